/* Tests of the VMM's virtio-mmio devices, driven from inside the tiny test guest (virtio.c). */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

void test_virtio_rng(void);
void test_virtio_blk(void);
void test_virtio_features(void);
void test_virtio_net(void);

#endif
