//! How a device tells the VMM that the guest asked to stop: a reason, recorded once, and an
//! eventfd that wakes whoever waits for the VM to end.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why a guest stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset itself; the string says how (i8042, ACPI reset register, triple fault).
    Reset(&'static str),
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest kernel panicked and said so through pvpanic.
    Panic,
    /// The VMM could not go on running the guest.
    Error(String),
}

/// The first exit reason any device or vCPU reports, and an eventfd signalled at that moment.
pub struct ExitSignal {
    reason: Mutex<Option<GuestExit>>,
    event: EventFd,
}

impl ExitSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { reason: Mutex::new(None), event: EventFd::new(libc::EFD_NONBLOCK)? })
    }

    /// Records `reason` unless another one came first, and wakes the waiter.
    pub fn raise(&self, reason: GuestExit) {
        let mut slot = crate::bus::lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
            // A failed write only means the counter is saturated: the waiter wakes regardless.
            let _ = self.event.write(1);
        }
    }

    /// The reason recorded, if any.
    pub fn reason(&self) -> Option<GuestExit> {
        crate::bus::lock(&self.reason).clone()
    }

    /// The eventfd signalled on the first `raise`.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_event_fires() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        assert!(s.event().read().is_err(), "not signalled yet");
        s.raise(GuestExit::PowerOff);
        s.raise(GuestExit::Panic);
        assert_eq!(s.reason(), Some(GuestExit::PowerOff));
        assert_eq!(s.event().read().unwrap(), 1);
    }
}
