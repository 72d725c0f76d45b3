//! pvpanic: the guest kernel writes to this port when it panics, so the VMM can report a crash
//! instead of a silent hang or reboot.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

/// The one-byte pvpanic register.
pub struct PvPanic(Arc<ExitSignal>);

impl PvPanic {
    /// A device that ends the VM through `exit` on a guest panic.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(exit)
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The events this device supports, as the guest driver probes them.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PANICKED | CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PANICKED != 0) {
            self.0.raise(GuestExit::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_bit_reports_a_panic() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = PvPanic::new(exit.clone());
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps[0], PANICKED | CRASH_LOADED);
        dev.write(0, &[CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
        dev.write(0, &[PANICKED]);
        assert_eq!(exit.reason(), Some(GuestExit::Panic));
    }
}
