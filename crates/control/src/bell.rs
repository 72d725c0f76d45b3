//! [`Bell`]: how a loop that runs every so often is asked to run now.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A wake-up for a loop thread: [`ring`](Bell::ring) from anywhere, and the loop's
/// [`wait`](Bell::wait) returns at once (or at its period, whichever is first).
#[derive(Default)]
pub struct Bell {
    rung: Mutex<bool>,
    signal: Condvar,
}

impl Bell {
    /// Asks the loop to run now.
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.signal.notify_one();
    }

    /// Waits for a ring, at most `period`, and clears it.
    pub fn wait(&self, period: Duration) {
        let mut rung = self.rung.lock().unwrap_or_else(|p| p.into_inner());
        if !*rung {
            rung = self.signal.wait_timeout(rung, period).unwrap_or_else(|p| p.into_inner()).0;
        }
        *rung = false;
    }
}
