//! The 16550 UART on COM1: the guest's console. Output goes to any writer (the terminal, a
//! file); input is queued by the VMM's console thread; interrupts go out through an eventfd
//! that KVM turns into the UART's IRQ (irqfd).

use std::io::Write;

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The 16550A receive FIFO, in bytes (vm-superio's, which it does not export).
const UART_FIFO_SIZE: usize = 64;

/// Raises the UART's interrupt by signalling its irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART at offsets 0..8 of its port range.
pub struct Serial {
    uart: Uart<IrqFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART writing guest output to `out` and interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Uart::new(IrqFdTrigger(irq), out) }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            input: s.in_buffer,
        }
    }

    /// Takes a saved UART's registers and receive FIFO, keeping this one's interrupt and
    /// output.
    pub fn restore(&mut self, state: &SerialState) -> std::io::Result<()> {
        let irq = self.uart.interrupt_evt().0.try_clone()?;
        let placeholder =
            Uart::new(IrqFdTrigger(irq.try_clone()?), Box::new(std::io::sink()) as Box<dyn Write + Send>);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        *self = Self::from_state(state, irq, out)?;
        Ok(())
    }

    /// A UART in a saved state, writing to `out` and interrupting through `irq`. A receive
    /// FIFO longer than the UART's is cut to fit: console input is not worth failing over.
    pub fn from_state(
        state: &SerialState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> std::io::Result<Self> {
        let r = state.registers;
        let mut input = state.input.clone();
        input.truncate(UART_FIFO_SIZE);
        let saved = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: input,
        };
        Uart::from_state(&saved, IrqFdTrigger(irq), vm_superio::serial::NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| std::io::Error::other(format!("restoring the UART: {e:?}")))
    }
}

/// What a snapshot keeps of the UART: its nine registers (divisor low/high, IER, IIR, LCR,
/// LSR, MCR, MSR, scratch) and the bytes waiting in its receive FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// The registers in the order above.
    pub registers: [u8; 9],
    /// Received bytes the guest has not read.
    pub input: Vec<u8>,
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            // A failed write to the host's console must not stop the guest.
            let _ = self.uart.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_the_guest() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        serial.write(1, &[0x01]); // IER: interrupt on received data
        assert_eq!(serial.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1, "input raised the interrupt");
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut c = [0u8];
        serial.read(0, &mut c);
        assert_eq!(c[0], b'o');
    }

    #[test]
    fn state_round_trips_registers_and_pending_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, Box::new(std::io::sink()));
        serial.write(3, &[0x1b]); // LCR
        serial.write(7, &[0x5a]); // scratch
        serial.enqueue_input(b"abc");
        let state = serial.state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = Serial::from_state(&state, irq, Box::new(std::io::sink())).unwrap();
        assert_eq!(restored.state(), state);
        let mut c = [0u8];
        restored.read(0, &mut c);
        assert_eq!(c[0], b'a', "queued input survives");
    }

    #[test]
    fn restore_in_place_keeps_the_output_and_interrupt() {
        let mut saved = Serial::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(std::io::sink()));
        saved.write(1, &[0x01]); // IER: interrupt on received data
        saved.write(7, &[0x5a]); // scratch
        let state = saved.state();

        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        serial.restore(&state).unwrap();
        assert_eq!(serial.state(), state);
        serial.write(0, b"x");
        assert_eq!(&*sink.0.lock().unwrap(), b"x", "output still goes to the same writer");
        serial.enqueue_input(b"k");
        assert!(irq.read().unwrap() >= 1, "the same interrupt is raised");
    }

    #[test]
    fn a_full_fifo_takes_no_more() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, Box::new(std::io::sink()));
        let big = vec![b'x'; 1000];
        let taken = serial.enqueue_input(&big);
        assert!(taken > 0 && taken < 1000);
        assert_eq!(serial.enqueue_input(&big), 0);
    }
}
