//! A driver's side of the transport for unit tests: guest memory, a split virtqueue laid out
//! at fixed addresses, the initialisation sequence through the registers, and request chains.

use std::sync::Arc;

use crate::GuestRam;
use stratus_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::mmio::{reg, status, MmioTransport};
use crate::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

pub const MEM_SIZE: usize = 1 << 20;
/// Queue 0's rings; queue q's are `q * QUEUE_STRIDE` further on.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;
pub const QUEUE_STRIDE: u64 = 0x5000;
/// Data buffers live from here on.
pub const DATA: u64 = 0x10000;
pub const QUEUE_SIZE: u16 = 16;

pub const F_WRITE: u16 = 2;
pub const F_NEXT: u16 = 1;

pub struct Driver {
    pub mem: GuestRam,
    pub transport: MmioTransport,
    avail_idx: [u16; 3],
    queues: u32,
    /// The queue `set_desc`, `submit`, `post`, `used_*` and `fuzz_round` work on.
    current: usize,
}

pub fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    /// A transport for `device` with memory, not yet initialised.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let transport = MmioTransport::new(device, mem.clone(), interrupt).unwrap();
        Self { mem, transport, avail_idx: [0; 3], queues: 1, current: 0 }
    }

    /// Negotiates `features` and sets up queue 0; returns the final status register.
    pub fn init_with(&mut self, features: u64) -> u32 {
        let t = &mut self.transport;
        write32(t, reg::STATUS, 0);
        write32(t, reg::STATUS, status::ACKNOWLEDGE);
        write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(t, reg::DRIVER_FEATURES_SEL, 0);
        write32(t, reg::DRIVER_FEATURES, features as u32);
        write32(t, reg::DRIVER_FEATURES_SEL, 1);
        write32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if read32(t, reg::STATUS) & status::FEATURES_OK == 0 {
            return read32(t, reg::STATUS);
        }
        for queue in 0..self.queues {
            let off = u64::from(queue) * QUEUE_STRIDE;
            write32(t, reg::QUEUE_SEL, queue);
            write32(t, reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            write32(t, reg::QUEUE_DESC_LOW, (DESC + off) as u32);
            write32(t, reg::QUEUE_DESC_HIGH, 0);
            write32(t, reg::QUEUE_DRIVER_LOW, (AVAIL + off) as u32);
            write32(t, reg::QUEUE_DRIVER_HIGH, 0);
            write32(t, reg::QUEUE_DEVICE_LOW, (USED + off) as u32);
            write32(t, reg::QUEUE_DEVICE_HIGH, 0);
            write32(t, reg::QUEUE_READY, 1);
        }
        write32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        read32(t, reg::STATUS)
    }

    /// Makes `queue` the one later calls work on.
    pub fn select(&mut self, queue: usize) {
        self.current = queue;
    }

    fn off(&self) -> u64 {
        self.current as u64 * QUEUE_STRIDE
    }

    /// Initialises `queues` queues, each with its own rings, with every offered feature.
    pub fn init_queues(&mut self, queues: u32) {
        self.queues = queues;
        self.init();
    }

    /// Initialises with every feature the device offers.
    pub fn init(&mut self) {
        let t = &mut self.transport;
        write32(t, reg::DEVICE_FEATURES_SEL, 0);
        let lo = read32(t, reg::DEVICE_FEATURES);
        write32(t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = read32(t, reg::DEVICE_FEATURES);
        let features = u64::from(lo) | (u64::from(hi) << 32);
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        let s = self.init_with(features);
        assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
    }

    /// Writes descriptor `index`.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC + self.off() + u64::from(index) * 16;
        self.mem.write_obj(addr, GuestAddress(base)).unwrap();
        self.mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Posts a chain of (addr, len, device-writable) buffers as descriptors 0.., then notifies.
    pub fn submit(&mut self, buffers: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.set_desc(i as u16, addr, len, flags, i as u16 + 1);
        }
        self.post(0);
    }

    /// Puts descriptor `head` on the available ring and processes the queue.
    pub fn post(&mut self, head: u16) {
        self.make_available(head);
        self.transport.process_queue(self.current);
    }

    /// Puts descriptor `head` on the available ring without notifying the device.
    pub fn make_available(&mut self, head: u16) {
        let (q, off) = (self.current, self.off());
        let slot = AVAIL + off + 4 + u64::from(self.avail_idx[q] % QUEUE_SIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem.write_obj(self.avail_idx[q], GuestAddress(AVAIL + off + 2)).unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + self.off() + 2)).unwrap()
    }

    /// The (descriptor id, length) the device reported for used element `n`.
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let base = USED + self.off() + 4 + u64::from(n % QUEUE_SIZE) * 8;
        (self.mem.read_obj(GuestAddress(base)).unwrap(), self.mem.read_obj(GuestAddress(base + 4)).unwrap())
    }

    /// The length the device reported for used element `n`.
    pub fn used_len(&self, n: u16) -> u32 {
        self.used_elem(n).1
    }

    /// A small deterministic random generator for fuzz loops (xorshift64).
    pub fn rand(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Fills the descriptor table and available ring with random values (addresses mostly in
    /// or near guest memory, sometimes anywhere) and processes the queue. Returns how many
    /// used entries the device added.
    pub fn fuzz_round(&mut self, state: &mut u64) -> u16 {
        self.fuzz_round_on(state, 0)
    }

    /// `fuzz_round` on queue `queue`.
    pub fn fuzz_round_on(&mut self, state: &mut u64, queue: usize) -> u16 {
        self.select(queue);
        for i in 0..QUEUE_SIZE {
            let r = Self::rand(state);
            let addr = match r % 4 {
                0 => Self::rand(state),
                1 => MEM_SIZE as u64 - (r >> 40) % 64,
                _ => DATA + (r >> 20) % (MEM_SIZE as u64 - DATA),
            };
            let len = match (r >> 8) % 4 {
                0 => Self::rand(state) as u32,
                1 => 16,
                _ => ((r >> 24) % 8192) as u32,
            };
            let flags = ((r >> 32) % 8) as u16; // NEXT, WRITE, INDIRECT in any mix
            let next = ((r >> 48) % (u64::from(QUEUE_SIZE) + 2)) as u16;
            self.set_desc(i, addr, len, flags, next);
        }
        let before = self.used_idx();
        let heads = Self::rand(state) % 4 + 1;
        for _ in 0..heads {
            let head = (Self::rand(state) % (u64::from(QUEUE_SIZE) + 4)) as u16;
            self.make_available(head);
        }
        self.transport.process_queue(queue);
        self.used_idx().wrapping_sub(before)
    }
}
