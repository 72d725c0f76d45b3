//! virtio devices of a Stratus guest, and the virtio-mmio transport that carries them.
//!
//! A device (`block`, `rng`) knows its queues, features and configuration space and nothing
//! of its transport; `mmio::MmioTransport` owns the register layout, feature negotiation and
//! queue set-up, and calls the device when a queue is notified. Everything the guest writes
//! into a queue is hostile: devices read requests only through virtio-queue's checked
//! `Reader`/`Writer`, and a malformed request is answered with an error status (or dropped)
//! and counted, never a panic.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod rate_limiter;
pub mod rng;
pub mod tap;
pub mod vsock;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use virtio_queue::Queue;
/// Guest RAM as every device and the VMM see it: mmap-backed regions with a bitmap of the pages
/// the VMM itself wrote (device DMA), which dirty-page tracking adds to KVM's own log.
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: the device is a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// virtio device type ids (virtio 1.x, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
}

/// Interrupt status bit: a used buffer was added.
pub const INT_USED_RING: u32 = 1 << 0;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = 1 << 1;

/// A device's interrupt line: the status bits the driver reads through the transport and the
/// irqfd that raises the GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        // A failed write means the counter is saturated: an interrupt is pending anyway.
        let _ = self.irqfd.write(1);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        let _ = self.irqfd.write(1);
    }

    /// The pending interrupt bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Raises the interrupt line for the bits already pending (after a restore, whose
    /// interrupt controller may not hold an interrupt raised just before the save).
    pub fn raise_again(&self) {
        let _ = self.irqfd.write(1);
    }

    /// Sets the pending bits, as a snapshot saved them.
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd, for registering with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Counters every device keeps: what a user sees in metrics and what a test checks.
#[derive(Default, Debug)]
pub struct DeviceCounters {
    /// Requests completed successfully.
    pub requests: AtomicU64,
    /// Bytes moved between guest and backend.
    pub bytes: AtomicU64,
    /// Requests refused as malformed (bad chain, bad length, out of range).
    pub rejected: AtomicU64,
    /// Requests the backend failed (I/O errors).
    pub failed: AtomicU64,
}

impl DeviceCounters {
    /// Counts a malformed request from the guest, logging the first one only: a guest must
    /// not be able to flood the host's log.
    pub fn reject(&self, device: &str, what: &str) {
        if self.rejected.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!("[stratus] {device}: the guest sent {what} (logged once)");
        }
    }
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// The virtio device type (`device_type::*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VERSION_1 included).
    fn features(&self) -> u64;
    /// The driver settled on `features` (a subset of `features()`, VERSION_1 included).
    fn ack_features(&mut self, _features: u64) {}
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Handles the driver's notification of queue `index` (all queues are passed: a kick on
    /// one may let work on another go on); returns true if used buffers were added (the
    /// transport then interrupts the driver).
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool;
    /// Host-side descriptors the device waits on (a tap, a socket), watched edge-triggered by
    /// the event loop: the device must consume until it would block, or remember to resume.
    fn host_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// `host_fds()[index]` became ready; returns true if used buffers were added.
    fn process_host_event(&mut self, _index: usize, _queues: &mut [Queue], _mem: &GuestRam) -> bool {
        false
    }
    /// Whether the configuration space changed since the last call (the transport then
    /// bumps the generation and interrupts the driver).
    fn config_changed(&mut self) -> bool {
        false
    }
    /// The device's counters.
    fn counters(&self) -> &DeviceCounters;
    /// Device state a snapshot must keep beyond what the transport holds (queues, features),
    /// in the device's own encoding; most devices have none.
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes back what `save` gave, from a snapshot (hostile input: validate it).
    fn load(&mut self, _saved: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// The VM was restored from a snapshot into a new process: host-side connections the
    /// guest knew are gone. Returns true if used buffers were added (an event for the guest).
    fn restored(&mut self, _queues: &mut [Queue], _mem: &GuestRam) -> bool {
        false
    }
}

/// Takes every chain the driver made available. An available ring that cannot be read (an
/// index beyond the queue, memory outside the guest) gives nothing, and is counted and logged
/// once as the driver's error.
pub fn available_chains<'m>(
    queue: &mut Queue,
    mem: &'m GuestRam,
    counters: &DeviceCounters,
    device: &str,
) -> Vec<virtio_queue::DescriptorChain<&'m GuestRam>> {
    match virtio_queue::QueueOwnedT::iter(queue, mem) {
        Ok(iter) => iter.collect(),
        Err(_) => {
            counters.reject(device, "an invalid available ring");
            Vec::new()
        }
    }
}

/// Takes available chains one at a time for as long as `limiter` lets them go (a chain's
/// size is the sum of its descriptors); a chain the limiter holds back stays available, and
/// the limiter's timer says when to look again.
pub fn available_chains_limited<'m>(
    queue: &mut Queue,
    mem: &'m GuestRam,
    counters: &DeviceCounters,
    device: &str,
    limiter: &std::sync::Mutex<rate_limiter::RateLimiter>,
) -> Vec<virtio_queue::DescriptorChain<&'m GuestRam>> {
    if virtio_queue::QueueOwnedT::iter(queue, mem).is_err() {
        counters.reject(device, "an invalid available ring");
        return Vec::new();
    }
    let mut limiter = stratus_devices::bus::lock(limiter);
    let mut chains = Vec::new();
    while let Some(chain) = virtio_queue::QueueT::pop_descriptor_chain(queue, mem) {
        let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
        if !limiter.consume(bytes) {
            virtio_queue::QueueOwnedT::go_to_previous_position(queue);
            break;
        }
        chains.push(chain);
    }
    chains
}

/// Hands every chain to `handle` and returns it to the driver with the number of bytes
/// `handle` wrote into it; true if any chain was returned (the driver is then interrupted).
pub fn complete_chains<'m>(
    queue: &mut Queue,
    mem: &'m GuestRam,
    chains: Vec<virtio_queue::DescriptorChain<&'m GuestRam>>,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&'m GuestRam>) -> u32,
) -> bool {
    let mut used_any = false;
    for chain in chains {
        let head = chain.head_index();
        let written = handle(chain);
        used_any |= virtio_queue::QueueT::add_used(queue, mem, head, written).is_ok();
    }
    used_any
}

/// Copies `value`'s little-endian bytes at `offset` of a configuration space into `data`;
/// reads past the end give zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else { return };
    if offset >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - offset);
    data[..n].copy_from_slice(&config[offset..offset + n]);
}

#[cfg(test)]
mod testing;
