//! `info`: what the guest reports about itself.

use std::ffi::c_char;
use std::net::Ipv4Addr;

use super::describe;
use crate::message::GuestInfo;

/// Collects the guest's description; the error is one line for the client.
pub(super) fn gather() -> Result<GuestInfo, String> {
    // SAFETY: utsname is plain old data, all zeroes is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname(2) fills the struct we pass, which lives for the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(format!("uname: {}", describe(&std::io::Error::last_os_error())));
    }
    let uptime = std::fs::read_to_string("/proc/uptime")
        .map_err(|e| format!("reading /proc/uptime: {}", describe(&e)))?;
    let uptime_secs = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected /proc/uptime: {uptime:?}"))?;
    Ok(GuestInfo {
        hostname: c_string(&uts.nodename),
        addresses: ipv4_addresses()?,
        kernel: c_string(&uts.release),
        uptime_secs,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        cid: local_cid(),
    })
}

/// The guest's own vsock CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock). A clone restored
/// from a snapshot re-reads it from its device when the host resets the transport.
fn local_cid() -> Option<u32> {
    use std::os::fd::AsRawFd;
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: u32 = 0x7b9; // _IO(7, 0xb9)
    let vsock = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 to the pointer it is given, which lives for the call.
    let rc = unsafe { libc::ioctl(vsock.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID as _, &mut cid) };
    (rc == 0).then_some(cid)
}

/// A NUL-terminated `char` array (from uname) as a string.
fn c_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The non-loopback IPv4 addresses, `A.B.C.D/N`, in the kernel's order.
fn ipv4_addresses() -> Result<Vec<String>, String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs stores a list it allocated in `head`; it is freed below, once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(format!("getifaddrs: {}", describe(&std::io::Error::last_os_error())));
    }
    let mut addresses = Vec::new();
    let mut node = head;
    while !node.is_null() {
        // SAFETY: `node` is an element of the list from getifaddrs, alive until freeifaddrs.
        let ifa = unsafe { &*node };
        node = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_LOOPBACK as libc::c_uint != 0 {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr, whose family field is always valid.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in; so is its netmask when present.
        let (address, netmask) = unsafe {
            let address = (*ifa.ifa_addr.cast::<libc::sockaddr_in>()).sin_addr.s_addr;
            let netmask = (!ifa.ifa_netmask.is_null())
                .then(|| (*ifa.ifa_netmask.cast::<libc::sockaddr_in>()).sin_addr.s_addr);
            (address, netmask)
        };
        // s_addr is in network order, i.e. its memory bytes are the address's octets.
        let prefix = netmask.map_or(32, |m| u32::from_be(m).leading_ones());
        addresses.push(format!("{}/{prefix}", Ipv4Addr::from(address.to_ne_bytes())));
    }
    // SAFETY: `head` came from getifaddrs and no reference into the list outlives this.
    unsafe { libc::freeifaddrs(head) };
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_this_host() {
        let info = gather().unwrap();
        assert!(!info.kernel.is_empty() && !info.hostname.is_empty());
        assert!(info.uptime_secs > 0.0);
        for a in &info.addresses {
            let (ip, prefix) = a.split_once('/').unwrap();
            assert!(ip.parse::<Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()), "{a}");
            assert!(prefix.parse::<u8>().is_ok_and(|p| p <= 32), "{a}");
        }
    }

    #[test]
    fn c_strings_stop_at_nul() {
        let chars: Vec<c_char> = b"6.1.0\0junk".iter().map(|&b| b as c_char).collect();
        assert_eq!(c_string(&chars), "6.1.0");
    }
}
