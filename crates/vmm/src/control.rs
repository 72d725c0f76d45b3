//! Pausing a running VM: every vCPU thread and the device thread stop at a safe point (outside
//! `KVM_RUN`, outside any device's lock) and wait there until resumed. A paused VM's vCPU
//! registers, device state and memory hold still, which is what a snapshot or the last phase of
//! a migration needs.
//!
//! A vCPU inside `KVM_RUN` is kicked out with a signal (`KICK_SIGNAL`, whose handler does
//! nothing: `KVM_RUN` returns `EINTR`). A kick that lands just before a thread enters
//! `KVM_RUN` would be lost, so `pause` repeats it until every thread has parked.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int) {}

/// Installs the (empty) handler of the kick signal, so that it interrupts `KVM_RUN` instead
/// of killing the process. SA_RESTART: the other system calls a vCPU thread makes (a console
/// write) go on as if nothing happened; `KVM_RUN` returns `EINTR` regardless.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (it does nothing).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore_kick as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct State {
    /// Threads should park.
    pause: bool,
    /// Threads taking part (vCPUs and the device thread) that have not left for good.
    active: usize,
    /// Threads parked right now.
    parked: usize,
}

/// The pause/resume rendezvous shared by the VM's threads and whoever controls the VM.
#[derive(Debug, Default)]
pub struct RunControl {
    state: Mutex<State>,
    changed: Condvar,
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A thread joins before it starts running.
    pub fn join(&self) {
        self.lock().active += 1;
        self.changed.notify_all();
    }

    /// A thread leaves for good (its vCPU stopped the VM, say): pause no longer waits for it.
    pub fn leave(&self) {
        self.lock().active -= 1;
        self.changed.notify_all();
    }

    /// Called by a VM thread at a safe point: parks while the VM is paused.
    pub fn checkpoint(&self) {
        self.checkpoint_with(|| {});
    }

    /// [`checkpoint`](Self::checkpoint), running `before_parking` once a pause is seen and
    /// before the thread counts as parked: whatever the thread must settle before the VM's
    /// state is read (a vCPU's unfinished port or MMIO access) is settled for every pause,
    /// including one asked for just after the thread last looked.
    pub fn checkpoint_with(&self, before_parking: impl FnOnce()) {
        if !self.lock().pause {
            return;
        }
        before_parking();
        let mut state = self.lock();
        if !state.pause {
            // Resumed meanwhile: nothing to park for.
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.pause {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    /// Asks threads to park without waiting (before they start: they park at once).
    pub fn request_pause(&self) {
        self.lock().pause = true;
    }

    /// Asks every thread to park and waits until all have; `kick` is called (repeatedly, a
    /// millisecond apart) to interrupt threads blocked in the kernel.
    pub fn pause(&self, mut kick: impl FnMut()) {
        let mut state = self.lock();
        state.pause = true;
        while state.parked < state.active {
            drop(state);
            kick();
            state = self.lock();
            if state.parked < state.active {
                state = self
                    .changed
                    .wait_timeout(state, Duration::from_millis(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }

    /// Lets every parked thread go on.
    pub fn resume(&self) {
        self.lock().pause = false;
        self.changed.notify_all();
    }

    /// Whether the VM is paused: asked to and every thread parked.
    pub fn is_paused(&self) -> bool {
        let state = self.lock();
        state.pause && state.parked >= state.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn pause_stops_every_thread_and_resume_lets_them_go_on() {
        let control = Arc::new(RunControl::default());
        let counters: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = counters
            .iter()
            .map(|counter| {
                let (control, counter, stop) = (control.clone(), counter.clone(), stop.clone());
                control.join();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        control.checkpoint();
                        counter.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    control.leave();
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(10));
        control.pause(|| {});
        assert!(control.is_paused());
        let frozen: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        std::thread::sleep(Duration::from_millis(20));
        let later: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(frozen, later, "a paused thread went on running");
        control.resume();
        std::thread::sleep(Duration::from_millis(20));
        for (c, before) in counters.iter().zip(&frozen) {
            assert!(c.load(Ordering::Relaxed) > *before, "a resumed thread stayed parked");
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        // Every thread left: a pause now has nobody to wait for.
        control.pause(|| {});
        assert!(control.is_paused());
    }
}
