//! The serial console on the terminal: the VMM's main loop waits for the guest to stop while
//! it forwards standard input to the UART. On a terminal, input is raw (every key goes to the
//! guest, Ctrl-C included) and Ctrl-A then `x` stops the VM.

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd};

use stratus_devices::bus::lock;
use stratus_devices::GuestExit;

use crate::vm::RunningVm;

/// Ctrl-A: the escape key.
const ESCAPE: u8 = 0x01;

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal; `None` otherwise.
    pub fn enable(fd: BorrowedFd) -> Option<Self> {
        let fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Why the console loop returned.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The guest stopped.
    Guest(GuestExit),
    /// The user pressed Ctrl-A x.
    Detached,
}

/// Forwards standard input to the guest until the guest stops (or the user escapes, when
/// `escape` is set: stdin is a terminal).
pub fn run(vm: &RunningVm, escape: bool) -> ConsoleEnd {
    let stdin = std::io::stdin();
    let stdin_fd = stdin.as_raw_fd();
    let mut stdin_open = true;
    let mut pending: Vec<u8> = Vec::new();
    let mut saw_escape = false;
    loop {
        if let Some(reason) = vm.exit.reason() {
            return ConsoleEnd::Guest(reason);
        }
        let mut fds = [
            libc::pollfd { fd: vm.exit.event().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd {
                fd: if stdin_open && pending.is_empty() { stdin_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // While input waits for room in the UART's FIFO, wake up soon to retry.
        let timeout = if pending.is_empty() { -1 } else { 5 };
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            continue; // EINTR
        }
        if fds[1].revents != 0 {
            let mut buf = [0u8; 256];
            match stdin.lock().read(&mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(len) => {
                    for &b in &buf[..len] {
                        if escape && saw_escape {
                            saw_escape = false;
                            if b == b'x' {
                                return ConsoleEnd::Detached;
                            }
                            if b != ESCAPE {
                                pending.push(ESCAPE);
                            }
                        } else if escape && b == ESCAPE {
                            saw_escape = true;
                            continue;
                        }
                        pending.push(b);
                    }
                }
            }
        }
        if !pending.is_empty() {
            let taken = lock(&vm.serial).enqueue_input(&pending);
            pending.drain(..taken);
        }
    }
}
