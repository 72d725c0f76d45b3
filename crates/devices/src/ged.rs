//! The ACPI Generic Event Device's register: the host raises an event (a bit), the GED's
//! interrupt fires, and the guest's `_EVT` method reads the register — which clears it — and
//! notifies the ACPI device the bit names (the power button, the VM generation id).

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Pending event bits and the interrupt that announces them.
pub struct Ged {
    pending: u8,
    irq: EventFd,
}

impl Ged {
    /// A GED interrupting through `irq` (an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self { pending: 0, irq }
    }

    /// Raises the events in `bits` and interrupts the guest.
    pub fn raise(&mut self, bits: u8) {
        self.pending |= bits;
        // A failed write means the counter is saturated: an interrupt is pending anyway.
        let _ = self.irq.write(1);
    }
}

impl BusDevice for Ged {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = std::mem::take(&mut self.pending);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_interrupts_and_reading_clears_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        ged.raise(1);
        ged.raise(2);
        assert_eq!(irq.read().unwrap(), 2);
        let mut b = [0u8];
        ged.read(0, &mut b);
        assert_eq!(b[0], 3);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "reading cleared the events");
    }
}
