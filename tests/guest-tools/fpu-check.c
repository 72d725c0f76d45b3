/* Checks that a process's SSE registers survive what happens around it (context switches,
 * the kernel's own use of the FPU, a snapshot or a migration of the VM):
 *   fpu-check SECONDS PROCS
 * starts PROCS processes; each fills xmm0-xmm15 with bytes of its own, then over and over
 * spins, yields the CPU (sched_yield) and reads the registers back, all in one asm block so
 * that no compiled code touches them in between. A register that came back different is
 * printed ("fpu-check: CORRUPT ...") and the run fails; otherwise "fpu-check: ok N rounds".
 *   fpu-check fresh PAGES            stores two registers to pages never touched (they fault)
 *   fpu-check hexout FILE STRADDLE [READ_FIRST]
 *                                    what md5sum does at its end: 32 hex digits and "  -"
 *                                    through stdio (from a buffer across a page boundary when
 *                                    STRADDLE is 1, after reading READ_FIRST whole), checked.
 *   fpu-check churn SECONDS          short-lived processes one after another, each checking its
 *                                    registers across a few yields (a fresh task each time).
 *   fpu-check stale KIND ITERS [FORKS]
 *                                    new values in all sixteen registers before EVERY kernel entry,
 *                                    the entry right after the load (KIND: fault = an SSE store to a
 *                                    page never touched, cow = an SSE store to a page shared with the
 *                                    parent, syscall = getppid, spin = a busy loop the timer
 *                                    preempts, mix = each in turn), then all sixteen read back; a
 *                                    register from an older iteration says how many iterations old
 *                                    it is. With FORKS, that many children one after another (fork
 *                                    without exec, like busybox's NOEXEC applets) each do ITERS. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Each round's values differ from the last's: a register restored from an old save shows. */
static void fill(uint8_t regs[16][16], int proc, long round) {
    for (int r = 0; r < 16; r++)
        for (int b = 0; b < 16; b++)
            regs[r][b] = (uint8_t)(0x11 * (proc + 1) + 7 * r + b + 3 * round);
}

/* Loads the sixteen registers, spins `spin` times, yields, spins again and stores them. */
static void round_trip(uint8_t in[16][16], uint8_t out[16][16], long spin) {
    long scratch;
    __asm__ volatile(
        "movdqu 0x00(%[in]), %%xmm0\n movdqu 0x10(%[in]), %%xmm1\n"
        "movdqu 0x20(%[in]), %%xmm2\n movdqu 0x30(%[in]), %%xmm3\n"
        "movdqu 0x40(%[in]), %%xmm4\n movdqu 0x50(%[in]), %%xmm5\n"
        "movdqu 0x60(%[in]), %%xmm6\n movdqu 0x70(%[in]), %%xmm7\n"
        "movdqu 0x80(%[in]), %%xmm8\n movdqu 0x90(%[in]), %%xmm9\n"
        "movdqu 0xa0(%[in]), %%xmm10\n movdqu 0xb0(%[in]), %%xmm11\n"
        "movdqu 0xc0(%[in]), %%xmm12\n movdqu 0xd0(%[in]), %%xmm13\n"
        "movdqu 0xe0(%[in]), %%xmm14\n movdqu 0xf0(%[in]), %%xmm15\n"
        "mov %[spin], %[scratch]\n"
        "1: dec %[scratch]\n jnz 1b\n"
        "mov $24, %%eax\n syscall\n" /* sched_yield */
        "mov %[spin], %[scratch]\n"
        "2: dec %[scratch]\n jnz 2b\n"
        "movdqu %%xmm0, 0x00(%[out])\n movdqu %%xmm1, 0x10(%[out])\n"
        "movdqu %%xmm2, 0x20(%[out])\n movdqu %%xmm3, 0x30(%[out])\n"
        "movdqu %%xmm4, 0x40(%[out])\n movdqu %%xmm5, 0x50(%[out])\n"
        "movdqu %%xmm6, 0x60(%[out])\n movdqu %%xmm7, 0x70(%[out])\n"
        "movdqu %%xmm8, 0x80(%[out])\n movdqu %%xmm9, 0x90(%[out])\n"
        "movdqu %%xmm10, 0xa0(%[out])\n movdqu %%xmm11, 0xb0(%[out])\n"
        "movdqu %%xmm12, 0xc0(%[out])\n movdqu %%xmm13, 0xd0(%[out])\n"
        "movdqu %%xmm14, 0xe0(%[out])\n movdqu %%xmm15, 0xf0(%[out])\n"
        : [scratch] "=&r"(scratch)
        : [in] "r"(in), [out] "r"(out), [spin] "r"(spin)
        : "rax", "rcx", "r11", "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
          "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

static void on_alarm(int sig) { (void)sig; }

/* Prints each register of `who` `id` that came back from round `round` different. */
static void report(const char *who, int id, long round, uint8_t want[16][16], uint8_t got[16][16]) {
    for (int r = 0; r < 16; r++) {
        if (memcmp(want[r], got[r], 16) == 0) continue;
        printf("fpu-check: CORRUPT %s %d round %ld xmm%d:", who, id, round, r);
        for (int b = 0; b < 16; b++) printf(" %02x", got[r][b]);
        printf(" (want");
        for (int b = 0; b < 16; b++) printf(" %02x", want[r][b]);
        printf(")\n");
    }
    fflush(stdout);
}

static int check(int proc, time_t until) {
    /* Processes 2 and 3 take a signal every 20 ms: its frame saves and restores the
     * registers too. */
    if (proc >= 2) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_alarm;
        sa.sa_flags = SA_RESTART;
        sigaction(SIGALRM, &sa, NULL);
        struct itimerval every = {{0, 20000}, {0, 20000}};
        setitimer(ITIMER_REAL, &every, NULL);
    }
    uint8_t want[16][16];
    /* Odd processes store to a page given back before each round: their stores fault. */
    uint8_t (*got)[16] = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (got == MAP_FAILED) { perror("mmap"); return 1; }
    long rounds = 0;
    while (time(NULL) < until) {
        fill(want, proc, rounds);
        if (proc % 2) madvise(got, 4096, MADV_DONTNEED);
        else memset(got, 0, 256);
        round_trip(want, got, 20000);
        rounds++;
        if (memcmp(want, got, sizeof want) != 0) {
            printf("fpu-check: process %d (%s)\n", proc, proc % 2 ? "faulting stores" : "yields");
            report("process", proc, rounds, want, got);
            return 1;
        }
    }
    printf("fpu-check: process %d ok %ld rounds\n", proc, rounds);
    fflush(stdout);
    return 0;
}

/* Loads two registers, stores the first to a page never touched (it faults), then the second. */
static int fresh(int pages) {
    uint8_t src[32], *page = sbrk(4096 * (pages + 1));
    if (page == (void *)-1) { perror("sbrk"); return 1; }
    page = (uint8_t *)(((uintptr_t)page + 4095) & ~(uintptr_t)4095);
    for (int n = 0; n < pages; n++, page += 4096) {
        for (int b = 0; b < 32; b++) src[b] = (uint8_t)(n * 5 + b + 1);
        __asm__ volatile("movdqu (%0), %%xmm0\n movdqu 16(%0), %%xmm1\n"
                         "movdqu %%xmm0, (%1)\n movdqu %%xmm1, 16(%1)\n"
                         :: "r"(src), "r"(page) : "memory", "xmm0", "xmm1");
        if (memcmp(src, page, 32) != 0) {
            printf("fpu-check: CORRUPT fresh page %d:", n);
            for (int b = 0; b < 32; b++) printf(" %02x", page[b]);
            printf("\n");
            return 1;
        }
    }
    return 0;
}

static char page_buf[8192] __attribute__((aligned(4096)));

/* Writes 32 hex digits and "  -" to FILE through stdio from a static buffer (across a page
 * boundary when STRADDLE is 1), reads the file back and compares. */
static int hexout(const char *path, int straddle, const char *first_read) {
    static const char digits[] = "0123456789abcdef";
    if (first_read) {
        static char big[65536];
        FILE *in = fopen(first_read, "r");
        if (!in) { perror(first_read); return 2; }
        while (fread(big, 1, sizeof big, in) > 0) {}
        fclose(in);
    }
    unsigned seed = (unsigned)getpid() * 2654435761u ^ (unsigned)time(NULL);
    char *hex = page_buf + (straddle ? 4096 - 16 : 0), want[40], got[64];
    for (int i = 0; i < 16; i++) {
        seed = seed * 1103515245u + 12345u;
        unsigned b = (seed >> 16) & 0xff;
        hex[2 * i] = digits[b >> 4];
        hex[2 * i + 1] = digits[b & 15];
    }
    hex[32] = 0;
    memcpy(want, hex, 32);
    memcpy(want + 32, "  -\n", 5);
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); return 2; }
    fprintf(f, "%s  -\n", hex);
    fclose(f);
    f = fopen(path, "r");
    size_t n = fread(got, 1, sizeof got, f);
    fclose(f);
    if (n == 36 && memcmp(got, want, 36) == 0) return 0;
    printf("fpu-check: CORRUPT hexout (%zu bytes):", n);
    for (size_t i = 0; i < n; i++) printf(" %02x", (unsigned char)got[i]);
    printf("\n");
    return 1;
}

/* Forks short-lived processes one after another until SECONDS pass: each goes through a few
 * rounds of check()'s yields with registers of its own and exits; a new process each time
 * puts its saved FPU state somewhere new in the kernel's memory. */
static int churn(int seconds) {
    time_t until = time(NULL) + seconds;
    long children = 0, corrupt = 0;
    while (time(NULL) < until) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            uint8_t want[16][16], got[16][16];
            for (long round = 0; round < 4; round++) {
                fill(want, getpid() & 7, round);
                round_trip(want, got, 20000);
                if (memcmp(want, got, sizeof want) != 0) {
                    report("child", (int)getpid(), round, want, got);
                    _exit(1);
                }
            }
            _exit(0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        children++;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) corrupt++;
    }
    printf("fpu-check: churn %ld children, %ld corrupt\n", children, corrupt);
    return corrupt != 0;
}

/* The value of register r in iteration `it` of `stale`: every byte differs between iterations
 * and registers, and never zero. */
static void stale_fill(uint8_t regs[16][16], uint32_t it) {
    for (int r = 0; r < 16; r++) {
        uint32_t w = it * 16 + r + 1;
        memcpy(&regs[r][0], &w, 4);
        memcpy(&regs[r][4], &w, 4);
        memcpy(&regs[r][8], &w, 4);
        memcpy(&regs[r][12], &w, 4);
        regs[r][15] = 0xa5;
    }
}

/* Loads the sixteen registers from `in`, stores xmm0 to `target` (the store that may fault),
 * runs `kind`'s kernel entry, then stores all sixteen to `out`. */
static void stale_trip(uint8_t in[16][16], uint8_t out[16][16], uint8_t *target, int kind) {
    long scratch = 0;
    __asm__ volatile(
        "movdqu 0x00(%[in]), %%xmm0\n movdqu 0x10(%[in]), %%xmm1\n"
        "movdqu 0x20(%[in]), %%xmm2\n movdqu 0x30(%[in]), %%xmm3\n"
        "movdqu 0x40(%[in]), %%xmm4\n movdqu 0x50(%[in]), %%xmm5\n"
        "movdqu 0x60(%[in]), %%xmm6\n movdqu 0x70(%[in]), %%xmm7\n"
        "movdqu 0x80(%[in]), %%xmm8\n movdqu 0x90(%[in]), %%xmm9\n"
        "movdqu 0xa0(%[in]), %%xmm10\n movdqu 0xb0(%[in]), %%xmm11\n"
        "movdqu 0xc0(%[in]), %%xmm12\n movdqu 0xd0(%[in]), %%xmm13\n"
        "movdqu 0xe0(%[in]), %%xmm14\n movdqu 0xf0(%[in]), %%xmm15\n"
        "movdqu %%xmm0, (%[target])\n" /* fault / cow: this store enters the kernel */
        "cmp $2, %[kind]\n jne 1f\n"
        "mov $110, %%eax\n syscall\n" /* getppid */
        "jmp 3f\n"
        "1: cmp $3, %[kind]\n jne 3f\n"
        "mov $200000, %[scratch]\n"
        "2: dec %[scratch]\n jnz 2b\n"
        "3:\n"
        "movdqu %%xmm0, 0x00(%[out])\n movdqu %%xmm1, 0x10(%[out])\n"
        "movdqu %%xmm2, 0x20(%[out])\n movdqu %%xmm3, 0x30(%[out])\n"
        "movdqu %%xmm4, 0x40(%[out])\n movdqu %%xmm5, 0x50(%[out])\n"
        "movdqu %%xmm6, 0x60(%[out])\n movdqu %%xmm7, 0x70(%[out])\n"
        "movdqu %%xmm8, 0x80(%[out])\n movdqu %%xmm9, 0x90(%[out])\n"
        "movdqu %%xmm10, 0xa0(%[out])\n movdqu %%xmm11, 0xb0(%[out])\n"
        "movdqu %%xmm12, 0xc0(%[out])\n movdqu %%xmm13, 0xd0(%[out])\n"
        "movdqu %%xmm14, 0xe0(%[out])\n movdqu %%xmm15, 0xf0(%[out])\n"
        : [scratch] "+&r"(scratch)
        : [in] "r"(in), [out] "r"(out), [target] "r"(target), [kind] "r"((long)kind)
        : "rax", "rcx", "r11", "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
          "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

#define STALE_PAGES 256

/* ITERS iterations of stale_trip; returns the number of iterations with a changed register. */
static long stale_run(const char *kind_name, long iters, uint8_t *cow) {
    static const char *kinds[] = {"fault", "cow", "syscall", "spin"};
    int mix = strcmp(kind_name, "mix") == 0, kind = -1;
    for (int k = 0; k < 4; k++)
        if (strcmp(kind_name, kinds[k]) == 0) kind = k;
    if (kind < 0 && !mix) { fprintf(stderr, "fpu-check: unknown kind %s\n", kind_name); exit(2); }
    uint8_t *fresh = mmap(NULL, 4096 * STALE_PAGES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fresh == MAP_FAILED) { perror("mmap"); exit(1); }
    static uint8_t scratch[64];
    uint8_t want[16][16], got[16][16];
    long bad = 0;
    uint32_t seed = (uint32_t)getpid() << 12;
    for (long i = 0; i < iters; i++) {
        int k = mix ? (int)(i % 4) : kind;
        uint8_t *target = scratch;
        if (k == 0) {
            if (i % STALE_PAGES == 0) madvise(fresh, 4096 * STALE_PAGES, MADV_DONTNEED);
            target = fresh + 4096 * (i % STALE_PAGES) + 16 * (i % 200);
        } else if (k == 1 && cow) {
            target = cow + 4096 * (i % STALE_PAGES);
        }
        uint32_t it = seed + (uint32_t)i;
        stale_fill(want, it);
        memset(got, 0, sizeof got);
        stale_trip(want, got, target, k);
        if (memcmp(want, got, sizeof want) == 0 && memcmp(target, want[0], 16) == 0) continue;
        bad++;
        printf("fpu-check: STALE pid %d iteration %ld kind %s:", (int)getpid(), i, kinds[k]);
        for (int r = 0; r < 16; r++) {
            if (memcmp(want[r], got[r], 16) == 0) continue;
            uint32_t w;
            memcpy(&w, got[r], 4);
            long age = (long)it * 16 + r + 1 - (long)w;
            printf(" xmm%d=", r);
            for (int b = 0; b < 16; b++) printf("%02x", got[r][b]);
            if (got[r][15] == 0xa5 && age % 16 == 0) printf("(%ld iterations old)", age / 16);
        }
        if (memcmp(target, want[0], 16) != 0) printf(" stored xmm0 differs");
        printf("\n");
        fflush(stdout);
    }
    munmap(fresh, 4096 * STALE_PAGES);
    return bad;
}

static int stale(const char *kind, long iters, int forks) {
    if (forks <= 0) {
        long bad = stale_run(kind, iters, NULL);
        printf("fpu-check: stale %s %ld iterations, %ld bad\n", kind, iters, bad);
        return bad != 0;
    }
    /* Pages the children write first (copy on write), touched here first. */
    uint8_t *cow = mmap(NULL, 4096 * STALE_PAGES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (cow == MAP_FAILED) { perror("mmap"); return 1; }
    memset(cow, 1, 4096 * STALE_PAGES);
    long bad = 0;
    for (int f = 0; f < forks; f++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) _exit(stale_run(kind, iters, cow) != 0);
        int status = 0;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) bad++;
    }
    printf("fpu-check: stale %s %d children x %ld iterations, %ld bad children\n", kind, forks, iters, bad);
    return bad != 0;
}

int main(int argc, char **argv) {
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "stale") == 0)
        return stale(argv[2], atol(argv[3]), argc == 5 ? atoi(argv[4]) : 0);
    if (argc == 3 && strcmp(argv[1], "churn") == 0) return churn(atoi(argv[2]));
    if (argc == 3 && strcmp(argv[1], "fresh") == 0) return fresh(atoi(argv[2]));
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "hexout") == 0)
        return hexout(argv[2], atoi(argv[3]), argc == 5 ? argv[4] : NULL);
    if (argc < 3) {
        fprintf(stderr, "usage: fpu-check SECONDS PROCS\n");
        return 2;
    }
    int seconds = atoi(argv[1]), procs = atoi(argv[2]);
    time_t until = time(NULL) + seconds;
    for (int p = 0; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) _exit(check(p, until));
    }
    int failed = 0;
    for (int p = 0; p < procs; p++) {
        int status = 0;
        if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
    }
    if (failed) printf("fpu-check: FAILED in %d of %d processes\n", failed, procs);
    else printf("fpu-check: ok\n");
    return failed != 0;
}
