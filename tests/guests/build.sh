#!/usr/bin/env bash
# Builds the tiny test guests into $1 (default: ./out): `guest` (ELF, 64-bit Linux boot
# protocol, test chosen by "test=NAME" on the command line), `guest.bzImage` (the same code as
# a bzImage), `guest.pvh` (the same code behind a 32-bit PVH entry, which QEMU microvm boots
# too: bench/io runs it under both) and `pvh` (a minimal ELF with a 32-bit PVH entry).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"
cflags=(-O2 -ffreestanding -fno-pic -no-pie -nostdlib -static -mno-red-zone -mgeneral-regs-only
        -fno-stack-protector -fno-asynchronous-unwind-tables -fcf-protection=none -Wall -Werror
        -Wl,--build-id=none -Wl,-z,max-page-size=4096 -Wl,-z,noexecstack -Wl,--no-warn-rwx-segments)
gcc "${cflags[@]}" -T "$here/guest.ld" -o "$out/guest.tmp" "$here/start.S" "$here/guest.c" "$here/virtio.c"
gcc "${cflags[@]}" -T "$here/pvh.ld" -o "$out/pvh.tmp" "$here/pvh.S"
gcc "${cflags[@]}" -T "$here/pvh.ld" -o "$out/guest.pvh.tmp" "$here/pvhboot.S" "$here/start.S" "$here/guest.c" "$here/virtio.c"
gcc "${cflags[@]}" -T "$here/bz.ld" -o "$out/guest-bz.elf" "$here/bzhead.S" "$here/start.S" "$here/guest.c" "$here/virtio.c"
objcopy -O binary "$out/guest-bz.elf" "$out/guest-bz.bin"
python3 "$here/mkbzimage.py" "$out/guest-bz.bin" "$out/guest.bzImage" "0x$(nm "$out/guest-bz.elf" | awk '$3 == "_end" {print $1}')"
rm -f "$out/guest-bz.elf" "$out/guest-bz.bin"
strip "$out/guest.tmp" "$out/pvh.tmp" "$out/guest.pvh.tmp"
mv "$out/guest.tmp" "$out/guest"
mv "$out/guest.pvh.tmp" "$out/guest.pvh"
mv "$out/pvh.tmp" "$out/pvh"
