//! The hardware-reduced ACPI registers announced in the FADT: sleep control (S5 = power off),
//! sleep status, and the reset register.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

const SLP_EN: u8 = 1 << 5;

/// The three one-byte registers, at offsets 0 (sleep control), 1 (sleep status), 2 (reset).
pub struct AcpiPowerManagement {
    exit: Arc<ExitSignal>,
    s5_sleep_type: u8,
    reset_value: u8,
}

impl AcpiPowerManagement {
    /// Registers that end the VM through `exit` when the guest enters `s5_sleep_type` or writes
    /// `reset_value` to the reset register.
    pub fn new(exit: Arc<ExitSignal>, s5_sleep_type: u8, reset_value: u8) -> Self {
        Self { exit, s5_sleep_type, reset_value }
    }
}

impl BusDevice for AcpiPowerManagement {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: wake status never set; nothing else is readable.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0 && (value >> 2) & 0x7 == self.s5_sleep_type => {
                self.exit.raise(GuestExit::PowerOff)
            }
            2 if value == self.reset_value => self.exit.raise(GuestExit::Reset("ACPI reset")),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPowerManagement::new(exit.clone(), 5, 1);
        pm.write(1, &[0x80]); // clearing wake status
        pm.write(0, &[5 << 2]); // sleep type without SLP_EN: nothing yet
        assert_eq!(exit.reason(), None);
        pm.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(GuestExit::PowerOff));
    }

    #[test]
    fn reset_register_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPowerManagement::new(exit.clone(), 5, 1);
        pm.write(2, &[0]);
        assert_eq!(exit.reason(), None);
        pm.write(2, &[1]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset("ACPI reset")));
    }
}
