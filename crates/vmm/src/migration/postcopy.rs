//! Post-copy: when the guest dirties memory faster than the link carries it, the source stops
//! sending rounds and moves the guest at once. It pauses the guest, names the pages the
//! destination holds stale copies of (`Discard`), sends the state and `Postcopy`, and the
//! destination runs the guest straight away. The stale pages follow in the background; a page
//! the guest touches before it has come is fetched on its fault (userfaultfd: the touching
//! vCPU or device thread waits) ahead of the rest.
//!
//! The failure window, which post-copy cannot avoid: from `Postcopy` on, the guest's memory is
//! split between the hosts and neither side alone can run it. If the link or either VMM fails
//! before the last page is in, the guest is lost. The source keeps its paused copy (every page
//! as of the switch) and says how many pages had not been sent; the destination stops rather
//! than run the guest on memory it does not have.

use std::io::{BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use stratus_virtio::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::stream::{read_frame, write_frame, Kind, StreamError, MAX_PAYLOAD};
use super::uffd::Uffd;
use super::{
    answer, count, destination_work_ms, is_set, ms_since, page_frame, regions, Connection, MigrationError,
    Progress, Replies, Sender, TIMEOUT,
};
use crate::snapshot::memory::{is_zero, region_bytes, DirtyPages, PAGE};

/// Pages per background frame: few, so that a page asked for waits behind little.
const BATCH: usize = 16;
/// Pages sent with one asked for: it and the stale ones straight after it.
const AHEAD: u64 = 16;

/// Where guest pages are: per RAM region, its first page index, its page count, its guest
/// address and its host address.
pub(super) struct Layout {
    regions: Vec<(u64, u64, u64, usize)>,
    total: u64,
}

impl Layout {
    pub(super) fn new(mem: &GuestRam) -> Self {
        let regions: Vec<_> = regions(mem)
            .into_iter()
            .map(|(first, r)| (first, r.len() / PAGE as u64, r.start_addr().0, r.as_ptr() as usize))
            .collect();
        let total = regions.iter().map(|r| r.1).sum();
        Self { regions, total }
    }

    /// Pages `first..first + n`, if they lie in one region: (guest address, host address).
    pub(super) fn locate(&self, first: u64, n: u64) -> Option<(u64, usize)> {
        let &(base, pages, guest, host) = self.regions.iter().rev().find(|r| r.0 <= first)?;
        let end = first.checked_add(n)?;
        (end <= self.total && end - base <= pages).then(|| {
            let offset = (first - base) * PAGE as u64;
            (guest + offset, host + offset as usize)
        })
    }

    /// Pages in all.
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    /// The page at host address `addr`.
    fn page_at(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|&(first, pages, _, host)| {
            let offset = addr.checked_sub(host as u64)?;
            (offset < pages * PAGE as u64).then(|| first + offset / PAGE as u64)
        })
    }
}

/// The destination's list of pages it must not use until the source sends them.
pub(super) struct Stale {
    bits: Vec<AtomicU64>,
    left: AtomicU64,
}

impl Stale {
    pub(super) fn new(pages: u64) -> Self {
        Self { bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), left: AtomicU64::new(0) }
    }

    pub(super) fn mark(&self, page: u64) {
        let bit = 1 << (page % 64);
        if self.bits[(page / 64) as usize].fetch_or(bit, Ordering::SeqCst) & bit == 0 {
            self.left.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn is_stale(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// Page `page` is in guest memory now (call only once it is placed).
    fn arrived(&self, page: u64) {
        let bit = 1 << (page % 64);
        if self.bits[(page / 64) as usize].fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
            self.left.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn left(&self) -> u64 {
        self.left.load(Ordering::SeqCst)
    }
}

// ---- the source ----

/// Sends `stale` as `Discard` ranges.
pub(super) fn discard(
    sender: &mut Sender<'_>,
    mem: &GuestRam,
    stale: &DirtyPages,
) -> Result<(), StreamError> {
    // At least one frame, even when nothing is stale: it tells the destination post-copy comes.
    let mut payload = Vec::new();
    let mut frames = 0;
    for (k, (first, region)) in regions(mem).into_iter().enumerate() {
        let pages = (region.len() / PAGE as u64) as usize;
        let mut i = 0;
        while i < pages {
            if !is_set(stale, k, i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < pages && i - start < u32::MAX as usize && is_set(stale, k, i) {
                i += 1;
            }
            payload.extend_from_slice(&(first + start as u64).to_le_bytes());
            payload.extend_from_slice(&((i - start) as u32).to_le_bytes());
            if payload.len() + 12 > MAX_PAYLOAD {
                write_frame(&mut sender.out, Kind::Discard, &payload)?;
                sender.report.bytes_sent += 9 + payload.len() as u64;
                payload.clear();
                frames += 1;
            }
        }
    }
    if !payload.is_empty() || frames == 0 {
        write_frame(&mut sender.out, Kind::Discard, &payload)?;
        sender.report.bytes_sent += 9 + payload.len() as u64;
    }
    Ok(())
}

/// What the destination says during post-copy (read on a thread of its own).
enum Heard {
    /// With the destination's own part of the downtime, in milliseconds, when it says.
    Running(Option<f64>),
    Requests(Vec<u64>),
    Complete,
    Refused(String),
    Broken(MigrationError),
}

fn listen(mut input: BufReader<Box<dyn Connection>>, tx: mpsc::Sender<Heard>) -> std::io::Result<()> {
    std::thread::Builder::new().name("postcopy-in".into()).spawn(move || {
        let mut payload = Vec::new();
        loop {
            let heard = match read_frame(&mut input, &mut payload) {
                Ok(Kind::Running) => Heard::Running(destination_work_ms(&payload)),
                Ok(Kind::Complete) => Heard::Complete,
                // An empty request: the destination is there, nothing is missing.
                Ok(Kind::Request) if payload.len() % 8 == 0 => Heard::Requests(
                    payload
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                        .collect(),
                ),
                Ok(Kind::Refuse) => Heard::Refused(String::from_utf8_lossy(&payload).into_owned()),
                Ok(other) => Heard::Broken(MigrationError::Protocol(format!("{other:?} during post-copy"))),
                Err(e) => Heard::Broken(e.into()),
            };
            // Running and Complete may come in either order: read on after either.
            let last = matches!(heard, Heard::Refused(_) | Heard::Broken(_));
            if tx.send(heard).is_err() || last {
                return;
            }
        }
    })?;
    Ok(())
}

/// The source's post-copy: the guest is paused and its state has gone with `Postcopy`.
struct Source<'s, 'r> {
    sender: &'s mut Sender<'r>,
    mem: &'s GuestRam,
    layout: Layout,
    stale: DirtyPages,
    paused_at: Instant,
    running: Option<Instant>,
    faults: u64,
    /// Stale pages not sent yet.
    left: u64,
    progress: &'s Progress,
}

impl Source<'_, '_> {
    /// Sends page `page` (global index) if it is still stale. A page beyond guest memory is
    /// not stale (a confused request must not cost the guest).
    fn send(&mut self, page: u64) -> Result<bool, MigrationError> {
        let Some((k, first)) = self
            .layout
            .regions
            .iter()
            .enumerate()
            .rev()
            .find(|(_, r)| r.0 <= page && page < r.0 + r.1)
            .map(|(k, r)| (k, r.0))
        else {
            return Ok(false);
        };
        let i = (page - first) as usize;
        if !is_set(&self.stale, k, i) {
            return Ok(false);
        }
        let region =
            self.mem.iter().nth(k).ok_or_else(|| MigrationError::Protocol("no such region".into()))?;
        let bytes = &region_bytes(region)[i * PAGE..(i + 1) * PAGE];
        if is_zero(bytes) {
            self.sender.zeros(page, 1)?;
        } else {
            self.sender.run(page, bytes)?;
        }
        self.stale[k][i / 64] &= !(1 << (i % 64));
        self.left -= 1;
        Ok(true)
    }

    /// Acts on what the destination said; `Ok(true)` once it has every page.
    fn heard(&mut self, heard: Heard) -> Result<bool, MigrationError> {
        match heard {
            Heard::Running(work_ms) => {
                self.running = Some(Instant::now());
                if let Some(ms) = work_ms {
                    self.sender.report.destination_work_ms = ms;
                }
                self.sender.report.downtime_ms = ms_since(self.paused_at);
                self.progress.update(|p| p.phase = "post-copy (running at the destination)".into());
                Ok(false)
            }
            Heard::Requests(pages) => {
                for page in pages {
                    if self.send(page)? {
                        self.faults += 1;
                        // The page waited for goes first, on its own.
                        self.sender.out.flush().map_err(StreamError::Io)?;
                        // The guest is likely to want the pages after it next: they go with
                        // it, saving a fault each.
                        for next in page + 1..page + AHEAD {
                            if !self.send(next)? {
                                break;
                            }
                        }
                    }
                }
                self.sender.out.flush().map_err(StreamError::Io)?;
                Ok(false)
            }
            Heard::Complete => Ok(true),
            Heard::Refused(reason) => Err(MigrationError::Refused(reason)),
            Heard::Broken(e) => Err(e),
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Heard>) -> Result<(), MigrationError> {
        let early =
            || MigrationError::Protocol("the destination says Complete before every page was sent".into());
        for (k, &(first, pages, ..)) in self.layout.regions.clone().iter().enumerate() {
            let mut i = 0usize;
            while (i as u64) < pages {
                while let Ok(heard) = rx.try_recv() {
                    if self.heard(heard)? {
                        return Err(early());
                    }
                }
                if self.stale[k].get(i / 64).is_some_and(|&w| w == 0) {
                    i = (i / 64 + 1) * 64;
                    continue;
                }
                let end = (i + BATCH).min(pages as usize);
                for j in i..end {
                    self.send(first + j as u64)?;
                }
                i = end;
                self.sender.out.flush().map_err(StreamError::Io)?;
                // Pacing the background waits for requests rather than sleeping through them.
                while let Some(wait) = self.sender.due() {
                    match rx.recv_timeout(wait) {
                        Ok(heard) => {
                            if self.heard(heard)? {
                                return Err(early());
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            return Err(MigrationError::Protocol("the post-copy reader stopped".into()))
                        }
                    }
                }
                let left = self.left * PAGE as u64;
                self.progress.update(|p| {
                    p.bytes_sent = self.sender.report.bytes_sent;
                    p.remaining_bytes = left;
                });
            }
        }
        write_frame(&mut self.sender.out, Kind::Complete, &[])?;
        self.sender.out.flush().map_err(StreamError::Io)?;
        let mut complete = false;
        while !complete || self.running.is_none() {
            let heard = rx.recv_timeout(TIMEOUT).map_err(|_| {
                MigrationError::Protocol(format!(
                    "the destination did not confirm the last pages within {} s",
                    TIMEOUT.as_secs()
                ))
            })?;
            complete |= self.heard(heard)?;
        }
        Ok(())
    }
}

/// Serves the destination after `Postcopy`: the stale pages in order, those it asks for first,
/// until it has them all. A refusal before the guest runs there is `Refused` (the source may
/// resume); any other failure is `Stranded`, with how much never went.
pub(super) fn serve(
    sender: &mut Sender<'_>,
    input: BufReader<Box<dyn Connection>>,
    mem: &GuestRam,
    stale: DirtyPages,
    paused_at: Instant,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let total = count(&stale);
    let (tx, rx) = mpsc::channel();
    listen(input, tx).map_err(|e| MigrationError::Vm(format!("starting post-copy: {e}")))?;
    let before = sender.report.pages_sent + sender.report.zero_pages;
    let mut source = Source {
        sender,
        mem,
        layout: Layout::new(mem),
        stale,
        paused_at,
        running: None,
        faults: 0,
        left: total,
        progress,
    };
    let result = source.run(&rx);
    let (running, left, faults) = (source.running, source.left, source.faults);
    let report = &mut *source.sender.report;
    report.postcopy = true;
    report.postcopy_pages = report.pages_sent + report.zero_pages - before;
    report.postcopy_faults = faults;
    if let Some(at) = running {
        report.postcopy_ms = ms_since(at);
    }
    match result {
        Ok(()) => Ok(()),
        Err(MigrationError::Refused(reason)) if running.is_none() => Err(MigrationError::Refused(reason)),
        Err(e) => Err(MigrationError::Stranded(format!(
            "post-copy failed after the guest moved: {e}; {left} of {total} pages had not been sent, so the \
             guest cannot go on at the destination; this copy stays paused with all of its memory as of the \
             switch (it cannot resume: the guest may have run and written its disks there)"
        ))),
    }
}

// ---- the destination ----

/// What post-copy did at the destination.
#[derive(Clone, Copy, Debug, Default)]
pub struct Arrived {
    /// Pages placed after the guest started.
    pub pages: u64,
    /// Pages the guest waited for (fetched on fault).
    pub faults: u64,
    /// From the start of post-copy to the last page in, in milliseconds.
    pub ms: f64,
}

/// The rest of a post-copy arrival, coming in on threads of its own.
pub struct Arriving {
    handle: std::thread::JoinHandle<Result<Arrived, String>>,
    pending: Arc<Stale>,
}

/// Whether pages are still to come (a snapshot or a further migration must wait for them).
#[derive(Clone)]
pub struct Pending(Arc<Stale>);

impl Pending {
    /// Pages not in guest memory yet.
    pub fn pages(&self) -> u64 {
        self.0.left()
    }
}

impl Arriving {
    /// Waits until every page is in (`Ok`) or the guest's memory can no longer be completed.
    pub fn wait(self) -> Result<Arrived, String> {
        self.handle.join().unwrap_or_else(|_| Err("the post-copy thread panicked".into()))
    }

    /// What is still to come, readable while it comes.
    pub fn pending(&self) -> Pending {
        Pending(self.pending.clone())
    }
}

/// Post-copy at the destination, from the first `Discard`: guest memory is registered with a
/// userfaultfd before any page is dropped, so nothing can fill a dropped page behind its back.
pub(super) struct Incoming {
    uffd: Arc<Uffd>,
    stale: Arc<Stale>,
}

impl Incoming {
    pub(super) fn new(memory: &GuestRam, layout: &Layout) -> Result<Self, MigrationError> {
        let uffd = Uffd::new().map_err(|e| MigrationError::Vm(e.to_string()))?;
        for region in memory.iter() {
            let (start, len) = (region.as_ptr(), region.len() as usize);
            uffd.register(start, len).map_err(|e| MigrationError::Vm(e.to_string()))?;
            // Pages come one at a time; a huge page would be filled before they do.
            // SAFETY: advice on the region's own mapping; it changes no contents.
            unsafe { libc::madvise(start.cast(), len, libc::MADV_NOHUGEPAGE) };
        }
        Ok(Self { uffd: Arc::new(uffd), stale: Arc::new(Stale::new(layout.total())) })
    }

    /// Drops the stale copies of pages `first..first + n`: touching them now faults.
    pub(super) fn discard(&self, layout: &Layout, first: u64, n: u64) -> Result<(), MigrationError> {
        let (_, host) = layout.locate(first, n).ok_or_else(|| {
            MigrationError::Protocol(format!("stale pages {first}+{n} beyond guest memory"))
        })?;
        // SAFETY: `locate` put the range inside guest memory; the guest does not run yet, and
        // MADV_DONTNEED on private anonymous memory only empties the pages.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, n as usize * PAGE, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(MigrationError::Vm(format!(
                "dropping stale pages: {}",
                std::io::Error::last_os_error()
            )));
        }
        (first..first + n).for_each(|page| self.stale.mark(page));
        Ok(())
    }
}

/// How often the destination says it is there when the guest asks for nothing (the source
/// gives up after `TIMEOUT` of silence).
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Starts post-copy at the destination: a thread asks the source for stale pages the guest
/// touches and maps zeros for its other missing pages, another places the pages that come.
/// The guest may run as soon as this returns.
pub(super) fn arrive(
    memory: GuestRam,
    incoming: Incoming,
    layout: Layout,
    input: BufReader<Box<dyn Connection>>,
    replies: Replies,
) -> Result<Arriving, MigrationError> {
    let Incoming { uffd, stale } = incoming;
    let layout = Arc::new(layout);
    let done = Arc::new(AtomicBool::new(false));
    let faults = {
        let (uffd, layout, stale, done, replies) =
            (uffd.clone(), layout.clone(), stale.clone(), done.clone(), replies.clone());
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || serve_faults(&uffd, &layout, &stale, &done, &replies))
            .map_err(|e| MigrationError::Vm(format!("starting post-copy: {e}")))?
    };
    let pending = stale.clone();
    let handle = std::thread::Builder::new()
        .name("postcopy-pages".into())
        .spawn(move || {
            let started = Instant::now();
            let placed = place_pages(&uffd, &layout, &stale, input, &replies);
            done.store(true, Ordering::SeqCst);
            let faulted = faults.join().unwrap_or_else(|_| Err("the fault thread panicked".into()));
            let left = stale.left();
            let result = match (placed, faulted) {
                (Ok(pages), Ok(faults)) => Ok(Arrived { pages, faults, ms: ms_since(started) }),
                // Every page is in: the guest lost nothing even if the end was not clean.
                (Err(_), _) | (_, Err(_)) if left == 0 => {
                    Ok(Arrived { ms: ms_since(started), ..Default::default() })
                }
                (Err(e), _) | (_, Err(e)) => Err(format!("{e}; {left} pages of guest memory never arrived")),
            };
            if result.is_ok() {
                for region in memory.iter() {
                    let _ = uffd.unregister(region.as_ptr(), region.len() as usize);
                }
            } else {
                // Closing the userfaultfd would hand whoever waits for a missing page a zero
                // page: the guest would run on holes. It stays open, and they wait, until the
                // caller stops the VMM.
                std::mem::forget(uffd);
            }
            result
        })
        .map_err(|e| MigrationError::Vm(format!("starting post-copy: {e}")))?;
    Ok(Arriving { handle, pending })
}

/// Answers faults until `done`: a stale page is asked for, any other missing page is a zero
/// page (the source never sent it because it was zero there).
fn serve_faults(
    uffd: &Uffd,
    layout: &Layout,
    stale: &Stale,
    done: &AtomicBool,
    replies: &Replies,
) -> Result<u64, String> {
    let mut faults = 0;
    let mut said = Instant::now();
    while !done.load(Ordering::SeqCst) {
        let addresses = uffd.faults(Duration::from_millis(50)).map_err(|e| format!("reading faults: {e}"))?;
        let mut wanted = Vec::new();
        for address in addresses {
            let Some(page) = layout.page_at(address) else { continue };
            if stale.is_stale(page) {
                wanted.push(page);
            } else if let Some((_, host)) = layout.locate(page, 1) {
                // SAFETY: a page of registered guest memory; one already there is left alone.
                unsafe { uffd.zero(host as *mut u8, PAGE) }.map_err(|e| e.to_string())?;
            }
        }
        if wanted.is_empty() && said.elapsed() < KEEPALIVE {
            continue;
        }
        said = Instant::now();
        wanted.sort_unstable();
        wanted.dedup();
        faults += wanted.len() as u64;
        let payload: Vec<u8> = wanted.iter().flat_map(|p| p.to_le_bytes()).collect();
        answer(replies, Kind::Request, &payload).map_err(|e| format!("asking for pages: {e}"))?;
    }
    Ok(faults)
}

/// Places the pages the source sends until it says `Complete`, then says so back.
fn place_pages(
    uffd: &Uffd,
    layout: &Layout,
    stale: &Stale,
    mut input: BufReader<Box<dyn Connection>>,
    replies: &Replies,
) -> Result<u64, String> {
    let mut payload = Vec::new();
    let mut placed = 0;
    loop {
        let kind = read_frame(&mut input, &mut payload).map_err(|e| e.to_string())?;
        let (first, n, data) = match kind {
            Kind::Pages | Kind::Zeros => page_frame(kind, &payload).map_err(|e| e.to_string())?,
            Kind::Complete if stale.left() == 0 => {
                answer(replies, Kind::Complete, &[])
                    .map_err(|e| format!("confirming the last pages: {e}"))?;
                return Ok(placed);
            }
            Kind::Complete => return Err("the source finished post-copy early".into()),
            other => return Err(format!("an unexpected {other:?} frame during post-copy")),
        };
        let (_, host) =
            layout.locate(first, n).ok_or_else(|| format!("pages {first}+{n} beyond guest memory"))?;
        match data {
            // SAFETY: `locate` put the whole run inside registered guest memory.
            Some(data) => match unsafe { uffd.copy(host as *mut u8, data) } {
                Ok(true) => {}
                // The source sends each stale page once, and nothing else fills one.
                Ok(false) => return Err(format!("pages {first}+{n} were already in guest memory")),
                Err(e) => return Err(e.to_string()),
            },
            // SAFETY: as above.
            None => unsafe { uffd.zero(host as *mut u8, n as usize * PAGE) }.map_err(|e| e.to_string())?,
        }
        // Marked only once placed: a fault on the page meanwhile still asks for it.
        for page in first..first + n {
            stale.arrived(page);
        }
        placed += n;
    }
}
