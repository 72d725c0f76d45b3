//! virtio-balloon (virtio 1.x, 5.5): the host sets a target; the guest's driver gives pages
//! (inflate) until it holds that many, and takes them back (deflate) when the target drops.
//! Inflated pages go back to the host at once (`MADV_DONTNEED`): the VMM's resident memory
//! falls by what the guest gave. The statistics queue carries the guest's own view of its
//! memory (free, available, caches, faults).
//!
//! The host side (`BalloonControl`) is shared with the VMM: setting a target or asking for
//! fresh statistics writes an eventfd the device thread watches, so the queues are only
//! ever touched on that thread.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    available_chains, complete_chains, device_type, read_config_bytes, DeviceCounters, GuestRam,
    VirtioDevice, VIRTIO_F_VERSION_1,
};

/// VIRTIO_BALLOON_F_STATS_VQ: the statistics queue exists.
pub const F_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may deflate when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// Balloon pages are 4 KiB whatever the guest's page size.
pub const PAGE: u64 = 4096;
/// One statistic: le16 tag, le64 value.
const STAT_LEN: usize = 10;

/// The statistics' names, by tag (virtio 1.x, 5.5.6.3).
const STAT_NAMES: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// The guest's memory statistics as last reported.
#[derive(Clone, Debug, Default)]
pub struct BalloonStats {
    /// (name, value) pairs; memory figures in bytes.
    pub values: Vec<(&'static str, u64)>,
    /// When the guest reported them.
    pub at: Option<Instant>,
}

/// The host's handle on the balloon.
pub struct BalloonControl {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    stats: Mutex<BalloonStats>,
    wake: EventFd,
}

impl BalloonControl {
    /// Asks the guest to hold `pages` 4 KiB pages in the balloon.
    pub fn set_target(&self, pages: u32) {
        self.target_pages.store(pages, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// The target, in pages.
    pub fn target(&self) -> u32 {
        self.target_pages.load(Ordering::SeqCst)
    }

    /// Pages the guest says it has given.
    pub fn actual(&self) -> u32 {
        self.actual_pages.load(Ordering::SeqCst)
    }

    /// The last statistics, and a request for fresh ones (they arrive asynchronously).
    pub fn stats(&self) -> BalloonStats {
        let _ = self.wake.write(1);
        stratus_devices::bus::lock(&self.stats).clone()
    }
}

/// What a snapshot keeps of the balloon.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    target_pages: u32,
    actual_pages: u32,
    announced: u32,
    stats_head: Option<u16>,
}

/// The balloon device.
pub struct Balloon {
    control: Arc<BalloonControl>,
    features: u64,
    /// The target last announced to the guest by a configuration change.
    announced: u32,
    /// The statistics buffer the guest posted, held until we want fresh figures.
    stats_head: Option<u16>,
    counters: DeviceCounters,
}

impl Balloon {
    /// A balloon asking for `target_pages` at first; `deflate_on_oom` lets the guest take
    /// pages back under memory pressure.
    pub fn new(target_pages: u32, deflate_on_oom: bool) -> std::io::Result<(Self, Arc<BalloonControl>)> {
        let control = Arc::new(BalloonControl {
            target_pages: AtomicU32::new(target_pages),
            actual_pages: AtomicU32::new(0),
            stats: Mutex::new(BalloonStats::default()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let features = VIRTIO_F_VERSION_1 | F_STATS_VQ | if deflate_on_oom { F_DEFLATE_ON_OOM } else { 0 };
        let device = Self {
            control: control.clone(),
            features,
            announced: target_pages,
            stats_head: None,
            counters: DeviceCounters::default(),
        };
        Ok((device, control))
    }

    /// Reads the page frame numbers of every available chain on `queue`; for the inflate
    /// queue, gives those pages back to the host.
    fn take_pages(&mut self, queue: &mut Queue, mem: &GuestRam, release: bool) -> bool {
        let chains = available_chains(queue, mem, &self.counters, "virtio-balloon");
        complete_chains(queue, mem, chains, |chain| {
            let mut reader = match chain.reader(mem) {
                Ok(r) => r,
                Err(_) => {
                    self.counters.reject("virtio-balloon", "a malformed descriptor chain");
                    return 0;
                }
            };
            let mut pfns = Vec::with_capacity(reader.available_bytes() / 4);
            let mut word = [0u8; 4];
            while reader.available_bytes() >= 4 && std::io::Read::read_exact(&mut reader, &mut word).is_ok() {
                pfns.push(u64::from(u32::from_le_bytes(word)));
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if release {
                let released = release_pages(mem, &mut pfns, &self.counters);
                self.counters.bytes.fetch_add(released * PAGE, Ordering::Relaxed);
            }
            0
        })
    }

    /// Reads the statistics the guest put in its buffer and keeps the buffer.
    fn take_stats(&mut self, queue: &mut Queue, mem: &GuestRam) -> bool {
        let mut used = false;
        for chain in available_chains(queue, mem, &self.counters, "virtio-balloon") {
            let head = chain.head_index();
            // A second buffer while one is held: give the old one back (the driver keeps one).
            if let Some(old) = self.stats_head.replace(head) {
                used |= queue.add_used(mem, old, 0).is_ok();
            }
            let Ok(mut reader) = chain.reader(mem) else {
                self.counters.reject("virtio-balloon", "a malformed statistics buffer");
                continue;
            };
            let mut values = Vec::new();
            let mut entry = [0u8; STAT_LEN];
            while reader.available_bytes() >= STAT_LEN
                && std::io::Read::read_exact(&mut reader, &mut entry).is_ok()
            {
                let tag = u16::from_le_bytes([entry[0], entry[1]]) as usize;
                let mut v = [0u8; 8];
                v.copy_from_slice(&entry[2..]);
                if let Some(name) = STAT_NAMES.get(tag) {
                    values.push((*name, u64::from_le_bytes(v)));
                }
            }
            *stratus_devices::bus::lock(&self.control.stats) =
                BalloonStats { values, at: Some(Instant::now()) };
        }
        used
    }
}

/// Gives the pages in `pfns` back to the host, in runs of contiguous pages; pages outside
/// guest RAM are refused and counted. Returns how many pages were released.
fn release_pages(mem: &GuestRam, pfns: &mut [u64], counters: &DeviceCounters) -> u64 {
    pfns.sort_unstable();
    let mut released = 0;
    let mut i = 0;
    while i < pfns.len() {
        let start = pfns[i];
        let mut n = 1;
        while i + (n as usize) < pfns.len() && pfns[i + n as usize] == start + n {
            n += 1;
        }
        i += n as usize;
        let Some(addr) = start.checked_mul(PAGE) else {
            counters.reject("virtio-balloon", "a page number beyond any address");
            continue;
        };
        let len = n * PAGE;
        // The run must lie in one region, so that its host addresses are contiguous.
        let (Ok(first), Ok(last)) =
            (mem.get_host_address(GuestAddress(addr)), mem.get_host_address(GuestAddress(addr + len - 1)))
        else {
            counters.reject("virtio-balloon", "a page outside guest memory");
            continue;
        };
        if last as usize - first as usize != (len - 1) as usize {
            // Spans a hole between regions: release page by page.
            for page in 0..n {
                released += release_pages(mem, &mut [start + page], counters);
            }
            continue;
        }
        // SAFETY: [first, first + len) lies inside one guest memory mapping (checked above);
        // MADV_DONTNEED only drops its pages (they read as zeros, or the snapshot file's
        // content for a restored VM, when touched again).
        if unsafe { libc::madvise(first.cast(), len as usize, libc::MADV_DONTNEED) } == 0 {
            released += n;
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    released
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&self.control.target().to_le_bytes());
        config[4..].copy_from_slice(&self.control.actual().to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            let actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.control.actual_pages.store(actual, Ordering::SeqCst);
        }
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        let Some(queue) = queues.get_mut(index) else { return false };
        match index {
            INFLATE => self.take_pages(queue, mem, true),
            DEFLATE => self.take_pages(queue, mem, false),
            STATS => self.take_stats(queue, mem),
            _ => false,
        }
    }

    fn host_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![std::os::fd::AsRawFd::as_raw_fd(&self.control.wake)]
    }

    // The host set a target or wants statistics: hand the statistics buffer back (the driver
    // refills and returns it) — the configuration change is announced by `config_changed`.
    fn process_host_event(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        let _ = self.control.wake.read();
        match (self.stats_head.take(), queues.get_mut(STATS)) {
            (Some(head), Some(stats)) if stats.ready() => stats.add_used(mem, head, 0).is_ok(),
            (head, _) => {
                self.stats_head = head;
                false
            }
        }
    }

    fn config_changed(&mut self) -> bool {
        let target = self.control.target();
        let changed = target != self.announced;
        self.announced = target;
        changed
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    fn save(&self) -> Vec<u8> {
        let saved = Saved {
            target_pages: self.control.target(),
            actual_pages: self.control.actual(),
            announced: self.announced,
            stats_head: self.stats_head,
        };
        postcard::to_stdvec(&saved).unwrap_or_default()
    }

    fn load(&mut self, saved: &[u8]) -> Result<(), String> {
        let saved: Saved = postcard::from_bytes(saved).map_err(|e| format!("balloon state: {e}"))?;
        if saved.stats_head.is_some_and(|h| h >= QUEUE_SIZE) {
            return Err("balloon state: statistics buffer index out of range".into());
        }
        self.control.target_pages.store(saved.target_pages, Ordering::SeqCst);
        self.control.actual_pages.store(saved.actual_pages, Ordering::SeqCst);
        self.announced = saved.announced;
        self.stats_head = saved.stats_head;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Driver, DATA};
    use vm_memory::Bytes;

    fn resident(mem: &GuestRam, addr: u64) -> bool {
        let ptr = mem.get_host_address(GuestAddress(addr)).unwrap();
        let mut vec = [0u8; 1];
        let page = (ptr as usize) & !4095;
        // SAFETY: mincore reads the residency of one mapped page into `vec`.
        assert_eq!(unsafe { libc::mincore(page as *mut _, 4096, vec.as_mut_ptr()) }, 0);
        vec[0] & 1 != 0
    }

    #[test]
    fn inflating_returns_pages_to_the_host() {
        let (balloon, control) = Balloon::new(8, true).unwrap();
        let mut d = Driver::new(Box::new(balloon));
        d.init_queues(3);
        let pages: Vec<u64> = (0x80..0x88).collect();
        for &p in &pages {
            d.mem.write_slice(&[0xaa; 4096], GuestAddress(p * PAGE)).unwrap();
        }
        assert!(resident(&d.mem, 0x80 * PAGE));
        let list: Vec<u8> =
            pages.iter().flat_map(|&p| (p as u32).to_le_bytes()).chain(u32::MAX.to_le_bytes()).collect();
        d.mem.write_slice(&list, GuestAddress(DATA)).unwrap();
        d.select(INFLATE);
        d.submit(&[(DATA, list.len() as u32, false)]);
        assert_eq!(d.used_idx(), 1);
        for &p in &pages {
            assert!(!resident(&d.mem, p * PAGE), "page {p:#x} still resident");
        }
        let mut byte = [0u8; 1];
        d.mem.read_slice(&mut byte, GuestAddress(0x80 * PAGE)).unwrap();
        assert_eq!(byte[0], 0, "a released page reads as zeros");
        let counters = d.transport.device().counters();
        assert_eq!(counters.bytes.load(Ordering::Relaxed), 8 * PAGE);
        assert_eq!(counters.rejected.load(Ordering::Relaxed), 1, "the page beyond memory is refused");
        assert_eq!(control.target(), 8);
    }

    #[test]
    fn statistics_are_read_and_the_buffer_handed_back_on_request() {
        let (balloon, control) = Balloon::new(0, false).unwrap();
        let mut d = Driver::new(Box::new(balloon));
        d.init_queues(3);
        let mut stats = Vec::new();
        for (tag, value) in [(4u16, 100u64 << 20), (5, 256 << 20), (42, 1)] {
            stats.extend_from_slice(&tag.to_le_bytes());
            stats.extend_from_slice(&value.to_le_bytes());
        }
        d.mem.write_slice(&stats, GuestAddress(DATA)).unwrap();
        d.select(STATS);
        d.submit(&[(DATA, stats.len() as u32, false)]);
        assert_eq!(d.used_idx(), 0, "the device holds the statistics buffer");
        let seen = control.stats();
        assert!(seen.values.contains(&("free_memory", 100 << 20)));
        assert!(seen.values.contains(&("total_memory", 256 << 20)));
        assert_eq!(seen.values.len(), 2, "unknown tags are skipped");
        // The request for fresh figures (control.stats() above) returns the buffer.
        d.transport.process_host_event(0);
        assert_eq!(d.used_idx(), 1);
    }

    #[test]
    fn fuzz_random_descriptor_tables() {
        let (balloon, _control) = Balloon::new(0, true).unwrap();
        let mut d = Driver::new(Box::new(balloon));
        d.init_queues(3);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..20_000 {
            d.fuzz_round_on(&mut state, round % 3);
        }
        println!("virtio-balloon: 20000 random descriptor tables processed without a fault");
    }
}
