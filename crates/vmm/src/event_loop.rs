//! The device event loop: one thread that waits (epoll) on every virtio queue's notification
//! eventfd and runs the device's queue processing when the guest kicks it. vCPU threads never
//! do device work: a guest's QUEUE_NOTIFY write is an ioeventfd signal that KVM completes
//! without leaving the kernel.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use stratus_devices::bus::lock;
use stratus_virtio::mmio::MmioTransport;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Starts the event loop for `transports`; it runs for the life of the VMM process.
pub fn spawn(transports: Vec<Arc<Mutex<MmioTransport>>>) -> std::io::Result<Option<JoinHandle<()>>> {
    if transports.is_empty() {
        return Ok(None);
    }
    let epoll = Epoll::new()?;
    for (dev, transport) in transports.iter().enumerate() {
        let t = lock(transport);
        for (queue, evt) in t.queue_events().iter().enumerate() {
            let token = ((dev as u64) << 16) | queue as u64;
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, token))?;
        }
    }
    let handle =
        std::thread::Builder::new().name("devices".into()).stack_size(256 << 10).spawn(move || {
            let mut events = vec![EpollEvent::default(); 64];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("[stratus] device event loop stopped: {e}");
                        return;
                    }
                };
                for event in &events[..n] {
                    let token = event.data();
                    let (dev, queue) = ((token >> 16) as usize, (token & 0xffff) as usize);
                    let Some(transport) = transports.get(dev) else { continue };
                    let mut t = lock(transport);
                    // Drain the counter first: kicks arriving while we process wake us again.
                    if let Some(evt) = t.queue_events().get(queue) {
                        let _ = evt.read();
                    }
                    t.process_queue(queue);
                }
            }
        })?;
    Ok(Some(handle))
}
