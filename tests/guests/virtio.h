/* Tests of the VMM's virtio-mmio devices, driven from inside the tiny test guest (virtio.c), and
 * the block and network benchmarks bench/io runs. */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include <stdint.h>

void test_virtio_rng(void);
void test_virtio_blk(void);
void test_virtio_features(void);
void test_virtio_net(void);
void test_virtio_vsock(void);
void bench_virtio_blk(uint64_t mib, uint64_t ops);
void bench_virtio_net(uint64_t frames);
/* The disk half of test=dirty: sectors each filled with one 64-bit value. */
int stamp_disk_open(void);
int stamp_disk_write(uint64_t sector, uint64_t value);
int stamp_disk_read(uint64_t sector, uint64_t *value);

#endif
