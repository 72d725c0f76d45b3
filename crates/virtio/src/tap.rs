//! Tap devices: the host end of a guest's network card. Frames carry the 12-byte virtio-net
//! header on both sides (IFF_VNET_HDR), so they pass between tap and queue unchanged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the virtio-net header (virtio 1.x: with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// TUNSETOFFLOAD: the tap may hand over frames with partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUNSETOFFLOAD: the tap may hand over TCPv4 super-frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUNSETOFFLOAD: the tap may hand over TCPv6 super-frames.
pub const TUN_F_TSO6: u32 = 0x04;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No interface of that name.
    #[error("tap device {0} does not exist (create it with: ip tuntap add {0} mode tap)")]
    Missing(String),
    /// The name is not a valid interface name.
    #[error("'{0}' is not a valid network interface name")]
    BadName(String),
    /// The kernel refused.
    #[error("cannot attach to tap device {name}: {source}")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

/// An attached tap, non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= 16 || name.contains('/') || name == "." || name == ".." {
            return Err(TapError::BadName(name.to_owned()));
        }
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(TapError::Missing(name.to_owned()));
        }
        let attach = |source| TapError::Attach { name: name.to_owned(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(attach)?;
        // struct ifreq: 16 bytes of name, then the flags (a short) in the union.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is large enough for.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        let tap = Self { file, name: name.to_owned() };
        // No offloads until a guest driver accepts some: until then the host completes
        // checksums and segments before frames reach us.
        tap.set_offload(0).map_err(attach)?;
        Ok(tap)
    }

    /// Which offloaded frames (`TUN_F_*`) the tap may hand over.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write_all(frame)
    }

    /// A second handle on the same tap queue (frames written to either go out).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self { file: self.file.try_clone()?, name: self.name.clone() })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
