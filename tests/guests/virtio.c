/* A minimal virtio-mmio driver for the tiny test guest: virtio 1.x ("modern") devices behind the
 * version-2 MMIO register layout, one split virtqueue, completions polled. Just enough to check
 * from inside the VM that the VMM's devices keep the spec: feature negotiation, the ring
 * protocol, request status codes, the interrupt status register.
 * Memory is identity-mapped, so the address of a static buffer is what the device is given.
 * Everything the device reads or writes is volatile, so the compiler neither caches it nor turns
 * our loops over it into memset/memcpy calls (there is no libc to provide them). */
#include <stdint.h>
#include "virtio.h"

#include "console.h"

/* x86 keeps stores in order and volatile keeps the compiler from reordering them: a compiler
 * barrier at each hand-over point is all the ring protocol needs. */
#define barrier() __asm__ volatile("" ::: "memory")
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

/* ---- the transport: virtio 1.x section 4.2.2 ---- */
/* Where the transports are: Stratus puts device i at 0xd0000000 + i*0x1000; QEMU microvm has
 * its (mostly empty) transports at 0xfeb00000 + i*0x200. Both are scanned, Stratus's first; an
 * address no device claims reads all-ones (Stratus) or zero (QEMU), never the magic. */
static const struct { u64 base, stride; } mmio_layouts[] = {
    {0xd0000000ull, 0x1000}, /* Stratus */
    {0xfeb00000ull, 0x200},  /* QEMU microvm */
};
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
 * contiguous from each layout's base; a window with DeviceID 0 is an empty slot and is skipped. */
static u64 find_device(u32 id) {
    for (u64 l = 0; l < sizeof(mmio_layouts) / sizeof(mmio_layouts[0]); l++) {
        for (u64 i = 0; i < MMIO_MAX_DEVICES; i++) {
            u64 base = mmio_layouts[l].base + i * mmio_layouts[l].stride;
            if (rd(base, REG_MAGIC) != MAGIC_VIRT) break;
            u32 dev = rd(base, REG_DEVICE_ID);
            if (dev && (!id || dev == id)) return base;
        }
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

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct vring_avail {
    u16 flags, idx, ring[QSZ], used_event;
};
struct vring_used {
    u16 flags, idx;
    struct { u32 id, len; } ring[QSZ];
    u16 avail_event;
};
static volatile struct vring_desc desc[QSZ] __attribute__((aligned(16)));
static volatile struct vring_avail avail __attribute__((aligned(2)));
static volatile struct vring_used used __attribute__((aligned(4)));
static u16 last_used;  /* used.idx up to which completions are consumed */
static u32 last_isr;   /* InterruptStatus as read after the last completion */
static int isr_all_set; /* every completion so far had the used-ring bit set */

static void set_desc(int i, volatile void *buf, u32 len, u16 flags) {
    desc[i].addr = (u64)buf;
    desc[i].len = len;
    desc[i].flags = flags;
    desc[i].next = (u16)(i + 1);
}

/* Fresh rings (d, a, u) for queue q, handed to the device, then QueueReady (4.2.3.2). */
static int setup_rings(u64 base, u32 q, volatile struct vring_desc *d, volatile struct vring_avail *a,
                       volatile struct vring_used *u, const char *who) {
    wr(base, REG_QUEUE_SEL, q);
    if (rd(base, REG_QUEUE_READY)) {
        puts(who); puts(": queue"); putdec(q); puts(" ready before setup\n");
        return 0;
    }
    u32 max = rd(base, REG_QUEUE_NUM_MAX);
    if (max < QSZ) {
        puts(who); puts(": queue"); putdec(q); puts(" queue_num_max="); putdec(max); puts("\n");
        return 0;
    }
    /* flags 0: we want interrupts (and so InterruptStatus), no EVENT_IDX. */
    a->flags = 0;
    a->idx = 0;
    u->flags = 0;
    u->idx = 0;
    for (int i = 0; i < QSZ; i++) {
        a->ring[i] = 0;
        u->ring[i].id = 0;
        u->ring[i].len = 0;
    }
    barrier();
    wr(base, REG_QUEUE_NUM, QSZ);
    wr(base, REG_QUEUE_DESC_LOW, (u32)(u64)d);
    wr(base, REG_QUEUE_DESC_HIGH, (u32)((u64)d >> 32));
    wr(base, REG_QUEUE_DRIVER_LOW, (u32)(u64)a);
    wr(base, REG_QUEUE_DRIVER_HIGH, (u32)((u64)a >> 32));
    wr(base, REG_QUEUE_DEVICE_LOW, (u32)(u64)u);
    wr(base, REG_QUEUE_DEVICE_HIGH, (u32)((u64)u >> 32));
    wr(base, REG_QUEUE_READY, 1);
    return 1;
}

/* Queue 0 on the shared rings above, for the one-request-at-a-time devices. */
static int setup_queue(u64 base, const char *who) {
    last_used = 0;
    isr_all_set = 1;
    return setup_rings(base, 0, desc, &avail, &used, who);
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

/* ---- stamped sectors (test=dirty with a disk): each sector is one 64-bit value repeated ---- */
static u64 stamp_base;

int stamp_disk_open(void) {
    u64 offered;
    stamp_base = find_device(ID_BLOCK);
    return stamp_base && bring_up(stamp_base, BLK_F_FLUSH, &offered, "virtio-blk");
}

int stamp_disk_write(u64 sector, u64 value) {
    for (int i = 0; i < SECTOR; i++) blk_data[i] = (u8)(value >> (8 * (i % 8)));
    return blk_request(stamp_base, BLK_T_OUT, sector) == 0;
}

/* 1 if the sector holds one value throughout (put in *value), 0 if not or on error. */
int stamp_disk_read(u64 sector, u64 *value) {
    if (blk_request(stamp_base, BLK_T_IN, sector) != 0) return 0;
    u64 v = 0;
    for (int i = 0; i < 8; i++) v |= (u64)blk_data[i] << (8 * i);
    for (int i = 8; i < SECTOR; i++)
        if (blk_data[i] != (u8)(v >> (8 * (i % 8)))) return 0;
    *value = v;
    return 1;
}

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

/* ---- blk-bench: throughput and IOPS of the first disk, one request in flight ----
 * Four phases, each framed by "bench: start NAME" and "bench: end NAME bytes=N ops=N" (the host
 * timestamps those lines as they arrive: the guest has no clock it can trust):
 *   seq-read, seq-write   `mib` requests of 1 MiB, consecutive from sector 0 (wrapping)
 *   rand-read, rand-write `ops` requests of 4 KiB at 4 KiB-aligned xorshift64 positions
 * Each request is one chain (header, one data descriptor, status) whose completion is polled
 * on the used ring, then InterruptStatus read and acknowledged as an interrupt handler would.
 * Writes send whatever the buffer holds (the last data read), so the guest spends no time
 * filling it. A failed request prints "bench: error NAME status=S op=I" and ends the run. */
#define BENCH_SEQ_LEN (1u << 20)
#define BENCH_RAND_LEN 4096u
static volatile u8 bench_buf[BENCH_SEQ_LEN] __attribute__((aligned(4096)));

/* One request on `len` bytes of bench_buf at `sector`: the status, or -1 on timeout. */
static int bench_request(u64 base, u32 type, u64 sector, u32 len) {
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    set_desc(0, &blk_hdr, sizeof(blk_hdr), DESC_F_NEXT);
    set_desc(1, bench_buf, len, DESC_F_NEXT | (type == BLK_T_IN ? DESC_F_WRITE : 0));
    set_desc(2, &blk_status, 1, DESC_F_WRITE);
    if (transact(base, "virtio-blk") < 0) return -1;
    return blk_status;
}

static int bench_phase(u64 base, u64 capacity, const char *name, u32 type, int random, u64 count) {
    u32 len = random ? BENCH_RAND_LEN : BENCH_SEQ_LEN;
    u64 step = len / SECTOR, slots = capacity / step;
    u64 x = 0x9e3779b97f4a7c15ull; /* xorshift64 state: the same sequence every run */
    puts("bench: start "); puts(name); puts("\n");
    for (u64 i = 0; i < count; i++) {
        u64 slot = i % slots;
        if (random) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            slot = x % slots;
        }
        int st = bench_request(base, type, slot * step, len);
        if (st != 0) {
            puts("bench: error "); puts(name); puts(" status="); putdec((u32)st);
            puts(" op="); putdec(i); puts("\n");
            return 0;
        }
    }
    puts("bench: end "); puts(name); puts(" bytes="); putdec(count * len);
    puts(" ops="); putdec(count); puts("\n");
    return 1;
}

void bench_virtio_blk(u64 mib, u64 ops) {
    u64 base = find_device(ID_BLOCK), offered;
    if (!base) { puts("virtio: no device\n"); return; }
    /* FLUSH accepted as any real driver does: a device may take a driver without it as
     * unable to flush, and so write through (QEMU does). No flush is sent. */
    if (!bring_up(base, BLK_F_FLUSH, &offered, "virtio-blk")) return;
    u64 capacity = config64(base, 0);
    puts("bench: capacity="); putdec(capacity);
    puts(" ro="); putdec(!!(offered & BLK_F_RO));
    puts(" flush="); putdec(!!(offered & BLK_F_FLUSH));
    puts(" mib="); putdec(mib); puts(" ops="); putdec(ops); puts("\n");
    if (capacity < BENCH_SEQ_LEN / SECTOR) { puts("bench: disk smaller than 1 MiB\n"); return; }
    if (bench_phase(base, capacity, "seq-read", BLK_T_IN, 0, mib) &&
        bench_phase(base, capacity, "seq-write", BLK_T_OUT, 0, mib) &&
        bench_phase(base, capacity, "rand-read", BLK_T_IN, 1, ops) &&
        bench_phase(base, capacity, "rand-write", BLK_T_OUT, 1, ops))
        puts("bench: done\n");
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

/* ---- virtio-net: one broadcast frame out, the host's answer back (5.1) ---- */
#define ID_NET 1
#define NET_F_MAC (1ull << 5)
#define NET_RXQ 0
#define NET_TXQ 1
#define NET_HDR 12         /* struct virtio_net_hdr with VERSION_1: num_buffers always present */
#define ETH_MAX 1526       /* the largest frame a receive buffer takes, after the header */
#define ETH_HLEN 14
#define ETH_MIN_PAYLOAD 46
#define NET_RX_BUFS 4
#define NET_ETHERTYPE 0x88b5 /* IEEE 802 local experimental */
#define NET_TX_TIMEOUT 100000000u
#define NET_RX_TIMEOUT_TSC 10000000000ull /* ~2.5-10 s at a 1-4 GHz TSC */
#define NET_RX_TIMEOUT_ITERS 2000000000ull /* and never more than this many polls */

static volatile struct vring_desc net_rx_desc[QSZ] __attribute__((aligned(16)));
static volatile struct vring_avail net_rx_avail __attribute__((aligned(2)));
static volatile struct vring_used net_rx_used __attribute__((aligned(4)));
static volatile struct vring_desc net_tx_desc[QSZ] __attribute__((aligned(16)));
static volatile struct vring_avail net_tx_avail __attribute__((aligned(2)));
static volatile struct vring_used net_tx_used __attribute__((aligned(4)));
static volatile u8 net_rx_buf[NET_RX_BUFS][NET_HDR + ETH_MAX];
static volatile u8 net_tx_hdr[NET_HDR];
static volatile u8 net_tx_frame[ETH_HLEN + ETH_MIN_PAYLOAD];

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static void puthex2(u8 v) {
    putc("0123456789abcdef"[v >> 4]);
    putc("0123456789abcdef"[v & 15]);
}
/* The mac, byte by byte as the spec sizes it (4.2.2.2), retried if the config moved. */
static void read_mac(u64 base, u8 mac[6]) {
    u32 gen;
    int tries = 0;
    do {
        gen = rd(base, REG_CONFIG_GENERATION);
        for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(base + REG_CONFIG + i);
    } while (rd(base, REG_CONFIG_GENERATION) != gen && ++tries < 100);
}

static void putmac(const volatile u8 *m) {
    for (int i = 0; i < 6; i++) {
        if (i) putc(':');
        puthex2(m[i]);
    }
}

/* Descriptor `id` made available in (a) and queue q notified. */
static void net_post(u64 base, u32 q, volatile struct vring_avail *a, u16 id) {
    u16 ai = a->idx;
    a->ring[ai % QSZ] = id;
    barrier(); /* the descriptor and ring entry before the index that publishes them */
    a->idx = (u16)(ai + 1);
    barrier(); /* the index before the notification */
    wr(base, REG_QUEUE_NOTIFY, q);
}

/* InterruptStatus, polled briefly for the used-ring bit (it may trail the used index). */
static u32 isr_settled(u64 base) {
    u32 isr = rd(base, REG_INTERRUPT_STATUS);
    for (u32 i = 0; !(isr & INT_USED_RING) && i < 1000000; i++) {
        cpu_relax();
        isr = rd(base, REG_INTERRUPT_STATUS);
    }
    return isr;
}

void test_virtio_net(void) {
    const char *who = "virtio-net";
    u64 base = find_device(ID_NET), offered;
    if (!base) { puts("virtio: no device\n"); return; }
    u64 wanted = F_VERSION_1 | NET_F_MAC;
    int ok = negotiate(base, wanted, &offered);
    if (!ok || (offered & wanted) != wanted) {
        puts(who); puts(": features_ok=0 offered="); puthex(offered); puts("\n");
        wr(base, REG_STATUS, S_FAILED);
        return;
    }
    if (!setup_rings(base, NET_RXQ, net_rx_desc, &net_rx_avail, &net_rx_used, who) ||
        !setup_rings(base, NET_TXQ, net_tx_desc, &net_tx_avail, &net_tx_used, who)) {
        wr(base, REG_STATUS, S_FAILED);
        return;
    }
    wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    u8 mac[6];
    read_mac(base, mac);
    puts(who); puts(": mac="); putmac(mac); puts(" features_ok=1\n");

    /* Receive buffers first, so the answer has somewhere to go: one descriptor each. */
    for (u16 i = 0; i < NET_RX_BUFS; i++) {
        net_rx_desc[i].addr = (u64)net_rx_buf[i];
        net_rx_desc[i].len = NET_HDR + ETH_MAX;
        net_rx_desc[i].flags = DESC_F_WRITE;
        net_rx_desc[i].next = 0;
        net_rx_avail.ring[i] = i;
    }
    barrier();
    net_rx_avail.idx = NET_RX_BUFS;
    barrier();
    wr(base, REG_QUEUE_NOTIFY, NET_RXQ);
    u16 rx_last = 0;

    /* One broadcast frame from our mac, as a two-descriptor chain: header, then frame. */
    for (int i = 0; i < NET_HDR; i++) net_tx_hdr[i] = 0;
    for (int i = 0; i < 6; i++) {
        net_tx_frame[i] = 0xff;
        net_tx_frame[6 + i] = mac[i];
    }
    net_tx_frame[12] = NET_ETHERTYPE >> 8;
    net_tx_frame[13] = NET_ETHERTYPE & 0xff;
    const char *text = "stratus-guest-hello";
    for (int i = 0; i < ETH_MIN_PAYLOAD; i++) {
        net_tx_frame[ETH_HLEN + i] = (u8)*text;
        if (*text) text++;
    }
    net_tx_desc[0].addr = (u64)net_tx_hdr;
    net_tx_desc[0].len = NET_HDR;
    net_tx_desc[0].flags = DESC_F_NEXT;
    net_tx_desc[0].next = 1;
    net_tx_desc[1].addr = (u64)net_tx_frame;
    net_tx_desc[1].len = sizeof(net_tx_frame);
    net_tx_desc[1].flags = 0;
    net_tx_desc[1].next = 0;
    net_post(base, NET_TXQ, &net_tx_avail, 0);
    for (u32 i = 0; net_tx_used.idx == 0; i++) {
        if (i == NET_TX_TIMEOUT) { puts(who); puts(": tx timeout\n"); return; }
        cpu_relax();
    }
    barrier();
    u32 tx_id = net_tx_used.ring[0].id;
    if (tx_id != 0) { puts(who); puts(": tx used_id="); putdec(tx_id); puts("\n"); }
    puts(who); puts(": tx_done=1\n");
    /* InterruptStatus is not acknowledged until the end: an ack here could race with (and
     * swallow) the bit for an answer the device publishes meanwhile. */

    /* Wait for the answer; anything else the host sends (IPv6 router solicitations, ...) goes
     * back into the ring. */
    int got = 0;
    u64 t0 = rdtsc();
    for (u64 i = 0; !got; i++) {
        if (net_rx_used.idx == rx_last) {
            if (i >= NET_RX_TIMEOUT_ITERS || ((i & 0xffff) == 0 && rdtsc() - t0 > NET_RX_TIMEOUT_TSC))
                break;
            cpu_relax();
            continue;
        }
        barrier(); /* the used element and buffer only after the index that published them */
        u16 slot = rx_last % QSZ;
        u32 id = net_rx_used.ring[slot].id, len = net_rx_used.ring[slot].len;
        rx_last++;
        if (id >= NET_RX_BUFS) {
            puts(who); puts(": rx used_id="); putdec(id); puts("\n");
            return;
        }
        volatile u8 *frame = net_rx_buf[id] + NET_HDR;
        u32 flen = len >= NET_HDR ? len - NET_HDR : 0;
        if (flen > ETH_MAX) flen = ETH_MAX;
        if (flen >= ETH_HLEN && frame[12] == (NET_ETHERTYPE >> 8) && frame[13] == (NET_ETHERTYPE & 0xff)) {
            puts(who); puts(": rx len="); putdec(flen);
            puts(" ethertype=0x"); puthex2(frame[12]); puthex2(frame[13]);
            puts(" payload=");
            for (u32 j = ETH_HLEN; j < flen && frame[j]; j++) {
                u8 c = frame[j];
                putc(c >= 0x20 && c < 0x7f ? (char)c : '.'); /* keep the console line one line */
            }
            puts("\n");
            puts(who); puts(": rx_from="); putmac(frame + 6); puts("\n");
            got = 1;
        }
        net_post(base, NET_RXQ, &net_rx_avail, (u16)id); /* the buffer back, used or skipped */
    }
    if (!got) { puts(who); puts(": rx timeout\n"); }

    u32 isr = isr_settled(base);
    puts(who); puts(": isr="); puthex(isr); puts("\n");
    wr(base, REG_INTERRUPT_ACK, isr);
}

/* ---- virtio-vsock: a connection from the host echoed, then one out to the host (5.10) ----
 * Every packet is the 44-byte header and its payload in one descriptor. Receive buffers are
 * re-posted as soon as they are read; packets the test is not waiting for are answered where
 * a peer expects an answer (CREDIT_REQUEST, a REQUEST to a port nobody listens on, a SHUTDOWN)
 * and otherwise skipped. */
#define ID_VSOCK 19
#define VS_RXQ 0
#define VS_TXQ 1
#define VS_EVQ 2
#define VS_HDR 44
#define VS_RX_PAYLOAD 4096
#define VS_TX_PAYLOAD 128
#define VS_HOST_CID 2
#define VS_TYPE_STREAM 1
#define VS_BUF_ALLOC 65536
#define VS_LISTEN_PORT 1234
#define VS_LOCAL_PORT 40000
#define VS_HOST_PORT 5000
#define VS_LINE 64
#define VS_TX_TIMEOUT 100000000u
#define VS_TIMEOUT_TSC 30000000000ull  /* ~10 s at a 3 GHz TSC (7.5-30 s at 1-4 GHz) */
#define VS_TIMEOUT_ITERS 10000000000ull /* and never more than this many polls */
enum { VS_REQUEST = 1, VS_RESPONSE, VS_RST, VS_SHUTDOWN, VS_RW, VS_CREDIT_UPDATE, VS_CREDIT_REQUEST };

struct __attribute__((packed)) vs_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
};
_Static_assert(sizeof(struct vs_hdr) == VS_HDR, "vsock header is 44 bytes");

static volatile struct vring_desc vs_rx_desc[QSZ] __attribute__((aligned(16)));
static volatile struct vring_avail vs_rx_avail __attribute__((aligned(2)));
static volatile struct vring_used vs_rx_used __attribute__((aligned(4)));
static volatile struct vring_desc vs_tx_desc[QSZ] __attribute__((aligned(16)));
static volatile struct vring_avail vs_tx_avail __attribute__((aligned(2)));
static volatile struct vring_used vs_tx_used __attribute__((aligned(4)));
static volatile struct vring_desc vs_ev_desc[QSZ] __attribute__((aligned(16)));
static volatile struct vring_avail vs_ev_avail __attribute__((aligned(2)));
static volatile struct vring_used vs_ev_used __attribute__((aligned(4)));
static volatile u8 vs_rx_buf[QSZ][VS_HDR + VS_RX_PAYLOAD] __attribute__((aligned(8)));
static volatile u8 vs_tx_buf[VS_HDR + VS_TX_PAYLOAD] __attribute__((aligned(8)));
static u16 vs_rx_last, vs_tx_last;
static u64 vs_cid;

/* The two connections' state: the host's port (the peer) and payload bytes consumed. */
static u32 vs_in_port, vs_in_fwd, vs_out_fwd;
static int vs_in_open, vs_out_open;

/* Sends one packet from our port `sport` to host port `dport` and waits until the device has
 * taken it. Returns 0 (after printing why) if it does not. */
static int vs_send(u64 base, u32 sport, u32 dport, u16 op, u32 flags, u32 fwd_cnt,
                   const volatile u8 *payload, u32 len) {
    if (len > VS_TX_PAYLOAD) len = VS_TX_PAYLOAD;
    volatile struct vs_hdr *h = (volatile struct vs_hdr *)vs_tx_buf;
    h->src_cid = vs_cid;
    h->dst_cid = VS_HOST_CID;
    h->src_port = sport;
    h->dst_port = dport;
    h->len = len;
    h->type = VS_TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = VS_BUF_ALLOC;
    h->fwd_cnt = fwd_cnt;
    for (u32 i = 0; i < len; i++) vs_tx_buf[VS_HDR + i] = payload[i];
    vs_tx_desc[0].addr = (u64)vs_tx_buf;
    vs_tx_desc[0].len = VS_HDR + len;
    vs_tx_desc[0].flags = 0;
    vs_tx_desc[0].next = 0;
    net_post(base, VS_TXQ, &vs_tx_avail, 0);
    for (u32 i = 0; vs_tx_used.idx == vs_tx_last; i++) {
        if (i == VS_TX_TIMEOUT) { puts("virtio-vsock: timeout waiting for tx\n"); return 0; }
        cpu_relax();
    }
    barrier();
    vs_tx_last++;
    return 1;
}

/* The next packet the device delivers: header into *h, payload (up to cap bytes) into
 * payload, the buffer then re-posted. Returns 0 if none came within the timeout from t0. */
static int vs_recv(u64 base, struct vs_hdr *h, u8 *payload, u32 cap, u64 t0) {
    for (u64 i = 0; vs_rx_used.idx == vs_rx_last; i++) {
        if (i >= VS_TIMEOUT_ITERS || ((i & 0xffff) == 0 && rdtsc() - t0 > VS_TIMEOUT_TSC)) return 0;
        cpu_relax();
    }
    barrier(); /* the used element and buffer only after the index that published them */
    u16 slot = vs_rx_last % QSZ;
    u32 id = vs_rx_used.ring[slot].id, len = vs_rx_used.ring[slot].len;
    vs_rx_last++;
    if (id >= QSZ) {
        puts("virtio-vsock: rx used_id="); putdec(id); puts("\n");
        h->op = 0;
        return 1;
    }
    volatile u8 *buf = vs_rx_buf[id];
    u8 *raw = (u8 *)h;
    if (len < VS_HDR) {
        h->op = 0; /* nothing written (a dropped packet): skipped */
    } else {
        for (u32 i = 0; i < VS_HDR; i++) raw[i] = buf[i];
        u32 n = len - VS_HDR;
        if (n > h->len) n = h->len;
        if (n > cap) n = cap;
        h->len = n;
        for (u32 i = 0; i < n; i++) payload[i] = buf[VS_HDR + i];
    }
    net_post(base, VS_RXQ, &vs_rx_avail, (u16)id); /* the buffer back, used or skipped */
    return 1;
}

static int vs_from_host(const struct vs_hdr *h) {
    return h->src_cid == VS_HOST_CID && h->dst_cid == vs_cid && h->type == VS_TYPE_STREAM;
}

/* A packet the test was not waiting for. Answers what expects an answer; returns 0 if the
 * answer could not be sent. */
static int vs_other(u64 base, const struct vs_hdr *h) {
    if (h->op == 0 || !vs_from_host(h)) return 1;
    int in = vs_in_open && h->dst_port == VS_LISTEN_PORT && h->src_port == vs_in_port;
    int out = vs_out_open && h->dst_port == VS_LOCAL_PORT && h->src_port == VS_HOST_PORT;
    u32 fwd = in ? vs_in_fwd : out ? vs_out_fwd : 0;
    switch (h->op) {
    case VS_REQUEST: /* nobody listens there (or a second connection we do not take) */
        return vs_send(base, h->dst_port, h->src_port, VS_RST, 0, 0, 0, 0);
    case VS_CREDIT_REQUEST:
        if (in || out) return vs_send(base, h->dst_port, h->src_port, VS_CREDIT_UPDATE, 0, fwd, 0, 0);
        return 1;
    case VS_SHUTDOWN: /* the host closed its end: the connection is over, say so */
        if (in) vs_in_open = 0;
        if (out) vs_out_open = 0;
        if (in || out) return vs_send(base, h->dst_port, h->src_port, VS_RST, 0, fwd, 0, 0);
        return 1;
    case VS_RST:
        if (in) vs_in_open = 0;
        if (out) vs_out_open = 0;
        return 1;
    default: /* CREDIT_UPDATE, RESPONSE or RW we are not waiting for: nothing to do */
        return 1;
    }
}

/* Reads RW payload on the connection (our port lport, the host's hport) until a '\n' or
 * VS_LINE bytes. Returns the length, or -1 after printing why. *fwd counts what was read. */
static long vs_read_line(u64 base, u32 lport, u32 hport, u8 *line, u32 *fwd, int *open,
                         const char *what) {
    struct vs_hdr h;
    u8 payload[VS_LINE];
    u32 n = 0;
    u64 t0 = rdtsc();
    while (n == 0 || (line[n - 1] != '\n' && n < VS_LINE)) {
        if (!vs_recv(base, &h, payload, VS_LINE - n, t0)) {
            puts("virtio-vsock: timeout waiting for "); puts(what); puts("\n");
            return -1;
        }
        if (vs_from_host(&h) && h.dst_port == lport && h.src_port == hport && h.op == VS_RW) {
            for (u32 i = 0; i < h.len; i++) line[n++] = payload[i];
            *fwd += h.len;
            continue;
        }
        if (!vs_other(base, &h)) return -1;
        if (!*open) { puts("virtio-vsock: closed waiting for "); puts(what); puts("\n"); return -1; }
    }
    return n;
}

void test_virtio_vsock(void) {
    const char *who = "virtio-vsock";
    u64 base = find_device(ID_VSOCK), offered;
    if (!base) { puts("virtio: no device\n"); return; }
    int ok = negotiate(base, F_VERSION_1, &offered);
    if (!ok || !(offered & F_VERSION_1)) {
        puts(who); puts(": features_ok=0 offered="); puthex(offered); puts("\n");
        wr(base, REG_STATUS, S_FAILED);
        return;
    }
    if (!setup_rings(base, VS_RXQ, vs_rx_desc, &vs_rx_avail, &vs_rx_used, who) ||
        !setup_rings(base, VS_TXQ, vs_tx_desc, &vs_tx_avail, &vs_tx_used, who) ||
        !setup_rings(base, VS_EVQ, vs_ev_desc, &vs_ev_avail, &vs_ev_used, who)) {
        wr(base, REG_STATUS, S_FAILED);
        return;
    }
    vs_rx_last = vs_tx_last = 0;
    vs_in_open = vs_out_open = 0;
    vs_in_fwd = vs_out_fwd = 0;
    wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    vs_cid = config64(base, 0);

    /* Receive buffers in every receive descriptor, before anyone can connect. */
    for (u16 i = 0; i < QSZ; i++) {
        vs_rx_desc[i].addr = (u64)vs_rx_buf[i];
        vs_rx_desc[i].len = VS_HDR + VS_RX_PAYLOAD;
        vs_rx_desc[i].flags = DESC_F_WRITE;
        vs_rx_desc[i].next = 0;
        vs_rx_avail.ring[i] = i;
    }
    barrier();
    vs_rx_avail.idx = QSZ;
    barrier();
    wr(base, REG_QUEUE_NOTIFY, VS_RXQ);
    puts(who); puts(": cid="); putdec(vs_cid); puts(" features_ok=1\n");

    /* 1. The host connects to our port 1234: accept, echo one line. */
    struct vs_hdr h;
    u8 payload[VS_LINE];
    u64 t0 = rdtsc();
    for (;;) {
        if (!vs_recv(base, &h, payload, sizeof(payload), t0)) {
            puts(who); puts(": timeout waiting for request\n");
            return;
        }
        if (vs_from_host(&h) && h.op == VS_REQUEST && h.dst_port == VS_LISTEN_PORT) break;
        if (!vs_other(base, &h)) return;
    }
    vs_in_port = h.src_port;
    vs_in_open = 1;
    if (!vs_send(base, VS_LISTEN_PORT, vs_in_port, VS_RESPONSE, 0, 0, 0, 0)) return;
    puts(who); puts(": accepted from_port="); putdec(vs_in_port); puts("\n");

    static volatile u8 echo[6 + VS_LINE];
    u8 line[VS_LINE];
    long n = vs_read_line(base, VS_LISTEN_PORT, vs_in_port, line, &vs_in_fwd, &vs_in_open, "data");
    if (n < 0) return;
    const char *prefix = "echo: ";
    for (int i = 0; i < 6; i++) echo[i] = (u8)prefix[i];
    for (long i = 0; i < n; i++) echo[6 + i] = line[i];
    if (!vs_send(base, VS_LISTEN_PORT, vs_in_port, VS_RW, 0, vs_in_fwd, echo, (u32)(6 + n))) return;
    puts(who); puts(": echoed len="); putdec((u64)n); puts("\n");

    /* 2. We connect to the host's port 5000, say hello, read its answer, shut down. */
    if (!vs_send(base, VS_LOCAL_PORT, VS_HOST_PORT, VS_REQUEST, 0, 0, 0, 0)) return;
    t0 = rdtsc();
    for (;;) {
        if (!vs_recv(base, &h, payload, sizeof(payload), t0)) {
            puts(who); puts(": timeout waiting for response\n");
            return;
        }
        if (vs_from_host(&h) && h.dst_port == VS_LOCAL_PORT && h.src_port == VS_HOST_PORT) {
            if (h.op == VS_RESPONSE) break;
            if (h.op == VS_RST) { puts(who); puts(": refused\n"); return; }
        }
        if (!vs_other(base, &h)) return;
    }
    vs_out_open = 1;
    puts(who); puts(": connected\n");

    static volatile u8 hello[] = "hello-from-tiny-guest\n";
    if (!vs_send(base, VS_LOCAL_PORT, VS_HOST_PORT, VS_RW, 0, vs_out_fwd, hello, sizeof(hello) - 1))
        return;
    n = vs_read_line(base, VS_LOCAL_PORT, VS_HOST_PORT, line, &vs_out_fwd, &vs_out_open, "reply");
    if (n < 0) return;
    puts(who); puts(": reply=");
    for (long i = 0; i < n && line[i] != '\n'; i++) {
        u8 c = line[i];
        putc(c >= 0x20 && c < 0x7f ? (char)c : '.'); /* keep the console line one line */
    }
    puts("\n");
    if (!vs_send(base, VS_LOCAL_PORT, VS_HOST_PORT, VS_SHUTDOWN, 3, vs_out_fwd, 0, 0)) return;
    vs_out_open = 0;
    puts(who); puts(": done\n");
}

/* ---- net-bench: frame throughput of the first virtio-net device, both directions ----
 * The guest half of bench/io's network phases, framed like the block bench's:
 *   net-tx  `frames` frames of 1514 bytes (broadcast, ethertype 0x88b5, the frame's number in
 *           the first 8 payload bytes) sent as fast as the transmit ring takes them: every free
 *           descriptor is stamped and made available, the ring published and notified,
 *           completions reclaimed as they come.
 *   net-rx  every receive buffer posted, "bench: start net-rx" printed (the host starts sending
 *           when it reads that line), then frames of ethertype 0x88b5 counted until `frames`
 *           have arrived; used buffers go straight back into the ring, a batch at a time.
 * Each frame is one descriptor (header and frame together, as VERSION_1 allows). The driver
 * polls like a user-space (DPDK-style) one: it sets VRING_AVAIL_F_NO_INTERRUPT on both rings,
 * reads no InterruptStatus during a phase, and notifies only when the device has not set
 * VRING_USED_F_NO_NOTIFY.
 * The guest's own work per frame is kept to a few instructions (on PVM hosts every guest
 * instruction is emulated, and a driver that spends 50 of them per frame measures itself, not
 * the VMM): descriptor i always holds buffer i and available-ring slot i always names
 * descriptor i, so making frames available or re-posting buffers is one store of avail.idx.
 * That relies on the device using chains in the order they were made available (both VMMs
 * do, though IN_ORDER is not negotiated); the last used element of every batch is checked for
 * it, and a device that breaks it ends the run with "bench: error PHASE out_of_order ...", as
 * does a phase with no progress for NB_TIMEOUT_TSC. */
#define NB_QMAX 256
#define NB_FRAME 1514
#define NB_BUF (NET_HDR + ETH_MAX)
#define NB_TIMEOUT_TSC 30000000000ull /* ~10 s at a 3 GHz TSC (7.5-30 s at 1-4 GHz) */
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

struct nb_avail {
    u16 flags, idx, ring[NB_QMAX], used_event;
};
struct nb_used {
    u16 flags, idx;
    struct { u32 id, len; } ring[NB_QMAX];
    u16 avail_event;
};
static volatile struct vring_desc nb_rx_desc[NB_QMAX] __attribute__((aligned(16)));
static volatile struct nb_avail nb_rx_avail __attribute__((aligned(2)));
static volatile struct nb_used nb_rx_used __attribute__((aligned(4)));
static volatile struct vring_desc nb_tx_desc[NB_QMAX] __attribute__((aligned(16)));
static volatile struct nb_avail nb_tx_avail __attribute__((aligned(2)));
static volatile struct nb_used nb_tx_used __attribute__((aligned(4)));
static volatile u8 nb_rx_buf[NB_QMAX][NB_BUF] __attribute__((aligned(64)));
static volatile u8 nb_tx_buf[NB_QMAX][NET_HDR + NB_FRAME] __attribute__((aligned(64)));
static u64 nb_publishes, nb_notifies; /* per phase: ring publications, and those notified */

/* A full barrier (a store, then a load that must not pass it), as Linux's smp_mb() does it:
 * a locked add to the stack, which every emulator knows (mfence is not one of them on PVM). */
static inline void full_barrier(void) { __asm__ volatile("lock addl $0, -8(%%rsp)" ::: "memory", "cc"); }

/* Called every 64Ki polls without progress (TSC reads are kept out of the busy path: under
 * PVM they may trap): *t is when this idle stretch began, taken at its first check. */
static int idle_too_long(u64 *t, u64 idle) {
    u64 now = rdtsc();
    if (idle == 0x10000) *t = now;
    return now - *t > NB_TIMEOUT_TSC;
}

/* Queue q on the rings given, as large as the device allows up to NB_QMAX (a power of two,
 * so ring positions wrap with the 16-bit indices). Returns the size, or 0 after printing why. */
static u32 nb_setup_ring(u64 base, u32 q, volatile struct vring_desc *d, volatile struct nb_avail *a,
                         volatile struct nb_used *u) {
    wr(base, REG_QUEUE_SEL, q);
    u32 max = rd(base, REG_QUEUE_NUM_MAX), n = NB_QMAX;
    while (n > max) n >>= 1;
    if (rd(base, REG_QUEUE_READY) || n < 2) {
        puts("bench: error queue"); putdec(q); puts(" queue_num_max="); putdec(max); puts("\n");
        return 0;
    }
    a->flags = AVAIL_F_NO_INTERRUPT;
    a->idx = 0;
    for (u32 i = 0; i < n; i++) a->ring[i] = (u16)i; /* slot i names descriptor i, for good */
    u->flags = 0;
    u->idx = 0;
    barrier();
    wr(base, REG_QUEUE_NUM, n);
    wr(base, REG_QUEUE_DESC_LOW, (u32)(u64)d);
    wr(base, REG_QUEUE_DESC_HIGH, (u32)((u64)d >> 32));
    wr(base, REG_QUEUE_DRIVER_LOW, (u32)(u64)a);
    wr(base, REG_QUEUE_DRIVER_HIGH, (u32)((u64)a >> 32));
    wr(base, REG_QUEUE_DEVICE_LOW, (u32)(u64)u);
    wr(base, REG_QUEUE_DEVICE_HIGH, (u32)((u64)u >> 32));
    wr(base, REG_QUEUE_READY, 1);
    return n;
}

/* Publishes the avail index `idx` and notifies queue q unless the device said not to. */
static void nb_publish(u64 base, u32 q, volatile struct nb_avail *a, volatile struct nb_used *u, u16 idx) {
    barrier(); /* the buffers before the index that publishes them */
    a->idx = idx;
    full_barrier(); /* the index before reading the device's flag */
    nb_publishes++;
    if (!(u->flags & USED_F_NO_NOTIFY)) {
        wr(base, REG_QUEUE_NOTIFY, q);
        nb_notifies++;
    }
}

/* Whether the used element before position `now` names the descriptor made available at
 * that position (see above); prints the error if not. */
static int nb_in_order(const char *name, volatile struct nb_used *u, u32 qn, u16 now) {
    u32 id = u->ring[(u16)(now - 1) & (qn - 1)].id;
    if (id == ((u16)(now - 1) & (qn - 1))) return 1;
    puts("bench: error "); puts(name); puts(" out_of_order used_id="); putdec(id);
    puts(" at="); putdec((u16)(now - 1)); puts("\n");
    return 0;
}

/* The phase's end line, then (outside the phase) how the frames were batched. */
static void nb_end(const char *name, u64 bytes, u64 ops) {
    puts("bench: end "); puts(name); puts(" bytes="); putdec(bytes);
    puts(" ops="); putdec(ops); puts("\n");
    puts("bench: batching "); puts(name); puts(" publishes="); putdec(nb_publishes);
    puts(" notifies="); putdec(nb_notifies); puts("\n");
    nb_publishes = nb_notifies = 0;
}

/* Frame numbers first..first+n-1 into their buffers (frame k lives in buffer k % qn). */
static void nb_stamp(u32 qn, u64 first, u64 n) {
    u32 slot = (u32)(first & (qn - 1));
    while (n) {
        u32 run = qn - slot;
        if (run > n) run = (u32)n;
        volatile u8 *p = nb_tx_buf[slot] + NET_HDR + ETH_HLEN;
#pragma GCC unroll 8
        for (u32 k = 0; k < run; k++) {
            *(volatile u64 *)p = first + k;
            p += sizeof(nb_tx_buf[0]);
        }
        first += run;
        n -= run;
        slot = 0;
    }
}

static int nb_transmit(u64 base, u32 qn, const u8 *mac, u64 frames) {
    for (u32 i = 0; i < qn; i++) {
        volatile u8 *b = nb_tx_buf[i], *f = b + NET_HDR;
        for (int j = 0; j < NET_HDR; j++) b[j] = 0;
        for (int j = 0; j < 6; j++) {
            f[j] = 0xff;
            f[6 + j] = mac[j];
        }
        f[12] = NET_ETHERTYPE >> 8;
        f[13] = NET_ETHERTYPE & 0xff;
        for (int j = ETH_HLEN; j < NB_FRAME; j++) f[j] = 0;
        nb_tx_desc[i].addr = (u64)b;
        nb_tx_desc[i].len = NET_HDR + NB_FRAME;
        nb_tx_desc[i].flags = 0;
        nb_tx_desc[i].next = 0;
    }
    u16 last = 0; /* used index consumed */
    u64 sent = 0, done = 0, t = 0, idle = 0;
    puts("bench: start net-tx\n");
    while (done < frames) {
        u16 now = nb_tx_used.idx;
        int progress = now != last;
        if (progress) {
            barrier(); /* the used elements only after the index that published them */
            if (!nb_in_order("net-tx", &nb_tx_used, qn, now)) return 0;
            done += (u16)(now - last);
            last = now;
        }
        u64 room = qn - (sent - done);
        if (room > frames - sent) room = frames - sent;
        if (room) {
            nb_stamp(qn, sent, room);
            sent += room;
            nb_publish(base, NET_TXQ, &nb_tx_avail, &nb_tx_used, (u16)sent);
            progress = 1;
        }
        if (progress) {
            idle = 0;
        } else {
            cpu_relax();
            if ((++idle & 0xffff) == 0 && idle_too_long(&t, idle)) {
                puts("bench: error net-tx timeout sent="); putdec(sent);
                puts(" done="); putdec(done); puts("\n");
                return 0;
            }
        }
    }
    nb_end("net-tx", frames * NB_FRAME, frames);
    return 1;
}

static int nb_receive(u64 base, u32 qn, u64 frames) {
    for (u32 i = 0; i < qn; i++) {
        nb_rx_desc[i].addr = (u64)nb_rx_buf[i];
        nb_rx_desc[i].len = NB_BUF;
        nb_rx_desc[i].flags = DESC_F_WRITE;
        nb_rx_desc[i].next = 0;
    }
    barrier();
    nb_rx_avail.idx = (u16)qn;
    barrier();
    wr(base, REG_QUEUE_NOTIFY, NET_RXQ); /* the first buffers are always announced */
    u16 last = 0, posted = (u16)qn;
    u64 got = 0, bytes = 0, seen = 0, t = 0, idle = 0;
    const u16 ethertype = (u16)(NET_ETHERTYPE >> 8 | (NET_ETHERTYPE & 0xff) << 8); /* as loaded */
    puts("bench: start net-rx\n");
    while (got < frames) {
        u16 now = nb_rx_used.idx;
        if (now == last) {
            cpu_relax();
            if ((++idle & 0xffff) == 0 && idle_too_long(&t, idle)) {
                puts("bench: error net-rx timeout received="); putdec(got);
                puts(" other="); putdec(seen - got); puts("\n");
                return 0;
            }
            continue;
        }
        idle = 0;
        barrier(); /* the used elements and buffers only after the index that published them */
        if (!nb_in_order("net-rx", &nb_rx_used, qn, now)) return 0;
        /* Count the batch: frames of our ethertype, and their bytes (the used length less the
         * header). The host kernel's own traffic, if any, is skipped. */
        u32 slot = last & (qn - 1), n = (u16)(now - last);
        seen += n;
        while (n) {
            u32 run = qn - slot;
            if (run > n) run = n;
            volatile u32 *len = &nb_rx_used.ring[slot].len;
            volatile u8 *f = nb_rx_buf[slot] + NET_HDR + 12;
#pragma GCC unroll 4
            for (u32 k = 0; k < run; k++) {
                if (*(volatile u16 *)f == ethertype) {
                    got++;
                    bytes += *len;
                }
                len += 2;
                f += sizeof(nb_rx_buf[0]);
            }
            n -= run;
            slot = 0;
        }
        last = now;
        posted = (u16)(now + qn); /* every used buffer back: all qn are posted again */
        nb_publish(base, NET_RXQ, &nb_rx_avail, &nb_rx_used, posted);
    }
    nb_end("net-rx", bytes - got * NET_HDR, got);
    return 1;
}

void bench_virtio_net(u64 frames) {
    u64 base = find_device(ID_NET), offered;
    if (!base) { puts("virtio: no device\n"); return; }
    u64 wanted = F_VERSION_1 | NET_F_MAC;
    int ok = negotiate(base, wanted, &offered);
    if (!ok || (offered & wanted) != wanted) {
        puts("bench: error features_ok=0 offered="); puthex(offered); puts("\n");
        wr(base, REG_STATUS, S_FAILED);
        return;
    }
    u32 rxn = nb_setup_ring(base, NET_RXQ, nb_rx_desc, &nb_rx_avail, &nb_rx_used);
    u32 txn = rxn ? nb_setup_ring(base, NET_TXQ, nb_tx_desc, &nb_tx_avail, &nb_tx_used) : 0;
    if (!txn) {
        wr(base, REG_STATUS, S_FAILED);
        return;
    }
    wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u8 mac[6];
    read_mac(base, mac);
    puts("bench: mac="); putmac(mac);
    puts(" rxq="); putdec(rxn); puts(" txq="); putdec(txn);
    puts(" frames="); putdec(frames); puts("\n");
    if (nb_transmit(base, txn, mac, frames) && nb_receive(base, rxn, frames)) {
        wr(base, REG_INTERRUPT_ACK, rd(base, REG_INTERRUPT_STATUS));
        puts("bench: done\n");
    }
}
