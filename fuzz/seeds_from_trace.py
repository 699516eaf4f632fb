#!/usr/bin/env python3
"""Turns a recorded guest access trace into seeds for the fuzz targets.

A trace is barge's log with `RUST_LOG=warn,vmm::vfio=info,barge::exit=trace`
(any filter that keeps `barge::exit` at trace): one line per port or MMIO
exit, after env_logger's prefix if any,

    [<timestamp> TRACE] exit KIND ADDR LEN DATA

KIND in|out|mmio-read|mmio-write, ADDR the port or guest physical address
(hex), LEN the byte count, DATA the bytes written or read in guest order as
hex, `-` when empty (vmm/src/exit.rs, `AccessTrace`). Other lines are
ignored, except barge's `vfio: <host BDF> is 00:NN.0 in the guest` line,
which names the passed-through device.

Each target gets the accesses it models, in its own encoding (src/lib.rs:
op byte = selector << 4 | width index << 1 | write, offset u32 LE, data),
with the selectors its doc comment states:

  exit_dispatch  every access: ports with selector 6 (raw port), ECAM with
                 selector 8, other MMIO below 4 GiB with 12 (raw address)
  pci_segment    0xCF8..0xCFF (selector 0) and ECAM (1; 9 = raw past bus 0)
  serial         0x3F8..0x3FF (selector 0); host input the guest read is
                 re-enqueued (selector 12) before the LSR read that saw it
  acpi_pm        0x3C0 (selector 0) and the i8042 0x60..0x64 (selector 1)
  vfio_device    config accesses (CF8/CFC or ECAM) to the passed-through
                 device, at their config offsets (selector 0), and MMIO/port
                 accesses inside its BARs (selector 4 + BAR); first byte 1
                 (interrupts wired, as `barge run` does). Needs the `vfio:`
                 line or --vfio-device. The fuzz target's device is the
                 fake GPU, not the lab's device: header and BAR accesses
                 mean the same there, capability bodies do not (they land on
                 whatever the fake has at that offset), and MSI-X table/PBA
                 accesses are moved to the fake's table (BAR0 0xb90000) and
                 PBA (BAR0 0xba0000) when the trace shows the device's
                 MSI-X capability.

Reads are replayed as reads of the same width (the recorded data is only
used to follow the guest's view: CONFIG_ADDRESS, BARs, capabilities, LSR).
Accesses of a length other than 1..8 (string port I/O) become byte accesses,
which is how barge replays them. Output: corpus-seeds/<target>/lab-<name>-<n>,
consecutive chunks of at most --max-size bytes (default 4096, libFuzzer's
default -max_len), at most --max-files per target (default 8: the first, the
last, and those bringing the most accesses not yet in the picked ones) so
the committed seeds stay small.

    python3 seeds_from_trace.py [--name NAME] [--vfio-device N] TRACE...

Run from fuzz/. Standard library only.
"""
import argparse
import collections
import os
import re
import struct
import sys

WIDTHS = [1, 2, 4, 8, 3, 5, 6, 7]

# arch/src/layout.rs and vmm/src/pci.rs
COM1_PORT, COM1_PORT_COUNT = 0x3F8, 8
ACPI_SLEEP_CONTROL_PORT, ACPI_REGISTER_SIZE = 0x3C0, 1
I8042_DATA_PORT, I8042_REGISTER_SPAN = 0x60, 5
PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT = 0xCF8, 8
PCIE_ECAM_START, PCIE_ECAM_SIZE = 0xE000_0000, 0x1000_0000
ECAM_DECODED_SIZE = 1 << 20
CONFIG_ADDRESS_MASK = 0x80FF_FFFC
# devices/src/vfio/fake.rs, FakeVfioDevice::gpu_like()
FAKE_MSIX_TABLE = (0, 0xB9_0000)
FAKE_MSIX_PBA = (0, 0xBA_0000)

EXIT_RE = re.compile(
    r"exit (in|out|mmio-read|mmio-write) (0x[0-9a-fA-F]+) (\d+) ([0-9a-fA-F]+|-)(?=\s|$)")
VFIO_RE = re.compile(r"vfio: \S+ is 00:([0-9a-fA-F]{2})\.0 in the guest")

Access = collections.namedtuple("Access", "kind addr data")  # data: bytes (read: what came back)


def parse(path):
    """Accesses in the trace, and the guest device number of the VFIO device."""
    accesses, vfio_device = [], None
    with open(path, errors="replace") as f:
        for line in f:
            m = EXIT_RE.search(line)
            if m:
                kind, addr, length, data = m.group(1), int(m.group(2), 16), int(m.group(3)), m.group(4)
                data = b"" if data == "-" else bytes.fromhex(data)
                if len(data) != length:
                    continue  # a cut line
                accesses.append(Access(kind, addr, data))
                continue
            m = VFIO_RE.search(line)
            if m:
                vfio_device = int(m.group(1), 16)
    return accesses, vfio_device


def op(selector, offset, width, data=None):
    """One encoded access; widths outside WIDTHS must be split first."""
    write = data is not None
    out = bytes([selector << 4 | WIDTHS.index(width) << 1 | int(write)]) + struct.pack(
        "<I", offset & 0xFFFF_FFFF)
    return out + (data if write else b"")


def encode(selector, offset, access, port_io):
    """`access` at `offset` under `selector`; string I/O split into bytes."""
    write = access.kind in ("out", "mmio-write")
    n = len(access.data)
    if n == 0:
        return []
    if n <= 8:
        return [op(selector, offset, n, access.data if write else None)]
    if not port_io:
        return []  # KVM reports at most 8 bytes of MMIO
    return [op(selector, offset, 1, access.data[i:i + 1] if write else None) for i in range(n)]


def is_port(access):
    return access.kind in ("in", "out")


def is_write(access):
    return access.kind in ("out", "mmio-write")


def le(data):
    return int.from_bytes(data, "little")


class ConfigTracker:
    """Follows CONFIG_ADDRESS and turns config accesses into (bus, dev, fn, reg)."""

    def __init__(self):
        self.config_address = 0

    def decode(self, access):
        """(bus, device, function, register) of a config access, else None."""
        if is_port(access) and PCI_CONFIG_PORT <= access.addr < PCI_CONFIG_PORT + PCI_CONFIG_PORT_COUNT:
            offset = access.addr - PCI_CONFIG_PORT
            if offset == 0 and len(access.data) == 4:
                if is_write(access):
                    self.config_address = le(access.data) & CONFIG_ADDRESS_MASK
                return None
            if offset < 4 or not self.config_address & 0x8000_0000:
                return None
            a = self.config_address
            return ((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7, (a & 0xFC) + offset - 4)
        if not is_port(access) and PCIE_ECAM_START <= access.addr < PCIE_ECAM_START + PCIE_ECAM_SIZE:
            o = access.addr - PCIE_ECAM_START
            return ((o >> 20) & 0xFF, (o >> 15) & 0x1F, (o >> 12) & 7, o & 0xFFF)
        return None


def exit_dispatch(trace, _vfio):
    out, skipped = [], 0
    for a in trace:
        if is_port(a):
            out += encode(6, a.addr, a, True)
        elif PCIE_ECAM_START <= a.addr < PCIE_ECAM_START + ECAM_DECODED_SIZE + 0x1000:
            out += encode(8, a.addr - PCIE_ECAM_START, a, False)
        elif a.addr < 1 << 32:
            out += encode(12, a.addr, a, False)
        elif a.addr >= (1 << 64) - (1 << 32):
            out += encode(13, (1 << 64) - 1 - a.addr, a, False)
        else:
            skipped += 1  # 64-bit MMIO: only the VFIO BAR traps live there
    return out, skipped


def pci_segment(trace, _vfio):
    out = []
    for a in trace:
        if is_port(a) and PCI_CONFIG_PORT <= a.addr < PCI_CONFIG_PORT + PCI_CONFIG_PORT_COUNT:
            out += encode(0, a.addr - PCI_CONFIG_PORT, a, True)
        elif not is_port(a) and PCIE_ECAM_START <= a.addr < PCIE_ECAM_START + PCIE_ECAM_SIZE:
            offset = a.addr - PCIE_ECAM_START
            out += encode(1 if offset < ECAM_DECODED_SIZE + 0x1000 else 9, offset, a, False)
    return out, 0


def acpi_pm(trace, _vfio):
    out = []
    for a in trace:
        if not is_port(a):
            continue
        if ACPI_SLEEP_CONTROL_PORT <= a.addr < ACPI_SLEEP_CONTROL_PORT + ACPI_REGISTER_SIZE:
            out += encode(0, a.addr - ACPI_SLEEP_CONTROL_PORT, a, True)
        elif I8042_DATA_PORT <= a.addr < I8042_DATA_PORT + I8042_REGISTER_SPAN:
            out += encode(1, a.addr - I8042_DATA_PORT, a, True)
    return out, 0


def serial(trace, _vfio):
    """COM1 accesses; input the guest read is enqueued before it is seen.

    The model's receive FIFO starts empty in the replay, so every byte the
    guest read from RBR after LSR said "data ready" is enqueued (selector
    12) just before that LSR read. Loopback writes fill the FIFO themselves.
    """
    com1 = [a for a in trace if is_port(a) and COM1_PORT <= a.addr < COM1_PORT + COM1_PORT_COUNT]
    lcr, mcr = 0, 0
    # First pass: which RBR reads return input (DLAB clear, not loopback).
    rbr_input = {}
    pending_loop = 0
    for i, a in enumerate(com1):
        reg = a.addr - COM1_PORT
        if is_write(a) and len(a.data) == 1:
            if reg == 3:
                lcr = a.data[0]
            elif reg == 4:
                mcr = a.data[0]
            elif reg == 0 and not lcr & 0x80 and mcr & 0x10:
                pending_loop += 1
        elif not is_write(a) and reg == 0 and len(a.data) == 1 and not lcr & 0x80:
            if pending_loop:
                pending_loop -= 1
            else:
                rbr_input[i] = a.data[0]
    # Second pass: emit, enqueueing each input byte before the LSR read that saw it.
    out, enqueued, lcr = [], 0, 0
    for i, a in enumerate(com1):
        reg = a.addr - COM1_PORT
        if is_write(a) and reg == 3 and len(a.data) == 1:
            lcr = a.data[0]
        sees_data = (not is_write(a) and reg == 5 and len(a.data) == 1 and a.data[0] & 1
                     and not lcr & 0x80)
        if sees_data and enqueued == 0:
            # The input bytes the guest reads before LSR next says empty.
            batch = []
            for j in range(i + 1, len(com1)):
                b = com1[j]
                if b.addr - COM1_PORT == 5 and not is_write(b) and len(b.data) == 1 and not b.data[0] & 1:
                    break
                if j in rbr_input:
                    batch.append(rbr_input[j])
                if len(batch) == 8:
                    break
            if batch:
                out.append(op(12, 0, len(batch), bytes(batch)))
                enqueued = len(batch)
        if i in rbr_input and enqueued:
            enqueued -= 1
        out += encode(0, reg, a, True)
    return out, 0


class VfioView:
    """The passed-through device's config space as the guest saw it."""

    def __init__(self):
        self.config = {}  # offset -> byte, from reads and writes
        self.sizing = set()  # BAR registers last written with all ones
        self.size_mask = {}  # BAR register -> mask read back after all ones

    def dword(self, reg):
        return le(bytes(self.config.get(reg + i, 0) for i in range(4)))

    def access(self, reg, a):
        data = a.data
        for i, b in enumerate(data):
            self.config[reg + i] = b
        if 0x10 <= reg < 0x28 and reg % 4 == 0 and len(data) == 4:
            if is_write(a):
                if le(data) == 0xFFFF_FFFF:
                    self.sizing.add(reg)
                else:
                    self.sizing.discard(reg)
            elif reg in self.sizing:
                self.size_mask[reg] = le(data)

    def bars(self):
        """[(index, kind 'mem'|'io', base, size)] for BARs whose size was seen."""
        out, index = [], 0
        while index < 6:
            reg = 0x10 + 4 * index
            low = self.dword(reg)
            mask = self.size_mask.get(reg)
            if low & 1:
                if mask:
                    out.append((index, "io", low & ~3, ((~(mask & ~3)) & 0xFFFF) + 1))
                index += 1
                continue
            wide = (low >> 1) & 3 == 2
            base = low & ~0xF
            size = None
            if mask:
                size = ((~(mask & ~0xF)) & 0xFFFF_FFFF) + 1
            if wide:
                high = self.dword(reg + 4)
                high_mask = self.size_mask.get(reg + 4)
                base |= high << 32
                if mask is not None and high_mask is not None:
                    size = ((~((high_mask << 32) | (mask & ~0xF))) & (1 << 64) - 1) + 1
            if size and base:
                out.append((index, "mem", base, size))
            index += 2 if wide else 1
        return out

    def msix(self):
        """((table BAR, offset, size), (PBA BAR, offset, size)) or None."""
        pointer, seen = self.config.get(0x34, 0) & 0xFC, set()
        while pointer and pointer not in seen and pointer in self.config:
            seen.add(pointer)
            if self.config.get(pointer) == 0x11 and pointer + 8 in self.config:
                control = le(bytes([self.config.get(pointer + 2, 0), self.config.get(pointer + 3, 0)]))
                vectors = (control & 0x7FF) + 1
                table, pba = self.dword(pointer + 4), self.dword(pointer + 8)
                return ((table & 7, table & ~7, vectors * 16),
                        (pba & 7, pba & ~7, (vectors + 63) // 64 * 8))
            pointer = self.config.get(pointer + 1, 0) & 0xFC
        return None


def vfio_device(trace, vfio):
    if vfio is None:
        return None, 0
    tracker, view, out, skipped = ConfigTracker(), VfioView(), [bytes([1])], 0
    for a in trace:
        decoded = tracker.decode(a)
        if decoded is not None:
            bus, dev, fn, reg = decoded
            if (bus, dev, fn) == (0, vfio, 0) and reg < 0x1000:
                view.access(reg, a)
                out += encode(0, reg, a, is_port(a))
            continue
        for index, kind, base, size in view.bars():
            if (kind == "io") != is_port(a) or not base <= a.addr < base + size:
                continue
            offset, selector = a.addr - base, 4 + index
            msix = view.msix()
            for (bar, start, length), (fake_bar, fake_start) in zip(
                    msix or (), (FAKE_MSIX_TABLE, FAKE_MSIX_PBA)):
                if bar == index and start <= offset < start + length:
                    selector, offset = 4 + fake_bar, fake_start + offset - start
                    break
            if offset >= 1 << 32:
                skipped += 1
            else:
                out += encode(selector, offset, a, is_port(a))
            break
    return out, skipped


TARGETS = {
    "exit_dispatch": exit_dispatch,
    "pci_segment": pci_segment,
    "serial": serial,
    "acpi_pm": acpi_pm,
    "vfio_device": vfio_device,
}


def chunks(encoded, max_size, header=b""):
    """Consecutive runs of whole accesses, each at most max_size bytes."""
    out, current = [], header
    for access in encoded:
        if len(current) + len(access) > max_size and len(current) > len(header):
            out.append(current)
            current = header
        current += access
    if len(current) > len(header):
        out.append(current)
    return out


def keys(chunk, header):
    """The distinct (op, offset) pairs of a chunk's accesses."""
    out, data = set(), chunk[len(header):]
    while len(data) >= 5:
        code, offset = data[0], data[1:5]
        out.add((code, offset))
        data = data[5 + (WIDTHS[(code >> 1) & 7] if code & 1 else 0):]
    return out


def pick(files, count, header):
    """At most `count` chunks, in trace order: the first and the last, then
    greedily those with the most (op, offset) pairs not yet picked."""
    if len(files) <= count:
        return files
    chosen = {0, len(files) - 1} if count > 1 else {0}
    seen = set().union(*(keys(files[i], header) for i in chosen))
    while len(chosen) < count:
        gain, best = max((len(keys(f, header) - seen), i) for i, f in enumerate(files)
                         if i not in chosen)
        if gain == 0:
            break
        chosen.add(best)
        seen |= keys(files[best], header)
    return [files[i] for i in sorted(chosen)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--name", help="seed name (default: the trace file's stem)")
    parser.add_argument("--vfio-device", type=lambda s: int(s, 0),
                        help="guest device number of the passed-through device on bus 0 "
                             "(default: from the trace's `vfio: ... is 00:NN.0` line)")
    parser.add_argument("--out", default="corpus-seeds")
    parser.add_argument("--max-size", type=int, default=4096)
    parser.add_argument("--max-files", type=int, default=8)
    args = parser.parse_args()
    for path in args.traces:
        name = args.name or os.path.splitext(os.path.basename(path))[0]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
        trace, vfio = parse(path)
        if args.vfio_device is not None:
            vfio = args.vfio_device
        kinds = collections.Counter(a.kind for a in trace)
        print(f"{path}: {len(trace)} accesses {dict(kinds)}, vfio device: "
              f"{'none' if vfio is None else f'00:{vfio:02x}.0'}")
        for target, convert in TARGETS.items():
            encoded, skipped = convert(trace, vfio)
            if encoded is None:
                print(f"  {target}: skipped (no passed-through device named)")
                continue
            header = b""
            if target == "vfio_device":
                header, encoded = encoded[0], encoded[1:]
            files = chunks(encoded, args.max_size, header)
            kept = pick(files, args.max_files, header)
            os.makedirs(f"{args.out}/{target}", exist_ok=True)
            for n, data in enumerate(kept):
                with open(f"{args.out}/{target}/lab-{name}-{n}", "wb") as f:
                    f.write(data)
            print(f"  {target}: {len(encoded)} accesses in {len(files)} chunks, "
                  f"{len(kept)} written ({sum(map(len, kept))} bytes)"
                  + (f", {skipped} not encodable" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
