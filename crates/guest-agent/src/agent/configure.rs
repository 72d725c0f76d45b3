//! `configure`: take a new identity (a VM cloned from a snapshot must not keep its parent's).
//! The hostname is set directly; the network through busybox `ip`, whose stderr is the error.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::{describe, Config};
use crate::message::Identity;

/// Longest stderr quoted in an error.
const MAX_QUOTED_STDERR: usize = 2048;

/// Applies every field given, in order hostname, MAC, address, gateway; stops at the first
/// failure. Everything is validated before anything changes.
pub(super) fn apply(identity: &Identity, config: &Config) -> Result<(), String> {
    let interface = identity.interface.as_deref().unwrap_or("eth0");
    check_interface(interface)?;
    if let Some(name) = &identity.hostname {
        check_hostname(name)?;
    }
    let mac = identity.mac.as_deref().map(parse_mac).transpose()?;
    if let Some(address) = &identity.address {
        check_cidr(address)?;
    }
    let gateway = identity
        .gateway
        .as_deref()
        .map(|g| g.parse::<Ipv4Addr>().map_err(|_| format!("bad gateway '{g}': expected an IPv4 address")));
    let gateway = gateway.transpose()?;

    if let Some(name) = &identity.hostname {
        set_hostname(name)?;
    }
    let ip = |args: &[&str]| run_ip(config, args);
    if let Some(mac) = &mac {
        // Most drivers refuse a new MAC on a running link.
        ip(&["link", "set", "dev", interface, "down"])?;
        let set = ip(&["link", "set", "dev", interface, "address", mac]);
        // Up again even if the address was refused: the old identity beats no network.
        let up = ip(&["link", "set", "dev", interface, "up"]);
        set.and(up)?;
    }
    if let Some(address) = &identity.address {
        ip(&["-4", "addr", "flush", "dev", interface])?;
        ip(&["addr", "add", address, "dev", interface])?;
        if mac.is_none() {
            ip(&["link", "set", "dev", interface, "up"])?;
        }
    }
    if let Some(gateway) = gateway {
        ip(&["route", "replace", "default", "via", &gateway.to_string(), "dev", interface])?;
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

/// Runs `ip ARGS`; the error names the command and quotes its stderr.
fn run_ip(config: &Config, args: &[&str]) -> Result<(), String> {
    let program = config.ip_command.display();
    let output = Command::new(&config.ip_command)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run '{program}': {}", describe(&e)))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut stderr = stderr.trim();
    if stderr.len() > MAX_QUOTED_STDERR {
        let mut end = MAX_QUOTED_STDERR;
        while !stderr.is_char_boundary(end) {
            end -= 1;
        }
        stderr = &stderr[..end];
    }
    let why = if stderr.is_empty() { output.status.to_string() } else { stderr.to_owned() };
    Err(format!("{program} {}: {why}", args.join(" ")))
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

/// `aa:bb:cc:dd:ee:ff` (any case), returned in lowercase. Multicast addresses are refused:
/// no interface can have one.
fn parse_mac(mac: &str) -> Result<String, String> {
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
    if octets.len() != 6 {
        return Err(bad());
    }
    if octets[0] & 1 != 0 {
        return Err(format!("bad MAC address '{mac}': a multicast address"));
    }
    Ok(mac.to_ascii_lowercase())
}

fn check_cidr(cidr: &str) -> Result<(), String> {
    let ok = cidr.split_once('/').is_some_and(|(ip, prefix)| {
        ip.parse::<Ipv4Addr>().is_ok()
            && (1..=2).contains(&prefix.len())
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && prefix.parse::<u8>().is_ok_and(|p| (1..=32).contains(&p))
    });
    if ok {
        Ok(())
    } else {
        Err(format!("bad address '{cidr}': expected IPv4 CIDR like 10.210.0.5/24"))
    }
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
        assert_eq!(parse_mac("52:54:00:AB:cd:0f").unwrap(), "52:54:00:ab:cd:0f");
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
        assert!(check_cidr("10.210.0.5/24").is_ok() && check_cidr("10.0.0.1/32").is_ok());
        for bad in ["10.210.0.5", "10.210.0.5/33", "10.210.0.5/0", "10.210.0/24", "10.0.0.1/+8", "::1/64"] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
        assert!(check_interface("eth0").is_ok());
        for bad in ["", "-x", "..", "a/b", "a b", "sixteen-chars-xx"] {
            assert!(check_interface(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nothing_runs_when_a_field_is_bad() {
        // A missing `ip` would fail loudly if anything ran.
        let config = Config { ip_command: "/nonexistent/ip".into() };
        let identity = Identity {
            address: Some("10.0.0.5/24".into()),
            gateway: Some("10.0.0.256".into()),
            ..Default::default()
        };
        assert!(apply(&identity, &config).unwrap_err().starts_with("bad gateway"));
        assert_eq!(apply(&Identity::default(), &config), Ok(()));
    }
}
