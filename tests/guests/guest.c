/* A tiny test guest, in the spirit of kvm-unit-tests: it checks from inside the VM what the
 * VMM set up, prints what it found on COM1, and leaves through the exit the test asks for.
 * The test to run comes from the kernel command line: "test=NAME"; how to leave, from
 * "exit=reset|poweroff|acpi-reset|panic|hang|triple-fault". "test=blk-bench" and "test=net-bench"
 * are not checks but the guest halves of bench/io (see virtio.c); "test=snapshot" and
 * "test=dirty" hold patterns in RAM (and with "disk_sectors", on disk) for save/restore,
 * dirty-tracking and migration tests.
 * Built freestanding: no libc, general registers only (so the compiler emits no SSE). */
#include "console.h"
#include "virtio.h"

static int getc_blocking(void) {
    while (!(inb(COM1 + 5) & 0x01)) {}
    return inb(COM1);
}

static void i8042_reset(void) { outb(0x64, 0xfe); }
static void acpi_poweroff(void) { outb(0x600, (5 << 2) | (1 << 5)); }
static void acpi_reset(void) { outb(0x602, 1); }
static void pvpanic(void) { outb(0x505, 1); }

static u64 rdmsr(u32 idx) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(idx));
    return ((u64)hi << 32) | lo;
}
static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) { a++; b++; }
    return *a == *b;
}
static int memeq(const void *a, const void *b, u64 n) {
    const u8 *x = a, *y = b;
    for (u64 i = 0; i < n; i++)
        if (x[i] != y[i]) return 0;
    return 1;
}

/* The value of "key=" in the command line, copied into out (up to the next space). */
static int cmdline_get(const char *cmdline, const char *key, char *out, int cap) {
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ') continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k || *q != '=') continue;
        q++;
        int n = 0;
        while (*q && *q != ' ' && n < cap - 1) out[n++] = *q++;
        out[n] = 0;
        return 1;
    }
    return 0;
}

/* The decimal value of "key=" in the command line, or `dflt` if it is absent or not a number. */
static u64 cmdline_u64(const char *cmdline, const char *key, u64 dflt) {
    char text[21];
    if (!cmdline_get(cmdline, key, text, sizeof(text)) || !text[0]) return dflt;
    u64 v = 0;
    for (const char *p = text; *p; p++) {
        if (*p < '0' || *p > '9') return dflt;
        v = v * 10 + (u64)(*p - '0');
    }
    return v;
}

/* ---- boot: the 64-bit boot protocol state ---- */
static void test_boot(u8 *zp, u64 entry_rsp) {
    u64 cr0, cr4;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    u64 efer = rdmsr(0xc0000080);
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    puts("boot: cr0.pe="); putdec(cr0 & 1);
    puts(" cr0.pg="); putdec(cr0 >> 31 & 1);
    puts(" cr4.pae="); putdec(cr4 >> 5 & 1);
    puts(" efer.lme="); putdec(efer >> 8 & 1);
    puts(" efer.lma="); putdec(efer >> 10 & 1);
    puts(" cs="); puthex(cs);
    puts(" rsp="); puthex(entry_rsp);
    puts(" zero_page="); puthex((u64)zp);
    puts(" hdrs="); putdec(memeq(zp + 0x202, "HdrS", 4));
    puts(" boot_flag="); puthex(*(u16 *)(zp + 0x1fe));
    puts(" protocol="); puthex(*(u16 *)(zp + 0x206));
    puts("\n");
}

/* ---- memory: the e820 map, and RAM really there at its top ---- */
static void test_memory(u8 *zp) {
    u8 n = zp[0x1e8];
    u64 top = 0, total = 0;
    puts("e820: entries="); putdec(n); puts("\n");
    for (int i = 0; i < n; i++) {
        u8 *e = zp + 0x2d0 + i * 20;
        u64 addr = *(u64 *)e, size = *(u64 *)(e + 8);
        u32 type = *(u32 *)(e + 16);
        puts("e820: "); puthex(addr); puts(" "); puthex(size); puts(" type="); putdec(type); puts("\n");
        if (type == 1) {
            total += size;
            if (addr + size > top) top = addr + size;
        }
    }
    /* Write and read back the last 8 bytes of RAM below 1 GiB of identity mapping. */
    int rw = -1;
    if (top <= (1ull << 32)) {
        volatile u64 *last = (volatile u64 *)(top - 8);
        *last = 0x5354524154555321ull;
        rw = *last == 0x5354524154555321ull;
    }
    puts("memory: ram_top="); puthex(top); puts(" ram_total="); puthex(total);
    puts(" top_rw="); putdec(rw); puts("\n");
}

/* ---- cpus: CPUID as this vCPU sees it, and the MADT as the guest parses it ---- */
static u8 sum(const u8 *p, u64 n) {
    u8 s = 0;
    for (u64 i = 0; i < n; i++) s += p[i];
    return s;
}
static void test_cpus(void) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    puts("cpuid: apic_id="); putdec(b >> 24);
    puts(" hypervisor="); putdec(c >> 31 & 1);
    char sig[13];
    cpuid(0x40000000, 0, &a, (u32 *)&sig[0], (u32 *)&sig[4], (u32 *)&sig[8]);
    sig[12] = 0;
    puts(" signature="); puts(sig);
    u32 kvm_features;
    cpuid(0x40000001, 0, &kvm_features, &b, &c, &d);
    puts(" kvm_features="); puthex(kvm_features);
    puts("\n");

    u8 *rsdp = 0;
    for (u8 *p = (u8 *)0xe0000; p < (u8 *)0x100000; p += 16)
        if (memeq(p, "RSD PTR ", 8)) { rsdp = p; break; }
    if (!rsdp) { puts("acpi: no RSDP\n"); return; }
    int ok = sum(rsdp, 20) == 0 && sum(rsdp, 36) == 0;
    u8 *xsdt = (u8 *)*(u64 *)(rsdp + 24);
    u32 xlen = *(u32 *)(xsdt + 4);
    ok = ok && memeq(xsdt, "XSDT", 4) && sum(xsdt, xlen) == 0;
    int cpus = 0, ioapics = 0, tables = 0;
    puts("acpi: madt_apic_ids=");
    for (u32 off = 36; off + 8 <= xlen; off += 8) {
        u8 *t = (u8 *)*(u64 *)(xsdt + off);
        u32 len = *(u32 *)(t + 4);
        tables++;
        ok = ok && sum(t, len) == 0;
        if (!memeq(t, "APIC", 4)) continue;
        for (u32 e = 44; e + 2 <= len && t[e + 1]; e += t[e + 1]) {
            if (t[e] == 0 && (t[e + 4] & 1)) {
                if (cpus++) putc(',');
                putdec(t[e + 3]);
            } else if (t[e] == 1) {
                ioapics++;
            }
        }
    }
    puts(" madt_cpus="); putdec(cpus);
    puts(" ioapics="); putdec(ioapics);
    puts(" tables="); putdec(tables);
    puts(" checksums="); puts(ok ? "ok" : "BAD");
    puts("\n");
}

/* ---- echo: serial input reaches the guest ---- */
static void test_echo(void) {
    char line[80];
    int n = 0;
    puts("ready\n");
    for (;;) {
        int c = getc_blocking();
        if (c == '\n' || c == '\r' || n == (int)sizeof(line) - 1) break;
        line[n++] = (char)c;
    }
    line[n] = 0;
    puts("echo: "); puts(line); puts("\n");
}

/* ---- pvm: instructions the PVM profile completes, each checked for its architectural result.
 * On hardware KVM they simply run on the CPU; the answers must be the same. ---- */
struct __attribute__((packed)) idt_gate {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, zero;
};
static struct idt_gate idt[32] __attribute__((aligned(16)));
extern void bp_handler(void), gp_handler(void);
volatile u64 bp_rip, gp_rip;
volatile u32 bp_count, gp_count;

static void set_gate(int vec, void (*fn)(void)) {
    u64 a = (u64)fn;
    idt[vec] = (struct idt_gate){(u16)a, 0x8, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

static void report(const char *name, int ok) {
    puts(" "); puts(name); puts(ok ? "=ok" : "=FAIL");
}

static void test_pvm(void) {
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = {sizeof(idt) - 1, (u64)idt};
    set_gate(3, bp_handler);
    set_gate(13, gp_handler);
    __asm__ volatile("lidt %0" ::"m"(idtr));
    /* SSE on: CR0.MP=1, EM=0; CR4.OSFXSR, OSXMMEXCPT. */
    u64 cr0, cr4;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %0, %%cr0" ::"r"((cr0 | 2) & ~4ull));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4 | (1 << 9) | (1 << 10)));

    puts("pvm:");
    /* int3: the #BP handler runs once and sees the address after the int3. */
    u64 expected;
    __asm__ volatile("lea 1f(%%rip), %0\n\tint3\n1:" : "=r"(expected)::"memory");
    report("int3", bp_count == 1 && bp_rip == expected);

    /* popcnt: register and memory forms, 64/32/16-bit, ZF from the source. */
    u64 src = 0xf0f0000000000001ull, r64, zf;
    __asm__ volatile("popcnt %2, %0\n\tsetz %b1" : "=r"(r64), "=q"(zf) : "r"(src) : "cc");
    int ok = r64 == 9 && (zf & 0xff) == 0;
    u64 zero = 0, rz = 123;
    __asm__ volatile("popcnt %2, %0\n\tsetz %b1" : "=r"(rz), "=q"(zf) : "r"(zero) : "cc");
    ok = ok && rz == 0 && (zf & 0xff) == 1;
    static volatile u32 mem32 = 0x80000003u;
    u32 r32;
    __asm__ volatile("popcnt %1, %0" : "=r"(r32) : "m"(mem32) : "cc");
    ok = ok && r32 == 3;
    u64 r16 = 0xdead0000ull;
    u16 s16 = 0x0107;
    __asm__ volatile("popcnt %w1, %w0" : "+r"(r16) : "r"(s16) : "cc");
    ok = ok && r16 == 0xdead0004ull;
    report("popcnt", ok);

    /* ldmxcsr: load round-to-zero, read it back; then a reserved bit must raise #GP. */
    u32 in = 0x7f80, out = 0;
    __asm__ volatile("ldmxcsr %1\n\tstmxcsr %0" : "=m"(out) : "m"(in));
    report("ldmxcsr", out == 0x7f80);
    static volatile u32 bad[2] = {0x00011f80u, 0};
    __asm__ volatile("mov %0, %%rax\n\t.byte 0x0f, 0xae, 0x50, 0x00" ::"r"(bad) : "rax", "memory");
    __asm__ volatile("stmxcsr %0" : "=m"(out));
    report("ldmxcsr_gp", gp_count == 1 && out == 0x7f80);
    in = 0x1f80;
    __asm__ volatile("ldmxcsr %0" ::"m"(in));

    /* stac/clac: RFLAGS.AC follows (only where the CPU offers SMAP; else #UD by design). */
    u32 a, b, c, d;
    cpuid(7, 0, &a, &b, &c, &d);
    if (b & (1u << 20)) {
        u64 f1, f2;
        __asm__ volatile("stac\n\tpushfq\n\tpop %0\n\tclac\n\tpushfq\n\tpop %1" : "=r"(f1), "=r"(f2)::"cc");
        report("stac", (f1 >> 18) & 1);
        report("clac", !((f2 >> 18) & 1));
    } else {
        puts(" stac=skipped clac=skipped");
    }

    /* fences and fwait: no architectural result beyond carrying on with registers intact. */
    u64 keep = 0x1234;
    __asm__ volatile("lfence\n\tmfence\n\tsfence\n\tfwait" : "+r"(keep)::"memory");
    report("fences", keep == 0x1234);
    puts("\n");
}

/* ---- time: the TSC as a clock, calibrated once against the i8254 PIT (1.193182 MHz) ---- */
#define PIT_HZ 1193182u
static u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
/* Channel ch's count, latched first so that the two byte reads belong together. */
static u16 pit_count(int ch) {
    outb(0x43, (u8)(ch << 6));
    u8 lo = inb(0x40 + ch), hi = inb(0x40 + ch);
    return (u16)(lo | hi << 8);
}
/* TSC cycles per 100 ms of PIT time on channel ch, counting down from 65536 in mode 2 (the
 * latched count is read well within one 55 ms period, so the wraps are counted); 0 if the
 * channel does not count. */
static u64 pit_tsc_per_100ms(int ch) {
    outb(0x43, (u8)(ch << 6 | 0x34)); /* lobyte/hibyte, mode 2, binary */
    outb(0x40 + ch, 0);
    outb(0x40 + ch, 0);
    u16 prev = pit_count(ch), cur = prev;
    for (int i = 0; i < 1000 && cur == prev; i++) cur = pit_count(ch);
    if (cur == prev) return 0;
    /* Start after the first reload: KVM's channel 0 counts erratically in its first period
     * (seen here: 25000 ticks in 20 ms). */
    do { prev = cur; cur = pit_count(ch); } while (cur <= prev);
    u64 t0 = rdtsc(), ticks = 0;
    while (ticks < PIT_HZ / 10) {
        prev = cur;
        cur = pit_count(ch);
        ticks += (u16)(prev - cur);
    }
    return (rdtsc() - t0) * (PIT_HZ / 10) / ticks;
}
/* now_us() = TSC * us_mult >> 32: a multiply, no division, and no overflow for any TSC. */
static u64 us_mult;
static void time_init(void) {
    /* Channel 2 first, as it raises no IRQ: gated on by port 0x61 bit 0 (speaker off, bit 1),
     * though KVM's in-kernel PIT counts it either way. Where channel 2 does not count, channel
     * 0 (always gated) does the same job. */
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);
    int ch = 2;
    u64 per_100ms = pit_tsc_per_100ms(ch);
    if (!per_100ms) per_100ms = pit_tsc_per_100ms(ch = 0);
    if (ch == 0) { /* one last interrupt (mode 0) instead of one every 55 ms; IF is 0 anyway */
        outb(0x43, 0x30);
        outb(0x40, 1);
        outb(0x40, 0);
    }
    if (!per_100ms) { puts("guest: no PIT counts; assuming a 1 GHz TSC\n"); per_100ms = 100000000; }
    us_mult = ((u64)100000 << 32) / per_100ms;
    puts("guest: tsc_mhz="); putdec((per_100ms + 50000) / 100000);
    puts(" pit_channel="); putdec(ch); puts("\n");
}
static u64 now_us(void) { return (u64)(((unsigned __int128)rdtsc() * us_mult) >> 32); }

/* Microseconds since *last, at most cap: a pause of the VM (or a TSC that jumped either way
 * across a save and restore) counts as one short step, so periodic work carries on where it
 * was instead of catching up in a burst or stalling. */
static u64 step_us(u64 *last, u64 cap) {
    u64 now = now_us(), d = now > *last ? now - *last : 0;
    *last = now;
    return d < cap ? d : cap;
}

/* ---- snapshot and dirty: guest halves of the save/restore and dirty-tracking benchmarks.
 * Each keeps a pattern in RAM that 'c' on the serial port verifies, answers 'p' with "pong"
 * (the first sign of life after a restore), ticks so that a restored VM visibly carries on
 * from its count, and leaves on 'q'. Where KVM emulates every guest instruction (PVM running a
 * guest that is not PVM-aware: about 1 us each), the bulk work uses rep stosq / repe scasq,
 * which the emulator runs in the kernel some 7 times faster than a loop of moves. ---- */
#define MIB (1ull << 20)
#define PATTERN_BASE (16 * MIB) /* above the guest image, its stack, tables and dirty_gen */
#define PATTERN_SEED 0x5354524154555321ull
/* Both entries map the low 4 GiB, and RAM below 3 GiB is one range in both VMMs (Stratus's
 * MMIO hole starts there; above it, RAM continues past 4 GiB, unmapped here). */
#define MAPPED_RAM_TOP (3072 * MIB)
/* Whether [start, end) is mapped RAM within one e820 entry (with no e820 table, trust it). */
static int ram_covers(const u8 *zp, u64 start, u64 end) {
    if (end > MAPPED_RAM_TOP) return 0;
    u8 n = zp[0x1e8];
    for (int i = 0; i < n; i++) {
        const u8 *e = zp + 0x2d0 + i * 20;
        u64 addr = *(const u64 *)e, size = *(const u64 *)(e + 8);
        if (*(const u32 *)(e + 16) == 1 && addr <= start && end <= addr + size) return 1;
    }
    return !n;
}

/* The byte waiting on COM1, or -1. Polled every 20 us at most: each poll is an exit to the
 * VMM, and on hardware KVM a tighter loop would load the VMM without answering sooner. */
static int serial_poll(void) {
    static u64 last;
    u64 now = now_us();
    if (now - last < 20 && now >= last) return -1;
    last = now;
    return (inb(COM1 + 5) & 0x01) ? inb(COM1) : -1;
}

/* The snapshot pattern: every word of a page holds the page's address XOR the seed, so a page
 * lost, zeroed, stale or put at the wrong address shows. */
static void fill_page(u64 addr) {
    u64 *d = (u64 *)addr, n = 512;
    __asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(addr ^ PATTERN_SEED) : "memory");
}
/* The first word of the page that differs from the pattern, or 0. */
static u64 check_page(u64 addr) {
    u64 *d = (u64 *)addr, n = 512;
    __asm__ volatile("repe scasq" : "+D"(d), "+c"(n) : "a"(addr ^ PATTERN_SEED) : "memory", "cc");
    return d[-1] == (addr ^ PATTERN_SEED) ? 0 : (u64)(d - 1);
}

static void test_snapshot(const u8 *zp, u64 mib) {
    u64 end = PATTERN_BASE + mib * MIB;
    if (mib > 3072 || !ram_covers(zp, PATTERN_BASE, end)) {
        puts("snapshot: fill_mib too large: 16 MiB + fill_mib must be RAM, below 3 GiB\n");
        return;
    }
    for (u64 a = PATTERN_BASE; a < end; a += 4096) fill_page(a);
    puts("snapshot: filled "); putdec(mib); puts(" MiB\n");
    u64 last = now_us(), acc = 0, tick = 0;
    for (;;) {
        acc += step_us(&last, 100000);
        if (acc >= 100000) {
            acc -= 100000;
            puts("tick "); putdec(tick++); puts("\n");
        }
        int c = serial_poll();
        if (c == 'p') puts("pong\n");
        else if (c == 'q') return;
        else if (c == 'c') {
            u64 bad = 0;
            for (u64 a = PATTERN_BASE; a < end && !bad; a += 4096) bad = check_page(a);
            if (!bad) puts("check ok\n");
            else { puts("check BAD at "); puthex(bad); puts("\n"); }
        }
    }
}

/* The last generation written to each page of the dirty region (3 MiB: enough for 3 GiB). */
static u32 dirty_gen[(MAPPED_RAM_TOP - PATTERN_BASE) / 4096];
static void dirty_write(u64 n) {
    u32 g = ++dirty_gen[n];
    /* The page number too, so that a page landing at the wrong address shows. */
    *(volatile u64 *)(PATTERN_BASE + n * 4096) = n << 32 | g;
}
/* With "disk_sectors=N", N sectors of the disk, "disk_stride" apart (default 1), are stamped
 * too (sector << 32 | generation), "disk_ops" of them per 10 ms step, and 'c' checks them
 * against disk_gen. */
static u32 disk_gen[16384];
static u64 disk_sectors, disk_next, disk_stride = 1;
static int disk_stamp(u64 s) {
    return stamp_disk_write(s * disk_stride, s << 32 | ++disk_gen[s]);
}
static int disk_check(void) {
    for (u64 s = 0; s < disk_sectors; s++) {
        u64 v;
        if (!stamp_disk_read(s * disk_stride, &v) || v != (s << 32 | disk_gen[s])) {
            puts("check BAD sector "); putdec(s); puts("\n");
            return 0;
        }
    }
    return 1;
}
static void test_dirty(const u8 *zp, u64 rate_mib, u64 mib, u64 sectors, u64 stride, u64 disk_ops) {
    u64 pages = mib * MIB / 4096;
    if (!pages || mib > 3072 || !ram_covers(zp, PATTERN_BASE, PATTERN_BASE + mib * MIB)) {
        puts("dirty: dirty_mib must be 1 or more, and 16 MiB + dirty_mib RAM, below 3 GiB\n");
        return;
    }
    if (sectors > sizeof(disk_gen) / sizeof(disk_gen[0]) || (sectors && !stamp_disk_open())) {
        puts("dirty: disk_sectors needs a disk and at most 16384\n");
        return;
    }
    disk_sectors = sectors;
    disk_stride = stride ? stride : 1;
    for (u64 s = 0; s < disk_sectors; s++)
        if (!disk_stamp(s)) { puts("dirty: a disk write failed\n"); return; }
    /* Generation 1 everywhere first: every page starts resident and checkable. */
    for (u64 n = 0; n < pages; n++) dirty_write(n);
    puts("dirty: running "); putdec(rate_mib); puts(" MiB/s over "); putdec(mib); puts(" MiB\n");
    /* Pages owed = running time * rate, paid every ~10 ms with the next pages in turn. A debt
     * beyond 20 ms worth (a rate faster than this vCPU writes) is dropped, so that the ticks
     * and the serial port keep their pace and the guest simply dirties as fast as it can. */
    u64 rate_pages = rate_mib * (MIB / 4096), quantum = rate_pages / 50 + 1;
    u64 last = now_us(), run_us = 0, since_write = 0, since_tick = 0, paid = 0, next = 0, tick = 0;
    for (;;) {
        u64 d = step_us(&last, 1000000); /* a longer step only drops debt, see above */
        run_us += d;
        since_write += d;
        since_tick += d;
        if (since_write >= 10000) {
            since_write = 0;
            u64 owed = run_us * rate_pages / 1000000;
            if (owed - paid > quantum) paid = owed - quantum;
            for (; paid < owed; paid++) {
                dirty_write(next);
                if (++next == pages) next = 0;
            }
            for (u64 k = 0; disk_sectors && k < disk_ops; k++) {
                if (!disk_stamp(disk_next)) { puts("dirty: a disk write failed\n"); return; }
                if (++disk_next == disk_sectors) disk_next = 0;
            }
        }
        if (since_tick >= 1000000) {
            since_tick -= 1000000;
            puts("tick "); putdec(tick++); puts("\n");
        }
        int c = serial_poll();
        if (c == 'p') puts("pong\n");
        else if (c == 'q') return;
        else if (c == 'c') {
            u64 n = 0;
            while (n < pages && *(volatile u64 *)(PATTERN_BASE + n * 4096) == (n << 32 | dirty_gen[n])) n++;
            if (n != pages) { puts("check BAD page "); putdec(n); puts("\n"); }
            else if (disk_check()) puts("check ok\n");
        }
    }
}

static void test_triple_fault(void) {
    struct __attribute__((packed)) { u16 limit; u64 base; } empty = {0, 0};
    __asm__ volatile("lidt %0\n\tud2" ::"m"(empty));
}

void main(u8 *zero_page, u64 entry_rsp) {
    const char *cmdline = (const char *)(u64) * (u32 *)(zero_page + 0x228);
    char test[32] = "", exit_how[32] = "reset";
    cmdline_get(cmdline, "test", test, sizeof(test));
    cmdline_get(cmdline, "exit", exit_how, sizeof(exit_how));
    puts("guest: test="); puts(test); puts("\n");

    if (streq(test, "boot")) test_boot(zero_page, entry_rsp);
    else if (streq(test, "memory")) test_memory(zero_page);
    else if (streq(test, "cpus")) test_cpus();
    else if (streq(test, "echo")) test_echo();
    else if (streq(test, "pvm")) test_pvm();
    else if (streq(test, "triple-fault")) test_triple_fault();
    else if (streq(test, "virtio-rng")) test_virtio_rng();
    else if (streq(test, "virtio-blk")) test_virtio_blk();
    else if (streq(test, "virtio-features")) test_virtio_features();
    else if (streq(test, "virtio-net")) test_virtio_net();
    else if (streq(test, "virtio-vsock")) test_virtio_vsock();
    else if (streq(test, "blk-bench"))
        bench_virtio_blk(cmdline_u64(cmdline, "bench_mib", 64), cmdline_u64(cmdline, "bench_ops", 4096));
    else if (streq(test, "net-bench")) bench_virtio_net(cmdline_u64(cmdline, "bench_frames", 65536));
    else if (streq(test, "snapshot")) {
        time_init();
        test_snapshot(zero_page, cmdline_u64(cmdline, "fill_mib", 16));
    } else if (streq(test, "dirty")) {
        time_init();
        test_dirty(zero_page, cmdline_u64(cmdline, "rate_mib", 100), cmdline_u64(cmdline, "dirty_mib", 64),
                   cmdline_u64(cmdline, "disk_sectors", 0), cmdline_u64(cmdline, "disk_stride", 1),
                   cmdline_u64(cmdline, "disk_ops", 1));
    }
    else if (test[0]) { puts("guest: unknown test\n"); }

    if (streq(exit_how, "poweroff")) acpi_poweroff();
    else if (streq(exit_how, "acpi-reset")) acpi_reset();
    else if (streq(exit_how, "panic")) pvpanic();
    else if (streq(exit_how, "hang")) for (;;) __asm__ volatile("pause");
    else if (streq(exit_how, "triple-fault")) test_triple_fault(); /* machines without an i8042 */
    else i8042_reset();
}
