#!/bin/sh
# barge vs QEMU side by side, inside the lab host: the same guest kernel and
# initramfs, the same ivshmem BARs passed through with VFIO (every ivshmem
# device of the lab: $LAB_IVSHMEM0, $LAB_IVSHMEM1, ...), one VMM after the
# other. Per VMM: process start to the guest's GUEST-UP line; the VMM's
# resident memory at GUEST-UP (VmRSS; with hugetlbfs-backed guest RAM the
# kernel counts that RAM apart, in HugetlbPages, so VmRSS is the VMM's own
# memory, the "beyond guest RAM" figure; with anonymous RAM it includes the
# RAM the VMM touched); KVM's page counters for the VM at GUEST-UP
# (debugfs, the whole VM: RAM and BARs); vfio-pci's host faults by order
# over the whole run and per GiB of BAR (kprobe); the time spent in type1's
# DMA maps (kprobe and kretprobe on vfio_iommu_type1_ioctl, VFIO_IOMMU_MAP_DMA only) of guest RAM (IOVA
# below 4 GiB) and of the BARs (above), each summed over the run; the time
# to exit.
#
# MEM (default 2G) is the guest RAM; HUGEPAGES (default 1G; 2M, or none for
# anonymous RAM) backs it, for both VMMs: barge with --memory
# hugepages=..., QEMU with a hugetlb memory-backend-memfd. The lab host
# reserves the pages.
#
# Run from the outer machine (QEMU and its firmware are carried in with
# --bin, which puts each file in /usr/local/bin; -L points QEMU there), for
# the 8 x 8 GiB set:
#
#   cargo build --workspace
#   target/debug/barge-lab run --ivshmem 8G --ivshmem 8G --ivshmem 8G \
#     --ivshmem 8G --ivshmem 8G --ivshmem 8G --ivshmem 8G --ivshmem 8G \
#     --mem 8G --timeout 3000 \
#     --bin /usr/bin/qemu-system-x86_64 --bin /usr/share/seabios/bios-256k.bin \
#     --bin /usr/share/qemu/linuxboot_dma.bin --bin /usr/share/qemu/kvmvapic.bin \
#     --script vmm/cli/src/bench/compare-qemu.sh
#
# The table is printed and written to /out/compare.txt (copied back).

set -u
MEM=${MEM:-2G}
HUGEPAGES=${HUGEPAGES:-1G}
GUEST_CMD='true'
T=/sys/kernel/tracing
E=$T/events/barge_cmp/hf
HP=/sys/kernel/mm/hugepages
devices=""
count=0
for n in 0 1 2 3 4 5 6 7; do
  eval bdf=\${LAB_IVSHMEM$n:-}
  [ -n "$bdf" ] || continue
  devices="$devices $bdf"
  count=$((count + 1))
done
[ $count -gt 0 ] || { echo "no ivshmem device in the lab" >&2; exit 1; }
# GiB of BAR2 over all devices (sysfs resource2's size).
bar_gib=0
for bdf in $devices; do
  size=$(stat -c %s /sys/bus/pci/devices/$bdf/resource2)
  bar_gib=$((bar_gib + size / 1073741824))
done
case $MEM in
  *G) mem_mib=$((${MEM%G} * 1024)) ;;
  *M) mem_mib=${MEM%M} ;;
  *) echo "MEM=$MEM: give it in M or G" >&2; exit 1 ;;
esac
case $HUGEPAGES in
  1G) echo $((mem_mib / 1024)) > $HP/hugepages-1048576kB/nr_hugepages
      barge_mem="size=$MEM,hugepages=1G"
      qemu_mem="-object memory-backend-memfd,id=ram,size=$MEM,hugetlb=on,hugetlbsize=1G -machine memory-backend=ram" ;;
  2M) echo $((mem_mib / 2)) > $HP/hugepages-2048kB/nr_hugepages
      barge_mem="size=$MEM,hugepages=2M"
      qemu_mem="-object memory-backend-memfd,id=ram,size=$MEM,hugetlb=on,hugetlbsize=2M -machine memory-backend=ram" ;;
  *)  barge_mem="size=$MEM"
      qemu_mem="" ;;
esac
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

echo '-:barge_cmp/hf' >> $T/kprobe_events 2>/dev/null
if echo 'p:barge_cmp/hf vfio_pci_mmap_huge_fault order=%si:u32' >> $T/kprobe_events &&
   echo 'hist:keys=order' >> $E/trigger && echo 1 > $E/enable; then
  PROBE=1
else
  PROBE=0
  echo "no kprobe: host faults not counted" >&2
fi
# type1's map: VFIO_IOMMU_MAP_DMA (0x3b71) through vfio_iommu_type1_ioctl
# (iommu, cmd, arg), the map's iova at +16 of the user's struct; entry and
# return in the trace buffer.
M=$T/events/barge_cmp
echo '-:barge_cmp/map' >> $T/kprobe_events 2>/dev/null
echo '-:barge_cmp/mapret' >> $T/kprobe_events 2>/dev/null
if echo 'p:barge_cmp/map vfio_iommu_type1_ioctl cmd=%si:u32 iova=+u16(%dx):u64' >> $T/kprobe_events &&
   echo 'r:barge_cmp/mapret vfio_iommu_type1_ioctl' >> $T/kprobe_events &&
   echo 1 > $M/map/enable && echo 1 > $M/mapret/enable; then
  MAPS=1
  echo 16384 > $T/buffer_size_kb
else
  MAPS=0
  echo "no kprobe on vfio_iommu_type1_ioctl: DMA map times not measured" >&2
fi

now() { cut -d' ' -f1 /proc/uptime; }
nap() { usleep 10000 2>/dev/null || sleep 1; }
diff_s() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a - b }'; }

# faults: "1G:8 2M:0 4K:3" from the hist file.
faults() {
  [ $PROBE = 1 ] || { echo "-"; return; }
  awk '/^\{ order:/ { gsub(/[{}:]/, " "); o[$2] = $4 }
       END { printf "1G:%d 2M:%d 4K:%d", o[18], o[9], o[0] }' $E/hist
}

# per_gib: all host faults over the run per GiB of BAR.
per_gib() {
  [ $PROBE = 1 ] || { echo "-"; return; }
  awk -v g=$bar_gib '/^\{ order:/ { gsub(/[{}:]/, " "); n += $4 }
       END { printf "%.2f", n / g }' $E/hist
}

# map_ms: "RAM_MS BAR_MS", type1 map time summed over the run from the
# trace (entry and return paired per thread; VFIO_IOMMU_MAP_DMA only; IOVA
# below 4 GiB is RAM).
map_ms() {
  [ $MAPS = 1 ] || { echo "- -"; return; }
  awk '/ map: / { t = $0; sub(/:  *map:.*/, "", t); n = split(t, f, " ");
                  c = $0; sub(/.*cmd=/, "", c); sub(/ .*/, "", c);
                  v = $0; sub(/.*iova=/, "", v); sub(/ .*/, "", v);
                  start[$1] = f[n]; cmd[$1] = c + 0; iova[$1] = v + 0; next }
       / mapret: / { if (!($1 in start)) next; t = $0; sub(/:  *mapret:.*/, "", t);
                  n = split(t, f, " "); d = (f[n] - start[$1]) * 1000;
                  if (cmd[$1] == 15217) { if (iova[$1] < 4294967296) ram += d; else bar += d }
                  delete start[$1] }
       END { printf "%.0f %.0f", ram, bar }' $T/trace
}

# kvm_pages PID: the VM's pages_1g/2m/4k from debugfs (the first VM of PID).
kvm_pages() {
  for d in /sys/kernel/debug/kvm/$1-*; do
    [ -d "$d" ] || continue
    echo "1G:$(cat $d/pages_1g) 2M:$(cat $d/pages_2m) 4K:$(cat $d/pages_4k)"
    return
  done
  echo "-"
}

# measure NAME LOG COMMAND...: runs COMMAND in the background, waits for
# GUEST-UP in LOG, samples, waits for the exit; prints one table row.
measure() {
  name=$1; log=$2; shift 2
  : > "$log"
  [ $PROBE = 1 ] && echo 'hist:keys=order:clear' >> $E/trigger
  [ $MAPS = 1 ] && : > $T/trace
  start=$(now)
  "$@" > "/out/$name.stdout" 2> "/out/$name.stderr" &
  pid=$!
  while ! grep -q GUEST-UP "$log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || break
    nap
  done
  up=$(now)
  rss=$(awk '/^VmRSS/ { print $2 }' /proc/$pid/status 2>/dev/null)
  huge=$(awk '/^HugetlbPages/ { print $2 }' /proc/$pid/status 2>/dev/null)
  pages=$(kvm_pages $pid)
  wait $pid
  status=$?
  end=$(now)
  [ $MAPS = 1 ] && cp $T/trace "/out/$name.maps.trace"
  set -- $(map_ms)
  printf '%-6s %8s %8s %9s %9s  %-20s %-22s %7s %7s %7s %6s\n' "$name" "$(diff_s $up $start)" \
    "$(diff_s $end $start)" "${rss:--}" "${huge:--}" "$pages" "$(faults)" "$(per_gib)" \
    "$1" "$2" "$status"
}

qemu_devices=""
barge_devices=""
for bdf in $devices; do
  qemu_devices="$qemu_devices -device vfio-pci,host=$bdf"
  barge_devices="$barge_devices --device vfio=$bdf"
done

{
  echo "barge vs QEMU: guest $MEM ($HUGEPAGES pages), $count ivshmem devices ($bar_gib GiB of BARs) passed through, guest runs '$GUEST_CMD' and powers off; host $(uname -r)"
  printf '%-6s %8s %8s %9s %9s  %-20s %-22s %7s %7s %7s %6s\n' vmm up_s exit_s rss_kib \
    huge_kib kvm_pages_at_up host_faults per_gib ram_map bar_map status
  # shellcheck disable=SC2086
  measure barge /out/barge.log barge run --kernel /lab/guest/bzImage \
    --initramfs /lab/guest/initramfs --memory $barge_mem $barge_devices \
    --serial file=/out/barge.log --report /out/barge.json \
    --cmdline "console=ttyS0 panic=-1 -- $GUEST_CMD"
  # shellcheck disable=SC2086
  measure qemu /out/qemu.log qemu-system-x86_64 -L /usr/local/bin \
    -machine q35,accel=kvm -cpu host -smp 1 -m $MEM $qemu_mem -nodefaults -display none \
    -no-reboot -monitor none -serial file:/out/qemu.log \
    -kernel /lab/guest/bzImage -initrd /lab/guest/initramfs \
    -append "console=ttyS0 panic=-1 -- $GUEST_CMD" $qemu_devices
} | tee /out/compare.txt
echo "(ram_map, bar_map: ms in type1's VFIO_IOMMU_MAP_DMA over the run, for IOVAs below and above 4 GiB; barge's own report: dma.ms $(sed -n '/"dma"/,$ s/.*"ms": *\([0-9.]*\).*/\1/p' /out/barge.json | head -n 1))" |
  tee -a /out/compare.txt

# Fields: vmm up exit rss huge, kvm pages (3), host faults (3), per_gib,
# ram_map, bar_map, status.
awk 'NR > 2 && ($1 == "barge" || $1 == "qemu") { up[$1] = $2; rss[$1] = $4; g[$1] = $12; ram[$1] = $13 }
     END { if (up["qemu"] > 0 && rss["qemu"] > 0)
             printf "barge/QEMU: time to GUEST-UP %.2f, resident memory %.2f, RAM DMA map %s; host faults per GiB of BAR: barge %s, QEMU %s\n",
                    up["barge"] / up["qemu"], rss["barge"] / rss["qemu"],
                    (ram["qemu"] > 0 ? sprintf("%.2f", ram["barge"] / ram["qemu"]) : "-"), g["barge"], g["qemu"] }' \
  /out/compare.txt | tee -a /out/compare.txt

if [ $PROBE = 1 ]; then
  echo 0 > $E/enable
  echo '!hist:keys=order' >> $E/trigger
  echo '-:barge_cmp/hf' >> $T/kprobe_events
fi
if [ $MAPS = 1 ]; then
  echo 0 > $M/map/enable
  echo 0 > $M/mapret/enable
  echo '-:barge_cmp/map' >> $T/kprobe_events
  echo '-:barge_cmp/mapret' >> $T/kprobe_events
fi
