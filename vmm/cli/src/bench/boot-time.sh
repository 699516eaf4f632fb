#!/bin/sh
# Time to the first KVM_RUN with several ivshmem BARs passed through,
# inside the lab host: barge boots the same guest with every ivshmem
# device of the lab ($LAB_IVSHMEM0, $LAB_IVSHMEM1, ...) and 1 GiB of RAM,
# five ways one after the other, and reads from each report the time from
# process start to the first KVM_RUN (`start_to_first_run_ms`), its longest
# phase (`phases_ms`), the RAM DMA map's time (`dma.ms`) and, with
# p2p=background, when the last BAR's peer-to-peer map was done
# (`p2p.ready_after_first_run_ms`):
#
#   4k auto        anonymous 4 KiB RAM, BARs mapped for P2P before the guest runs
#   4k off         the same without P2P (only RAM is DMA-mapped)
#   4k background  the P2P maps on a thread while the guest boots
#   2m background  RAM on 2 MiB hugetlbfs pages, the P2P maps while the guest boots
#   1g auto        RAM on 1 GiB hugetlbfs pages, P2P before the guest runs
#   1g background  1 GiB pages and the P2P maps while the guest boots
#
# Run from the outer machine, on each host kernel (the set: six
# 4 GiB BARs and one of 16 GiB):
#
#   cargo build --workspace
#   target/debug/barge-lab run --ivshmem 4G --ivshmem 4G --ivshmem 4G \
#     --ivshmem 4G --ivshmem 4G --ivshmem 4G --ivshmem 16G --mem 8G \
#     --timeout 3000 --script vmm/cli/src/bench/boot-time.sh
#   (the same with --host-kernel 7.3)
#
# The table is printed and written to /out/boot-time.txt (copied back),
# with each row's ratio to the first. The times are emulation times:
# compare only ratios, within one run.

set -u
OUT=/out/boot-time.txt
HP=/sys/kernel/mm/hugepages
# 1 GiB first, while the host's memory is least fragmented.
echo 1 > $HP/hugepages-1048576kB/nr_hugepages
echo 512 > $HP/hugepages-2048kB/nr_hugepages
devices=""
count=0
for n in 0 1 2 3 4 5 6 7; do
  eval bdf=\${LAB_IVSHMEM$n:-}
  [ -n "$bdf" ] || continue
  devices="$devices $bdf"
  count=$((count + 1))
done
[ $count -gt 0 ] || { echo "no ivshmem device in the lab" >&2; exit 1; }

# field NAME KEY: the first number after "KEY": in /out/NAME.json.
field() {
  sed -n "s/.*\"$2\": *\(-\{0,1\}[0-9][0-9.]*\).*/\1/p" "/out/$1.json" | head -n 1
}

# run NAME HUGEPAGES P2P
run() {
  name=$1 pages=$2 p2p=$3
  memory=size=1G
  [ "$pages" = 2m ] && memory=size=1G,hugepages=2M
  [ "$pages" = 1g ] && memory=size=1G,hugepages=1G
  set --
  for bdf in $devices; do
    set -- "$@" --device "vfio=$bdf,p2p=$p2p"
  done
  barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
    --memory "$memory" "$@" --serial none --report "/out/$name.json" \
    --cmdline 'console=ttyS0 panic=-1 -- true' > /dev/null 2> "/out/$name.log"
  status=$?
  if [ $status -ne 0 ]; then
    printf '%-14s status %s: %s\n' "$pages $p2p" $status "$(tail -n 1 /out/$name.log)"
    return
  fi
  first=$(field "$name" start_to_first_run_ms)
  dma=$(sed -n '/"dma"/,$ s/.*"ms": *\([0-9.]*\).*/\1/p' "/out/$name.json" | head -n 1)
  # The phases object is one line; its largest value is the longest phase.
  longest=$(tr ',{}' '\n\n\n' < "/out/$name.json" | sed -n '/"phases_ms"/,/"memory"/p' |
    sed -n 's/.*"\([a-z_0-9]*\)": *\([0-9][0-9]*\)$/\2 \1/p' | sort -n | tail -n 1)
  ready=$(sed -n 's/.*"ready_after_first_run_ms": *\(-\{0,1\}[0-9][0-9.]*\).*/\1/p' "/out/$name.json" |
    sort -n | tail -n 1)
  [ -n "$base" ] || base=$first
  awk -v n="$pages $p2p" -v f="$first" -v b="$base" -v l="$longest" -v r="${ready:--}" \
    -v d="$dma" 'BEGIN { split(l, p, " ");
      printf "%-14s %8d %6.2fx %9.0f  %-22s %s\n", n, f, b / f, d, p[2] " " p[1], r }'
}

base=""
{
  echo "barge: time to the first KVM_RUN, $count ivshmem devices, 1 GiB guest RAM, host $(uname -r)"
  printf '%-14s %8s %7s %9s  %-22s %s\n' "ram p2p" first_ms speedup dma_ms "longest phase (ms)" \
    "p2p_ready_after_first_run_ms (last BAR)"
  run 4k-auto 4k auto
  run 4k-off 4k off
  run 4k-background 4k background
  run 2m-background 2m background
  run 1g-auto 1g auto
  run 1g-background 1g background
} | tee $OUT
