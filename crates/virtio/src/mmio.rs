//! The virtio-mmio transport (virtio 1.x, section 4.2, register layout version 2): the
//! registers a driver uses to discover a device, negotiate features and set up queues.
//! Queue notifications normally arrive through ioeventfds, without a VM exit to this code.

use std::sync::Arc;

use crate::GuestRam;
use stratus_devices::BusDevice;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor id reported to the guest: "STRA".
pub const VENDOR_ID: u32 = 0x4152_5453;

/// Register offsets.
pub mod reg {
    /// Magic value.
    pub const MAGIC: u64 = 0x000;
    /// Version.
    pub const VERSION: u64 = 0x004;
    /// Device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features (32 bits selected by DEVICE_FEATURES_SEL).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 bits of device features.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 bits of driver features.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selected queue.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupts.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledgement.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available ring address, high.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring address, low.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// Errors creating or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A saved state does not fit this device.
    #[error("virtio device {slot}: saved state does not fit: {reason}")]
    State {
        /// Which device (its index).
        slot: usize,
        /// What did not fit.
        reason: String,
    },
    /// A queue could not be created with the device's size.
    #[error("virtio device type {0}: invalid queue size")]
    QueueSize(u32),
    /// An eventfd could not be created.
    #[error("creating a queue eventfd: {0}")]
    EventFd(std::io::Error),
}

/// One device behind its virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

/// One queue's position and layout, as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// The size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// The driver made the queue live.
    pub ready: bool,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Guest addresses of the descriptor table, available ring and used ring.
    pub desc_table: u64,
    /// See `desc_table`.
    pub avail_ring: u64,
    /// See `desc_table`.
    pub used_ring: u64,
}

/// Everything a snapshot keeps of one device behind its transport.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The virtio device type, checked on restore.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver wrote (acknowledged when FEATURES_OK is set).
    pub driver_features: u64,
    /// Selector registers.
    pub queue_sel: u32,
    /// See `queue_sel`.
    pub device_features_sel: u32,
    /// See `queue_sel`.
    pub driver_features_sel: u32,
    /// Configuration generation counter.
    pub config_generation: u32,
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// The queues in order.
    pub queues: Vec<QueueState>,
    /// The device's own state (`VirtioDevice::save`).
    pub device: Vec<u8>,
}

impl MmioTransport {
    /// The transport's and device's state, for a snapshot; the VM must be paused.
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueState {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
            device: self.device.save(),
        }
    }

    /// Puts the transport and device (device number `slot`) back in a saved state. The state
    /// comes from a file: anything that does not fit this device is refused, and a queue
    /// that is not valid in guest memory marks the device as needing a reset.
    pub fn restore(&mut self, slot: usize, state: &TransportState) -> Result<(), MmioError> {
        let misfit = |reason: String| MmioError::State { slot, reason };
        if state.device_type != self.device.device_type() {
            return Err(misfit(format!(
                "saved as device type {}, configured as type {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(misfit(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let offered = self.device.features();
        if state.status & status::FEATURES_OK != 0 && state.driver_features & !offered != 0 {
            return Err(misfit(format!(
                "the driver had features {:#x} this device does not offer ({offered:#x})",
                state.driver_features & !offered
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(misfit(format!(
                    "queue {i} was {} entries at most, the device offers {}",
                    saved.max_size,
                    current.max_size()
                )));
            }
            let queue = Queue::try_from(virtio_queue::QueueState {
                max_size: saved.max_size,
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: saved.event_idx,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            })
            .map_err(|e| misfit(format!("queue {i}: {e:?}")))?;
            queues.push(queue);
        }
        self.device.load(&state.device).map_err(misfit)?;
        self.queues = queues;
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        if self.status & status::FEATURES_OK != 0 {
            self.device.ack_features(self.driver_features);
        }
        if self.status & status::DRIVER_OK != 0
            && !self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem))
        {
            self.status |= status::DEVICE_NEEDS_RESET;
        }
        Ok(())
    }

    /// Tells a live device that it now runs in a restored VM (see `VirtioDevice::restored`),
    /// then takes what the driver left in its queues and raises a pending interrupt again.
    ///
    /// The device thread parks for a snapshot or a migration's last pass after a whole batch
    /// of notifications: a request the driver made available as it parked (or whose
    /// notification came after) is in the saved queue, but nothing notifies the restored
    /// device of it, and the guest would wait for it until it happens to notify that queue
    /// again (seconds for a journal commit; for ever if that request is the commit). And an
    /// interrupt raised just before the pause may be missing from the interrupt controller's
    /// saved state while its status bit was saved: raising it again is harmless (the driver
    /// reads the status and finds nothing new at worst).
    pub fn restored(&mut self) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let mut used = self.device.restored(&mut self.queues, &self.mem);
        for index in 0..self.queues.len() {
            if self.queues[index].ready() {
                used |= self.device.process_queue(index, &mut self.queues, &self.mem);
            }
        }
        if used {
            self.interrupt.signal_used();
        } else if self.interrupt.status() != 0 {
            self.interrupt.raise_again();
        }
    }

    /// Puts `device` behind virtio-mmio registers, interrupting through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let kind = device.device_type();
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&size| Queue::new(size).map_err(|_| MmioError::QueueSize(kind)))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue: register each as an ioeventfd on QUEUE_NOTIFY with the queue's
    /// index as data, and wait on them in the event loop.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The current device status.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Processes queue `index` after a notification, if the driver made the device live.
    pub fn process_queue(&mut self, index: usize) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        if self.device.process_queue(index, &mut self.queues, &self.mem) {
            self.interrupt.signal_used();
        }
    }

    /// Lets the device handle readiness of its host descriptor `index` (see
    /// `VirtioDevice::host_fds`), once the driver made the device live.
    pub fn process_host_event(&mut self, index: usize) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        if self.device.process_host_event(index, &mut self.queues, &self.mem) {
            self.interrupt.signal_used();
        }
        if self.device.config_changed() {
            self.config_generation = self.config_generation.wrapping_add(1);
            self.interrupt.signal_config();
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues cannot be reconfigured once the driver said DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added (except by reset).
        let added = value & !self.status;
        let mut new = self.status | added;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let acceptable =
                self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if acceptable {
                self.device.ack_features(self.driver_features);
            } else {
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            let ready_ok = self.status & status::FEATURES_OK != 0
                && self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem));
            if !ready_ok {
                new |= status::DEVICE_NEEDS_RESET;
            } else {
                // Drivers may post buffers and kick before DRIVER_OK (Linux's balloon posts
                // its statistics buffer that way); those kicks found the device not live.
                // Kick every queue again so the event loop looks at them now.
                for evt in &self.queue_events {
                    let _ = evt.write(1);
                }
            }
        }
        self.status = new;
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map(|q| u32::from(q.max_size())).unwrap_or(0),
            reg::QUEUE_READY => queue.map(|q| u32::from(q.ready())).unwrap_or(0),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Features are fixed once FEATURES_OK is set.
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            reg::QUEUE_NOTIFY => {
                // Reached only when no ioeventfd caught the write: hand it to the event loop.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.set_status(value),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and read whole.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testing::{read32, write32, Driver, DATA};

    #[test]
    fn identifies_itself() {
        let mut d = Driver::new(Box::new(Rng::new()));
        let t = &mut d.transport;
        assert_eq!(read32(t, reg::MAGIC), 0x7472_6976);
        assert_eq!(read32(t, reg::VERSION), 2);
        assert_eq!(read32(t, reg::DEVICE_ID), crate::device_type::RNG);
        assert_eq!(read32(t, reg::VENDOR_ID), VENDOR_ID);
        write32(t, reg::QUEUE_SEL, 0);
        assert_eq!(read32(t, reg::QUEUE_NUM_MAX), 256);
        write32(t, reg::QUEUE_SEL, 7);
        assert_eq!(read32(t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let mut d = Driver::new(Box::new(Rng::new()));
        let s = d.init_with(0);
        assert_eq!(s & status::FEATURES_OK, 0, "legacy drivers are refused");
        let s = d.init_with(VIRTIO_F_VERSION_1 | (1 << 20));
        assert_eq!(s & status::FEATURES_OK, 0, "a feature the device never offered");
        let s = d.init_with(VIRTIO_F_VERSION_1);
        assert_eq!(s & (status::FEATURES_OK | status::DRIVER_OK), status::FEATURES_OK | status::DRIVER_OK);
        write32(&mut d.transport, reg::STATUS, 0);
        assert_eq!(read32(&mut d.transport, reg::STATUS), 0, "reset");
    }

    #[test]
    fn a_queue_outside_guest_memory_needs_reset_and_is_never_used() {
        let mut d = Driver::new(Box::new(Rng::new()));
        let t = &mut d.transport;
        write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(t, reg::DRIVER_FEATURES_SEL, 1);
        write32(t, reg::DRIVER_FEATURES, 1);
        write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        write32(t, reg::QUEUE_NUM, 16);
        write32(t, reg::QUEUE_DESC_LOW, 0xffff_f000);
        write32(t, reg::QUEUE_DESC_HIGH, 0x7fff);
        write32(t, reg::QUEUE_READY, 1);
        write32(t, reg::STATUS, 0xf);
        assert_ne!(read32(t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        t.process_queue(0); // must not touch memory
        assert_eq!(t.interrupt().status(), 0);
    }

    #[test]
    fn queues_are_frozen_after_driver_ok() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        write32(&mut d.transport, reg::QUEUE_DESC_LOW, 0x8000);
        write32(&mut d.transport, reg::QUEUE_READY, 0);
        assert_eq!(read32(&mut d.transport, reg::QUEUE_READY), 1);
        d.submit(&[(DATA, 8, true)]);
        assert_eq!(d.used_idx(), 1, "the queue still works where it was set up");
    }

    #[test]
    fn interrupt_status_is_set_by_completion_and_cleared_by_ack() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        d.submit(&[(DATA, 8, true)]);
        assert_eq!(read32(&mut d.transport, reg::INTERRUPT_STATUS), 1);
        assert_eq!(d.transport.interrupt().irqfd().read().unwrap(), 1);
        write32(&mut d.transport, reg::INTERRUPT_ACK, 1);
        assert_eq!(read32(&mut d.transport, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn odd_sized_register_accesses_are_ignored() {
        let mut d = Driver::new(Box::new(Rng::new()));
        let mut b = [0xffu8; 2];
        d.transport.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        d.transport.write(reg::STATUS, &[1]);
        d.transport.write(reg::STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(read32(&mut d.transport, reg::STATUS), 0);
    }

    #[test]
    fn notify_register_wakes_the_queue_event() {
        let mut d = Driver::new(Box::new(Rng::new()));
        write32(&mut d.transport, reg::QUEUE_NOTIFY, 0);
        assert_eq!(d.transport.queue_events()[0].read().unwrap(), 1);
        write32(&mut d.transport, reg::QUEUE_NOTIFY, 9); // no such queue: ignored
    }
}
