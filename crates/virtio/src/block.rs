//! virtio-blk backed by a raw file: reads, writes, flush (fdatasync), device id; read-only
//! disks refuse writes with an I/O error status. The file is locked so two VMMs never write
//! the same disk.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::rate_limiter::{RateLimit, RateLimiter, SharedLimiter};
use crate::GuestRam;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::{
    available_chains_limited, complete_chains, device_type, read_config_bytes, DeviceCounters, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// The guest-memory pieces holding `len` bytes of a chain's device-writable (`writable`) or
/// device-readable buffers, after skipping the first `skip` bytes of them.
fn regions(
    chain: &virtio_queue::DescriptorChain<&GuestRam>,
    writable: bool,
    mut skip: usize,
    mut len: usize,
) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    for desc in chain.clone().filter(|d| d.is_write_only() == writable) {
        if len == 0 {
            break;
        }
        let mut addr = desc.addr();
        let mut n = desc.len() as usize;
        let skipped = skip.min(n);
        skip -= skipped;
        n -= skipped;
        addr = addr.unchecked_add(skipped as u64);
        let take = n.min(len);
        if take > 0 {
            out.push((addr, take));
            len -= take;
        }
    }
    out
}

/// Size of a request header: type, reserved, sector.
const HEADER_LEN: usize = 16;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the device id string returned by GET_ID.
const ID_BYTES: usize = 20;
const QUEUE_SIZE: u16 = 256;
/// Largest single request: a guest cannot make the VMM allocate more than this at once.
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file could not be opened.
    #[error("disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("disk {0} is in use by another VMM (it holds the file's lock)")]
    Locked(PathBuf),
    /// The size is not usable.
    #[error("disk {path} is {size} bytes, not a whole number of 512-byte sectors")]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// A virtio block device on a raw file.
pub struct Block {
    file: File,
    path: PathBuf,
    readonly: bool,
    capacity_sectors: u64,
    config: [u8; 24],
    id: [u8; ID_BYTES],
    limiter: SharedLimiter,
    counters: DeviceCounters,
    log: Arc<WriteLog>,
}

/// Which parts of a disk the guest wrote since the log was started, in blocks of
/// [`WriteLog::BLOCK`] bytes: a migration that copies the disk re-sends them.
pub struct WriteLog {
    bits: Vec<AtomicU64>,
    on: AtomicBool,
}

impl WriteLog {
    /// Bytes per bit.
    pub const BLOCK: u64 = 64 << 10;

    fn new(size: u64) -> Self {
        let words = size.div_ceil(Self::BLOCK).div_ceil(64) as usize;
        Self { bits: (0..words).map(|_| AtomicU64::new(0)).collect(), on: AtomicBool::new(false) }
    }

    /// Logs writes from now on, with nothing logged so far.
    pub fn start(&self) {
        self.on.store(true, Ordering::SeqCst);
        self.take();
    }

    /// Words in a `take`.
    pub fn words(&self) -> usize {
        self.bits.len()
    }

    /// Stops logging.
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.on.load(Ordering::SeqCst) {
            return;
        }
        for block in offset / Self::BLOCK..=(offset + len - 1) / Self::BLOCK {
            if let Some(word) = self.bits.get((block / 64) as usize) {
                word.fetch_or(1 << (block % 64), Ordering::SeqCst);
            }
        }
    }

    /// The blocks written since the last take (bit i of word w: block 64w + i), cleared.
    pub fn take(&self) -> Vec<u64> {
        self.bits.iter().map(|w| w.swap(0, Ordering::SeqCst)).collect()
    }
}

/// The lock a VMM holds on a disk file (`flock`: shared when read-only, exclusive otherwise),
/// so that two VMMs never write one disk. A live migration hands it over: the source lets go
/// once the guest is paused and its writes are on disk, the destination takes it before the
/// guest runs there.
pub struct DiskLock {
    /// The disk's open file description (a duplicate: the lock belongs to the description).
    file: File,
    path: PathBuf,
    readonly: bool,
}

impl DiskLock {
    /// Takes the lock; `Locked` if another process holds it.
    pub fn acquire(&self) -> Result<(), BlockError> {
        let op = if self.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(self.file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(BlockError::Locked(self.path.clone()));
        }
        Ok(())
    }

    /// Puts what was written on stable storage and lets go of the lock.
    pub fn release(&self) -> std::io::Result<()> {
        if !self.readonly {
            self.file.sync_data()?;
        }
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The disk file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open disk file, opened again to read (a migration copying the disk): a description
    /// of its own, so that seeking it never moves the offset the device's I/O goes through.
    pub fn reader(&self) -> std::io::Result<File> {
        File::open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

impl Block {
    /// Opens `path` as a disk and locks it (see [`DiskLock`]).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, BlockError> {
        let block = Self::open_unlocked(path, readonly)?;
        block
            .lock_handle()
            .map_err(|source| BlockError::Open { path: path.to_owned(), source })?
            .acquire()?;
        Ok(block)
    }

    /// Opens `path` as a disk without taking its lock: a migration's destination, whose
    /// source still holds it, takes it later through [`Block::lock_handle`].
    pub fn open_unlocked(path: &Path, readonly: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(!readonly).open(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size { path: path.to_owned(), size });
        }
        let capacity_sectors = size / SECTOR_SIZE;
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        // seg_max: how many data segments one request may carry.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        let mut id = [0u8; ID_BYTES];
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let limiter = RateLimiter::shared(RateLimit::default()).map_err(open_err)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            readonly,
            capacity_sectors,
            config,
            id,
            limiter,
            counters: DeviceCounters::default(),
            log: Arc::new(WriteLog::new(size)),
        })
    }

    /// The log of what the guest writes (off until started).
    pub fn write_log(&self) -> Arc<WriteLog> {
        self.log.clone()
    }

    /// A handle on this disk's lock.
    pub fn lock_handle(&self) -> std::io::Result<DiskLock> {
        Ok(DiskLock { file: self.file.try_clone()?, path: self.path.clone(), readonly: self.readonly })
    }

    /// The disk's rate limiter (unlimited until set), shared with whoever changes it.
    pub fn limiter(&self) -> SharedLimiter {
        self.limiter.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Executes one request; returns (status, bytes written into guest memory before status).
    fn execute(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestRam>,
        mem: &GuestRam,
    ) -> Result<u32, ()> {
        let mut reader = chain.clone().reader(mem).map_err(|_| ())?;
        let mut data_writer = chain.clone().writer(mem).map_err(|_| ())?;
        // The status byte is the last device-writable byte; everything before it is data.
        let writable = data_writer.available_bytes();
        if writable == 0 {
            return Err(());
        }
        let mut status_writer = data_writer.split_at(writable - 1).map_err(|_| ())?;
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header).map_err(|_| ())?;
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());

        let (status, used) = match kind {
            VIRTIO_BLK_T_IN => {
                let len = data_writer.available_bytes();
                match self.range(sector, len) {
                    Some(offset) => {
                        // Straight from the file into the guest's buffers: the writer above
                        // already checked every descriptor against guest memory.
                        let regions = regions(&chain, true, 0, len);
                        match self.transfer(&regions, offset, mem, true) {
                            Ok(()) => {
                                self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                                (VIRTIO_BLK_S_OK, len as u32)
                            }
                            Err(()) => self.io_error(),
                        }
                    }
                    None => self.bad_request(),
                }
            }
            VIRTIO_BLK_T_OUT if self.readonly => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                match self.range(sector, len) {
                    Some(offset) => {
                        let regions = regions(&chain, false, HEADER_LEN, len);
                        let done = self.transfer(&regions, offset, mem, false);
                        // Logged even when it failed part way: some of it may be written.
                        self.log.mark(offset, len as u64);
                        match done {
                            Ok(()) => {
                                self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                                (VIRTIO_BLK_S_OK, 0)
                            }
                            Err(()) => self.io_error(),
                        }
                    }
                    None => self.bad_request(),
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => self.io_error(),
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = data_writer.available_bytes().min(ID_BYTES);
                match data_writer.write_all(&self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => self.bad_request(),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        status_writer.write_all(&[status]).map_err(|_| ())?;
        if status == VIRTIO_BLK_S_OK {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
        }
        Ok(used + 1)
    }

    /// Moves data between the file at `offset` and guest memory `regions`, in order: file to
    /// guest when `to_guest`, else guest to file.
    fn transfer(
        &mut self,
        regions: &[(GuestAddress, usize)],
        offset: u64,
        mem: &GuestRam,
        to_guest: bool,
    ) -> Result<(), ()> {
        (&self.file).seek(SeekFrom::Start(offset)).map_err(|_| ())?;
        for &(addr, len) in regions {
            let done = if to_guest {
                mem.read_exact_volatile_from(addr, &mut &self.file, len)
            } else {
                mem.write_all_volatile_to(addr, &mut &self.file, len)
            };
            done.map_err(|_| ())?;
        }
        Ok(())
    }

    /// The file offset of a request of `len` bytes at `sector`, if it is whole sectors within
    /// the disk and not absurdly large.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_REQUEST_BYTES {
            return None;
        }
        let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
        (end <= self.capacity_sectors).then(|| sector * SECTOR_SIZE)
    }

    fn bad_request(&self) -> (u8, u32) {
        self.counters.reject("virtio-blk", "a malformed request");
        (VIRTIO_BLK_S_IOERR, 0)
    }

    fn io_error(&self) -> (u8, u32) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        (VIRTIO_BLK_S_IOERR, 0)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        let Some(queue) = queues.get_mut(index) else { return false };
        let chains = available_chains_limited(queue, mem, &self.counters, "virtio-blk", &self.limiter);
        complete_chains(queue, mem, chains, |chain| {
            self.execute(chain, mem).unwrap_or_else(|()| {
                // No room even for a status byte: the chain is returned untouched.
                self.counters.reject("virtio-blk", "a malformed descriptor chain");
                0
            })
        })
    }

    fn host_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![stratus_devices::bus::lock(&self.limiter).timer_fd()]
    }

    // The rate limiter's timer: requests held back may go now.
    fn process_host_event(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        stratus_devices::bus::lock(&self.limiter).timer_fired();
        match queues.first() {
            Some(q) if virtio_queue::QueueT::ready(q) => self.process_queue(0, queues, mem),
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
    use crate::testing::{Driver, DATA};
    use stratus_devices::BusDevice;
    use vm_memory::{Bytes, GuestAddress};

    struct Disk(PathBuf);
    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn disk(name: &str, sectors: u64) -> Disk {
        let path = std::env::temp_dir().join(format!("stratus-blk-{}-{name}", std::process::id()));
        let mut content = vec![0u8; (sectors * SECTOR_SIZE) as usize];
        content[..16].copy_from_slice(b"stratus disk 0!\n");
        std::fs::write(&path, content).unwrap();
        Disk(path)
    }

    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    fn request(d: &mut Driver, kind: u32, sector: u64, data_len: u32, data_writable: bool) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        d.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let before = d.used_idx();
        if data_len > 0 {
            d.submit(&[(HDR, 16, false), (BUF, data_len, data_writable), (STATUS, 1, true)]);
        } else {
            d.submit(&[(HDR, 16, false), (STATUS, 1, true)]);
        }
        assert_eq!(d.used_idx(), before.wrapping_add(1));
        (d.mem.read_obj(GuestAddress(STATUS)).unwrap(), d.used_len(before))
    }

    fn device(disk: &Disk, readonly: bool) -> Driver {
        let mut d = Driver::new(Box::new(Block::open(&disk.0, readonly).unwrap()));
        d.init();
        d
    }

    #[test]
    fn reads_writes_and_flushes_reach_the_file() {
        let disk = disk("rw", 64);
        let mut d = device(&disk, false);
        let mut cap = [0u8; 8];
        d.transport.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 64);

        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 0, 512, true), (VIRTIO_BLK_S_OK, 513));
        let mut got = [0u8; 16];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got, b"stratus disk 0!\n");

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        d.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 62, 1024, false), (VIRTIO_BLK_S_OK, 1));
        assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, 0, false), (VIRTIO_BLK_S_OK, 1));
        let file = std::fs::read(&disk.0).unwrap();
        assert_eq!(&file[62 * 512..64 * 512], &pattern[..]);

        assert_eq!(request(&mut d, VIRTIO_BLK_T_GET_ID, 0, 20, true).0, VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert!(String::from_utf8_lossy(&id).starts_with("stratus-blk-"));
    }

    #[test]
    fn bad_requests_get_an_error_status_and_change_nothing() {
        let disk = disk("bad", 8);
        let mut d = device(&disk, false);
        let before = std::fs::read(&disk.0).unwrap();
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 8, 512, true).0, VIRTIO_BLK_S_IOERR, "past the end");
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_OUT, 7, 1024, false).0,
            VIRTIO_BLK_S_IOERR,
            "runs past the end"
        );
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, u64::MAX, 512, false).0, VIRTIO_BLK_S_IOERR, "overflow");
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 0, 100, true).0, VIRTIO_BLK_S_IOERR, "not whole sectors");
        assert_eq!(request(&mut d, 99, 0, 512, true).0, VIRTIO_BLK_S_UNSUPP);
        assert_eq!(std::fs::read(&disk.0).unwrap(), before);
        assert!(d.transport.device().counters().rejected.load(Ordering::Relaxed) >= 4);
    }

    #[test]
    fn readonly_disks_refuse_writes_and_say_so() {
        let disk = disk("ro", 8);
        let mut d = device(&disk, true);
        assert_ne!(d.transport.device().features() & VIRTIO_BLK_F_RO, 0);
        let before = std::fs::read(&disk.0).unwrap();
        d.mem.write_slice(&[0xaau8; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 1, 512, false).0, VIRTIO_BLK_S_IOERR);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 0, 512, true).0, VIRTIO_BLK_S_OK);
        assert_eq!(std::fs::read(&disk.0).unwrap(), before);
    }

    #[test]
    fn a_disk_in_use_is_refused() {
        let disk = disk("lock", 8);
        let _first = Block::open(&disk.0, false).unwrap();
        let err = Block::open(&disk.0, false).err().unwrap();
        assert!(err.to_string().contains("is in use by another VMM"), "{err}");
        assert!(Block::open(&disk.0, true).is_err(), "not even read-only while someone writes");
        drop(_first);
        let _a = Block::open(&disk.0, true).unwrap();
        let _b = Block::open(&disk.0, true).expect("read-only users share");
        drop((_a, _b));

        // A migration's hand-over: the destination opens the disk while the source holds it,
        // and takes the lock only once the source has let go.
        let source = Block::open(&disk.0, false).unwrap();
        let destination = Block::open_unlocked(&disk.0, false).unwrap();
        let (held, wanted) = (source.lock_handle().unwrap(), destination.lock_handle().unwrap());
        assert!(matches!(wanted.acquire(), Err(BlockError::Locked(_))));
        held.release().unwrap();
        wanted.acquire().unwrap();
        assert!(matches!(held.acquire(), Err(BlockError::Locked(_))), "the source cannot take it back now");
        assert!(Block::open(&disk.0, false).is_err());
        let missing = Block::open(Path::new("/nonexistent/disk.img"), false).err().unwrap();
        assert!(missing.to_string().contains("/nonexistent/disk.img"), "{missing}");
    }

    #[test]
    fn fuzz_random_descriptor_tables() {
        let disk = disk("fuzz", 256);
        let mut d = device(&disk, false);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let rounds = 20_000;
        for _ in 0..rounds {
            assert!(d.fuzz_round(&mut state) <= 4);
        }
        assert_eq!(std::fs::metadata(&disk.0).unwrap().len(), 256 * SECTOR_SIZE, "the disk never grows");
        println!("virtio-blk: {rounds} random descriptor tables processed without a fault");
    }
}
