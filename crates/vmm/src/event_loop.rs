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
use vmm_sys_util::eventfd::EventFd;

use crate::control::RunControl;

/// Token bit marking a device's host descriptor rather than a queue.
const HOST_FD: u64 = 0x8000;
/// Token of the wake-up eventfd (a pause request).
const WAKE: u64 = u64::MAX;

/// The running device thread.
pub struct DeviceThread {
    wake: EventFd,
    _handle: JoinHandle<()>,
}

impl DeviceThread {
    /// Wakes the thread so that it sees a pause request.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// Starts the event loop for `transports`; it runs for the life of the VMM process and parks
/// at `control`'s checkpoint when the VM is paused.
pub fn spawn(
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    control: Arc<RunControl>,
) -> std::io::Result<Option<DeviceThread>> {
    if transports.is_empty() {
        return Ok(None);
    }
    let epoll = Epoll::new()?;
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    epoll.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE))?;
    let wake_in_thread = wake.try_clone()?;
    for (dev, transport) in transports.iter().enumerate() {
        let t = lock(transport);
        for (queue, evt) in t.queue_events().iter().enumerate() {
            let token = ((dev as u64) << 16) | queue as u64;
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, token))?;
        }
        // Host sides (a tap) are edge-triggered: the device reads until it would block, or
        // until the guest has no buffers left and a queue kick resumes it.
        for (index, fd) in t.device().host_fds().into_iter().enumerate() {
            let token = ((dev as u64) << 16) | HOST_FD | index as u64;
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token),
            )?;
        }
    }
    control.join();
    let control_on_error = control.clone();
    let spawned = std::thread::Builder::new().name("devices".into()).stack_size(256 << 10).spawn(move || {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("[stratus] device event loop stopped: {e}");
                    control.leave();
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == WAKE {
                    let _ = wake_in_thread.read();
                    control.checkpoint();
                    continue;
                }
                let dev = (token >> 16) as usize;
                let Some(transport) = transports.get(dev) else { continue };
                let mut t = lock(transport);
                if token & HOST_FD != 0 {
                    t.process_host_event((token & !HOST_FD & 0xffff) as usize);
                    continue;
                }
                let queue = (token & 0xffff) as usize;
                // Drain the counter first: kicks arriving while we process wake us again.
                if let Some(evt) = t.queue_events().get(queue) {
                    let _ = evt.read();
                }
                t.process_queue(queue);
            }
        }
    });
    match spawned {
        Ok(handle) => Ok(Some(DeviceThread { wake, _handle: handle })),
        Err(e) => {
            control_on_error.leave();
            Err(e)
        }
    }
}
