//! Networks on a host: a Linux bridge per network with the gateway address (joined to the other
//! hosts by a VXLAN), a tap per instance, and NAT to the host's uplink through nftables.
//! Addresses are leased centrally, by the control plane (`stratus-control`'s `ipam`).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use stratus_api::model::Network;

/// Errors of network set-up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A CIDR that does not parse or is unusable.
    #[error(
        "invalid subnet '{0}': expected a unicast IPv4 prefix such as 10.210.0.0/24, between /16 and /29"
    )]
    BadCidr(String),
    /// A guest's MAC, address or tap name that cannot go into a rule.
    #[error("invalid {0}")]
    Invalid(String),
    /// A host command failed.
    #[error("`{command}` failed: {cause}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output or spawn error.
        cause: String,
    },
}

/// A parsed IPv4 subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    /// Network address.
    pub base: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N` (16 <= N <= 29; the address is masked to the network).
    pub fn parse(cidr: &str) -> Result<Subnet, NetworkError> {
        let bad = || NetworkError::BadCidr(cidr.to_owned());
        let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        // Loopback, "this network" and multicast/reserved space cannot hold guests.
        if !(16..=29).contains(&prefix) || matches!(addr.octets()[0], 0 | 127 | 224..=255) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Subnet { base: Ipv4Addr::from(u32::from(addr) & mask), prefix })
    }

    /// The gateway: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// Host addresses guests may get: all but network, gateway and broadcast.
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.base);
        let size = 1u32 << (32 - self.prefix);
        (base + 2..base + size - 1).map(Ipv4Addr::from)
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.base)
    }

    /// Whether the two subnets share an address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.base) || other.contains(self.base)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// A MAC address derived from the instance id: locally administered, stable across restarts.
pub fn mac_for(id: &str) -> String {
    let bytes: Vec<u8> = (0..3)
        .map(|i| u8::from_str_radix(id.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0))
        .collect();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", bytes[0], bytes[1], bytes[2])
}

/// The tap device name of an instance (at most 15 bytes, the kernel's limit).
pub fn tap_name(id: &str) -> String {
    format!("st{}", &id[..id.len().min(12)])
}

fn run(args: &[&str]) -> Result<(), NetworkError> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetworkError::Command { command: args.join(" "), cause: e.to_string() })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            command: args.join(" "),
            cause: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The VXLAN network identifier of a network: from its name, the same on every host.
pub fn vni(network: &str) -> u32 {
    let hash = network.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    // 24 bits, away from 0 and the small numbers people pick by hand.
    (hash % 0x00ef_0000) + 0x0001_0000
}

/// The bridge's MAC: the same on every host for one network, so the gateway address answers
/// with the same MAC wherever a guest runs (a moved guest's ARP cache stays right).
pub fn gateway_mac(network: &str) -> String {
    let v = vni(network);
    format!("52:54:00:fe:{:02x}:{:02x}", (v >> 8) & 0xff, v & 0xff)
}

/// The VXLAN device that joins `bridge` to the other hosts (at most 15 bytes).
fn vxlan_name(bridge: &str) -> String {
    let mut name = format!("{bridge}vx");
    name.truncate(15);
    name
}

/// Creates the network's bridge with its gateway address, up, and IP forwarding on; with
/// peers (a cluster), joins it to theirs by a VXLAN from `local` (this host's underlay address).
pub fn ensure_bridge(network: &Network) -> Result<(), NetworkError> {
    ensure_bridge_on(network, None)
}

/// [`ensure_bridge`], with this host's underlay address for the VXLAN to the peers.
pub fn ensure_bridge_on(network: &Network, local: Option<&str>) -> Result<(), NetworkError> {
    let subnet = Subnet::parse(&network.cidr)?;
    if !link_exists(&network.bridge) {
        run(&["ip", "link", "add", &network.bridge, "type", "bridge"])?;
    }
    let peers: Vec<&str> =
        network.peers.iter().map(String::as_str).filter(|peer| Some(*peer) != local).collect();
    match local {
        Some(local) if !peers.is_empty() => {
            run(&["ip", "link", "set", &network.bridge, "address", &gateway_mac(&network.name)])?;
            // The same MAC on every host would give every bridge the same IPv6 link-local
            // address (duplicate address detection fails): the gateway is IPv4 only.
            run(&["ip", "link", "set", &network.bridge, "addrgenmode", "none"])?;
            ensure_vxlan(network, local, &peers)?;
        }
        _ => {
            let vxlan = vxlan_name(&network.bridge);
            if link_exists(&vxlan) {
                run(&["ip", "link", "del", &vxlan])?;
            }
        }
    }
    let address = format!("{}/{}", network.gateway, subnet.prefix);
    run(&["ip", "addr", "replace", &address, "dev", &network.bridge])?;
    run(&["ip", "link", "set", &network.bridge, "up"])?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| NetworkError::Command {
        command: "echo 1 > /proc/sys/net/ipv4/ip_forward".into(),
        cause: e.to_string(),
    })
}

/// Runs an nft script (atomically: all of it or none).
fn nft(script: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| NetworkError::Command { command: "nft -f -".into(), cause: e.to_string() })?;
    use std::io::Write;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| NetworkError::Command { command: "nft -f -".into(), cause: e.to_string() })?;
    if !output.status.success() {
        return Err(NetworkError::Command {
            command: "nft -f -".into(),
            cause: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// The nft table (bridge family) that keeps each guest to its own addresses.
const GUARD: &str = "stratus_guard";

/// Lets tap `tap` (a guest's) send only frames from its own `mac`, and IPv4 and ARP only from
/// its own `ip`: a guest cannot take another's MAC or address, nor answer ARP for the gateway
/// or another guest. The rules sit on the bridge's prerouting hook, so frames to other guests,
/// other hosts (through the VXLAN) and this host alike are checked. IPv6 is not carried (the
/// networks are IPv4). Made again from scratch each time (a restart, a move back).
pub fn guard_tap(tap: &str, mac: &str, ip: &str) -> Result<(), NetworkError> {
    let ip: Ipv4Addr = ip.parse().map_err(|_| NetworkError::Invalid(format!("guest address '{ip}'")))?;
    let octets: Vec<&str> = mac.split(':').collect();
    if octets.len() != 6 || !octets.iter().all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(NetworkError::Invalid(format!("guest MAC '{mac}'")));
    }
    if !tap.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(NetworkError::Invalid(format!("tap name '{tap}'")));
    }
    let chain = format!("g_{tap}");
    let script = format!(
        "table bridge {GUARD} {{\n\tmap taps {{ type ifname : verdict; }}\n}}\n\
         add chain bridge {GUARD} prerouting {{ type filter hook prerouting priority -200; policy accept; }}\n\
         flush chain bridge {GUARD} prerouting\n\
         add rule bridge {GUARD} prerouting iifname vmap @taps\n\
         add chain bridge {GUARD} {chain}\n\
         flush chain bridge {GUARD} {chain}\n\
         add rule bridge {GUARD} {chain} ether saddr != {mac} drop\n\
         add rule bridge {GUARD} {chain} arp saddr ether != {mac} drop\n\
         add rule bridge {GUARD} {chain} arp saddr ip != {ip} drop\n\
         add rule bridge {GUARD} {chain} ether type ip ip saddr != {ip} drop\n\
         add rule bridge {GUARD} {chain} ether type ip6 drop\n\
         add element bridge {GUARD} taps {{ \"{tap}\" : jump {chain} }}\n"
    );
    nft(&script)
}

/// Forgets tap `tap`'s guard (nothing to do if it has none).
fn unguard_tap(tap: &str) {
    if !tap.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return;
    }
    let _ = nft(&format!("delete element bridge {GUARD} taps {{ \"{tap}\" }}\n"));
    let _ = nft(&format!("delete chain bridge {GUARD} g_{tap}\n"));
}

/// Writes the `stratus` nftables table: masquerade for every NAT network's traffic leaving
/// its subnet. Replaces the whole table, so removed networks lose their rules.
pub fn apply_nat(networks: &[Network]) -> Result<(), NetworkError> {
    let mut rules = String::new();
    for network in networks.iter().filter(|n| n.nat) {
        let subnet = Subnet::parse(&network.cidr)?;
        rules.push_str(&format!("\t\tip saddr {subnet} ip daddr != {subnet} masquerade\n"));
    }
    let script = format!(
        "table ip stratus {{}}\ndelete table ip stratus\ntable ip stratus {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{rules}\t}}\n}}\n"
    );
    nft(&script)
}

/// The VXLAN of `network` from `local` to `peers`, on its bridge: flooded traffic goes to
/// every peer (head-end replication), unicast to where the MAC was learnt. Its MTU leaves room
/// for the 50 bytes of encapsulation; an underlay under 1550 bytes gives guests less than 1500.
fn ensure_vxlan(network: &Network, local: &str, peers: &[&str]) -> Result<(), NetworkError> {
    let vxlan = vxlan_name(&network.bridge);
    let vni = vni(&network.name).to_string();
    if !link_exists(&vxlan) {
        run(&["ip", "link", "add", &vxlan, "type", "vxlan", "id", &vni, "local", local, "dstport", "4789"])?;
    }
    let underlay_mtu = underlay_mtu(local).unwrap_or(1500);
    let mtu = underlay_mtu.saturating_sub(50).min(1500).to_string();
    run(&["ip", "link", "set", &vxlan, "mtu", &mtu])?;
    run(&["ip", "link", "set", &vxlan, "master", &network.bridge])?;
    run(&["ip", "link", "set", &vxlan, "up"])?;
    let zero = "00:00:00:00:00:00";
    let present = Command::new("bridge")
        .args(["fdb", "show", "dev", &vxlan])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let present = String::from_utf8_lossy(&present);
    for line in present.lines().filter(|l| l.starts_with(zero)) {
        // "00:00:00:00:00:00 dst 10.0.0.2 self permanent": drop peers that left.
        let dst = line.split_whitespace().skip_while(|w| *w != "dst").nth(1).unwrap_or("");
        if !dst.is_empty() && !peers.contains(&dst) {
            run(&["bridge", "fdb", "del", zero, "dev", &vxlan, "dst", dst])?;
        }
    }
    for peer in peers {
        if !present.lines().any(|l| l.starts_with(zero) && l.split_whitespace().any(|w| w == *peer)) {
            run(&["bridge", "fdb", "append", zero, "dev", &vxlan, "dst", peer])?;
        }
    }
    Ok(())
}

/// The MTU of the device holding address `local`.
fn underlay_mtu(local: &str) -> Option<usize> {
    let output = Command::new("ip").args(["-o", "addr", "show"]).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let device =
        text.lines().find(|l| l.contains(&format!(" {local}/")))?.split_whitespace().nth(1)?.to_owned();
    std::fs::read_to_string(format!("/sys/class/net/{device}/mtu")).ok()?.trim().parse().ok()
}

/// Removes a network's bridge (its taps must be gone: instances are deleted first).
pub fn remove_bridge(network: &Network) -> Result<(), NetworkError> {
    let vxlan = vxlan_name(&network.bridge);
    if link_exists(&vxlan) {
        run(&["ip", "link", "del", &vxlan])?;
    }
    if link_exists(&network.bridge) {
        run(&["ip", "link", "del", &network.bridge])?;
    }
    Ok(())
}

/// Creates the tap `name` on `bridge`, up (again if it exists, so a restart reuses it).
pub fn ensure_tap(name: &str, bridge: &str) -> Result<(), NetworkError> {
    if !link_exists(name) {
        run(&["ip", "tuntap", "add", "dev", name, "mode", "tap"])?;
    }
    run(&["ip", "link", "set", name, "master", bridge, "up"])
}

/// Removes the tap `name` if it exists, and its guard.
pub fn remove_tap(name: &str) -> Result<(), NetworkError> {
    unguard_tap(name);
    if link_exists(name) {
        run(&["ip", "link", "del", name])?;
    }
    Ok(())
}

/// Whether a link named `name` exists on this host (for tests and leftovers checks).
pub fn tap_exists(name: &str) -> bool {
    link_exists(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_hand_out_host_addresses() {
        let s = Subnet::parse("10.210.0.7/24").unwrap();
        assert_eq!(s.to_string(), "10.210.0.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 210, 0, 1));
        let all: Vec<_> = s.guest_addresses().collect();
        assert_eq!(all.first(), Some(&Ipv4Addr::new(10, 210, 0, 2)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 210, 0, 254)));
        assert_eq!(all.len(), 253);
        assert!(s.overlaps(&Subnet::parse("10.210.0.128/25").unwrap()));
        assert!(!s.overlaps(&Subnet::parse("10.211.0.0/24").unwrap()));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/8",
            "10.0.0.0/30",
            "10.0.0/24",
            "x/24",
            "10.0.0.0/-1",
            "255.255.0.0/16",
            "127.0.0.0/24",
            "224.1.0.0/16",
            "0.1.0.0/16",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_and_taps_come_from_the_id() {
        assert_eq!(mac_for("a1b2c3d4e5f60718"), "52:54:00:a1:b2:c3");
        assert_eq!(tap_name("a1b2c3d4e5f60718"), "sta1b2c3d4e5f6");
        assert!(tap_name("a1b2c3d4e5f60718").len() <= 15);
    }
}
