#!/bin/sh
# Guest RAM DMA-mapped for a passed-through device, by RAM backing, inside
# the lab host: barge boots the same guest with the same ivshmem device
# (p2p=off: only RAM is mapped) and RAM backed by 4 KiB pages (THP off),
# transparent huge pages, hugetlbfs 2 MiB and hugetlbfs 1 GiB pages, one
# after the other, and reads the time the RAM DMA map took from each
# report (`dma.ms`). Each backing runs three ways: RAM first touched by the
# DMA map (the default), and `prefault=on` (RAM populated before the DMA
# map) on every CPU of the lab host and on one (taskset), with the
# pre-fault's own time from barge's log. Where /dev/iommu exists the rows
# follow with --vfio-backend iommufd and shared=on (a memfd, which iommufd
# maps with IOMMU_IOAS_MAP_FILE from Linux 6.13 on).
#
# Run from the outer machine, on each host kernel:
#
#   cargo build --workspace
#   target/debug/barge-lab run --ivshmem 2M --mem 8G --timeout 3000 \
#     --script vmm/cli/src/bench/dma-map.sh
#   target/debug/barge-lab run --host-kernel 7.3 --iommufd --ivshmem 2M \
#     --mem 8G --timeout 3000 --script vmm/cli/src/bench/dma-map.sh
#
# The table is printed and written to /out/dma-map.txt (copied back): per
# backing the DMA map's time and rate on first touch and the ratio to the
# 4 KiB row; with prefault=on the pre-fault's time on all CPUs and on one,
# the DMA map's time after it, and the sum against the first-touch map.
# The times are emulation times: compare only ratios, within one run.

set -u
BDF=${LAB_IVSHMEM0:?no ivshmem device in the lab}
SIZE_MIB=2048
HP=/sys/kernel/mm/hugepages
THP=/sys/kernel/mm/transparent_hugepage/enabled
OUT=/out/dma-map.txt
CPUS=$(grep -c ^processor /proc/cpuinfo)

# 1 GiB pages first, while the host's memory is least fragmented.
echo $((SIZE_MIB / 1024)) > $HP/hugepages-1048576kB/nr_hugepages
got_1g=$(cat $HP/hugepages-1048576kB/nr_hugepages)

# run NAME BACKEND MEMORY-OPTIONS [taskset CPU]: prints "dma_ms prefault_ms
# method" (prefault_ms - without prefault=on), or "- - status-N" when barge
# failed.
run() {
  name=$1 backend=$2 opts=$3
  shift 3
  RUST_LOG=warn,vmm::builder=info "$@" barge run --kernel /lab/guest/bzImage \
    --initramfs /lab/guest/initramfs --memory "size=${SIZE_MIB}M$opts" \
    --vfio-backend "$backend" --device "vfio=$BDF,p2p=off" --serial none \
    --report "/out/$name.json" --cmdline 'console=ttyS0 panic=-1 -- true' \
    > /dev/null 2> "/out/$name.log"
  status=$?
  if [ $status -ne 0 ]; then
    echo "- - status-$status"
    return
  fi
  ms=$(sed -n '/"dma"/,$ s/.*"ms": \([0-9.]*\).*/\1/p' "/out/$name.json" | head -n 1)
  method=$(sed -n '/"dma"/,$ s/.*"method": "\([^"]*\)".*/\1/p' "/out/$name.json" | head -n 1)
  pre=$(sed -n 's/.*pre-faulted.* in \([0-9.]*\) ms.*/\1/p' "/out/$name.log" | head -n 1)
  awk -v ms="$ms" -v pre="${pre:--}" -v m="$method" \
    'BEGIN { if (pre == "-") printf "%.0f - %s\n", ms, m; else printf "%.0f %.0f %s\n", ms, pre, m }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.1fx", a / b; else print "-" }'; }

line() {
  printf '%-8s %-9s %-5s %9s %7s %7s %10s %10s %9s %9s  %s\n' "$@" | tee -a $OUT
}

# row BACKEND SHARED: the four backings for one backend.
row() {
  backend=$1 shared=$2 base=""
  for backing in 4k thp 2m 1g; do
    opts=$shared
    case $backing in
      4k) echo never > $THP ;;
      thp) echo always > $THP ;;
      2m) opts="$opts,hugepages=2M" ;;
      1g)
        if [ "$got_1g" -lt $((SIZE_MIB / 1024)) ]; then
          line "$backend" "${shared#,}" 1g - - - - - - - "only $got_1g 1 GiB pages"
          continue
        fi
        opts="$opts,hugepages=1G" ;;
    esac
    tag="$backend-${shared#,}-$backing"
    [ "$backing" = 2m ] && echo $((SIZE_MIB / 2)) > $HP/hugepages-2048kB/nr_hugepages
    set -- $(run "$tag" "$backend" "$opts")
    touch_ms=$1 method=$3
    set -- $(run "$tag-prefault" "$backend" "$opts,prefault=on")
    after_ms=$1 pre_ms=$2
    set -- $(run "$tag-prefault1" "$backend" "$opts,prefault=on" taskset -c 0)
    pre1_ms=$2
    [ "$backing" = 2m ] && echo 0 > $HP/hugepages-2048kB/nr_hugepages
    [ "$backing" = 4k ] && base=$touch_ms
    rate=$(awk -v ms="$touch_ms" -v mib=$SIZE_MIB 'BEGIN { if (ms > 0) printf "%.3f", mib / 1024 / (ms / 1000); else print "-" }')
    vs4k=-
    [ "$backing" != 4k ] && vs4k=$(ratio "$base" "$touch_ms")
    total=$(awk -v a="$pre_ms" -v b="$after_ms" 'BEGIN { print a + b }')
    line "$backend" "${shared#,}" "$backing" "$touch_ms" "$rate" "$vs4k" "$pre_ms" "$pre1_ms" \
      "$after_ms" "$(ratio "$touch_ms" "$total")" "$method; 1 CPU $(ratio "$pre1_ms" "$pre_ms") slower"
  done
}

: > $OUT
echo "kernel $(uname -r), guest RAM ${SIZE_MIB} MiB, $CPUS CPUs" | tee -a $OUT
line backend shared pages touch-ms GiB/s "vs 4k" "pre-ms" "pre-1cpu" "then-ms" "gain" method
row legacy ""
if [ -e /dev/iommu ]; then
  row iommufd ",shared=on"
fi
echo madvise > $THP
