//! The host side: [`Client`] talks to an agent through the VMM's vsock socket (or directly).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::frame::{self, Frame, FrameError, Kind, MAX_PAYLOAD};
use crate::message::{ExecRequest, ExitStatus, GuestInfo, Identity, Request, Response};
use crate::PORT;

/// Longest line the VMM answers `CONNECT` with (`OK <port>\n` or `ERR ...\n`).
const MAX_HANDSHAKE_LINE: usize = 128;
/// Pause between two readiness probes in [`Client::wait_ready`].
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes of stdin sent per frame.
const STDIN_CHUNK: usize = 64 << 10;

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be connected, or the VMM did not open a stream to the agent's
    /// port (VM not running, guest still booting, agent not started).
    #[error("guest agent unreachable: {0}")]
    Unreachable(String),
    /// The agent (or something pretending to be it) broke the protocol.
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    /// The agent refused or failed the request: its error response.
    #[error("guest agent: {0}")]
    Guest(String),
    /// Reading or writing failed: the connection, or the caller's stdout/stderr writers.
    #[error("guest agent i/o: {0}")]
    Io(#[from] io::Error),
    /// The agent did not answer within the client's timeout.
    #[error("guest agent did not answer in time")]
    Timeout,
}

/// A client for one guest's agent. It holds only a path and a timeout: every call opens its own
/// connection, so a `Client` is cheap to clone and to share between threads.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    /// Whether to say `CONNECT <port>` to the VMM first (false: a plain Unix socket).
    handshake: bool,
    timeout: Duration,
}

impl Client {
    /// A client reaching the agent through `vsock_socket`, the VMM's vsock Unix socket.
    ///
    /// `timeout` bounds connecting, the VMM handshake and the wait for each response. It does
    /// not bound how long an `exec`'d program runs: once the program has started, the client
    /// waits for its output and exit status as long as the connection stays open (a VM that
    /// stops closes it). Connect and handshake failures are [`AgentError::Unreachable`].
    pub fn new(vsock_socket: impl Into<PathBuf>, timeout: Duration) -> Client {
        Client { socket: vsock_socket.into(), handshake: true, timeout }
    }

    /// For tests: a client for an agent listening on a plain Unix socket (`--listen unix:PATH`),
    /// without the `CONNECT` handshake. Timeouts as for [`Client::new`].
    pub fn direct(unix_socket: impl Into<PathBuf>, timeout: Duration) -> Client {
        Client { socket: unix_socket.into(), handshake: false, timeout }
    }

    /// Describes the guest.
    pub fn info(&self) -> Result<GuestInfo, AgentError> {
        self.info_within(self.timeout)
    }

    /// Gives the guest a new identity (after a clone from a snapshot). Every `ip` command the
    /// agent runs is a process, which costs about a second on slow (emulated) hosts: allow a
    /// timeout of several seconds.
    pub fn configure(&self, identity: &Identity) -> Result<(), AgentError> {
        let (_, value) = self.call(&Request::Configure(identity.clone()), self.timeout)?;
        expect_null(value)
    }

    /// Runs argv in the guest, copying `stdin` to it (on its own thread) and its output to the
    /// writers; returns the exit code (128 + N if signal N killed it).
    ///
    /// The end of `stdin` (or a read error) closes the program's stdin. The stdin thread is not
    /// waited for: if the program exits before `stdin` ends, the thread stops at its next
    /// write, which may be never if reading `stdin` blocks forever. A program that does not
    /// start (no such file, bad cwd) is [`AgentError::Guest`] naming the cause.
    pub fn exec(
        &self,
        request: &ExecRequest,
        stdin: Box<dyn Read + Send>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<i32, AgentError> {
        let (stream, value) = self.call(&Request::Exec(request.clone()), self.timeout)?;
        // Ends the connection however we leave, which also stops the stdin thread.
        let stream = ShutdownOnDrop(stream);
        expect_null(value)?;
        // From here on the program runs: no idle timeout (it may be silent for hours) unless
        // it has a time limit, which the agent enforces; the margin covers an agent that
        // failed to. Stdin writes may wait for as long as the program does not read.
        let margin = Duration::from_secs(60);
        stream.0.set_read_timeout(request.timeout_ms.map(|ms| Duration::from_millis(ms) + margin))?;
        stream.0.set_write_timeout(None)?;
        let writer = stream.0.try_clone()?;
        std::thread::Builder::new()
            .name("agent-exec-stdin".into())
            .spawn(move || copy_stdin(stdin, writer))?;
        let mut reader = &stream.0;
        loop {
            let frame = frame::read_frame(&mut reader).map_err(|e| match e {
                FrameError::Closed | FrameError::Truncated => {
                    AgentError::Protocol("the connection closed before the program's exit status".into())
                }
                e => frame_error(e),
            })?;
            match frame.kind {
                Kind::Stdout => {
                    stdout.write_all(&frame.payload)?;
                    stdout.flush()?;
                }
                Kind::Stderr => {
                    stderr.write_all(&frame.payload)?;
                    stderr.flush()?;
                }
                Kind::Exit => {
                    let status: ExitStatus = serde_json::from_slice(&frame.payload)
                        .map_err(|e| AgentError::Protocol(format!("bad exit status: {e}")))?;
                    return Ok(status.code);
                }
                kind => return Err(AgentError::Protocol(format!("unexpected {kind:?} frame during exec"))),
            }
        }
    }

    /// Polls `info` until it answers or `deadline` passes (at least one attempt is made).
    ///
    /// Unreachable, timed-out and I/O failures are retried; after the deadline the last
    /// attempt's error is returned. Protocol and guest errors are returned at once.
    pub fn wait_ready(&self, deadline: Instant) -> Result<GuestInfo, AgentError> {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = self.info_within(self.timeout.min(remaining));
            match attempt {
                Ok(info) => return Ok(info),
                Err(AgentError::Unreachable(_) | AgentError::Timeout | AgentError::Io(_))
                    if Instant::now() + PROBE_INTERVAL < deadline =>
                {
                    std::thread::sleep(PROBE_INTERVAL)
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn info_within(&self, timeout: Duration) -> Result<GuestInfo, AgentError> {
        let (_, value) = self.call(&Request::Info, timeout)?;
        serde_json::from_value(value).map_err(|e| AgentError::Protocol(format!("bad info: {e}")))
    }

    /// Connects, sends `request` and reads the response; returns the stream for what follows.
    fn call(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<(UnixStream, serde_json::Value), AgentError> {
        let mut stream = self.connect(timeout)?;
        let json = serde_json::to_vec(request).expect("requests serialize");
        if json.len() > MAX_PAYLOAD {
            return Err(AgentError::Protocol(format!(
                "request of {} bytes is over the frame limit",
                json.len()
            )));
        }
        frame::write_frame(&mut stream, Kind::Request, &json).map_err(io_error)?;
        let frame = frame::read_frame(&mut stream).map_err(|e| match e {
            FrameError::Closed | FrameError::Truncated => {
                AgentError::Protocol("the agent closed the connection without answering".into())
            }
            e => frame_error(e),
        })?;
        let Frame { kind: Kind::Response, payload } = frame else {
            return Err(AgentError::Protocol(format!("expected a response frame, got {:?}", frame.kind)));
        };
        match serde_json::from_slice(&payload) {
            Ok(Response::Ok(value)) => Ok((stream, value)),
            Ok(Response::Error(message)) => Err(AgentError::Guest(message)),
            Err(e) => Err(AgentError::Protocol(format!("bad response: {e}"))),
        }
    }

    /// Opens a stream to the agent, through the VMM's handshake unless direct.
    fn connect(&self, timeout: Duration) -> Result<UnixStream, AgentError> {
        // A zero timeout means "none" to the socket API.
        let timeout = timeout.max(Duration::from_millis(1));
        let path = self.socket.display();
        let stream = stratus_unix::connect(&self.socket)
            .map_err(|e| AgentError::Unreachable(format!("connecting to {path}: {e}")))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        if !self.handshake {
            return Ok(stream);
        }
        let unreachable =
            |what: String| AgentError::Unreachable(format!("vsock handshake on {path}: {what}"));
        (&stream)
            .write_all(format!("CONNECT {PORT}\n").as_bytes())
            .map_err(|e| unreachable(e.to_string()))?;
        // Byte by byte: nothing after the newline belongs to the handshake.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match (&stream).read(&mut byte) {
                Ok(0) => {
                    return Err(unreachable(format!(
                        "the VMM closed the connection (nothing listening on guest port {PORT} yet?)"
                    )))
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() < MAX_HANDSHAKE_LINE => line.push(byte[0]),
                Ok(_) => return Err(unreachable("answer line too long".into())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(unreachable(format!("no answer within {timeout:?}"))),
                Err(e) => return Err(unreachable(e.to_string())),
            }
        }
        let line = String::from_utf8_lossy(&line);
        if !line.starts_with("OK ") {
            return Err(unreachable(format!("the VMM answered '{}'", line.trim())));
        }
        Ok(stream)
    }
}

/// Shuts the connection down when dropped, even while the stdin thread holds a clone.
struct ShutdownOnDrop(UnixStream);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// The stdin thread: `stdin` as stdin frames, then the EOF frame. Stops at the first write
/// error (the exec is over or the connection broke: the main thread reports that).
fn copy_stdin(mut stdin: Box<dyn Read + Send>, mut writer: UnixStream) {
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frame::write_frame(&mut writer, Kind::Stdin, &buf[..n]).is_err() {
            return;
        }
    }
    let _ = frame::write_frame(&mut writer, Kind::StdinEof, &[]);
}

fn expect_null(value: serde_json::Value) -> Result<(), AgentError> {
    match value {
        serde_json::Value::Null => Ok(()),
        other => Err(AgentError::Protocol(format!("expected null, got {other}"))),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn io_error(e: io::Error) -> AgentError {
    if is_timeout(&e) {
        AgentError::Timeout
    } else {
        AgentError::Io(e)
    }
}

fn frame_error(e: FrameError) -> AgentError {
    match e {
        FrameError::Io(e) => io_error(e),
        e => AgentError::Protocol(e.to_string()),
    }
}
