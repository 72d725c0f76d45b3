//! Where the agent listens: AF_VSOCK in a guest, a Unix socket for tests on the host.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A listening address, as given to `--listen`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `vsock:PORT`: any CID, this port.
    Vsock(u32),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Address, String> {
        if let Some(port) = s.strip_prefix("vsock:") {
            let port = port.parse().map_err(|_| format!("bad vsock port in '{s}'"))?;
            Ok(Address::Vsock(port))
        } else if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(Address::Unix(path.into()))
        } else {
            Err(format!("bad listen address '{s}': expected vsock:PORT or unix:PATH"))
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Vsock(port) => write!(f, "vsock:{port}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// AF_VSOCK, bound to any CID.
    Vsock(OwnedFd),
    /// A Unix socket.
    Unix(UnixListener),
}

impl Listener {
    /// Binds and listens. A stale Unix socket file at the path (left by a previous run) is
    /// replaced; any other file there is an error.
    pub fn bind(address: &Address) -> io::Result<Listener> {
        match address {
            Address::Vsock(port) => bind_vsock(*port).map(Listener::Vsock),
            Address::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                stratus_unix::bind(path).map(Listener::Unix)
            }
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::from(OwnedFd::from(s))),
            Listener::Vsock(fd) => {
                // SAFETY: accept4 on a listening socket we own; the peer address is not wanted
                // (null pointers are allowed), and the result is checked before use.
                let conn = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if conn < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(Stream::from(unsafe { OwnedFd::from_raw_fd(conn) }))
            }
        }
    }
}

fn bind_vsock(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked. CLOEXEC keeps it out of exec'd programs.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data, all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: the address points to a live sockaddr_vm of the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on the socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A connected stream socket, vsock or Unix: read(2) and write(2) work on either.
#[derive(Debug)]
pub struct Stream(File);

impl From<OwnedFd> for Stream {
    fn from(fd: OwnedFd) -> Stream {
        Stream(File::from(fd))
    }
}

impl Stream {
    /// Bounds how long one read waits (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        set_timeout(self.as_fd(), libc::SO_RCVTIMEO, timeout)
    }

    /// Bounds how long one write waits (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        set_timeout(self.as_fd(), libc::SO_SNDTIMEO, timeout)
    }

    /// Ends both directions, so the peer sees the end of the stream at once.
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on a socket we own; failure (already closed) is harmless.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn set_timeout(fd: BorrowedFd<'_>, option: libc::c_int, timeout: Option<Duration>) -> io::Result<()> {
    // A zero timeval means "forever" to the kernel: a zero bound becomes the smallest one.
    let timeout = match timeout {
        None => Duration::ZERO,
        Some(t) => t.max(Duration::from_micros(1)),
    };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads a timeval of the length given from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!("vsock:1024".parse(), Ok(Address::Vsock(1024)));
        assert_eq!("unix:/tmp/a.sock".parse(), Ok(Address::Unix("/tmp/a.sock".into())));
        for bad in ["vsock:", "vsock:x", "unix:", "tcp:1", "1024"] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
        assert_eq!(Address::Vsock(7).to_string(), "vsock:7");
    }
}
