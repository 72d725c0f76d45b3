//! The i8042 keyboard controller, reduced to what a VM needs: the CPU reset line that
//! `reboot=k` (and many tiny guests) pulse by writing 0xFE to port 0x64.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// Turns the controller's reset event into a guest exit.
pub struct ResetLine(Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.raise(GuestExit::Reset("i8042 reset"));
        Ok(())
    }
}

/// The controller on ports 0x60..=0x64.
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// A controller whose reset ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            let _ = self.0.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_fe_to_the_command_port_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0x20]);
        assert_eq!(exit.reason(), None, "other commands do not reset");
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset("i8042 reset")));
    }
}
