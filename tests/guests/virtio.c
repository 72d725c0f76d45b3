/* A minimal virtio-mmio driver for the tiny test guest: virtio 1.x ("modern") devices behind the
 * version-2 MMIO register layout, one split virtqueue, completions polled. Just enough to check
 * from inside the VM that the VMM's devices keep the spec: feature negotiation, the ring
 * protocol, request status codes, the interrupt status register.
 * Memory is identity-mapped, so the address of a static buffer is what the device is given.
 * Everything the device reads or writes is volatile, so the compiler neither caches it nor turns
 * our loops over it into memset/memcpy calls (there is no libc to provide them). */
#include <stdint.h>
#include "virtio.h"

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

/* guest.c keeps its serial helpers static; this file carries its own small copies. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
#define COM1 0x3f8
static void putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {}
    outb(COM1, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v) {
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
static void putdec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = '0' + v % 10; v /= 10; } while (v);
    puts(&buf[i]);
}

/* x86 keeps stores in order and volatile keeps the compiler from reordering them: a compiler
 * barrier at each hand-over point is all the ring protocol needs. */
#define barrier() __asm__ volatile("" ::: "memory")
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

/* ---- the transport: virtio 1.x section 4.2.2 ---- */
#define MMIO_BASE 0xd0000000ull
#define MMIO_STRIDE 0x1000
#define MMIO_MAX_DEVICES 32 /* scan bound, in case the space past the last device reads "virt" */
#define MAGIC_VIRT 0x74726976u

enum {
    REG_MAGIC = 0x000,
    REG_VERSION = 0x004,
    REG_DEVICE_ID = 0x008,
    REG_VENDOR_ID = 0x00c,
    REG_DEVICE_FEATURES = 0x010,
    REG_DEVICE_FEATURES_SEL = 0x014,
    REG_DRIVER_FEATURES = 0x020,
    REG_DRIVER_FEATURES_SEL = 0x024,
    REG_QUEUE_SEL = 0x030,
    REG_QUEUE_NUM_MAX = 0x034,
    REG_QUEUE_NUM = 0x038,
    REG_QUEUE_READY = 0x044,
    REG_QUEUE_NOTIFY = 0x050,
    REG_INTERRUPT_STATUS = 0x060,
    REG_INTERRUPT_ACK = 0x064,
    REG_STATUS = 0x070,
    REG_QUEUE_DESC_LOW = 0x080,
    REG_QUEUE_DESC_HIGH = 0x084,
    REG_QUEUE_DRIVER_LOW = 0x090,
    REG_QUEUE_DRIVER_HIGH = 0x094,
    REG_QUEUE_DEVICE_LOW = 0x0a0,
    REG_QUEUE_DEVICE_HIGH = 0x0a4,
    REG_CONFIG_GENERATION = 0x0fc,
    REG_CONFIG = 0x100,
};

enum { S_ACKNOWLEDGE = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_FAILED = 128 };

#define ID_BLOCK 2
#define ID_RNG 4
#define F_VERSION_1 (1ull << 32)
#define BLK_F_RO (1ull << 5)
#define BLK_F_FLUSH (1ull << 9)
#define INT_USED_RING 1u

static u32 rd(u64 base, u32 reg) { return *(volatile u32 *)(base + reg); }
static void wr(u64 base, u32 reg, u32 v) { *(volatile u32 *)(base + reg) = v; }

/* The window of the first device with this ID (0: any ID), or 0 if there is none. Windows are
 * contiguous from MMIO_BASE; a window with DeviceID 0 is an empty slot and is skipped. */
static u64 find_device(u32 id) {
    for (u64 i = 0; i < MMIO_MAX_DEVICES; i++) {
        u64 base = MMIO_BASE + i * MMIO_STRIDE;
        if (rd(base, REG_MAGIC) != MAGIC_VIRT) break;
        u32 dev = rd(base, REG_DEVICE_ID);
        if (dev && (!id || dev == id)) return base;
    }
    return 0;
}

/* Writing 0 resets the device; the driver then waits for Status to read back 0 (4.2.3.1.1).
 * Returns what Status last read. */
static u32 reset(u64 base) {
    wr(base, REG_STATUS, 0);
    u32 s = rd(base, REG_STATUS);
    for (u32 i = 0; s && i < 1000000; i++) {
        cpu_relax();
        s = rd(base, REG_STATUS);
    }
    return s;
}

/* Steps 1-6 of the initialisation in 3.1.1: reset, ACKNOWLEDGE, DRIVER, read the offer, accept
 * (offer & wanted), FEATURES_OK, and whether FEATURES_OK stuck (a device refuses a feature set
 * by leaving it clear). *offered gets the device's 64 feature bits. */
static int negotiate(u64 base, u64 wanted, u64 *offered) {
    reset(base);
    wr(base, REG_STATUS, S_ACKNOWLEDGE);
    wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(base, REG_DEVICE_FEATURES_SEL, 0);
    u64 f = rd(base, REG_DEVICE_FEATURES);
    wr(base, REG_DEVICE_FEATURES_SEL, 1);
    f |= (u64)rd(base, REG_DEVICE_FEATURES) << 32;
    *offered = f;
    u64 accept = f & wanted;
    wr(base, REG_DRIVER_FEATURES_SEL, 0);
    wr(base, REG_DRIVER_FEATURES, (u32)accept);
    wr(base, REG_DRIVER_FEATURES_SEL, 1);
    wr(base, REG_DRIVER_FEATURES, (u32)(accept >> 32));
    wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    return (rd(base, REG_STATUS) & S_FEATURES_OK) != 0;
}

/* ---- queue 0: a split virtqueue (2.7), one chain in flight at a time, always from desc 0 ---- */
#define QSZ 8
enum { DESC_F_NEXT = 1, DESC_F_WRITE = 2 };

static volatile struct {
    u64 addr;
    u32 len;
    u16 flags, next;
} desc[QSZ] __attribute__((aligned(16)));
static volatile struct {
    u16 flags, idx, ring[QSZ], used_event;
} avail __attribute__((aligned(2)));
static volatile struct {
    u16 flags, idx;
    struct { u32 id, len; } ring[QSZ];
    u16 avail_event;
} used __attribute__((aligned(4)));
static u16 last_used;  /* used.idx up to which completions are consumed */
static u32 last_isr;   /* InterruptStatus as read after the last completion */
static int isr_all_set; /* every completion so far had the used-ring bit set */

static void set_desc(int i, volatile void *buf, u32 len, u16 flags) {
    desc[i].addr = (u64)buf;
    desc[i].len = len;
    desc[i].flags = flags;
    desc[i].next = (u16)(i + 1);
}

/* Fresh rings for queue 0, handed to the device, then QueueReady (4.2.3.2). */
static int setup_queue(u64 base, const char *who) {
    wr(base, REG_QUEUE_SEL, 0);
    if (rd(base, REG_QUEUE_READY)) { puts(who); puts(": queue0 ready before setup\n"); return 0; }
    u32 max = rd(base, REG_QUEUE_NUM_MAX);
    if (max < QSZ) { puts(who); puts(": queue_num_max="); putdec(max); puts("\n"); return 0; }
    /* flags 0: we want interrupts (and so InterruptStatus), no EVENT_IDX. */
    avail.flags = 0;
    avail.idx = 0;
    used.flags = 0;
    used.idx = 0;
    for (int i = 0; i < QSZ; i++) {
        avail.ring[i] = 0;
        used.ring[i].id = 0;
        used.ring[i].len = 0;
    }
    last_used = 0;
    isr_all_set = 1;
    barrier();
    wr(base, REG_QUEUE_NUM, QSZ);
    wr(base, REG_QUEUE_DESC_LOW, (u32)(u64)desc);
    wr(base, REG_QUEUE_DESC_HIGH, (u32)((u64)desc >> 32));
    wr(base, REG_QUEUE_DRIVER_LOW, (u32)(u64)&avail);
    wr(base, REG_QUEUE_DRIVER_HIGH, (u32)((u64)&avail >> 32));
    wr(base, REG_QUEUE_DEVICE_LOW, (u32)(u64)&used);
    wr(base, REG_QUEUE_DEVICE_HIGH, (u32)((u64)&used >> 32));
    wr(base, REG_QUEUE_READY, 1);
    return 1;
}

/* The whole of 3.1.1 for a device we will use: negotiate (VERSION_1 required), queue 0,
 * DRIVER_OK. Prints "<who>: features_ok=0" (or another reason) and sets FAILED if it fails. */
static int bring_up(u64 base, u64 wanted, u64 *offered, const char *who) {
    int ok = negotiate(base, wanted | F_VERSION_1, offered);
    if (!ok || !(*offered & F_VERSION_1)) {
        puts(who); puts(": features_ok=0 offered="); puthex(*offered); puts("\n");
        wr(base, REG_STATUS, S_FAILED);
        return 0;
    }
    if (!setup_queue(base, who)) {
        wr(base, REG_STATUS, S_FAILED);
        return 0;
    }
    wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return 1;
}

/* Makes the chain at desc[0] available, notifies queue 0 and polls until the device uses it.
 * Then reads InterruptStatus (the device may publish the used ring a moment before it sets
 * the bit, so it is polled briefly too) and acknowledges what it saw.
 * Returns the used length, or -1 after printing "<who>: timeout". */
static long transact(u64 base, const char *who) {
    u16 ai = avail.idx;
    avail.ring[ai % QSZ] = 0;
    barrier(); /* the descriptors and ring entry before the index that publishes them */
    avail.idx = (u16)(ai + 1);
    barrier(); /* the index before the notification */
    wr(base, REG_QUEUE_NOTIFY, 0);
    for (u32 i = 0; used.idx == last_used; i++) {
        if (i == 100000000) { puts(who); puts(": timeout\n"); return -1; }
        cpu_relax();
    }
    barrier(); /* the used element (and buffers) only after the index that published them */
    u16 slot = last_used % QSZ;
    u32 id = used.ring[slot].id, len = used.ring[slot].len;
    last_used++;
    if (id != 0) { puts(who); puts(": used_id="); putdec(id); puts("\n"); }
    u32 isr = rd(base, REG_INTERRUPT_STATUS);
    for (u32 i = 0; !(isr & INT_USED_RING) && i < 1000000; i++) {
        cpu_relax();
        isr = rd(base, REG_INTERRUPT_STATUS);
    }
    last_isr = isr;
    if (!(isr & INT_USED_RING)) isr_all_set = 0;
    wr(base, REG_INTERRUPT_ACK, isr);
    return len;
}

/* ---- virtio-rng: two 64-byte requests ---- */
#define RNG_LEN 64
static volatile u8 rng_buf[2][RNG_LEN];

void test_virtio_rng(void) {
    u64 base = find_device(ID_RNG), offered;
    if (!base) { puts("virtio: no device\n"); return; }
    if (!bring_up(base, 0, &offered, "virtio-rng")) return;
    for (int r = 0; r < 2; r++) {
        for (int i = 0; i < RNG_LEN; i++) rng_buf[r][i] = 0; /* so "nonzero" means written */
        set_desc(0, rng_buf[r], RNG_LEN, DESC_F_WRITE);
        long len = transact(base, "virtio-rng");
        if (len < 0) return;
        if (r == 0) {
            u32 n = len < RNG_LEN ? (u32)len : RNG_LEN, nonzero = 0, distinct = 0;
            u64 seen[4] = {0, 0, 0, 0};
            for (u32 i = 0; i < n; i++) {
                u8 b = rng_buf[0][i];
                nonzero |= b != 0;
                if (!(seen[b >> 6] >> (b & 63) & 1)) distinct++;
                seen[b >> 6] |= 1ull << (b & 63);
            }
            puts("virtio-rng: features_ok=1 len="); putdec((u32)len);
            puts(" nonzero="); putdec(nonzero);
            puts(" distinct="); putdec(distinct);
            puts("\n");
        }
    }
    int differs = 0;
    for (int i = 0; i < RNG_LEN; i++) differs |= rng_buf[0][i] != rng_buf[1][i];
    puts("virtio-rng: second_differs="); putdec(differs); puts("\n");
    /* The status seen after the second completion, i.e. set again after the first was acked;
     * and after the ack it must read clear. */
    puts("virtio-rng: isr="); puthex(last_isr);
    puts(" isr_after_ack="); puthex(rd(base, REG_INTERRUPT_STATUS));
    puts("\n");
}

/* ---- virtio-blk: reads, a write, a flush, and the edges of the disk (5.2.6) ---- */
enum { BLK_T_IN = 0, BLK_T_OUT = 1, BLK_T_FLUSH = 4 };
#define SECTOR 512
static volatile struct { u32 type, reserved; u64 sector; } blk_hdr;
static volatile u8 blk_data[SECTOR];
static volatile u8 blk_status;

/* One request: header, the sector buffer (not for FLUSH), the status byte. Returns the status
 * the device wrote (0xff if it wrote none), or -1 on timeout. */
static int blk_request(u64 base, u32 type, u64 sector) {
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    int n = 0;
    set_desc(n++, &blk_hdr, sizeof(blk_hdr), DESC_F_NEXT);
    if (type != BLK_T_FLUSH)
        set_desc(n++, blk_data, SECTOR, DESC_F_NEXT | (type == BLK_T_IN ? DESC_F_WRITE : 0));
    set_desc(n, &blk_status, 1, DESC_F_WRITE);
    if (transact(base, "virtio-blk") < 0) return -1;
    return blk_status;
}

static u8 pattern(int i) { return (u8)((i * 7 + 3) & 0xff); }

/* A 64-bit config field read as two 32-bit halves, retried if ConfigGeneration moved (2.5.1). */
static u64 config64(u64 base, u32 off) {
    u32 gen, lo, hi;
    int tries = 0;
    do {
        gen = rd(base, REG_CONFIG_GENERATION);
        lo = rd(base, REG_CONFIG + off);
        hi = rd(base, REG_CONFIG + off + 4);
    } while (rd(base, REG_CONFIG_GENERATION) != gen && ++tries < 100);
    return (u64)hi << 32 | lo;
}

void test_virtio_blk(void) {
    u64 base = find_device(ID_BLOCK), offered;
    if (!base) { puts("virtio: no device\n"); return; }
    if (!bring_up(base, BLK_F_RO | BLK_F_FLUSH, &offered, "virtio-blk")) return;
    u64 capacity = config64(base, 0);
    puts("virtio-blk: capacity="); putdec(capacity);
    puts(" ro="); putdec(!!(offered & BLK_F_RO));
    puts(" flush="); putdec(!!(offered & BLK_F_FLUSH));
    puts("\n");

    int st = blk_request(base, BLK_T_IN, 0);
    if (st < 0) return;
    puts("virtio-blk: sector0=");
    for (int i = 0; i < 16; i++) {
        u8 c = blk_data[i];
        putc(c >= 0x20 && c < 0x7f ? (char)c : '.'); /* keep the console line one line */
    }
    puts("\n");

    for (int i = 0; i < SECTOR; i++) blk_data[i] = pattern(i);
    if ((st = blk_request(base, BLK_T_OUT, 1)) < 0) return;
    puts("virtio-blk: write_status="); putdec(st); puts("\n");

    if ((st = blk_request(base, BLK_T_FLUSH, 0)) < 0) return;
    puts("virtio-blk: flush_status="); putdec(st); puts("\n");

    for (int i = 0; i < SECTOR; i++) blk_data[i] = 0;
    if ((st = blk_request(base, BLK_T_IN, 1)) < 0) return;
    int same = st == 0;
    for (int i = 0; i < SECTOR; i++) same &= blk_data[i] == pattern(i);
    puts("virtio-blk: readback="); putdec(same); puts("\n");

    if ((st = blk_request(base, BLK_T_IN, capacity - 1)) < 0) return;
    puts("virtio-blk: last_status="); putdec(st); puts("\n");

    if ((st = blk_request(base, BLK_T_IN, capacity)) < 0) return;
    puts("virtio-blk: past_end_status="); putdec(st); puts("\n");

    puts("virtio-blk: isr_all_set="); putdec(isr_all_set); puts("\n");
}

/* ---- virtio-features: a modern-only device refuses a driver without VERSION_1 ---- */
void test_virtio_features(void) {
    u64 base = find_device(0), offered;
    if (!base) { puts("virtio: no device\n"); return; }
    puts("virtio-features: device_id="); putdec(rd(base, REG_DEVICE_ID));
    puts(" version="); putdec(rd(base, REG_VERSION));
    puts(" vendor="); puthex(rd(base, REG_VENDOR_ID));
    puts("\n");

    /* Everything offered except VERSION_1, so that is the only reason left to refuse. */
    int ok = negotiate(base, ~F_VERSION_1, &offered);
    puts("virtio-features: without_version_1_features_ok="); putdec(ok); puts("\n");

    puts("virtio-features: status_after_reset="); puthex(reset(base)); puts("\n");

    ok = negotiate(base, F_VERSION_1, &offered);
    puts("virtio-features: with_version_1_features_ok="); putdec(ok); puts("\n");
    reset(base);
}
