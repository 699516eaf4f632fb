#!/usr/bin/env python3
"""Writes the hand-made seed inputs under corpus-seeds/<target>/.

Encoding (fuzz/src/lib.rs): op byte = selector << 4 | width_index << 1 | write,
offset u32 LE, then `width` data bytes for writes. Run from fuzz/.
"""
import os
import struct

WIDTHS = [1, 2, 4, 8, 3, 5, 6, 7]


def rd(sel, off, width):
    return bytes([sel << 4 | WIDTHS.index(width) << 1]) + struct.pack("<I", off)


def wr(sel, off, width, value):
    return (bytes([sel << 4 | WIDTHS.index(width) << 1 | 1]) + struct.pack("<I", off)
            + (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))


def cf8(bus_dev_fn_reg):
    return 0x8000_0000 | bus_dev_fn_reg


def bdf(dev, reg, fn=0):
    return dev << 11 | fn << 8 | reg


def ecam(dev, reg, fn=0):
    return dev << 15 | fn << 12 | reg


# virtio_blk: a setup byte, then guest memory (fuzz_targets/virtio_blk.rs):
# descriptor table at 0, avail ring at 0x100, used ring at 0x200, buffers
# above. Descriptor flags: NEXT 1, WRITE 2, INDIRECT 4.
BLK_EVENT_IDX, BLK_RO, BLK_FLUSH, BLK_DISCARD, BLK_WZ, BLK_FAIL = 1, 2, 4, 8, 16, 32
BLK_QUEUE_16 = 3 << 6


def blk_desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def blk_header(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


def blk_image(setup, descriptors, heads, buffers):
    """descriptors: table entries from index 0; heads: the avail ring;
    buffers: {address: bytes}. Trailing zeroes are left out (the target's
    memory starts zeroed), so a seed stays under 4 KiB."""
    memory = bytearray(0x1000 - 1)
    table = b"".join(descriptors)
    memory[:len(table)] = table
    memory[0x100:0x104] = struct.pack("<HH", 0, len(heads))
    for i, head in enumerate(heads):
        memory[0x104 + 2 * i:0x106 + 2 * i] = struct.pack("<H", head)
    for address, data in buffers.items():
        memory[address:address + len(data)] = data
    return bytes([setup]) + bytes(memory).rstrip(b"\0")


def net_desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def net_input(setup, placed, ops):
    """A virtio_net input: the setup byte, the first 0x800 bytes of guest
    RAM (`placed`: {address: bytes}), then the operation bytes."""
    ram = bytearray(0x800)
    for addr, data in placed.items():
        ram[addr:addr + len(data)] = data
    return bytes([setup]) + bytes(ram) + bytes(ops)


# virtio_net: 16-entry queues; RX rings at 0x000/0x100/0x200, TX at
# 0x400/0x500/0x600; VRING_DESC_F_NEXT = 1, VRING_DESC_F_WRITE = 2.
NET_TX_AND_RX = {
    0x000: net_desc(0x2000, 1530, 2, 0),
    0x100: struct.pack("<HHH", 0, 1, 0),
    0x400: net_desc(0x700, 12, 1, 1) + net_desc(0x740, 60, 0, 0),
    0x500: struct.pack("<HHH", 0, 1, 0),
    0x740: bytes(range(60)),
}
# TX chain 0 loops (0 -> 1 -> 0); TX chain 2 has a writable descriptor; RX
# chain 0 is readable, RX chain 1 points outside RAM.
NET_MALFORMED = {
    0x000: net_desc(0x2000, 1530, 0, 0) + net_desc(0xffff_0000, 1530, 2, 0),
    0x100: struct.pack("<HHHH", 0, 2, 0, 1),
    0x400: net_desc(0x700, 12, 1, 1) + net_desc(0x740, 60, 1, 0)
    + net_desc(0x700, 12, 1, 3) + net_desc(0x740, 60, 2, 0),
    0x500: struct.pack("<HHHH", 0, 2, 0, 2),
}


# virtio_pci: selector 0 BAR 0 (common configuration at 0, ISR 0x1000,
# device configuration 0x2000, notify 0x3000, MSI-X table 0x4000, PBA
# 0x5000), 8 configuration space, 12 the device signals queue `offset`, 13
# it signals a configuration change, 14 the VMM resets the function.
VP_BAR, VP_CFG, VP_QUEUE_IRQ, VP_CONFIG_IRQ, VP_VMM_RESET = 0, 8, 12, 13, 14
VP_STATUS = 0x14
VP_ACK, VP_DRIVER, VP_DRIVER_OK, VP_FEATURES_OK, VP_NEEDS_RESET, VP_FAILED = 1, 2, 4, 8, 64, 128


def vp_status(value):
    return wr(VP_BAR, VP_STATUS, 1, value) + rd(VP_BAR, VP_STATUS, 1)


def vp_features(low, high):
    """Reads both device feature words, writes both driver ones."""
    return b"".join([wr(VP_BAR, 0x00, 4, 0), rd(VP_BAR, 0x04, 4), wr(VP_BAR, 0x00, 4, 1),
                     rd(VP_BAR, 0x04, 4), wr(VP_BAR, 0x08, 4, 0), wr(VP_BAR, 0x0c, 4, low),
                     wr(VP_BAR, 0x08, 4, 1), wr(VP_BAR, 0x0c, 4, high)])


def vp_queue(index, size, desc, vector):
    """Linux's vp_modern setup of one queue: rings after the descriptor
    table, 64-bit addresses as two 32-bit halves."""
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3
    return b"".join(
        [wr(VP_BAR, 0x16, 2, index), rd(VP_BAR, 0x18, 2), wr(VP_BAR, 0x18, 2, size),
         rd(VP_BAR, 0x1e, 2)]
        + [wr(VP_BAR, reg + half, 4, (addr >> (32 * half // 4)) & 0xffff_ffff)
           for reg, addr in ((0x20, desc), (0x28, avail), (0x30, used)) for half in (0, 4)]
        + [wr(VP_BAR, 0x1a, 2, vector), rd(VP_BAR, 0x1a, 2), wr(VP_BAR, 0x1c, 2, 1)])


def vp_msix_entry(vector, data, masked=0):
    entry = 0x4000 + 16 * vector
    return b"".join([wr(VP_BAR, entry, 4, 0xfee0_0000), wr(VP_BAR, entry + 4, 4, 0),
                     wr(VP_BAR, entry + 8, 4, data), wr(VP_BAR, entry + 12, 4, masked)])


# Enumeration: IDs, class, BAR 0 sizing, the capability list (MSI-X at
# 0x40, the virtio vendor capabilities at 0x50..0x80), memory decode on.
VP_ENUMERATE = b"".join(
    [rd(VP_CFG, 0, 4), rd(VP_CFG, 8, 4), rd(VP_CFG, 0x2c, 4), rd(VP_CFG, 6, 2),
     rd(VP_CFG, 0x34, 1), wr(VP_CFG, 0x10, 4, 0xffff_ffff), rd(VP_CFG, 0x10, 4),
     wr(VP_CFG, 0x10, 4, 0xe000_0000)]
    + [rd(VP_CFG, cap + i, 4) for cap in (0x40, 0x50, 0x60, 0x70, 0x80) for i in (0, 4, 8, 12)]
    + [rd(VP_CFG, 0x90, 4), wr(VP_CFG, 4, 2, 0x0006)])

# Feature words Linux accepts on this fake: its own bit 6, INDIRECT_DESC
# (28), EVENT_IDX (29); VERSION_1 is bit 0 of the high word.
VP_LOW, VP_HIGH = 1 << 6 | 1 << 28 | 1 << 29, 1


SEEDS = {
    "pci_segment": {
        # Linux's pci_direct probe, then a BAR sizing dance on 00:01.0 over CF8/CFC.
        "cf8_probe_and_size_bar": b"".join([
            wr(0, 0, 4, cf8(bdf(0, 0))), rd(0, 4, 4),
            wr(0, 0, 4, cf8(bdf(1, 0x10))), rd(0, 4, 4),
            wr(0, 4, 4, 0xffff_ffff), rd(0, 4, 4),
            wr(0, 0, 4, cf8(bdf(1, 0x18))), wr(0, 4, 4, 0xffff_ffff), rd(0, 4, 4),
            wr(0, 0, 4, cf8(bdf(1, 0x1c))), wr(0, 4, 4, 0xffff_ffff), rd(0, 4, 4),
            wr(0, 0, 4, cf8(bdf(1, 0x04))), wr(0, 4, 2, 0x0007), rd(0, 6, 2),
        ]),
        # ECAM: read every device's ID, then the endpoint's BARs and command register.
        "ecam_enumerate": b"".join(
            [rd(1, ecam(d, 0), 4) for d in range(4)]
            + [wr(1, ecam(1, 0x10 + 4 * i), 4, 0xffff_ffff) for i in range(6)]
            + [rd(1, ecam(1, 0x10 + 4 * i), 4) for i in range(6)]
            + [wr(1, ecam(1, 4), 2, 6), rd(1, ecam(2, 0x100), 4), rd(1, ecam(1, 0xffc), 4)]),
        "odd_widths": b"".join([rd(0, 1, 2), wr(0, 3, 2, 0x1234), rd(0, 5, 3), rd(1, 0xffe, 4),
                                wr(1, ecam(1, 0x3f), 8, -1), rd(8, 0xcf8, 4)]),
    },
    "vfio_device": {
        # Interrupts wired: enable MSI-X, program vector 0 (BAR0 0xb90000), fire it.
        "msix_enable_and_fire": bytes([1]) + b"".join([
            wr(0, 0xb6, 2, 0x8000 | 31), wr(4, 0xb9_0000, 8, 0xfee0_0000),
            wr(4, 0xb9_0008, 4, 0x41), wr(4, 0xb9_000c, 4, 0), rd(4, 0xba_0000, 8),
            wr(12, 0, 1, 0), wr(0, 0xb6, 2, 0xc000 | 31), wr(12, 0, 1, 0),
            wr(4, 0xb9_000c, 4, 1), rd(4, 0xb9_01f0, 4), wr(14, 0, 1, 0)]),
        # MSI: 64-bit address, data, enable; fire; disable.
        "msi_enable_and_fire": bytes([1]) + b"".join([
            wr(0, 0x6c, 4, 0xfee0_0000), wr(0, 0x70, 4, 0), wr(0, 0x74, 2, 0x42),
            wr(0, 0x6a, 2, 1), rd(0, 0x68, 4), wr(13, 0, 1, 0), wr(0, 0x6a, 2, 0)]),
        # BAR sizing, command register toggles, hidden capabilities, I/O BAR.
        "bars_command_hidden": bytes([0]) + b"".join(
            [wr(0, 0x10 + 4 * i, 4, 0xffff_ffff) for i in range(6)]
            + [rd(0, 0x10 + 4 * i, 4) for i in range(6)]
            + [wr(0, 0x30, 4, 0xffff_f800), rd(0, 0x30, 4), wr(0, 4, 2, 0), wr(0, 4, 2, 7),
               rd(0, 0x250, 4), rd(0, 0x254, 4), rd(0, 0xbb0, 4), wr(0, 0xbb4, 4, 0),
               rd(9, 0, 4), wr(9, 0x7c, 4, 1), rd(5, 1 << 31, 8), rd(10, 0, 4), rd(15, 0xffff, 2)]),
    },
    "msix": {
        "program_enable_trigger": struct.pack("<H", 32) + b"".join([
            wr(0, 0, 8, 0xfee0_0000), wr(0, 8, 4, 0x30), wr(0, 12, 4, 0),
            wr(3, 0, 2, 0x8000), wr(4, 0, 1, 0), rd(2, 0, 8), wr(3, 0, 2, 0xc000),
            wr(4, 0, 1, 0), wr(3, 0, 2, 0x8000), rd(2, 0, 8), wr(0, 31 * 16 + 12, 4, 0),
            wr(4, 31, 1, 0), rd(0, 31 * 16, 8), wr(5, 0, 1, 0)]),
        "odd_sizes": struct.pack("<H", 2048) + b"".join([
            rd(0, 3, 2), wr(0, 6, 4, 0xdead_beef), rd(0, 2047 * 16 + 12, 8), rd(2, 255, 4),
            wr(2, 0, 8, -1), wr(0, 1, 3, 0x123456), wr(4, 4096, 1, 0), rd(8, 0xffff_fff0, 8)]),
        "one_vector": struct.pack("<H", 1) + b"".join([wr(0, 12, 4, 0), wr(3, 0, 2, 0x8000),
                                                       wr(4, 0, 1, 0), rd(2, 0, 8)]),
    },
    "msi": {
        # 64-bit, per-vector masking, 32 vectors capable, at 0x50.
        "pvm64_multi": bytes([0x50]) + struct.pack("<H", 0x01 << 8 | 0x80 | 0x0a) + b"".join([
            wr(0, 12, 4, 0xfee0_0000), wr(0, 16, 4, 0), wr(0, 20, 2, 0x40),
            wr(0, 10, 2, 0x51), rd(0, 8, 4), wr(0, 24, 4, 0x2), wr(3, 1, 1, 0), rd(0, 28, 4),
            wr(0, 24, 4, 0), rd(0, 28, 4), wr(3, 31, 1, 0)]),
        "plain32": bytes([0x40]) + struct.pack("<H", 0) + b"".join([
            wr(0, 12, 4, 0xfee0_0000), wr(0, 16, 2, 0x30), wr(0, 10, 2, 1),
            wr(3, 0, 1, 0), rd(0, 8, 8), wr(0, 9, 3, 0xffffff), rd(8, 0xffff, 2)]),
    },
    "acpi_pm": {
        "poweroff_and_reset": b"".join([rd(0, 0, 1), wr(0, 0, 1, 0x80), wr(0, 0, 1, 0x34),
                                        wr(0, 0, 1, 0x01), rd(1, 4, 1), wr(1, 4, 1, 0xfe),
                                        wr(1, 0, 1, 0xfe), wr(0, 0, 2, 0x34)]),
        "odd": b"".join([wr(0, 1, 1, 0x34), wr(0, 0, 4, 0x34), rd(1, 4, 2), wr(9, 0xffff_ffff, 8, -1)]),
    },
    "serial": {
        # Linux 8250 probe and console setup: scratch test, DLAB + divisor 1
        # (115200), 8N1, FIFO on, DTR/RTS/OUT2, THRE interrupt, a line out.
        "linux_console_init": b"".join([
            wr(0, 7, 1, 0xa5), rd(0, 7, 1), wr(0, 7, 1, 0x5a), rd(0, 7, 1),
            wr(0, 3, 1, 0x80), wr(0, 0, 1, 0x01), wr(0, 1, 1, 0x00), rd(0, 0, 1), rd(0, 1, 1),
            wr(0, 3, 1, 0x03), wr(0, 2, 1, 0xc7), rd(0, 2, 1), wr(0, 4, 1, 0x0b),
            wr(0, 1, 1, 0x02), rd(0, 2, 1), rd(0, 5, 1), rd(0, 6, 1)]
            + [b"".join([rd(0, 5, 1), wr(0, 0, 1, c)]) for c in b"Linux\r\n"]
            + [wr(0, 1, 1, 0x00), rd(0, 2, 1)]),
        # MCR loopback (what autoconfig checks): THR bytes come back on RBR, the
        # modem outputs come back on MSR; then back to normal.
        "mcr_loopback": b"".join([
            wr(0, 4, 1, 0x10), rd(0, 6, 1), wr(0, 4, 1, 0x1f), rd(0, 6, 1),
            wr(0, 1, 1, 0x01), wr(0, 0, 1, 0x55), rd(0, 5, 1), rd(0, 2, 1), rd(0, 0, 1),
            rd(0, 5, 1), wr(12, 0, 2, 0x4142)]
            + [wr(0, 0, 1, i) for i in range(70)]
            + [rd(0, 0, 1), wr(0, 4, 1, 0x03), rd(0, 6, 1)]),
        # Host input with the receive interrupt on: IIR, LSR.DR, RBR until empty;
        # then a FIFO overflow, the IRQ drained, IER re-enabled with data pending.
        "input_interrupts": b"".join(
            [wr(0, 1, 1, 0x01), wr(12, 0, 5, int.from_bytes(b"hello", "little")),
             rd(0, 2, 1), rd(0, 5, 1)]
            + [rd(0, 0, 1) for _ in range(6)]
            + [rd(0, 5, 1), rd(12, 79, 1), rd(13, 30, 1), rd(0, 5, 1), rd(14, 0, 1),
               wr(0, 1, 1, 0x00), wr(0, 1, 1, 0x03), rd(14, 0, 1), rd(0, 2, 1), rd(0, 2, 1)]),
        # Odd widths and offsets, a broken console, writes that must be ignored.
        "odd_accesses": b"".join([
            rd(0, 0, 2), rd(0, 5, 4), wr(0, 0, 2, 0x4141), wr(0, 3, 8, -1), rd(0, 7, 3),
            wr(0, 0, 5, 0x4242424242), rd(8, 8, 1), wr(8, 0xffff_ffff, 1, 0x80),
            rd(9, 0x3f8, 1), rd(11, 1 << 31, 7), wr(15, 0, 1, 1), wr(0, 0, 1, 0x43),
            rd(0, 5, 1), rd(15, 0, 1), wr(0, 0, 1, 0x44), wr(12, 0, 1, 0), rd(12, 0, 1)]),
    },
    "exit_dispatch": {
        # Serial: LCR/DLAB, divisor, a few characters, LSR reads; then PCI probe over CF8.
        "serial_then_pci": b"".join([
            wr(0, 3, 1, 0x80), wr(0, 0, 1, 1), wr(0, 1, 1, 0), wr(0, 3, 1, 0x03),
            wr(0, 1, 1, 0x0f), wr(0, 0, 1, ord("h")), wr(0, 0, 1, ord("i")), rd(0, 5, 1),
            rd(0, 2, 1), wr(0, 0, 5, 0x6f6c6c6568), rd(0, 0, 6),
            wr(0, 0x300, 4, cf8(bdf(1, 0))), rd(0, 0x304, 4), rd(0, 0x306, 2)]),
        "ecam_and_power": b"".join([rd(8, ecam(0, 0), 4), rd(8, ecam(1, 0x10), 8),
                                    wr(8, ecam(1, 4), 2, 6), rd(12, 0xfee0_0000, 4),
                                    rd(13, 0, 8), wr(0, 0x204, 1, 0xfe),
                                    wr(0, 0x100, 1, 0x34), wr(14, 7, 1, 0), wr(14, 2, 1, 0)]),
    },
    "virtio_blk": {
        # OUT sector 1, IN it back, FLUSH, GET_ID: what a Linux guest sends.
        "out_in_flush_get_id": blk_image(
            BLK_EVENT_IDX | BLK_FLUSH | BLK_DISCARD | BLK_WZ | BLK_QUEUE_16,
            [blk_desc(0x300, 16, 1, 1), blk_desc(0x400, 512, 1, 2), blk_desc(0x700, 1, 2),
             blk_desc(0x310, 16, 1, 4), blk_desc(0x800, 512, 3, 5), blk_desc(0x701, 1, 2),
             blk_desc(0x320, 16, 1, 7), blk_desc(0x702, 1, 2),
             blk_desc(0x330, 16, 1, 9), blk_desc(0xa00, 20, 3, 10), blk_desc(0x703, 1, 2)],
            [0, 3, 6, 8],
            {0x300: blk_header(1, 1), 0x310: blk_header(0, 1), 0x320: blk_header(4),
             0x330: blk_header(8), 0x400: bytes(range(256)) * 2}),
        # DISCARD and WRITE_ZEROES (unmap) segments, then an IN through an
        # indirect table whose data crosses the 0x1000 region boundary.
        "discard_write_zeroes_indirect": blk_image(
            BLK_FLUSH | BLK_DISCARD | BLK_WZ | BLK_QUEUE_16,
            [blk_desc(0x300, 16, 1, 1), blk_desc(0x400, 16, 1, 2), blk_desc(0x700, 1, 2),
             blk_desc(0x310, 16, 1, 4), blk_desc(0x410, 32, 1, 5), blk_desc(0x701, 1, 2),
             blk_desc(0x600, 48, 4)],
            [0, 3, 6],
            {0x300: blk_header(11), 0x310: blk_header(13),
             0x400: struct.pack("<QII", 2, 2, 0),
             0x410: struct.pack("<QII", 4, 1, 1) + struct.pack("<QII", 8, 4, 0),
             0x600: blk_desc(0x320, 16, 1, 1) + blk_desc(0xf00, 512, 3, 2) + blk_desc(0x702, 1, 2),
             0x320: blk_header(0, 3)}),
        # A read-only disk: an OUT it refuses, a descriptor loop, a readable
        # status, a sector past the end, a head index past the table.
        "read_only_malformed": blk_image(
            BLK_RO | BLK_QUEUE_16,
            [blk_desc(0x300, 16, 1, 1), blk_desc(0x400, 512, 1, 2), blk_desc(0x700, 1, 2),
             blk_desc(0x310, 16, 1, 4), blk_desc(0x800, 512, 3, 3),
             blk_desc(0x320, 16, 1, 6), blk_desc(0x701, 1, 0),
             blk_desc(0x330, 16, 1, 8), blk_desc(0x800, 512, 3, 9), blk_desc(0x702, 1, 2)],
            [0, 3, 5, 7, 200],
            {0x300: blk_header(1), 0x310: blk_header(0), 0x320: blk_header(4),
             0x330: blk_header(0, 16)}),
    },
    "virtio_pci": {
        # Linux's virtio-pci modern probe and virtio core init: reset, ACK,
        # DRIVER, features, FEATURES_OK, MSI-X (masked while programmed),
        # config vector, two queues (one in each RAM region) with their
        # vectors, DRIVER_OK, notifies, the device's interrupts, ISR and
        # device configuration reads, then the reset of a shutdown.
        "linux_init": bytes([0]) + b"".join([
            VP_ENUMERATE, vp_status(0), vp_status(VP_ACK), vp_status(VP_ACK | VP_DRIVER),
            vp_features(VP_LOW, VP_HIGH),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK),
            wr(VP_CFG, 0x42, 2, 0xc000), vp_msix_entry(0, 0x40), vp_msix_entry(1, 0x41),
            vp_msix_entry(2, 0x42), wr(VP_CFG, 0x42, 2, 0x8000), rd(VP_CFG, 0x40, 4),
            wr(VP_BAR, 0x10, 2, 0), rd(VP_BAR, 0x10, 2), rd(VP_BAR, 0x12, 2),
            vp_queue(0, 128, 0x1000, 1), vp_queue(1, 16, 0x2_1000, 2),
            rd(VP_BAR, 0x2000, 4), rd(VP_BAR, 0x2004, 4), rd(VP_BAR, 0x15, 1),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK | VP_DRIVER_OK),
            wr(VP_BAR, 0x3000, 2, 0), wr(VP_BAR, 0x3004, 2, 1),
            wr(VP_QUEUE_IRQ, 0, 1, 0), wr(VP_QUEUE_IRQ, 1, 1, 0), wr(VP_CONFIG_IRQ, 0, 1, 0),
            rd(VP_BAR, 0x1000, 1), wr(VP_BAR, 0x2000, 1, 9), rd(VP_BAR, 0x2000, 8),
            wr(VP_BAR, 0x401c, 4, 1), wr(VP_QUEUE_IRQ, 0, 1, 0), rd(VP_BAR, 0x5000, 8),
            wr(VP_BAR, 0x401c, 4, 0), vp_status(0), rd(VP_BAR, 0x1c, 2)]),
        # What a broken or hostile driver does: a legacy driver without
        # VERSION_1, a feature never offered, a queue in the RAM hole (so
        # DEVICE_NEEDS_RESET), vectors beyond the table, queue registers
        # written after DRIVER_OK; after a reset, good queues but an
        # activation the device refuses (first byte 1); a PCI-level reset.
        "refused_and_malformed": bytes([1]) + b"".join([
            vp_status(VP_ACK | VP_DRIVER), vp_features(1 << 6, 0),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK), vp_status(0),
            vp_status(VP_ACK | VP_DRIVER), vp_features(1 << 3, 1),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK), vp_status(0),
            vp_status(VP_ACK | VP_DRIVER), vp_features(0, 1),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK),
            wr(VP_CFG, 0x42, 2, 0xc000), vp_msix_entry(1, 0x51), vp_msix_entry(2, 0x52, 1),
            vp_queue(0, 64, 0x1_0000, 1), vp_queue(1, 32, 0x3000, 7), vp_queue(5, 16, 0, 0),
            wr(VP_BAR, 0x10, 2, 2),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK | VP_DRIVER_OK),
            rd(VP_BAR, 0x5000, 8), wr(VP_BAR, 0x3008, 4, 0), rd(VP_BAR, 0x13, 2),
            rd(VP_BAR, 0x24, 4), rd(VP_BAR, 0x20, 8), wr(VP_BAR, 0x20, 8, 0x1000),
            vp_status(0), vp_status(VP_ACK | VP_DRIVER), vp_features(0, 1),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK), vp_queue(0, 64, 0xf000, 1),
            vp_status(VP_ACK | VP_DRIVER | VP_FEATURES_OK | VP_DRIVER_OK),
            wr(VP_VMM_RESET, 0, 1, 0), rd(VP_BAR, VP_STATUS, 1)]),
        # Found by the fuzzer (devices/src/virtio/pci/tests.rs): DRIVER_OK
        # cleared without a reset and set again activated the device twice.
        "driver_ok_cleared_and_set_again": bytes([0]) + b"".join([
            wr(VP_BAR, 0x08, 4, 1), wr(VP_BAR, 0x0c, 4, 1),
            wr(VP_BAR, VP_STATUS, 1, VP_ACK | VP_DRIVER | VP_FEATURES_OK | VP_DRIVER_OK),
            wr(VP_BAR, VP_STATUS, 1, VP_ACK | VP_DRIVER | VP_FEATURES_OK),
            wr(VP_BAR, VP_STATUS, 1, VP_ACK | VP_DRIVER | VP_FEATURES_OK | VP_DRIVER_OK)]),
    },
    "virtio_net": {
        # A TX frame to the peer, a peer frame into the RX buffer, resets.
        "tx_and_rx": net_input(4, NET_TX_AND_RX, [1, 3, 2, 60, 0, 0, 6, 5, 0, 5, 1, 3]),
        # The same with EVENT_IDX, the frame sent before the RX buffer is
        # offered (avail idx bumped by an 8-byte write at 0x100).
        "rx_waits_for_a_buffer": net_input(
            12, {**NET_TX_AND_RX, 0x100: struct.pack("<HHH", 0, 0, 0)},
            [0, 2, 64, 0, 0, 4, 0x00, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 3]),
        "malformed_chains": net_input(4, NET_MALFORMED, [1, 2, 60, 0, 0, 3, 6]),
    },
}

for target, seeds in SEEDS.items():
    os.makedirs(f"corpus-seeds/{target}", exist_ok=True)
    for name, data in seeds.items():
        with open(f"corpus-seeds/{target}/{name}", "wb") as f:
            f.write(data)
