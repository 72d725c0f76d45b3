#!/usr/bin/env python3
"""Wraps a flat protected-mode payload (linked at 1 MiB, 64-bit entry at +0x200) in a bzImage:
one setup sector carrying a boot-protocol 2.15 setup header, then the payload.
Usage: mkbzimage.py PAYLOAD.bin OUT [END]   (END: the image's end in memory, .bss included, so
that init_size covers it; hex or decimal)"""
import struct, sys

payload = open(sys.argv[1], "rb").read()
end = int(sys.argv[3], 0) if len(sys.argv) > 3 else 0
setup = bytearray(2 * 512)                      # boot sector + setup_sects (1) sectors
struct.pack_into("<B", setup, 0x1f1, 1)         # setup_sects
struct.pack_into("<I", setup, 0x1f4, (len(payload) + 15) // 16)  # syssize (16-byte units)
struct.pack_into("<H", setup, 0x1fe, 0xAA55)    # boot_flag
setup[0x200:0x202] = b"\xeb\x66"                # jump over the header (real-mode entry, unused)
setup[0x202:0x206] = b"HdrS"
struct.pack_into("<H", setup, 0x206, 0x020F)    # protocol version 2.15
struct.pack_into("<B", setup, 0x211, 0x01)      # loadflags: LOADED_HIGH
struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
struct.pack_into("<I", setup, 0x260, max(len(payload), end - 0x100000) + 0x10000)  # init_size
open(sys.argv[2], "wb").write(bytes(setup) + payload)
