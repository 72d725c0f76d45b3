//! virtio-net on a tap device: frames the guest transmits go to the tap, frames arriving on
//! the tap fill the guest's receive buffers. No offloads are offered, so every frame is a plain
//! Ethernet frame behind a zeroed header.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use crate::rate_limiter::{RateLimit, RateLimiter, SharedLimiter};
use crate::GuestRam;
use stratus_devices::bus::lock;
use virtio_queue::{Queue, QueueT};

use crate::tap::{Tap, VNET_HDR_LEN};
use crate::{
    available_chains_limited, complete_chains, device_type, read_config_bytes, DeviceCounters, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// The device completes partial checksums of frames the guest sends.
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The guest accepts frames with partial checksums.
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// The device has a MAC address in its configuration space.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The guest accepts TCPv4 segments of up to 64 KiB.
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// The guest accepts TCPv6 segments of up to 64 KiB.
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// The device segments TCPv4 super-frames the guest sends.
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// The device segments TCPv6 super-frames the guest sends.
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// The guest posts small buffers; a frame may fill several (`num_buffers`).
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame (with header) read from or written to the tap: room for a 64 KiB packet,
/// though without offloads the tap's MTU keeps frames far smaller.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;

/// A MAC address.
pub type Mac = [u8; 6];

/// A locally administered MAC address in QEMU's 52:54:00 range with random low bytes.
pub fn random_mac() -> Mac {
    let mut low = [0u8; 3];
    // SAFETY: getrandom writes at most 3 bytes into `low`.
    let n = unsafe { libc::getrandom(low.as_mut_ptr().cast(), low.len(), 0) };
    if n != 3 {
        // Fall back on time and pid: unique enough for one host's guests.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
        let seed = std::process::id() ^ nanos.unwrap_or(0);
        low.copy_from_slice(&seed.to_le_bytes()[..3]);
    }
    [0x52, 0x54, 0x00, low[0], low[1], low[2]]
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC address.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Writes one frame into as many receive chains as it needs: one, unless mergeable
/// buffers were negotiated, in which case the header's `num_buffers` says how many.
fn deliver(
    frame: &mut [u8],
    queue: &mut Queue,
    mem: &GuestRam,
    mergeable: bool,
    counters: &DeviceCounters,
) -> Delivery {
    let start = queue.next_avail();
    let mut writers = Vec::new();
    let mut room = 0;
    while room < frame.len() && (writers.is_empty() || mergeable) {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Not enough buffers yet: give back what was taken and wait for more.
            queue.set_next_avail(start);
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        match chain.writer(mem) {
            Ok(writer) => {
                room += writer.available_bytes();
                writers.push((head, Some(writer)));
            }
            Err(_) => {
                counters.reject("virtio-net", "a malformed receive chain");
                writers.push((head, None));
                break;
            }
        }
    }
    let fits = room >= frame.len() && writers.iter().all(|(_, w)| w.is_some());
    if !fits && writers.iter().all(|(_, w)| w.is_some()) {
        counters.reject("virtio-net", "receive buffers too small for a frame; frame dropped");
    }
    frame[10..12].copy_from_slice(&(writers.len() as u16).to_le_bytes());
    let mut offset = 0;
    for (head, writer) in writers {
        let mut written = 0;
        if let (true, Some(mut writer)) = (fits, writer) {
            let n = writer.available_bytes().min(frame.len() - offset);
            if writer.write_all(&frame[offset..offset + n]).is_ok() {
                written = n as u32;
                offset += n;
            }
        }
        // A used element per chain, even an empty one, so the guest gets every buffer back.
        let _ = queue.add_used(mem, head, written);
    }
    if fits && offset == frame.len() {
        counters.requests.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Delivery::Delivered
    } else {
        Delivery::Dropped
    }
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Buffers were used up but the frame could not go in (malformed or too small chains).
    Dropped,
    /// Not enough buffers: the frame waits for the guest to post more.
    NoBuffers,
}

/// Tells the network that a card moved (a migrated guest now sends from another host's tap):
/// RARP broadcasts from its address, as QEMU sends for guests that cannot announce
/// themselves. Bridges and switches learn the card's new port from them, so traffic to the
/// guest finds it at once rather than when the guest next talks.
pub struct Announcer {
    tap: Tap,
    mac: Mac,
}

impl Announcer {
    /// Sends one announcement.
    pub fn announce(&mut self) -> std::io::Result<()> {
        self.tap.write_frame(&rarp_announcement(&self.mac))
    }
}

/// A RARP "request reverse" broadcast from `mac` (the frame QEMU's announce sends), after an
/// empty virtio-net header, padded to Ethernet's 60-byte minimum.
pub fn rarp_announcement(mac: &Mac) -> [u8; VNET_HDR_LEN + 60] {
    let mut frame = [0u8; VNET_HDR_LEN + 60];
    let eth = &mut frame[VNET_HDR_LEN..];
    eth[..6].fill(0xff);
    eth[6..12].copy_from_slice(mac);
    eth[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    let arp = &mut eth[14..42];
    arp[..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&3u16.to_be_bytes()); // request reverse
    arp[8..14].copy_from_slice(mac); // sender: the card; addresses unknown (zero)
    arp[18..24].copy_from_slice(mac); // target: the card
    frame
}

/// A network card on a tap device.
pub struct Net {
    tap: Tap,
    config: [u8; 8],
    /// The guest accepted mergeable receive buffers: one frame may span several chains.
    mergeable: bool,
    /// Where frames from the tap are read.
    rx_buf: Vec<u8>,
    /// Length of a frame left in `rx_buf` while the guest had no receive buffer for it.
    pending: Option<usize>,
    rx_limiter: SharedLimiter,
    tx_limiter: SharedLimiter,
    counters: DeviceCounters,
}

impl Net {
    /// A card with address `mac` on `tap`.
    pub fn new(tap: Tap, mac: Mac) -> std::io::Result<Self> {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        Ok(Self {
            tap,
            config,
            mergeable: false,
            rx_buf: Vec::new(),
            pending: None,
            rx_limiter: RateLimiter::shared(RateLimit::default())?,
            tx_limiter: RateLimiter::shared(RateLimit::default())?,
            counters: DeviceCounters::default(),
        })
    }

    /// The receive and transmit rate limiters (unlimited until set).
    pub fn limiters(&self) -> [SharedLimiter; 2] {
        [self.rx_limiter.clone(), self.tx_limiter.clone()]
    }

    /// What announces this card from wherever it runs now (see [`Announcer`]).
    pub fn announcer(&self) -> std::io::Result<Announcer> {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        Ok(Announcer { tap: self.tap.try_clone()?, mac })
    }

    fn reject(&self, what: &str) {
        self.counters.reject("virtio-net", what);
    }

    /// Moves frames from the tap into receive buffers until either runs out. Frames are read
    /// into one buffer kept for the device's life: no allocation per frame.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestRam) -> bool {
        let mut frame = std::mem::take(&mut self.rx_buf);
        frame.resize(MAX_FRAME, 0);
        let mut used_any = false;
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                // Held back by the rate limit: its timer resumes us (the tap stays readable).
                None if !lock(&self.rx_limiter).consume(0) => break,
                None => match self.tap.read_frame(&mut frame) {
                    Ok(n) if n >= VNET_HDR_LEN => {
                        lock(&self.rx_limiter).charge((n - VNET_HDR_LEN) as u64);
                        n
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
            };
            match deliver(&mut frame[..len], queue, mem, self.mergeable, &self.counters) {
                Delivery::Delivered | Delivery::Dropped => used_any = true,
                Delivery::NoBuffers => {
                    // The frame stays in the buffer until the guest posts more.
                    self.pending = Some(len);
                    break;
                }
            }
        }
        self.rx_buf = frame;
        used_any
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestRam) -> bool {
        let chains = available_chains_limited(queue, mem, &self.counters, "virtio-net", &self.tx_limiter);
        complete_chains(queue, mem, chains, |chain| {
            match chain.reader(mem) {
                Ok(mut reader) if (VNET_HDR_LEN..=MAX_FRAME).contains(&reader.available_bytes()) => {
                    let mut frame = vec![0u8; reader.available_bytes()];
                    if reader.read_exact(&mut frame).is_ok() {
                        match self.tap.write_frame(&frame) {
                            Ok(()) => {
                                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                                self.counters
                                    .bytes
                                    .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                            }
                            // A full or downed tap drops the frame, as a real wire would.
                            Err(_) => {
                                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Ok(_) => self.reject("a transmit chain shorter than its header or longer than a frame"),
                Err(_) => self.reject("a malformed transmit chain"),
            }
            0
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        // Offloads cost nothing here: the virtio-net header and the tap's vnet header are the
        // same bytes, so checksum and segmentation work passes through to the host kernel.
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_MRG_RXBUF
    }

    fn ack_features(&mut self, features: u64) {
        self.mergeable = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        // Let the tap hand us only what the guest said it can take.
        let mut offload = 0;
        if features & VIRTIO_NET_F_GUEST_CSUM != 0 {
            offload |= crate::tap::TUN_F_CSUM;
            if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                offload |= crate::tap::TUN_F_TSO4;
            }
            if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                offload |= crate::tap::TUN_F_TSO6;
            }
        }
        if let Err(e) = self.tap.set_offload(offload) {
            eprintln!("[stratus] virtio-net: tap {} refused offloads {offload:#x}: {e}", self.tap.name());
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config[..6], offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        match (index, queues) {
            // New receive buffers: frames waiting on the tap can go in now.
            (RX, [rx, ..]) => self.receive(rx, mem),
            (TX, [_, tx, ..]) => self.transmit(tx, mem),
            _ => false,
        }
    }

    fn host_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd(), lock(&self.rx_limiter).timer_fd(), lock(&self.tx_limiter).timer_fd()]
    }

    // 0: frames on the tap; 1 and 2: the receive or transmit limit lets traffic go again.
    fn process_host_event(&mut self, index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        match index {
            1 => lock(&self.rx_limiter).timer_fired(),
            2 => {
                lock(&self.tx_limiter).timer_fired();
                return match queues.get_mut(TX) {
                    Some(tx) if tx.ready() => self.transmit(tx, mem),
                    _ => false,
                };
            }
            _ => {}
        }
        match queues.get_mut(RX) {
            Some(rx) if rx.ready() => self.receive(rx, mem),
            _ => false,
        }
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(parse_mac("52:54:00:ab:CD:0f"), Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0f]));
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:ef:01", "5:54:00:ab:cd:ef", "zz:54:00:ab:cd:ef"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let mac = random_mac();
        assert_eq!(&mac[..3], &[0x52, 0x54, 0]);
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
    }

    /// A tap for this test, created down (so nothing written to it is sent anywhere) and
    /// deleted when dropped; None when this process may not create one.
    struct TestTap(String);
    impl TestTap {
        fn create(tag: &str) -> Option<Self> {
            let name = format!("stfz{tag}{}", std::process::id() % 100_000);
            let ok = std::process::Command::new("ip")
                .args(["tuntap", "add", "name", &name, "mode", "tap"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Self(name))
        }
    }
    impl Drop for TestTap {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }

    #[test]
    fn fuzz_random_descriptor_tables() {
        let Some(tap) = TestTap::create("n") else {
            println!("SKIPPED: cannot create a tap device (needs root)");
            return;
        };
        let mut d = crate::testing::Driver::new(Box::new(
            Net::new(Tap::open(&tap.0).unwrap(), random_mac()).unwrap(),
        ));
        d.init_queues(2);
        let mut state = 0x1234_5678_9abc_def1u64;
        let rounds = 20_000;
        // The transmit queue parses whatever the guest wrote; the tap is down, so frames that
        // parse are dropped by the host kernel. (Receive chains go through the same checked
        // writer as virtio-rng's, fuzzed there.)
        for _ in 0..rounds {
            assert!(d.fuzz_round_on(&mut state, TX) <= 4);
        }
        println!("virtio-net: {rounds} random descriptor tables processed without a fault");
    }

    #[test]
    fn an_announcement_reaches_the_host_as_a_rarp_from_the_card() {
        let Some(tap) = TestTap::create("a") else {
            println!("SKIPPED: cannot create a tap device (needs root)");
            return;
        };
        let mac = random_mac();
        let card = Net::new(Tap::open(&tap.0).unwrap(), mac).unwrap();
        let up = std::process::Command::new("ip").args(["link", "set", &tap.0, "up"]).status().unwrap();
        assert!(up.success());
        let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", tap.0))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // A packet socket on the tap sees what the host receives from it.
        let rarp = 0x8035u16.to_be();
        // SAFETY: socket() takes no pointers; the descriptor is owned below.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(rarp)) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        at.sll_family = libc::AF_PACKET as u16;
        at.sll_protocol = rarp;
        at.sll_ifindex = ifindex;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: binds to a sockaddr_ll of the size given.
        let bound = unsafe { libc::bind(socket.as_raw_fd(), (&at as *const libc::sockaddr_ll).cast(), len) };
        assert_eq!(bound, 0, "{}", std::io::Error::last_os_error());
        let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: SO_RCVTIMEO reads a timeval of the size given.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };

        card.announcer().unwrap().announce().unwrap();
        let mut got = [0u8; 128];
        // SAFETY: reads into a buffer of the length given.
        let n = unsafe { libc::recv(socket.as_raw_fd(), got.as_mut_ptr().cast(), got.len(), 0) };
        assert!(n >= 42, "no announcement arrived: {}", std::io::Error::last_os_error());
        let frame = &got[..n as usize];
        assert_eq!(&frame[..6], &[0xff; 6], "a broadcast");
        assert_eq!(&frame[6..12], &mac, "from the card's address");
        assert_eq!(&frame[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&frame[20..22], &[0, 3], "request reverse");
        assert_eq!(&frame[22..28], &mac);
    }

    #[test]
    fn a_missing_tap_is_named() {
        let err = Tap::open("stratus-nope0").err().unwrap();
        assert_eq!(
            err.to_string(),
            "tap device stratus-nope0 does not exist (create it with: ip tuntap add stratus-nope0 mode tap)"
        );
        assert!(matches!(Tap::open("../etc"), Err(crate::tap::TapError::BadName(_))));
    }
}
