/* A tiny test guest, in the spirit of kvm-unit-tests: it checks from inside the VM what the
 * VMM set up, prints what it found on COM1, and leaves through the exit the test asks for.
 * The test to run comes from the kernel command line: "test=NAME"; how to leave, from
 * "exit=reset|poweroff|acpi-reset|panic|hang|triple-fault". "test=blk-bench" and "test=net-bench"
 * are not checks but the guest halves of bench/io (see virtio.c).
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
    else if (test[0]) { puts("guest: unknown test\n"); }

    if (streq(exit_how, "poweroff")) acpi_poweroff();
    else if (streq(exit_how, "acpi-reset")) acpi_reset();
    else if (streq(exit_how, "panic")) pvpanic();
    else if (streq(exit_how, "hang")) for (;;) __asm__ volatile("pause");
    else if (streq(exit_how, "triple-fault")) test_triple_fault(); /* machines without an i8042 */
    else i8042_reset();
}
