//! Live migration, pre-copy, VMM to VMM over TCP (or a Unix socket), in the order
//! `../shared/DESIGN.md` sets:
//!
//! 1. the source sends `Hello` (magic, state format version, the VM's configuration); the
//!    destination refuses a version or configuration it cannot take before any page moves;
//! 2. with dirty logging on, every page the guest ever touched goes over while it runs (zero
//!    pages are not sent: the destination's memory starts zeroed);
//! 3. dirty rounds, until what is left would go within the downtime target at the bandwidth
//!    measured in the last round (or a round limit is reached);
//! 4. pause, the last dirty pages and the whole state; the destination builds the VM from it,
//!    runs it and answers `Running`. Only then does the source stop its copy: any failure
//!    before that (connection cut, destination gone, a corrupted frame) resumes the guest on
//!    the source.
//!
//! With `postcopy`, a guest that does not converge moves at step 4 without its last dirty
//! pages: the destination runs it at once and fetches them on fault (see `postcopy`).
//!
//! Pages are named by their index in guest RAM laid end to end (the memory file's order).

mod disks;
pub mod postcopy;
pub mod stream;
mod uffd;

use std::io::{BufReader, BufWriter, Read, Write};
use std::time::{Duration, Instant};

use stratus_virtio::GuestRam;
pub use stratus_vmm_api::{MigrationProgress as ProgressState, MigrationReport as Report};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::snapshot::memory::{is_zero, region_bytes, DirtyPages, PAGE};
use crate::snapshot::{format, MemoryKind, VmState};
use crate::vm::{Vm, VmConfig};
use stream::{read_frame, write_frame, Kind, StreamError};

/// The stream's first bytes: the protocol's name and version (the last byte).
const MAGIC: &[u8; 16] = b"STRATUS-MIGRATE5";
/// Pages per `Pages` frame.
const BATCH: usize = 256;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream broke.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The destination refused the VM.
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// The other side said something out of turn.
    #[error("migration protocol error: {0}")]
    Protocol(String),
    /// The VM could not be saved or rebuilt.
    #[error("{0}")]
    Vm(String),
    /// The migration failed after the disks were handed over and they could not be taken
    /// back: the guest may be running at the destination, so it is left paused here.
    #[error("{0}")]
    Stranded(String),
    /// Called off before the guest paused (`DELETE /migration`, or the source said so).
    #[error("{0}")]
    Cancelled(String),
    /// A connection to a destination that has a secret came without it, or with another: it
    /// was refused before anything of it was looked at, and the destination waits on.
    #[error("a migration without the destination's secret: {0}")]
    Unauthorized(String),
}

/// How to migrate.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The longest the guest may stay paused (the last round's estimate).
    pub max_downtime: Duration,
    /// Dirty rounds before stopping the guest regardless.
    pub max_rounds: u32,
    /// The most bytes per second to put on the wire (`None`: as fast as it goes).
    pub bandwidth: Option<u64>,
    /// When a round does not shrink what is left, slow the vCPUs down (auto-converge).
    pub auto_converge: bool,
    /// When a round does not shrink what is left (or the rounds run out), move the guest at
    /// once and send the rest after it (post-copy); instead of throttling.
    pub postcopy: bool,
    /// Copy the disks too (the destination has its own files of the same sizes), rather than
    /// hand them over on shared storage.
    pub with_disks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(20),
            max_rounds: 30,
            bandwidth: None,
            auto_converge: true,
            postcopy: false,
            with_disks: false,
        }
    }
}

/// Throttle steps: the share of each 10 ms period the vCPUs are held, raised a step each
/// round that fails to shrink what is left.
const THROTTLE_START: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// What `Hello` says besides the configuration.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct HelloExtra {
    /// The disks are copied, and these are their sizes (`None`: a read-only disk, not copied).
    disk_sizes: Option<Vec<Option<u64>>>,
    /// The destination's secret, as the source was given it (empty: none).
    secret: Vec<u8>,
}

/// A migration's progress, readable while it runs (`GET /migration`), and the two requests
/// that reach it while it runs: call it off, or switch to post-copy now.
#[derive(Debug, Default)]
pub struct Progress {
    state: std::sync::Mutex<ProgressState>,
    cancel: std::sync::atomic::AtomicBool,
    switch: std::sync::atomic::AtomicBool,
    /// `GET /vm`'s answer as the migration began, and when: the VMM is the migration's until
    /// it ends, so `GET /vm` is answered from this meanwhile.
    vm_info: std::sync::Mutex<Option<(stratus_vmm_api::VmInfo, Instant)>>,
}

/// Phases in which the guest still runs only here: a migration may be called off, or switched
/// to post-copy.
const BEFORE_THE_MOVE: [&str; 4] = ["connecting", "disks", "full pass", "dirty rounds"];

/// Phases with no migration under way: none yet, or the last one over.
const AT_REST: [&str; 3] = ["", "completed", "failed"];

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.lock());
    }

    /// The progress now.
    pub fn get(&self) -> ProgressState {
        self.lock().clone()
    }

    /// Whether a migration is under way.
    pub fn active(&self) -> bool {
        !AT_REST.contains(&self.lock().phase.as_str())
    }

    /// A new migration to `to` begins (`postcopy`: it may switch to post-copy) of the VM
    /// that `GET /vm` describes as `vm_info`.
    pub fn begin(&self, to: &str, postcopy: bool, vm_info: stratus_vmm_api::VmInfo) {
        *self.vm_info.lock().unwrap_or_else(|p| p.into_inner()) = Some((vm_info, Instant::now()));
        let mut p = self.lock();
        *p = ProgressState {
            phase: "connecting".into(),
            to: to.to_owned(),
            postcopy_allowed: postcopy,
            ..Default::default()
        };
        self.cancel.store(false, std::sync::atomic::Ordering::SeqCst);
        self.switch.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// `GET /vm` while a migration runs: the VM as it began, its uptime brought up to date,
    /// and the migration's progress under `migration`; `None` with no migration under way.
    pub fn vm_info(&self) -> Option<stratus_vmm_api::VmInfo> {
        let progress = self.get();
        if AT_REST.contains(&progress.phase.as_str()) {
            return None;
        }
        let (mut info, began) = self.vm_info.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        if let Some(uptime) = &mut info.uptime_ms {
            *uptime += began.elapsed().as_millis() as u64;
        }
        info.migration = Some(progress);
        Some(info)
    }

    /// The progress, if the guest has not begun to move; otherwise why not (`moving` says it
    /// for a migration past that point).
    fn before_the_move(
        &self,
        moving: impl FnOnce(&str) -> String,
    ) -> Result<std::sync::MutexGuard<'_, ProgressState>, String> {
        let p = self.lock();
        match p.phase.as_str() {
            phase if BEFORE_THE_MOVE.contains(&phase) => Ok(p),
            phase if AT_REST.contains(&phase) => Err("no migration is under way".to_owned()),
            phase => Err(moving(phase)),
        }
    }

    /// Calls the migration off, if the guest has not begun to move: it runs on here.
    pub fn cancel(&self) -> Result<(), String> {
        let _p = self.before_the_move(|phase| {
            format!("too late to call the migration off: the guest is moving ({phase})")
        })?;
        self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Moves the guest at once and sends the rest after it (like QEMU's
    /// migrate-start-postcopy), if the migration was started with post-copy allowed.
    pub fn start_postcopy(&self) -> Result<(), String> {
        let p = self.before_the_move(|phase| format!("the guest is already moving ({phase})"))?;
        if !p.postcopy_allowed {
            return Err("this migration was started without post-copy (`postcopy: true`)".to_owned());
        }
        self.switch.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn switch_requested(&self) -> bool {
        self.switch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The guest is about to pause for the move: from here on it cannot be called off. Fails
    /// if it was called off just before.
    fn enter_move(&self, phase: &'static str) -> Result<(), ()> {
        let mut p = self.lock();
        if self.cancelled() {
            return Err(());
        }
        p.phase = phase.into();
        Ok(())
    }

    /// It ended: completed with a report, or failed.
    pub fn end(&self, result: Result<&Report, String>) {
        self.update(|p| match result {
            Ok(report) => {
                p.phase = "completed".into();
                p.report = Some(report.clone());
                p.remaining_bytes = 0;
                p.estimated_remaining_s = 0.0;
            }
            Err(e) => {
                p.phase = "failed".into();
                p.error = Some(e);
            }
        });
    }
}

/// A connection to the other VMM: `tcp:HOST:PORT` or a Unix socket path.
pub trait Connection: Read + Write + Send {
    /// A second handle on the same connection (one to read, one to write).
    fn duplicate(&self) -> std::io::Result<Box<dyn Connection>>;
}

/// The destination's way back to the source, shared by whoever answers (post-copy asks for
/// pages while the VM is being started).
pub type Replies = std::sync::Arc<std::sync::Mutex<Box<dyn Connection>>>;

impl Connection for std::net::TcpStream {
    fn duplicate(&self) -> std::io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Connection for std::os::unix::net::UnixStream {
    fn duplicate(&self) -> std::io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// How long either side waits for the other before giving up (the source then resumes the
/// guest): a destination that hangs or a link that drops silently must not keep the guest
/// paused for ever.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `to` (`tcp:HOST:PORT` or a Unix socket path).
pub fn connect(to: &str) -> std::io::Result<Box<dyn Connection>> {
    match to.strip_prefix("tcp:") {
        Some(addr) => {
            let stream = std::net::TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.set_write_timeout(Some(TIMEOUT))?;
            Ok(Box::new(stream))
        }
        None => {
            let stream = stratus_unix::connect(std::path::Path::new(to))?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.set_write_timeout(Some(TIMEOUT))?;
            Ok(Box::new(stream))
        }
    }
}

/// A bound place where a migration will arrive (see `listen`).
pub enum Incoming {
    /// `tcp:HOST:PORT`.
    Tcp(std::net::TcpListener),
    /// A Unix socket path.
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

/// Binds `on` (`tcp:HOST:PORT` or a Unix socket path) for one source. Separate from `accept`
/// so that a VMM can be listening before it answers its API: whoever sees the API up may
/// migrate to it at once.
pub fn listen(on: &str) -> std::io::Result<Incoming> {
    match on.strip_prefix("tcp:") {
        Some(addr) => Ok(Incoming::Tcp(std::net::TcpListener::bind(addr)?)),
        None => {
            let _ = std::fs::remove_file(on);
            Ok(Incoming::Unix(stratus_unix::bind(std::path::Path::new(on))?, on.into()))
        }
    }
}

impl Incoming {
    /// Waits for the source (again after a connection that was refused).
    pub fn accept(&self) -> std::io::Result<Box<dyn Connection>> {
        match self {
            Incoming::Tcp(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(TIMEOUT))?;
                stream.set_write_timeout(Some(TIMEOUT))?;
                Ok(Box::new(stream))
            }
            Incoming::Unix(listener, _) => {
                let (stream, _) = listener.accept()?;
                stream.set_read_timeout(Some(TIMEOUT))?;
                stream.set_write_timeout(Some(TIMEOUT))?;
                Ok(Box::new(stream))
            }
        }
    }

    /// Stops listening (a Unix socket's path goes).
    pub fn close(self) {
        if let Incoming::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reads and checks the source's `Hello` (its magic, versions, extras and the VM's
/// configuration), refusing what does not do.
fn read_hello(
    conn: &mut dyn Connection,
    input: &mut impl Read,
    payload: &mut Vec<u8>,
) -> Result<(HelloExtra, VmConfig), MigrationError> {
    if read_frame(input, payload)? != Kind::Hello {
        return Err(refuse(conn, "the stream does not start with Hello".into()));
    }
    if payload.len() < 20 || payload[..15] != MAGIC[..15] {
        return Err(refuse(conn, "not a Stratus migration stream".into()));
    }
    if payload[15] != MAGIC[15] {
        return Err(refuse(
            conn,
            format!(
                "migration protocol version {}: this VMM speaks version {}",
                payload[15] as char, MAGIC[15] as char
            ),
        ));
    }
    let version = u32::from_le_bytes(payload[16..20].try_into().unwrap_or_default());
    if !(format::OLDEST_READABLE..=format::CURRENT).contains(&version) {
        return Err(refuse(
            conn,
            format!(
                "state format version {version}: this VMM reads {} to {}",
                format::OLDEST_READABLE,
                format::CURRENT
            ),
        ));
    }
    let decoded = (|| {
        let len = u32::from_le_bytes(payload.get(20..24)?.try_into().ok()?) as usize;
        let extra: HelloExtra = postcard::from_bytes(payload.get(24..24usize.checked_add(len)?)?).ok()?;
        let config: VmConfig = postcard::from_bytes(payload.get(24 + len..)?).ok()?;
        Some((extra, config))
    })();
    decoded.ok_or_else(|| refuse(conn, "the VM configuration does not decode".into()))
}

/// Whether `given` is `secret`, in a time that does not depend on where they differ.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    given.len() == secret.len() && given.iter().zip(secret).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Guest RAM regions with the index of their first page.
fn regions(mem: &GuestRam) -> Vec<(u64, &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>)> {
    let mut first = 0;
    mem.iter()
        .map(|r| {
            let at = first;
            first += r.len() / PAGE as u64;
            (at, r)
        })
        .collect()
}

struct Sender<'a> {
    out: BufWriter<Box<dyn Connection>>,
    report: &'a mut Report,
    progress: &'a Progress,
    frame: Vec<u8>,
    /// Pacing: bytes per second, and when sending began.
    bandwidth: Option<u64>,
    started: Instant,
}

impl Sender<'_> {
    /// Fails once the migration is called off, telling the destination (best effort: it may
    /// be gone already).
    fn check_cancel(&mut self) -> Result<(), MigrationError> {
        if !self.progress.cancelled() {
            return Ok(());
        }
        Err(self.cancelled())
    }

    /// Tells the destination the migration is off; the error to return.
    fn cancelled(&mut self) -> MigrationError {
        let why = "called off at the source (DELETE /migration) before the guest paused";
        let _ = write_frame(&mut self.out, Kind::Cancel, why.as_bytes());
        let _ = self.out.flush();
        MigrationError::Cancelled(format!("{why}; the VM runs here still"))
    }

    /// Waits until the destination has everything sent so far in guest memory, so that a
    /// pass's time is the whole path's and no backlog is left for the guest's pause.
    fn sync(&mut self, input: &mut impl Read) -> Result<(), MigrationError> {
        write_frame(&mut self.out, Kind::Sync, &[])?;
        self.out.flush().map_err(StreamError::Io)?;
        let mut payload = Vec::new();
        match read_frame(input, &mut payload)? {
            Kind::Synced => Ok(()),
            Kind::Refuse => Err(MigrationError::Refused(String::from_utf8_lossy(&payload).into_owned())),
            other => Err(MigrationError::Protocol(format!("{other:?} instead of Synced"))),
        }
    }

    /// Waits, if a bandwidth limit is set, until the bytes sent so far are due.
    fn pace(&self) {
        if let Some(wait) = self.due() {
            std::thread::sleep(wait);
        }
    }

    /// How long until the bytes sent so far are due under the bandwidth limit, if at all.
    fn due(&self) -> Option<Duration> {
        let rate = self.bandwidth.filter(|&r| r > 0)?;
        let due = Duration::from_secs_f64(self.report.bytes_sent as f64 / rate as f64);
        due.checked_sub(self.started.elapsed()).filter(|w| !w.is_zero())
    }

    /// Sends the pages of `mem` that `wanted(region, page)` selects; `skip_zero` leaves zero
    /// pages out altogether (first pass), otherwise they go as `Zeros`. After a page not
    /// wanted the next one looked at is `next(region, page + 1)`: a dirty bitmap skips its
    /// clean words (a stop-and-copy looks at a few pages, not all of them).
    fn pages(
        &mut self,
        mem: &GuestRam,
        mut wanted: impl FnMut(usize, usize) -> bool,
        next: impl Fn(usize, usize) -> usize,
        skip_zero: bool,
    ) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for (k, (first, region)) in regions(mem).into_iter().enumerate() {
            let bytes = region_bytes(region);
            let pages = bytes.len() / PAGE;
            let mut i = 0;
            while i < pages {
                if !wanted(k, i) {
                    i = next(k, i + 1);
                    continue;
                }
                let page = &bytes[i * PAGE..(i + 1) * PAGE];
                if is_zero(page) {
                    // A run of wanted zero pages goes as one `Zeros`.
                    let start = i;
                    i += 1;
                    while i < pages && wanted(k, i) && is_zero(&bytes[i * PAGE..(i + 1) * PAGE]) {
                        i += 1;
                    }
                    if !skip_zero {
                        self.zeros(first + start as u64, (i - start) as u32)?;
                    }
                    continue;
                }
                // A run of wanted, non-zero pages (this one first), up to a batch.
                let start = i;
                i += 1;
                while i < pages
                    && i - start < BATCH
                    && wanted(k, i)
                    && !is_zero(&bytes[i * PAGE..(i + 1) * PAGE])
                {
                    i += 1;
                }
                self.run(first + start as u64, &bytes[start * PAGE..i * PAGE])?;
                sent += (i - start) as u64;
                let bytes_sent = self.report.bytes_sent;
                self.progress.update(|p| p.bytes_sent = bytes_sent);
                self.pace();
                self.check_cancel()?;
            }
        }
        Ok(sent)
    }

    /// Sends the pages of `mem` set in `dirty`, zero ones as `Zeros`.
    fn dirty_pages(&mut self, mem: &GuestRam, dirty: &DirtyPages) -> Result<u64, MigrationError> {
        self.pages(mem, |k, i| is_set(dirty, k, i), |k, i| next_set(dirty, k, i), false)
    }

    /// Sends whole pages `data` as pages `first..`.
    fn run(&mut self, first: u64, data: &[u8]) -> Result<(), StreamError> {
        self.frame.clear();
        self.frame.extend_from_slice(&first.to_le_bytes());
        self.frame.extend_from_slice(data);
        write_frame(&mut self.out, Kind::Pages, &self.frame)?;
        self.report.pages_sent += (data.len() / PAGE) as u64;
        self.report.bytes_sent += 9 + self.frame.len() as u64;
        Ok(())
    }

    /// Says that pages `first..first + n` are zeros now.
    fn zeros(&mut self, first: u64, n: u32) -> Result<(), StreamError> {
        let mut payload = [0u8; 12];
        payload[..8].copy_from_slice(&first.to_le_bytes());
        payload[8..].copy_from_slice(&n.to_le_bytes());
        write_frame(&mut self.out, Kind::Zeros, &payload)?;
        self.report.zero_pages += u64::from(n);
        self.report.bytes_sent += 21;
        Ok(())
    }
}

/// ORs `from` into `into` (bitmaps of the same memory).
fn merge(into: &mut DirtyPages, from: &DirtyPages) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// Watches the first pass for post-copy: a guest that dirties pages as fast as they go will
/// not converge, and the sooner it moves the less goes twice.
struct Watch {
    /// Dirty pages taken from the log during the pass.
    dirty: DirtyPages,
    /// Pages the pass would have sent but left for post-copy.
    held_back: DirtyPages,
    sent: u64,
    started: Instant,
    checked: Instant,
    switched: bool,
    error: Option<crate::vm::VmError>,
}

impl Watch {
    fn new(mem: &GuestRam) -> Self {
        let empty: DirtyPages =
            mem.iter().map(|r| vec![0u64; (r.len() / PAGE as u64).div_ceil(64) as usize]).collect();
        Self {
            dirty: empty.clone(),
            held_back: empty,
            sent: 0,
            started: Instant::now(),
            checked: Instant::now(),
            switched: false,
            error: None,
        }
    }

    /// Whether page `i` of region `k`, which the pass wants to send, goes now (`switch`: the
    /// user asked for post-copy now).
    fn before_send(&mut self, vm: &Vm, k: usize, i: usize, switch: bool) -> bool {
        self.switched |= switch;
        if self.switched {
            if let Some(word) = self.held_back.get_mut(k).and_then(|bits| bits.get_mut(i / 64)) {
                *word |= 1 << (i % 64);
            }
            return false;
        }
        self.sent += 1;
        if self.sent.is_multiple_of(256) && self.checked.elapsed() >= Duration::from_millis(50) {
            self.checked = Instant::now();
            match vm.take_dirty_pages() {
                Ok(dirty) => merge(&mut self.dirty, &dirty),
                Err(e) => {
                    // Reported after the pass; nothing more is held back.
                    self.error = Some(e);
                    return true;
                }
            }
            // Distinct pages dirtied since the pass began against pages sent: the guest's
            // dirtying rate against the link's, once there is enough to judge.
            if self.started.elapsed() >= Duration::from_millis(100)
                && count(&self.dirty) * 10 >= self.sent * 9
            {
                self.switched = true;
            }
        }
        true
    }
}

fn count(dirty: &DirtyPages) -> u64 {
    dirty.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

fn is_set(dirty: &DirtyPages, region: usize, page: usize) -> bool {
    dirty.get(region).and_then(|bits| bits.get(page / 64)).is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// The first page from `page` on that is set in region `region` of `dirty` (`usize::MAX`
/// when none is).
fn next_set(dirty: &DirtyPages, region: usize, page: usize) -> usize {
    let Some(bits) = dirty.get(region) else { return usize::MAX };
    let mut word = page / 64;
    let mut mask = u64::MAX.checked_shl((page % 64) as u32).unwrap_or(0);
    while let Some(w) = bits.get(word) {
        let set = w & mask;
        if set != 0 {
            return word * 64 + set.trailing_zeros() as usize;
        }
        word += 1;
        mask = u64::MAX;
    }
    usize::MAX
}

/// Seconds of stop-and-copy not worth another dirty round to save.
const NEGLIGIBLE_PAUSE: f64 = 0.000_25;

/// Migrates the running `vm` over `conn`. On success the guest runs at the destination and
/// `vm` is left paused; on any failure it runs again here.
pub fn send(
    vm: &mut Vm,
    conn: Box<dyn Connection>,
    options: Options,
    secret: &[u8],
    progress: &Progress,
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    let mut report = Report::default();
    let mut input = BufReader::new(conn.duplicate().map_err(StreamError::Io)?);
    let out = BufWriter::with_capacity(1 << 20, conn);
    let mut sender = Sender {
        out,
        report: &mut report,
        progress,
        frame: Vec::with_capacity(8 + BATCH * PAGE),
        bandwidth: options.bandwidth,
        started: Instant::now(),
    };

    // 1. Hello: versions and configuration are checked before any page moves.
    let disk_copy = if options.with_disks { Some(disks::SourceDisks::open(vm)?) } else { None };
    let mut disk_dirty = disk_copy.as_ref().map(|d| d.no_blocks()).unwrap_or_default();
    let extra = HelloExtra { disk_sizes: disk_copy.as_ref().map(|d| d.sizes()), secret: secret.to_vec() };
    let encoding = |e: postcard::Error| MigrationError::Vm(e.to_string());
    let extra = postcard::to_stdvec(&extra).map_err(encoding)?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&format::CURRENT.to_le_bytes());
    hello.extend_from_slice(&(extra.len() as u32).to_le_bytes());
    hello.extend_from_slice(&extra);
    hello.extend_from_slice(&postcard::to_stdvec(vm.config()).map_err(encoding)?);
    write_frame(&mut sender.out, Kind::Hello, &hello)?;
    sender.out.flush().map_err(StreamError::Io)?;
    let mut payload = Vec::new();
    match read_frame(&mut input, &mut payload)? {
        Kind::Accept => {}
        Kind::Refuse => return Err(MigrationError::Refused(String::from_utf8_lossy(&payload).into_owned())),
        other => return Err(MigrationError::Protocol(format!("{other:?} instead of an answer to Hello"))),
    }

    // 2. The disks whole, then everything the guest ever touched, while it runs.
    if let Some(disks) = &disk_copy {
        progress.update(|p| p.phase = "disks".into());
        disks.full_pass(&mut sender)?;
        sender.sync(&mut input)?;
    }
    progress.update(|p| p.phase = "full pass".into());
    vm.start_dirty_tracking().map_err(|e| MigrationError::Vm(e.to_string()))?;
    // Only anonymous memory: a page absent from a restored VM's file mapping holds the
    // file's contents, not zeros.
    let touched: Vec<Option<Vec<bool>>> = vm
        .memory()
        .iter()
        .map(|r| {
            if r.file_offset().is_none() {
                crate::snapshot::memory::touched_pages(region_bytes(r))
            } else {
                None
            }
        })
        .collect();
    let t = Instant::now();
    let before = sender.report.bytes_sent;
    // With post-copy the pass watches the guest: once it dirties pages about as fast as they
    // go, sending the rest ahead of the move is wasted (it would all go again).
    let mut watch = options.postcopy.then(|| Watch::new(vm.memory()));
    {
        let vm: &Vm = vm;
        sender.pages(
            vm.memory(),
            |k, i| {
                let wanted = touched[k].as_ref().is_none_or(|t| t.get(i).copied().unwrap_or(true));
                match watch.as_mut() {
                    Some(watch) if wanted => watch.before_send(vm, k, i, progress.switch_requested()),
                    _ => wanted,
                }
            },
            |_, i| i,
            true,
        )?;
    }
    sender.sync(&mut input)?;
    // Bytes per second, measured on each pass.
    let mut pass_secs = t.elapsed().as_secs_f64().max(1e-6);
    let mut bandwidth = (sender.report.bytes_sent - before) as f64 / pass_secs;
    progress.update(|p| {
        p.phase = "dirty rounds".into();
        p.bytes_sent = sender.report.bytes_sent;
        p.bandwidth = bandwidth;
    });

    // 3. Dirty rounds until the rest fits the downtime at the measured bandwidth; a round
    // that does not shrink what is left raises the vCPU throttle.
    let mut dirty = vm.take_dirty_pages().map_err(|e| MigrationError::Vm(e.to_string()))?;
    let mut switched = false;
    if let Some(watch) = watch {
        if let Some(e) = watch.error {
            return Err(MigrationError::Vm(e.to_string()));
        }
        // What the watch took from the log is dirty as much as what is left in it; the pages
        // it held back are still to go.
        merge(&mut dirty, &watch.dirty);
        merge(&mut dirty, &watch.held_back);
        switched = watch.switched;
    }
    let throttle = std::sync::atomic::AtomicU32::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let rounds = if switched {
        Ok(true)
    } else {
        std::thread::scope(|scope| -> Result<bool, MigrationError> {
            let vm: &Vm = vm;
            let throttler = scope.spawn(|| {
                use std::sync::atomic::Ordering::Relaxed;
                while !done.load(Relaxed) {
                    let held = throttle.load(Relaxed);
                    if held == 0 {
                        std::thread::sleep(THROTTLE_PERIOD);
                        continue;
                    }
                    // Let the vCPUs run a slice, then hold them in proportion to how long they
                    // really ran (a loaded host oversleeps the short slice).
                    let ran = Instant::now();
                    std::thread::sleep(THROTTLE_PERIOD * (100 - held) / 100);
                    let ran = ran.elapsed();
                    vm.pause();
                    std::thread::sleep(ran * held / (100 - held));
                    vm.resume();
                }
            });
            let result = (|| {
                let mut previous = u64::MAX;
                loop {
                    sender.check_cancel()?;
                    let disk_left = disk_copy.as_ref().map_or(0, |d| d.take_dirty(&mut disk_dirty));
                    let left = count(&dirty) * PAGE as u64 + disk_left;
                    let estimate = left as f64 / bandwidth;
                    // Once the rest fits the target, rounds go on while they still shrink it
                    // (each costs little when little is left) unless it is already next to
                    // nothing (a tenth of the target, at most a quarter of a millisecond): the
                    // pause is as short as the guest's dirtying allows, not merely short enough.
                    let target = options.max_downtime.as_secs_f64();
                    let shrinking = left.saturating_mul(4) < previous.saturating_mul(3);
                    let negligible = (target / 10.0).min(NEGLIGIBLE_PAUSE);
                    let fits = estimate <= target && (estimate <= negligible || !shrinking);
                    if fits {
                        return Ok(false);
                    }
                    let stuck = sender.report.rounds > 0 && left * 10 > previous * 9;
                    // Post-copy need not wait for a round to fail: one that would take as long as
                    // the pass that dirtied its pages will not shrink them either.
                    let hopeless = estimate >= pass_secs * 0.9;
                    // Post-copy moves memory only: the disk blocks left must fit the pause.
                    let disks_fit = disk_left as f64 / bandwidth <= target;
                    let asked = progress.switch_requested();
                    if options.postcopy
                        && disks_fit
                        && (asked || stuck || hopeless || sender.report.rounds >= options.max_rounds)
                    {
                        return Ok(true);
                    }
                    if sender.report.rounds >= options.max_rounds {
                        return Ok(false);
                    }
                    if options.auto_converge && stuck {
                        let held = throttle.load(std::sync::atomic::Ordering::Relaxed);
                        let next =
                            if held == 0 { THROTTLE_START } else { (held + THROTTLE_STEP).min(THROTTLE_MAX) };
                        throttle.store(next, std::sync::atomic::Ordering::Relaxed);
                        sender.report.throttle_percent = next;
                    }
                    previous = left;
                    let t = Instant::now();
                    let before = sender.report.bytes_sent;
                    if let Some(disks) = &disk_copy {
                        disks.send_dirty(&mut sender, &mut disk_dirty)?;
                    }
                    sender.dirty_pages(vm.memory(), &dirty)?;
                    sender.sync(&mut input)?;
                    let secs = t.elapsed().as_secs_f64().max(1e-6);
                    pass_secs = secs;
                    bandwidth = (sender.report.bytes_sent - before) as f64 / secs;
                    sender.report.rounds += 1;
                    dirty = vm.take_dirty_pages().map_err(|e| MigrationError::Vm(e.to_string()))?;
                    let remaining = count(&dirty) * PAGE as u64;
                    progress.update(|p| {
                        p.round = sender.report.rounds;
                        p.bytes_sent = sender.report.bytes_sent;
                        p.bandwidth = bandwidth;
                        p.remaining_bytes = remaining;
                        p.dirty_rate = remaining as f64 / secs;
                        p.estimated_remaining_s = remaining as f64 / bandwidth.max(1.0);
                        p.throttle_percent = sender.report.throttle_percent;
                    });
                }
            })();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = throttler.join();
            result
        })
    };
    // The throttler may have stopped between a pause and its resume.
    vm.resume();
    let postcopy = rounds?;
    // A throttled guest may have just been held for a while: let it run a slice before the
    // final pause, or the two would add up to one long stall (the few pages it dirties
    // meanwhile are in the last pages).
    let held = throttle.load(std::sync::atomic::Ordering::Relaxed);
    if held > 0 && !postcopy {
        std::thread::sleep(THROTTLE_PERIOD * (100 - held) / 100);
    }

    // 4. Stop and copy (or post-copy); the guest comes back here on any failure before the
    // destination runs it.
    if progress.enter_move(if postcopy { "post-copy" } else { "stop and copy" }).is_err() {
        return Err(sender.cancelled());
    }
    let paused_at = Instant::now();
    vm.pause();
    sender.report.pause_ms = ms_since(paused_at);
    // The bandwidth cap is for the guest's sake while it runs: the pause is not stretched by it.
    let limit = sender.bandwidth.take();
    let mut disks_released = false;
    let result = (|| -> Result<(), MigrationError> {
        let t = Instant::now();
        let mut merged = vm.take_dirty_pages().map_err(|e| MigrationError::Vm(e.to_string()))?;
        merge(&mut merged, &dirty);
        sender.report.last_round_pages = count(&merged);
        if postcopy {
            postcopy::discard(&mut sender, vm.memory(), &merged)?;
        } else {
            sender.dirty_pages(vm.memory(), &merged)?;
        }
        sender.report.last_pages_ms = ms_since(t);
        let t = Instant::now();
        let state = vm.save_state(MemoryKind::Full).map_err(|e| MigrationError::Vm(e.to_string()))?;
        let encoded = format::encode(&state).map_err(|e| MigrationError::Vm(e.to_string()))?;
        match &disk_copy {
            // The last blocks written: taken after the state, when every request the state
            // shows as done has reached the file.
            Some(disks) => {
                disks.take_dirty(&mut disk_dirty);
                disks.send_dirty(&mut sender, &mut disk_dirty)?;
            }
            // Shared disks go to the destination with their writes on stable storage; it
            // takes their locks before the guest runs there.
            None => {
                vm.release_disks().map_err(|e| MigrationError::Vm(e.to_string()))?;
                disks_released = true;
            }
        }
        sender.report.state_ms = ms_since(t);
        let t = Instant::now();
        write_frame(&mut sender.out, Kind::State, &encoded)?;
        if postcopy {
            write_frame(&mut sender.out, Kind::Postcopy, &[])?;
            sender.out.flush().map_err(StreamError::Io)?;
            // The guest runs at the destination from here: the background stream is capped again.
            sender.bandwidth = limit;
            let input =
                std::mem::replace(&mut input, BufReader::new(Box::new(Closed) as Box<dyn Connection>));
            let served = postcopy::serve(&mut sender, input, vm.memory(), merged, paused_at, progress);
            if sender.report.downtime_ms > 0.0 {
                // From the end of the stream to `Running`, as for a stop-and-copy.
                sender.report.destination_ms = sender.report.downtime_ms - ms_since(paused_at) + ms_since(t);
            }
            return served;
        }
        write_frame(&mut sender.out, Kind::Done, &[])?;
        sender.out.flush().map_err(StreamError::Io)?;
        let answer = read_frame(&mut input, &mut payload);
        sender.report.destination_ms = ms_since(t);
        if let (Err(e), Some(_)) = (&answer, &disk_copy) {
            // With its own copy of the disks, a destination that went quiet after `Done` may
            // run the guest: no lock keeps two copies apart, so this one stays paused.
            return Err(MigrationError::Stranded(format!(
                "{e} after the last of the VM was sent: the destination may be running the guest on \
                 its copy of the disks, so it stays paused here (resume it only if the destination \
                 does not run it)"
            )));
        }
        match answer? {
            Kind::Running => {
                if let Some(ms) = destination_work_ms(&payload) {
                    sender.report.destination_work_ms = ms;
                }
                Ok(())
            }
            Kind::Refuse => Err(MigrationError::Refused(String::from_utf8_lossy(&payload).into_owned())),
            other => Err(MigrationError::Protocol(format!("{other:?} instead of Running"))),
        }
    })();
    if let Err(e) = result {
        if let MigrationError::Stranded(_) = e {
            return Err(e);
        }
        if disks_released {
            if let Err(taken) = take_disks_back(vm) {
                // Another process holds a disk: the destination may run the guest after all.
                // Two copies must never run; this one stays paused.
                return Err(MigrationError::Stranded(format!(
                    "{e}; and the disks cannot be taken back ({taken}): the guest may be running at \
                     the destination, so it stays paused here"
                )));
            }
        }
        vm.resume();
        return Err(e);
    }
    if !report.postcopy {
        report.downtime_ms = ms_since(paused_at);
    }
    report.total_ms = ms_since(started);
    Ok(report)
}

/// A connection that is no longer there (what is left behind once post-copy takes the real one).
struct Closed;

impl Read for Closed {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl Write for Closed {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::NotConnected.into())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Connection for Closed {
    fn duplicate(&self) -> std::io::Result<Box<dyn Connection>> {
        Ok(Box::new(Closed))
    }
}

/// Takes the disks' locks back after a failed hand-over, waiting a little for a destination
/// that is exiting to let go.
fn take_disks_back(vm: &Vm) -> Result<(), crate::vm::VmError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match vm.reacquire_disks() {
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => return other,
        }
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// What arrived: the VM's state, what `receive`'s `prepare` built for it (holding its
/// memory), and the connection to answer on.
pub struct Arrival<P> {
    /// The state the source sent last.
    pub state: VmState,
    /// What `prepare` made of the configuration and memory.
    pub prepared: P,
    /// To send `Running` (or a refusal) back.
    pub conn: Replies,
    /// In post-copy, the pages still coming: the guest may run, but this must be waited on.
    pub postcopy: Option<postcopy::Arriving>,
    /// When the VM's state was read (the last large frame: `Done` or `Postcopy` follows).
    pub arrived_at: Instant,
    /// The stream's buffers (a megabyte or two): to be dropped once the VM runs, since giving
    /// them back to the system took a fifth of a millisecond of the downtime.
    pub buffers: Box<dyn Send>,
}

fn refuse(conn: &mut dyn Connection, reason: String) -> MigrationError {
    let _ = write_frame(conn, Kind::Refuse, reason.as_bytes());
    let _ = conn.flush();
    // Closing with the source's frames unread would reset the connection, and the refusal
    // with it: read on until the source has read the refusal and hung up (for a while).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sink = [0u8; 64 << 10];
    while Instant::now() < deadline {
        match conn.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    MigrationError::Refused(reason)
}

/// Receives a migration on `conn` until the source says it is done. The configuration is
/// checked (version, memory this host can hold) and handed with the guest's (still empty)
/// memory to `prepare`, which builds what it can ahead: its error refuses the VM before any
/// page is taken.
pub fn receive<P>(
    mut conn: Box<dyn Connection>,
    secret: Option<&[u8]>,
    prepare: impl FnOnce(&VmConfig, GuestRam, bool) -> Result<(P, Vec<std::path::PathBuf>), String>,
) -> Result<Arrival<P>, MigrationError> {
    let mut input = BufReader::with_capacity(1 << 20, conn.duplicate().map_err(StreamError::Io)?);
    let mut payload = Vec::new();
    let (extra, config) = match read_hello(conn.as_mut(), &mut input, &mut payload) {
        Ok(hello) => hello,
        // With a secret, whoever cannot even say Hello is a stranger: refused, and the
        // destination waits on for its source.
        Err(e) if secret.is_some() => return Err(MigrationError::Unauthorized(e.to_string())),
        Err(e) => return Err(e),
    };
    if let Some(secret) = secret {
        if !same_secret(&extra.secret, secret) {
            let why = if extra.secret.is_empty() { "none given" } else { "a wrong one" };
            let _ = refuse(
                conn.as_mut(),
                format!("this destination takes a migration only with its secret ({why})"),
            );
            return Err(MigrationError::Unauthorized(why.into()));
        }
    }
    let memory = match crate::memory::create(config.memory) {
        Ok(m) => m,
        Err(e) => return Err(refuse(conn.as_mut(), e.to_string())),
    };
    let (prepared, disk_paths) = match prepare(&config, memory.clone(), extra.disk_sizes.is_some()) {
        Ok(p) => p,
        Err(reason) => return Err(refuse(conn.as_mut(), reason)),
    };
    let disk_copy = match &extra.disk_sizes {
        Some(sizes) => match disks::DestinationDisks::open(&disk_paths, sizes) {
            Ok(d) => Some(d),
            Err(reason) => return Err(refuse(conn.as_mut(), reason)),
        },
        None => None,
    };
    write_frame(&mut conn, Kind::Accept, &[])?;
    conn.flush().map_err(StreamError::Io)?;

    let layout = postcopy::Layout::new(&memory);
    // Where pages `first..first + n` are: their guest address, if they lie in one region.
    let locate = |first: u64, n: u64| layout.locate(first, n).map(|(guest, _)| guest);
    // The VM's state, and when it was read: the destination's part of the downtime starts there.
    let mut state = None;
    // Post-copy's userfaultfd and stale pages, from the first `Discard` on.
    let mut stale: Option<postcopy::Incoming> = None;
    let postcopy = loop {
        let kind = read_frame(&mut input, &mut payload)?;
        match kind {
            // After a `Discard`, memory is the userfaultfd's: a write here would wait for itself.
            Kind::Pages | Kind::Zeros if stale.is_some() => {
                return Err(MigrationError::Protocol("pages after post-copy began".into()));
            }
            Kind::Pages | Kind::Zeros => {
                let (first, n, data) = page_frame(kind, &payload)?;
                let addr = locate(first, n).ok_or_else(|| {
                    MigrationError::Protocol(format!("pages {first}+{n} beyond guest memory"))
                })?;
                match data {
                    Some(data) => vm_memory::Bytes::write_slice(&memory, data, vm_memory::GuestAddress(addr))
                        .map_err(|e| MigrationError::Protocol(format!("writing pages: {e}")))?,
                    // A page at a time: a huge count must not become a huge allocation.
                    None => {
                        let zero = [0u8; PAGE];
                        for i in 0..n {
                            vm_memory::Bytes::write_slice(
                                &memory,
                                &zero,
                                vm_memory::GuestAddress(addr + i * PAGE as u64),
                            )
                            .map_err(|e| MigrationError::Protocol(format!("clearing pages: {e}")))?;
                        }
                    }
                }
            }
            Kind::State => {
                let read_at = Instant::now();
                let decoded =
                    format::decode(&payload).map_err(|e| MigrationError::Protocol(e.to_string()))?;
                state = Some((read_at, decoded));
            }
            Kind::Sync => {
                // Copied disk blocks go to stable storage pass by pass: the last sync, before the
                // guest runs here, is then short.
                if let Some(Err(e)) = disk_copy.as_ref().map(|d| d.sync()) {
                    return Err(refuse(conn.as_mut(), e.to_string()));
                }
                write_frame(&mut conn, Kind::Synced, &[])?;
                conn.flush().map_err(StreamError::Io)?;
            }
            Kind::Discard => {
                if payload.len() % 12 != 0 {
                    return Err(MigrationError::Protocol("a malformed Discard frame".into()));
                }
                if stale.is_none() {
                    match postcopy::Incoming::new(&memory, &layout) {
                        Ok(incoming) => stale = Some(incoming),
                        Err(e) => {
                            return Err(refuse(conn.as_mut(), format!("post-copy cannot start here: {e}")))
                        }
                    }
                }
                let incoming = stale.as_ref().ok_or_else(|| MigrationError::Vm("no post-copy".into()))?;
                for range in payload.chunks_exact(12) {
                    let (first, n) = page_range(range);
                    incoming.discard(&layout, first, n)?;
                }
            }
            Kind::Blocks | Kind::BlockZeros => {
                let Some(disks) = &disk_copy else {
                    return Err(MigrationError::Protocol(
                        "disk blocks, but the disks were not to be copied".into(),
                    ));
                };
                let written = if kind == Kind::Blocks { disks.write(&payload) } else { disks.zero(&payload) };
                if let Err(e) = written {
                    // A full disk here is the source's to hear about: it resumes the guest.
                    return Err(refuse(conn.as_mut(), e.to_string()));
                }
            }
            Kind::Cancel => {
                return Err(MigrationError::Cancelled(format!(
                    "the source called the migration off: {}",
                    String::from_utf8_lossy(&payload)
                )))
            }
            Kind::Postcopy if state.is_some() && stale.is_some() => break true,
            // Dropped pages are only ever refilled by post-copy.
            Kind::Done if stale.is_none() => break false,
            other => return Err(MigrationError::Protocol(format!("unexpected {other:?} frame"))),
        }
    };
    let (arrived_at, state) =
        state.ok_or_else(|| MigrationError::Protocol("Done before any State".into()))?;
    if let Some(Err(e)) = disk_copy.as_ref().map(|d| d.sync()) {
        return Err(refuse(conn.as_mut(), e.to_string()));
    }
    let conn: Replies = std::sync::Arc::new(std::sync::Mutex::new(conn));
    let (postcopy, input) = match stale {
        // Post-copy: the rest comes while the guest runs.
        Some(incoming) if postcopy => match postcopy::arrive(memory, incoming, layout, input, conn.clone()) {
            Ok(arriving) => (Some(arriving), None),
            Err(e) => {
                let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                return Err(refuse(&mut **c, format!("post-copy cannot start here: {e}")));
            }
        },
        _ => (None, Some(input)),
    };
    Ok(Arrival { state, prepared, conn, postcopy, arrived_at, buffers: Box::new((payload, input)) })
}

/// A (first page u64, count u32) range, as `Zeros` and `Discard` carry them: 12 bytes.
fn page_range(bytes: &[u8]) -> (u64, u64) {
    let first = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
    (first, u64::from(u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default())))
}

/// A `Pages` or `Zeros` frame: its first page, how many, and their bytes (`None`: zeros).
fn page_frame(kind: Kind, payload: &[u8]) -> Result<(u64, u64, Option<&[u8]>), MigrationError> {
    match kind {
        Kind::Pages if payload.len() >= 8 && (payload.len() - 8).is_multiple_of(PAGE) => {
            let first = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
            Ok((first, ((payload.len() - 8) / PAGE) as u64, Some(&payload[8..])))
        }
        Kind::Zeros if payload.len() == 12 => {
            let (first, n) = page_range(payload);
            Ok((first, n, None))
        }
        Kind::Pages => Err(MigrationError::Protocol("a Pages frame that is not whole pages".into())),
        other => Err(MigrationError::Protocol(format!("a malformed {other:?} frame"))),
    }
}

/// Tells the source that the VM runs here, and how long it took since its state was read
/// (microseconds, for the source's report).
pub fn confirm(replies: &Replies, arrived_at: Instant) -> Result<(), MigrationError> {
    let micros = arrived_at.elapsed().as_micros() as u64;
    answer(replies, Kind::Running, &micros.to_le_bytes())
}

/// The destination's own part of the downtime, in milliseconds, from a `Running` frame's
/// payload (see `confirm`); `None` when it does not say.
fn destination_work_ms(payload: &[u8]) -> Option<f64> {
    <[u8; 8]>::try_from(payload).ok().map(|micros| u64::from_le_bytes(micros) as f64 / 1e3)
}

/// Tells the source that the VM cannot run here after all (it resumes its copy).
pub fn decline(replies: &Replies, reason: &str) -> Result<(), MigrationError> {
    answer(replies, Kind::Refuse, reason.as_bytes())
}

fn answer(replies: &Replies, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
    // One write: the source waits on it in the guest's downtime.
    let mut frame = Vec::with_capacity(9 + payload.len());
    write_frame(&mut frame, kind, payload)?;
    let mut conn = replies.lock().unwrap_or_else(|p| p.into_inner());
    conn.write_all(&frame).map_err(StreamError::Io)?;
    conn.flush().map_err(StreamError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_set_finds_the_next_dirty_page_across_words_and_regions() {
        let dirty: DirtyPages = vec![vec![0, 1 << 5, 0, 1 << 63], vec![1]];
        assert_eq!(next_set(&dirty, 0, 0), 69);
        assert_eq!(next_set(&dirty, 0, 69), 69);
        assert_eq!(next_set(&dirty, 0, 70), 255);
        assert_eq!(next_set(&dirty, 0, 256), usize::MAX);
        assert_eq!(next_set(&dirty, 1, 0), 0);
        assert_eq!(next_set(&dirty, 1, 1), usize::MAX);
        assert_eq!(next_set(&dirty, 2, 0), usize::MAX);
        assert_eq!(next_set(&dirty, 0, usize::MAX - 1), usize::MAX);
    }
}
