#!/bin/sh
# barge vs QEMU side by side, inside the lab host: the same guest kernel and
# initramfs, the same ivshmem BAR passed through with VFIO, one VMM after the
# other. Per VMM: process start to the guest's GUEST-UP line, the VMM's
# resident memory at GUEST-UP (VmRSS: the VMM plus the guest RAM it touched;
# same guest, same RAM size, so the difference is the VMM), KVM's page
# counters for the VM at GUEST-UP (debugfs, the whole VM: RAM and BAR),
# vfio-pci's host faults by order over the whole run (kprobe), time to exit.
#
# Run from the outer machine (QEMU and its firmware are carried in with
# --bin, which puts each file in /usr/local/bin; -L points QEMU there):
#
#   cargo build --workspace
#   target/debug/barge-lab run --ivshmem 8G --timeout 1200 \
#     --bin /usr/bin/qemu-system-x86_64 --bin /usr/share/seabios/bios-256k.bin \
#     --bin /usr/share/qemu/linuxboot_dma.bin --bin /usr/share/qemu/kvmvapic.bin \
#     --script vmm/cli/src/bench/compare-qemu.sh
#
# The table is printed and written to /out/compare.txt (copied back).

set -u
BDF=${LAB_IVSHMEM0:?no ivshmem device in the lab}
MEM=512M
GUEST_CMD='true'
T=/sys/kernel/tracing
E=$T/events/barge_cmp/hf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

echo '-:barge_cmp/hf' >> $T/kprobe_events 2>/dev/null
if echo 'p:barge_cmp/hf vfio_pci_mmap_huge_fault order=%si:u32' >> $T/kprobe_events &&
   echo 'hist:keys=order' >> $E/trigger && echo 1 > $E/enable; then
  PROBE=1
else
  PROBE=0
  echo "no kprobe: host faults not counted" >&2
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
  start=$(now)
  "$@" > "/out/$name.stdout" 2> "/out/$name.stderr" &
  pid=$!
  while ! grep -q GUEST-UP "$log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || break
    nap
  done
  up=$(now)
  rss=$(awk '/^VmRSS/ { print $2 }' /proc/$pid/status 2>/dev/null)
  pages=$(kvm_pages $pid)
  wait $pid
  status=$?
  end=$(now)
  printf '%-6s %10s %10s %12s  %-22s %-22s %6s\n' "$name" "$(diff_s $up $start)" \
    "$(diff_s $end $start)" "${rss:--}" "$pages" "$(faults)" "$status"
}

{
  echo "barge vs QEMU: guest $MEM, ivshmem $BDF passed through, guest runs '$GUEST_CMD' and powers off"
  printf '%-6s %10s %10s %12s  %-22s %-22s %6s\n' vmm up_s exit_s rss_kib \
    kvm_pages_at_up host_faults status
  measure barge /out/barge.log barge run --kernel /lab/guest/bzImage \
    --initramfs /lab/guest/initramfs --memory size=$MEM --device vfio=$BDF \
    --serial file=/out/barge.log --cmdline "console=ttyS0 panic=-1 -- $GUEST_CMD"
  measure qemu /out/qemu.log qemu-system-x86_64 -L /usr/local/bin \
    -machine q35,accel=kvm -cpu host -smp 1 -m $MEM -nodefaults -display none \
    -no-reboot -monitor none -serial file:/out/qemu.log \
    -kernel /lab/guest/bzImage -initrd /lab/guest/initramfs \
    -append "console=ttyS0 panic=-1 -- $GUEST_CMD" \
    -device vfio-pci,host=$BDF
} | tee /out/compare.txt

awk 'NR > 2 { up[$1] = $2; rss[$1] = $4 }
     END { if (up["qemu"] > 0 && rss["qemu"] > 0)
             printf "barge/QEMU: time to GUEST-UP %.2f, resident memory %.2f\n",
                    up["barge"] / up["qemu"], rss["barge"] / rss["qemu"] }' \
  /out/compare.txt | tee -a /out/compare.txt

if [ $PROBE = 1 ]; then
  echo 0 > $E/enable
  echo '!hist:keys=order' >> $E/trigger
  echo '-:barge_cmp/hf' >> $T/kprobe_events
fi
