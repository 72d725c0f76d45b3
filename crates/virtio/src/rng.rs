//! virtio-rng: an entropy source. Every device-writable buffer the guest posts is filled from
//! the host kernel's CSPRNG (getrandom).

use std::sync::atomic::Ordering;

use crate::GuestRam;
use virtio_queue::Queue;

use crate::{
    available_chains, complete_chains, device_type, DeviceCounters, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Most bytes handed out per request: a guest cannot make one request drain the host's RNG
/// into gigabytes of its memory.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    counters: DeviceCounters,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        let Some(queue) = queues.get_mut(index) else { return false };
        let chains = available_chains(queue, mem, &self.counters, "virtio-rng");
        complete_chains(queue, mem, chains, |chain| match chain.writer(mem) {
            Ok(mut writer) => {
                let len = writer.available_bytes().min(MAX_REQUEST_BYTES);
                let mut bytes = vec![0u8; len];
                if fill_random(&mut bytes) && std::io::Write::write_all(&mut writer, &bytes).is_ok() {
                    self.counters.requests.fetch_add(1, Ordering::Relaxed);
                    self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                    len as u32
                } else {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    0
                }
            }
            Err(_) => {
                self.counters.reject("virtio-rng", "a malformed descriptor chain");
                0
            }
        })
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Driver, DATA};
    use vm_memory::{Bytes, GuestAddress};

    fn read(d: &Driver, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_writable_buffers_with_fresh_bytes() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        d.submit(&[(DATA, 32, true), (DATA + 0x100, 32, true)]);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used_len(0), 64);
        let first = [read(&d, DATA, 32), read(&d, DATA + 0x100, 32)].concat();
        assert!(first.iter().any(|&b| b != 0));
        d.submit(&[(DATA, 32, true), (DATA + 0x100, 32, true)]);
        let second = [read(&d, DATA, 32), read(&d, DATA + 0x100, 32)].concat();
        assert_ne!(first, second);
        assert_eq!(d.transport.device().counters().bytes.load(Ordering::Relaxed), 128);
    }

    #[test]
    fn read_only_buffers_get_nothing() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        d.mem.write_slice(&[7u8; 16], GuestAddress(DATA)).unwrap();
        d.submit(&[(DATA, 16, false)]);
        assert_eq!(d.used_len(0), 0);
        assert_eq!(read(&d, DATA, 16), vec![7u8; 16], "the device never writes a driver's buffer");
    }

    #[test]
    fn huge_requests_are_capped() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        d.submit(&[(DATA, 512 << 10, true)]);
        assert_eq!(d.used_len(0) as usize, MAX_REQUEST_BYTES);
    }

    #[test]
    fn fuzz_random_descriptor_tables() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let rounds = 20_000;
        for _ in 0..rounds {
            let used = d.fuzz_round(&mut state);
            assert!(used <= 4, "never more used entries than chains posted");
        }
        println!("virtio-rng: {rounds} random descriptor tables processed without a fault");
    }
}

#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::mmio::{status, MmioTransport};
    use crate::testing::{Driver, DATA};
    use crate::Interrupt;
    use vmm_sys_util::eventfd::EventFd;

    fn fresh_transport(d: &Driver, device: Box<dyn VirtioDevice>) -> MmioTransport {
        let interrupt = std::sync::Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        MmioTransport::new(device, d.mem.clone(), interrupt).unwrap()
    }

    // A transport restored from a saved state picks up the queue exactly where it was: the
    // next request lands in the next used-ring entry.
    #[test]
    fn a_restored_transport_continues_the_queue() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        d.submit(&[(DATA, 16, true)]);
        d.submit(&[(DATA, 16, true)]);
        let saved = d.transport.state();
        assert_eq!(saved.queues[0].next_avail, 2);
        assert!(saved.status & status::DRIVER_OK != 0);

        d.transport = fresh_transport(&d, Box::new(Rng::new()));
        d.transport.restore(0, &saved).unwrap();
        assert_eq!(d.transport.state(), saved);
        d.submit(&[(DATA, 16, true)]);
        assert_eq!(d.used_idx(), 3, "the third request is the third used entry");
    }

    #[test]
    fn a_state_that_does_not_fit_is_refused() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.init();
        let saved = d.transport.state();
        let err = |state: &crate::mmio::TransportState| {
            let mut t = fresh_transport(&d, Box::new(Rng::new()));
            t.restore(3, state).unwrap_err().to_string()
        };
        let mut other_type = saved.clone();
        other_type.device_type = crate::device_type::BLOCK;
        assert!(err(&other_type).contains("device type"), "{}", err(&other_type));
        let mut more_queues = saved.clone();
        more_queues.queues.push(saved.queues[0].clone());
        assert!(err(&more_queues).contains("queues"));
        let mut odd_size = saved.clone();
        odd_size.queues[0].size = 3;
        assert!(err(&odd_size).contains("queue 0"), "{}", err(&odd_size));
        let mut features = saved.clone();
        features.driver_features |= 1 << 40;
        assert!(err(&features).contains("does not offer"));

        // Rings outside guest memory: accepted, but the device needs a reset, and never
        // touches memory it should not.
        let mut far = saved.clone();
        far.queues[0].desc_table = 1 << 40;
        let mut t = fresh_transport(&d, Box::new(Rng::new()));
        t.restore(0, &far).unwrap();
        assert!(t.status() & status::DEVICE_NEEDS_RESET != 0);
        t.process_queue(0);
    }
}
