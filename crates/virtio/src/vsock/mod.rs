//! virtio-vsock with its host side on Unix sockets (the design Firecracker calls hybrid vsock):
//!
//! - a host program connects to the VMM's socket at PATH and writes `CONNECT <port>\n`; the
//!   VMM opens a stream to that port in the guest and answers `OK <host port>\n`, after which
//!   the Unix stream carries the connection's bytes both ways;
//! - a guest connecting to the host (CID 2) on port P reaches whoever listens on the Unix
//!   socket `PATH_P`.
//!
//! Flow control is vsock's credit scheme: the guest never sends more than the VMM said it can
//! buffer, and the VMM never reads a host stream faster than the guest has room for.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::GuestRam;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::{
    available_chains, complete_chains, device_type, read_config_bytes, DeviceCounters, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use packet::{op, Header, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Bytes the VMM buffers per connection for the host side: the credit it gives the guest.
const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload the VMM puts in one packet: the size of a Linux guest's receive buffers.
const MAX_PAYLOAD: usize = 4096;
/// Largest payload accepted from the guest in one packet.
const MAX_GUEST_PAYLOAD: u32 = 64 << 10;
/// Packets waiting for receive buffers, at most: beyond this host streams are not read.
const RX_BACKLOG_LIMIT: usize = 256;
/// First port the VMM gives host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_HANDSHAKE: usize = 32;

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_HANDSHAKE: u64 = 1 << 62;
const TOKEN_CONNECTION: u64 = 1 << 61;

/// The device's event queue index: it carries transport resets after a restore or migration.
pub const EVENT_QUEUE: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest's connections are gone.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved.
    #[error("vsock cid {0} is reserved: use 3 or more")]
    BadCid(u64),
    /// The socket path is in use.
    #[error("vsock socket {0} is already in use (another VMM, or a stale file to remove)")]
    PathTaken(PathBuf),
    /// The socket could not be created.
    #[error("vsock socket {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// We sent REQUEST for a host program; waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

struct Connection {
    stream: UnixStream,
    state: State,
    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest, ever (wrapping).
    tx_cnt: u32,
    /// Bytes from the guest written to the host stream, ever (wrapping).
    fwd_cnt: u32,
    /// fwd_cnt when the guest last heard it.
    fwd_cnt_told: u32,
    /// Bytes from the guest the host stream has not taken yet.
    to_host: Vec<u8>,
    /// The host stream said end-of-file.
    host_eof: bool,
    /// Current epoll interest.
    interest: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            to_host: Vec::new(),
            host_eof: false,
            interest: EventSet::empty(),
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Host streams that have not said `CONNECT <port>` yet, by fd.
    handshakes: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    /// Connections by (host port, guest port).
    connections: HashMap<(u32, u32), Connection>,
    /// Connection keys by their host stream's descriptor (the epoll token).
    by_fd: HashMap<RawFd, (u32, u32)>,
    /// Packets (header and payload) waiting for receive buffers.
    rx_backlog: VecDeque<Vec<u8>>,
    next_host_port: u32,
    config: [u8; 8],
    counters: DeviceCounters,
}

impl Vsock {
    /// A device with address `cid` whose host side listens on `path`.
    pub fn new(cid: u64, path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cid));
        }
        let socket_err = |source| VsockError::Socket { path: path.to_owned(), source };
        let listener = match stratus_unix::bind(path) {
            Ok(l) => l,
            // A socket file nobody listens on is left over from a VMM that ended: reuse it.
            Err(e)
                if e.kind() == ErrorKind::AddrInUse
                    && stratus_unix::connect(path).is_err()
                    && is_socket(path) =>
            {
                std::fs::remove_file(path).map_err(socket_err)?;
                stratus_unix::bind(path).map_err(socket_err)?
            }
            Err(e) if e.kind() == ErrorKind::AddrInUse => return Err(VsockError::PathTaken(path.to_owned())),
            Err(e) => return Err(socket_err(e)),
        };
        listener.set_nonblocking(true).map_err(socket_err)?;
        let epoll = Epoll::new().map_err(socket_err)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_LISTENER))
            .map_err(socket_err)?;
        Ok(Self {
            cid,
            path: path.to_owned(),
            listener,
            epoll,
            handshakes: HashMap::new(),
            connections: HashMap::new(),
            by_fd: HashMap::new(),
            rx_backlog: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            config: cid.to_le_bytes(),
            counters: DeviceCounters::default(),
        })
    }

    fn header(&self, host_port: u32, guest_port: u32, op: u16) -> Header {
        let (buf_alloc, fwd_cnt) = match self.connections.get(&(host_port, guest_port)) {
            Some(c) => (BUF_ALLOC, c.fwd_cnt),
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: host_port,
            dst_port: guest_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Default::default()
        }
    }

    /// Queues a packet for the guest.
    fn send(&mut self, mut header: Header, payload: &[u8]) {
        header.len = payload.len() as u32;
        if let Some(c) = self.connections.get_mut(&(header.src_port, header.dst_port)) {
            c.tx_cnt = c.tx_cnt.wrapping_add(payload.len() as u32);
            c.fwd_cnt_told = c.fwd_cnt;
        }
        let mut packet = header.to_bytes().to_vec();
        packet.extend_from_slice(payload);
        self.rx_backlog.push_back(packet);
    }

    fn send_op(&mut self, key: (u32, u32), op: u16, flags: u32) {
        let mut h = self.header(key.0, key.1, op);
        h.flags = flags;
        self.send(h, &[]);
    }

    fn reset(&mut self, key: (u32, u32)) {
        self.close(key);
        self.send_op(key, op::RST, 0);
    }

    fn close(&mut self, key: (u32, u32)) {
        if let Some(c) = self.connections.remove(&key) {
            self.by_fd.remove(&c.stream.as_raw_fd());
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    fn open(&mut self, key: (u32, u32), connection: Connection) {
        self.by_fd.insert(connection.stream.as_raw_fd(), key);
        self.connections.insert(key, connection);
    }

    /// Sets a connection's epoll interest: readable while the guest has credit and the
    /// backlog has room, writable while bytes wait for the host.
    fn update_interest(&mut self, key: (u32, u32)) {
        let backlog_full = self.rx_backlog.len() >= RX_BACKLOG_LIMIT;
        let Some(c) = self.connections.get_mut(&key) else { return };
        let mut want = EventSet::empty();
        if c.state == State::Established && !c.host_eof && c.peer_credit() > 0 && !backlog_full {
            want |= EventSet::IN;
        }
        if !c.to_host.is_empty() {
            want |= EventSet::OUT;
        }
        if want == c.interest {
            return;
        }
        let fd = c.stream.as_raw_fd();
        let token = TOKEN_CONNECTION | fd as u64;
        let result = match (c.interest.is_empty(), want.is_empty()) {
            (true, false) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(want, token)),
            (false, true) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (false, false) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, token)),
            (true, true) => Ok(()),
        };
        if result.is_ok() {
            c.interest = want;
        }
    }

    fn accept_host_streams(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, TOKEN_HANDSHAKE | fd as u64),
                        )
                        .is_ok()
                    {
                        self.handshakes.insert(fd, (stream, Vec::new()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }

    /// Reads a host program's `CONNECT <port>\n` and opens the stream to the guest.
    fn handshake(&mut self, fd: RawFd) {
        let Some((stream, line)) = self.handshakes.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        let done = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Some(None),
                Ok(_) if byte[0] == b'\n' => break Some(Some(String::from_utf8_lossy(line).into_owned())),
                Ok(_) if line.len() < MAX_HANDSHAKE => line.push(byte[0]),
                Ok(_) => break Some(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(_) => break Some(None),
            }
        };
        let Some(request) = done else { return };
        let (mut stream, _) = self.handshakes.remove(&fd).expect("present");
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let port = request
            .as_deref()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(guest_port) = port else {
            let _ = stream.write_all(b"ERR expected CONNECT <port>\n");
            return;
        };
        let host_port = self.next_host_port;
        self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
        let key = (host_port, guest_port);
        self.open(key, Connection::new(stream, State::Connecting));
        self.send_op(key, op::REQUEST, 0);
    }

    /// Moves host bytes to the guest, within its credit.
    fn read_host(&mut self, key: (u32, u32)) {
        loop {
            if self.rx_backlog.len() >= RX_BACKLOG_LIMIT {
                break;
            }
            let Some(c) = self.connections.get_mut(&key) else { return };
            let room = (c.peer_credit() as usize).min(MAX_PAYLOAD);
            if room == 0 || c.state != State::Established || c.host_eof {
                break;
            }
            let mut buf = vec![0u8; room];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.host_eof = true;
                    self.send_op(key, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    break;
                }
                Ok(n) => {
                    self.counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    let h = self.header(key.0, key.1, op::RW);
                    self.send(h, &buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset(key);
                    return;
                }
            }
        }
        self.update_interest(key);
    }

    /// Writes what the guest sent to the host stream; tells the guest of freed buffer space.
    fn write_host(&mut self, key: (u32, u32)) {
        let Some(c) = self.connections.get_mut(&key) else { return };
        while !c.to_host.is_empty() {
            match c.stream.write(&c.to_host) {
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset(key);
                    return;
                }
            }
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 2 {
            self.send_op(key, op::CREDIT_UPDATE, 0);
        }
        self.update_interest(key);
    }

    /// Handles one packet from the guest.
    fn handle_guest_packet(&mut self, h: Header, payload: Vec<u8>) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            self.reject("a packet with a wrong address or socket type");
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.connections.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match (h.op, self.connections.get(&key).map(|c| c.state)) {
            (op::REQUEST, None) => self.connect_to_host(key),
            (op::RESPONSE, Some(State::Connecting)) => {
                let c = self.connections.get_mut(&key).expect("present");
                c.state = State::Established;
                let line = format!("OK {}\n", key.0);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.reset(key);
                    return;
                }
                self.read_host(key);
            }
            (op::RW, Some(State::Established)) => {
                let c = self.connections.get_mut(&key).expect("present");
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    // The guest sent beyond the credit it was given.
                    self.reject("data beyond the credit given");
                    self.reset(key);
                    return;
                }
                c.to_host.extend_from_slice(&payload);
                self.counters.bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
                self.write_host(key);
            }
            (op::CREDIT_UPDATE, Some(_)) => self.read_host(key),
            (op::CREDIT_REQUEST, Some(_)) => self.send_op(key, op::CREDIT_UPDATE, 0),
            (op::SHUTDOWN, Some(_)) => {
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Both directions done: the connection is over once the guest hears RST.
                    let c = self.connections.get_mut(&key).expect("present");
                    let _ = c.stream.flush();
                    self.reset(key);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    let c = self.connections.get(&key).expect("present");
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            (op::RST, Some(_)) => self.close(key),
            (op::RST, None) => {}
            // Anything else for a connection that does not exist (or not in that state).
            _ => self.send_op(key, op::RST, 0),
        }
    }

    /// The guest connects to host port P: a Unix socket at `PATH_P`.
    fn connect_to_host(&mut self, key: (u32, u32)) {
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{}", key.0));
        match stratus_unix::connect(std::path::Path::new(&target))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
        {
            Ok(stream) => {
                self.open(key, Connection::new(stream, State::Established));
                self.send_op(key, op::RESPONSE, 0);
                self.update_interest(key);
            }
            Err(_) => self.send_op(key, op::RST, 0),
        }
    }

    fn reject(&self, what: &str) {
        self.counters.reject("virtio-vsock", what);
    }

    /// Reads the guest's transmit queue.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestRam) -> bool {
        let chains = available_chains(queue, mem, &self.counters, "virtio-vsock");
        complete_chains(queue, mem, chains, |chain| {
            let packet = chain.reader(mem).ok().and_then(|mut reader| {
                let mut hdr = [0u8; HEADER_LEN];
                reader.read_exact(&mut hdr).ok()?;
                let h = Header::from_bytes(&hdr);
                if h.len > MAX_GUEST_PAYLOAD || h.len as usize > reader.available_bytes() {
                    return None;
                }
                let mut payload = vec![0u8; h.len as usize];
                reader.read_exact(&mut payload).ok()?;
                Some((h, payload))
            });
            match packet {
                Some((h, payload)) => {
                    self.counters.requests.fetch_add(1, Ordering::Relaxed);
                    self.handle_guest_packet(h, payload);
                }
                None => self.reject("a malformed packet"),
            }
            0
        })
    }

    /// Moves queued packets into the guest's receive buffers.
    fn flush_rx(&mut self, queue: &mut Queue, mem: &GuestRam) -> bool {
        let mut used_any = false;
        while let Some(packet) = self.rx_backlog.front() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let mut written = 0;
            match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= packet.len() => {
                    if w.write_all(packet).is_ok() {
                        written = packet.len() as u32;
                    }
                }
                _ => self.reject("a receive buffer too small for a packet; packet dropped"),
            }
            self.rx_backlog.pop_front();
            if queue.add_used(mem, head, written).is_ok() {
                used_any = true;
            }
        }
        // Room in the backlog again: host streams may be read.
        let keys: Vec<_> = self.connections.keys().copied().collect();
        for key in keys {
            self.update_interest(key);
        }
        used_any
    }

    /// Handles whatever the host side has ready.
    fn host_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for event in &events[..n] {
            let token = event.data();
            if token == TOKEN_LISTENER {
                self.accept_host_streams();
            } else if token & TOKEN_HANDSHAKE != 0 {
                self.handshake((token & 0xffff_ffff) as RawFd);
            } else if token & TOKEN_CONNECTION != 0 {
                let Some(&key) = self.by_fd.get(&((token & 0xffff_ffff) as RawFd)) else { continue };
                let events = event.event_set();
                if events.contains(EventSet::OUT) {
                    self.write_host(key);
                }
                if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.read_host(key);
                }
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        let [rx, tx, ..] = queues else { return false };
        let mut used = false;
        if index == TX {
            used |= self.transmit(tx, mem);
        }
        if index == TX || index == RX {
            used |= self.flush_rx(rx, mem);
        }
        used
    }

    fn host_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn process_host_event(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestRam) -> bool {
        self.host_events();
        match queues.get_mut(RX) {
            Some(rx) if rx.ready() => self.flush_rx(rx, mem),
            _ => false,
        }
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    // The guest's connections had their host ends in the process that saved the snapshot:
    // tell it they are gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), so it closes them and
    // re-reads its CID, which a clone may have changed. Its listeners stay open.
    fn restored(&mut self, queues: &mut [Queue], mem: &GuestRam) -> bool {
        let Some(events) = queues.get_mut(EVENT_QUEUE).filter(|q| q.ready()) else { return false };
        let mut chains = available_chains(events, mem, &self.counters, "vsock");
        chains.truncate(1);
        if chains.is_empty() {
            eprintln!(
                "[stratus] vsock: no event buffer to announce the restore: guest connections stay half-open"
            );
        }
        complete_chains(events, mem, chains, |chain| {
            let mut writer = match virtio_queue::Writer::new(mem, chain) {
                Ok(w) => w,
                Err(_) => return 0,
            };
            match writer.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => 4,
                Err(_) => 0,
            }
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Driver, DATA, QUEUE_SIZE};
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    const RX_BUF: u64 = DATA + 0x8000;
    const RX_BUF_LEN: u32 = (HEADER_LEN + MAX_PAYLOAD) as u32;

    struct Guest {
        d: Driver,
        path: PathBuf,
        rx_seen: u16,
    }

    impl Guest {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("stratus-vsock-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let mut d = Driver::new(Box::new(Vsock::new(GUEST_CID, &path).unwrap()));
            d.init_queues(3);
            // Receive buffers in every receive descriptor.
            d.select(RX);
            for i in 0..QUEUE_SIZE {
                d.set_desc(
                    i,
                    RX_BUF + u64::from(i) * u64::from(RX_BUF_LEN),
                    RX_BUF_LEN,
                    crate::testing::F_WRITE,
                    0,
                );
                d.make_available(i);
            }
            d.transport.process_queue(RX);
            Self { d, path, rx_seen: 0 }
        }

        fn host_path(&self, port: u32) -> PathBuf {
            PathBuf::from(format!("{}_{port}", self.path.display()))
        }

        /// The guest transmits one packet.
        fn send(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
            let h = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                kind: TYPE_STREAM,
                op,
                buf_alloc: 64 << 10,
                ..Default::default()
            };
            let mut bytes = h.to_bytes().to_vec();
            bytes.extend_from_slice(payload);
            self.d.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
            self.d.select(TX);
            self.d.submit(&[(DATA, bytes.len() as u32, false)]);
        }

        /// Lets the host side run, then takes every packet the device put in receive buffers
        /// (re-posting each buffer).
        fn receive(&mut self) -> Vec<(Header, Vec<u8>)> {
            for _ in 0..3 {
                self.d.transport.process_host_event(0);
            }
            self.d.select(RX);
            let mut out = Vec::new();
            while self.rx_seen != self.d.used_idx() {
                let (id, len) = self.d.used_elem(self.rx_seen);
                self.rx_seen = self.rx_seen.wrapping_add(1);
                let addr = RX_BUF + u64::from(id) * u64::from(RX_BUF_LEN);
                let mut buf = vec![0u8; len as usize];
                self.d.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                let h = Header::from_bytes(buf[..HEADER_LEN].try_into().unwrap());
                out.push((h, buf[HEADER_LEN..].to_vec()));
                self.d.make_available(id as u16);
            }
            self.d.transport.process_queue(RX);
            out
        }
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn host_connects_into_the_guest_and_bytes_flow_both_ways() {
        let mut g = Guest::new("h2g");
        let mut host = UnixStream::connect(&g.path).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        let pkts = g.receive();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let (req, _) = pkts[0];
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port),
            (op::REQUEST, HOST_CID, GUEST_CID, 1234)
        );
        let host_port = req.src_port;
        g.send(op::RESPONSE, 1234, host_port, &[]);
        assert_eq!(read_line(&mut host), format!("OK {host_port}"));

        host.write_all(b"hello guest").unwrap();
        let pkts = g.receive();
        assert_eq!(pkts.iter().map(|(h, _)| h.op).collect::<Vec<_>>(), vec![op::RW]);
        assert_eq!(pkts[0].1, b"hello guest");

        g.send(op::RW, 1234, host_port, b"hello host");
        let mut got = [0u8; 10];
        host.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello host");

        drop(host);
        let pkts = g.receive();
        assert_eq!(pkts.iter().map(|(h, _)| (h.op, h.flags)).collect::<Vec<_>>(), vec![(op::SHUTDOWN, 3)]);
        g.send(op::RST, 1234, host_port, &[]);
        assert!(g.receive().is_empty());
    }

    #[test]
    fn guest_connects_out_to_a_host_listener() {
        let mut g = Guest::new("g2h");
        let listener = UnixListener::bind(g.host_path(5000)).unwrap();
        g.send(op::REQUEST, 40_000, 5000, &[]);
        let pkts = g.receive();
        assert_eq!(
            pkts.iter().map(|(h, _)| (h.op, h.dst_port, h.src_port)).collect::<Vec<_>>(),
            vec![(op::RESPONSE, 40_000, 5000)]
        );
        let (mut accepted, _) = listener.accept().unwrap();
        g.send(op::RW, 40_000, 5000, b"ping");
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        accepted.write_all(b"pong").unwrap();
        let pkts = g.receive();
        assert_eq!(pkts[0].1, b"pong");
        let _ = std::fs::remove_file(g.host_path(5000));

        // Nobody listening: refused.
        g.send(op::REQUEST, 40_001, 5001, &[]);
        let pkts = g.receive();
        assert_eq!(pkts.iter().map(|(h, _)| h.op).collect::<Vec<_>>(), vec![op::RST]);
    }

    #[test]
    fn bad_handshakes_and_packets_are_refused() {
        let mut g = Guest::new("bad");
        let mut host = UnixStream::connect(&g.path).unwrap();
        host.write_all(b"HELLO\n").unwrap();
        g.receive();
        assert_eq!(read_line(&mut host), "ERR expected CONNECT <port>");

        // Data for a connection that does not exist is answered by RST.
        g.send(op::RW, 1, 2, b"stray");
        assert_eq!(g.receive().iter().map(|(h, _)| h.op).collect::<Vec<_>>(), vec![op::RST]);
        // A spoofed source address is dropped and counted.
        let before = g.d.transport.device().counters().rejected.load(Ordering::Relaxed);
        let h = Header {
            src_cid: 9,
            dst_cid: HOST_CID,
            kind: TYPE_STREAM,
            op: op::REQUEST,
            ..Default::default()
        };
        g.d.mem.write_slice(&h.to_bytes(), GuestAddress(DATA)).unwrap();
        g.d.select(TX);
        g.d.submit(&[(DATA, HEADER_LEN as u32, false)]);
        assert!(g.receive().is_empty());
        assert_eq!(g.d.transport.device().counters().rejected.load(Ordering::Relaxed), before + 1);
    }

    #[test]
    fn setup_errors_are_clear() {
        let path = std::env::temp_dir().join(format!("stratus-vsock-{}-err", std::process::id()));
        assert!(matches!(Vsock::new(2, &path), Err(VsockError::BadCid(2))));
        let first = Vsock::new(3, &path).unwrap();
        let err = Vsock::new(4, &path).err().unwrap();
        assert!(err.to_string().contains("already in use"), "{err}");
        drop(first);
        assert!(!path.exists(), "the socket file is removed with the device");

        // A socket file left by a VMM that died is taken over; any other file is not.
        std::os::unix::net::UnixListener::bind(&path).unwrap();
        let second = Vsock::new(3, &path).expect("stale socket reused");
        drop(second);
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(Vsock::new(3, &path).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fuzz_random_descriptor_tables() {
        let mut g = Guest::new("fuzz");
        let mut state = 0x0bad_cafe_dead_beefu64;
        let rounds = 20_000;
        for _ in 0..rounds {
            assert!(g.d.fuzz_round_on(&mut state, TX) <= 4);
        }
        println!("virtio-vsock: {rounds} random descriptor tables processed without a fault");
    }
}
