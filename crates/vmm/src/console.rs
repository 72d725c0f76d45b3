//! The serial console: where the guest's UART output goes (`ConsoleConfig`: the VMM's stdout,
//! a file, or a Unix socket an agent attaches to), and on a terminal: the VMM's main loop waits for the guest to stop while
//! it forwards standard input to the UART. On a terminal, input is raw (every key goes to the
//! guest, Ctrl-C included) and Ctrl-A then `x` stops the VM.

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd};

use std::sync::Mutex;

use stratus_devices::bus::lock;
use stratus_devices::serial::Serial;
use stratus_devices::{ExitSignal, GuestExit};
pub use stratus_vmm_api::ConsoleConfig;

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
pub fn run(exit: &ExitSignal, serial: &Mutex<Serial>, escape: bool) -> ConsoleEnd {
    let stdin = std::io::stdin();
    let stdin_fd = stdin.as_raw_fd();
    let mut stdin_open = true;
    let mut pending: Vec<u8> = Vec::new();
    let mut saw_escape = false;
    loop {
        if let Some(reason) = exit.reason() {
            return ConsoleEnd::Guest(reason);
        }
        let mut fds = [
            libc::pollfd { fd: exit.event().as_raw_fd(), events: libc::POLLIN, revents: 0 },
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
            let taken = lock(serial).enqueue_input(&pending);
            pending.drain(..taken);
        }
    }
}

/// Where console input goes: the guest's UART, once the VM exists (it is filled in after the
/// console's output was opened).
pub type ConsoleInput = std::sync::Arc<ConsoleSlot>;

/// The guest's UART once the VM exists; input typed before can wait for it.
#[derive(Default)]
pub struct ConsoleSlot {
    serial: Mutex<Option<std::sync::Arc<Mutex<Serial>>>>,
    filled: std::sync::Condvar,
}

impl ConsoleSlot {
    /// The VM's UART is `serial` from now on.
    pub fn fill(&self, serial: std::sync::Arc<Mutex<Serial>>) {
        *lock(&self.serial) = Some(serial);
        self.filled.notify_all();
    }

    /// The UART, if the VM exists.
    pub fn serial(&self) -> Option<std::sync::Arc<Mutex<Serial>>> {
        lock(&self.serial).clone()
    }

    /// The UART, waiting at most `timeout` for the VM to exist (input typed while a
    /// migration arrives reaches the guest as soon as it runs).
    pub fn wait_serial(&self, timeout: std::time::Duration) -> Option<std::sync::Arc<Mutex<Serial>>> {
        let slot = lock(&self.serial);
        let (slot, _) =
            self.filled.wait_timeout_while(slot, timeout, |s| s.is_none()).unwrap_or_else(|p| p.into_inner());
        slot.clone()
    }
}

/// Opens the console's output; for a socket, also starts the thread that accepts clients and
/// feeds their input to `serial` (once it exists: the slot is filled after the VM is built).
pub fn open(config: &ConsoleConfig, input: ConsoleInput) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    match config {
        ConsoleConfig::Stdout => Ok(Box::new(std::io::stdout())),
        ConsoleConfig::File { path } => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            Ok(Box::new(file))
        }
        ConsoleConfig::Socket { path } => Ok(Box::new(SocketConsole::listen(path, input)?)),
        ConsoleConfig::None => Ok(Box::new(std::io::sink())),
    }
}

/// Output kept for a client that attaches later.
const CONSOLE_BACKLOG: usize = 64 << 10;

#[derive(Default)]
struct Attached {
    client: Option<std::os::unix::net::UnixStream>,
    backlog: std::collections::VecDeque<u8>,
}

/// The console on a Unix socket (see `ConsoleConfig::Socket`).
pub struct SocketConsole {
    shared: std::sync::Arc<Mutex<Attached>>,
}

impl SocketConsole {
    fn listen(path: &std::path::Path, input: ConsoleInput) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = stratus_unix::bind(path)?;
        let shared = std::sync::Arc::new(Mutex::new(Attached::default()));
        let accept_shared = shared.clone();
        std::thread::Builder::new().name("console".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let Ok(mut reader) = stream.try_clone() else { continue };
                {
                    use std::io::Write;
                    let mut attached = lock(&accept_shared);
                    let backlog: Vec<u8> = attached.backlog.drain(..).collect();
                    let mut writer = &stream;
                    let _ = writer.write_all(&backlog);
                    attached.client = Some(stream);
                }
                // This client's input goes to the UART until it leaves.
                let mut buf = [0u8; 256];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut pending = &buf[..n];
                    while !pending.is_empty() {
                        let serial = input.serial();
                        let taken = serial.map(|s| lock(&s).enqueue_input(pending)).unwrap_or(pending.len());
                        pending = &pending[taken..];
                        if taken == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                    }
                }
                lock(&accept_shared).client = None;
            }
        })?;
        Ok(Self { shared })
    }
}

/// Sends what the client's socket takes now without blocking (a client that stops reading
/// must not stall the vCPU writing to the UART); `None` when the client is gone.
fn send_now(client: &std::os::unix::net::UnixStream, data: &[u8]) -> Option<usize> {
    // SAFETY: `data` is valid for `len` bytes; MSG_DONTWAIT never blocks, MSG_NOSIGNAL turns
    // a closed peer into EPIPE instead of SIGPIPE.
    let n = unsafe {
        libc::send(
            client.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        return Some(n as usize);
    }
    let err = std::io::Error::last_os_error().kind();
    (err == std::io::ErrorKind::WouldBlock || err == std::io::ErrorKind::Interrupted).then_some(0)
}

impl std::io::Write for SocketConsole {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut attached = lock(&self.shared);
        attached.backlog.extend(data);
        if let Some(client) = attached.client.take() {
            // Send what waits, oldest first; what the client cannot take yet stays queued.
            let (front, _) = attached.backlog.as_slices();
            let front = front.to_vec();
            if let Some(n) = send_now(&client, &front) {
                attached.backlog.drain(..n);
                attached.client = Some(client);
            }
        }
        let excess = attached.backlog.len().saturating_sub(CONSOLE_BACKLOG);
        attached.backlog.drain(..excess);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
