/* What every tiny test guest file needs: fixed-width types, port I/O and output on COM1.
 * Header-only (static inline) so each file of the guest shares one copy of the source. */
#ifndef STRATUS_GUEST_CONSOLE_H
#define STRATUS_GUEST_CONSOLE_H
#include <stdint.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

#define COM1 0x3f8
static inline void putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {}
    outb(COM1, (u8)c);
}
static inline void puts(const char *s) { while (*s) putc(*s++); }
static inline void puthex(u64 v) {
    puts("0x");
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        int d = (v >> shift) & 0xf;
        if (d || started || shift == 0) {
            putc("0123456789abcdef"[d]);
            started = 1;
        }
    }
}
static inline void putdec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = '0' + v % 10; v /= 10; } while (v);
    puts(&buf[i]);
}
#endif
