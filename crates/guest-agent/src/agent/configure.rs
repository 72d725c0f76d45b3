//! `configure`: take a new identity (a VM cloned from a snapshot must not keep its parent's).
//! Everything is done with system calls of the agent's own — sethostname and the classic
//! interface and route ioctls — and no process: in a guest whose kernel runs emulated (PVM
//! hosts) each process costs about a second, so six `ip` runs made a clone's first seconds.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{describe, Config};
use crate::message::Identity;

/// Applies every field given, in order hostname, MAC, address, gateway; stops at the first
/// failure. Everything is validated before anything changes.
pub(super) fn apply(identity: &Identity, _config: &Config) -> Result<(), String> {
    let interface = identity.interface.as_deref().unwrap_or("eth0");
    check_interface(interface)?;
    if let Some(name) = &identity.hostname {
        check_hostname(name)?;
    }
    let mac = identity.mac.as_deref().map(parse_mac).transpose()?;
    let address = identity.address.as_deref().map(parse_cidr).transpose()?;
    let gateway = identity
        .gateway
        .as_deref()
        .map(|g| g.parse::<Ipv4Addr>().map_err(|_| format!("bad gateway '{g}': expected an IPv4 address")));
    let gateway = gateway.transpose()?;
    // A missing interface is found before anything changes.
    let link = if mac.is_some() || address.is_some() || gateway.is_some() {
        Some(Link::open(interface)?)
    } else {
        None
    };

    if let Some(name) = &identity.hostname {
        set_hostname(name)?;
    }
    let Some(link) = link else { return Ok(()) };
    if let Some(mac) = mac {
        // Most drivers refuse a new MAC on a running link; up again even if it was refused:
        // the old identity beats no network.
        link.set_up(false)?;
        let set = link.set_mac(mac);
        let up = link.set_up(true);
        set.and(up)?;
    }
    if let Some((ip, prefix)) = address {
        link.set_address(ip, prefix)?;
        link.set_up(true)?;
    }
    if let Some(gateway) = gateway {
        link.set_default_route(gateway)?;
    }
    Ok(())
}

fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: sethostname reads `len` bytes from a live string (no NUL needed).
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(format!("sethostname: {}", describe(&std::io::Error::last_os_error())));
    }
    std::fs::write("/etc/hostname", format!("{name}\n"))
        .map_err(|e| format!("writing /etc/hostname: {}", describe(&e)))
}

/// An interface, addressed through an AF_INET datagram socket's ioctls.
struct Link {
    socket: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
    label: String,
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; every bit pattern is valid for both.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

impl Link {
    fn open(interface: &str) -> Result<Link, String> {
        // SAFETY: socket() takes no pointers; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", describe(&std::io::Error::last_os_error())));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
        for (slot, byte) in name.iter_mut().zip(interface.bytes()) {
            *slot = byte as libc::c_char;
        }
        let link = Link { socket, name, label: interface.to_owned() };
        link.flags()?;
        Ok(link)
    }

    fn request(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = self.name;
        req
    }

    fn ioctl(&self, what: &str, request: libc::Ioctl, arg: *mut libc::c_void) -> Result<(), String> {
        // SAFETY: every caller passes the matching argument type for `request` (ifreq or
        // rtentry), alive for the call.
        if unsafe { libc::ioctl(self.socket.as_raw_fd(), request, arg) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(format!("{what} on {}: {}", self.label, describe(&err)));
        }
        Ok(())
    }

    fn flags(&self) -> Result<libc::c_short, String> {
        let mut req = self.request();
        self.ioctl("reading flags", libc::SIOCGIFFLAGS, (&mut req as *mut libc::ifreq).cast())?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        Ok(unsafe { req.ifr_ifru.ifru_flags })
    }

    fn set_up(&self, up: bool) -> Result<(), String> {
        let flags = self.flags()?;
        let wanted =
            if up { flags | libc::IFF_UP as libc::c_short } else { flags & !(libc::IFF_UP as libc::c_short) };
        let mut req = self.request();
        req.ifr_ifru.ifru_flags = wanted;
        self.ioctl(
            if up { "bringing up" } else { "bringing down" },
            libc::SIOCSIFFLAGS,
            (&mut req as *mut libc::ifreq).cast(),
        )
    }

    fn set_mac(&self, mac: [u8; 6]) -> Result<(), String> {
        let mut req = self.request();
        // SAFETY: sockaddr is plain data; all zeros is valid.
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (slot, byte) in hw.sa_data.iter_mut().zip(mac) {
            *slot = byte as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        self.ioctl("setting the MAC address", libc::SIOCSIFHWADDR, (&mut req as *mut libc::ifreq).cast())
    }

    /// Replaces the interface's IPv4 address (and the subnet route that comes with it).
    fn set_address(&self, ip: Ipv4Addr, prefix: u8) -> Result<(), String> {
        let mut req = self.request();
        req.ifr_ifru.ifru_addr = sockaddr_in(ip);
        self.ioctl("setting the address", libc::SIOCSIFADDR, (&mut req as *mut libc::ifreq).cast())?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        let mut req = self.request();
        req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
        self.ioctl("setting the netmask", libc::SIOCSIFNETMASK, (&mut req as *mut libc::ifreq).cast())
    }

    /// Makes `gateway` the default route through this interface, replacing an existing one.
    fn set_default_route(&self, gateway: Ipv4Addr) -> Result<(), String> {
        let mut device = self.name;
        // SAFETY: rtentry is plain data; all zeros is valid (null device pointer, no metric).
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr_in(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        route.rt_dev = device.as_mut_ptr();
        // An old default route (the parent's) goes first; none there is fine.
        let mut old = route;
        old.rt_gateway = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        old.rt_flags = libc::RTF_UP;
        old.rt_dev = std::ptr::null_mut();
        while self
            .ioctl("removing the old default route", libc::SIOCDELRT, (&mut old as *mut libc::rtentry).cast())
            .is_ok()
        {}
        self.ioctl("adding the default route", libc::SIOCADDRT, (&mut route as *mut libc::rtentry).cast())
    }
}

fn check_interface(name: &str) -> Result<(), String> {
    // IFNAMSIZ is 16 with the NUL; a leading '-' would read as an option to ip.
    let ok = !name.is_empty()
        && name.len() < 16
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(format!("bad interface name '{name}'"))
    }
}

fn check_hostname(name: &str) -> Result<(), String> {
    // RFC 1123 labels; 64 is the kernel's limit (__NEW_UTS_LEN).
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("bad hostname '{name}': expected letters, digits, '-' and '.', at most 64"))
    }
}

/// `aa:bb:cc:dd:ee:ff` (any case). Multicast addresses are refused: no interface can have one.
fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let bad = || format!("bad MAC address '{mac}': expected six hex pairs like 52:54:00:12:34:56");
    let octets: Vec<u8> = mac
        .split(':')
        .map(|pair| {
            // from_str_radix alone would take "+f".
            let hex = pair.len() == 2 && pair.bytes().all(|b| b.is_ascii_hexdigit());
            hex.then(|| u8::from_str_radix(pair, 16).ok()).flatten()
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let octets: [u8; 6] = octets.try_into().map_err(|_| bad())?;
    if octets[0] & 1 != 0 {
        return Err(format!("bad MAC address '{mac}': a multicast address"));
    }
    Ok(octets)
}

/// `A.B.C.D/N` with 1 <= N <= 32.
fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8), String> {
    let parsed = cidr.split_once('/').and_then(|(ip, prefix)| {
        let ip = ip.parse::<Ipv4Addr>().ok()?;
        let digits = (1..=2).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_digit());
        let prefix = prefix.parse::<u8>().ok().filter(|p| digits && (1..=32).contains(p))?;
        Some((ip, prefix))
    });
    parsed.ok_or_else(|| format!("bad address '{cidr}': expected IPv4 CIDR like 10.210.0.5/24"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(check_hostname("vm-1.stratus").is_ok());
        for bad in ["", "-a", "a-", "a..b", "a b", "a_b", &"x".repeat(65)] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mac("52:54:00:AB:cd:0f").unwrap(), [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5254.00ab.cd0f",
            "52:54:00:ab:cd:+f",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cidr("10.210.0.5/24"), Ok((Ipv4Addr::new(10, 210, 0, 5), 24)));
        assert!(parse_cidr("10.0.0.1/32").is_ok());
        for bad in ["10.210.0.5", "10.210.0.5/33", "10.210.0.5/0", "10.210.0/24", "10.0.0.1/+8", "::1/64"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert!(check_interface("eth0").is_ok());
        for bad in ["", "-x", "..", "a/b", "a b", "sixteen-chars-xx"] {
            assert!(check_interface(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nothing_changes_when_a_field_is_bad() {
        // A bad gateway is found before the (missing) interface is ever looked at.
        let identity = Identity {
            address: Some("10.0.0.5/24".into()),
            gateway: Some("10.0.0.256".into()),
            interface: Some("nosuch0".into()),
            ..Default::default()
        };
        assert!(apply(&identity, &Config::default()).unwrap_err().starts_with("bad gateway"));
        assert_eq!(apply(&Identity::default(), &Config::default()), Ok(()));
    }
}
