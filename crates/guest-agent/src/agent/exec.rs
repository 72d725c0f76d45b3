//! `exec`: runs a program and relays its stdio as frames until it exits.
//!
//! One thread per exec drives everything with poll(2): the client socket (stdin frames in),
//! the program's stdin pipe (non-blocking, fed from a bounded buffer), its stdout and stderr
//! pipes, and a pidfd that becomes readable when it exits. Output is relayed as it comes; a
//! client that reads slowly slows the program down (its pipes fill) rather than the agent
//! buffering without bound.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use super::{describe, linger, log, respond, Stream, LINGER};
use crate::frame::{self, Decoder, Kind};
use crate::message::{ExecRequest, ExitStatus, Response};

/// Bytes of output read (and sent) at once.
const OUTPUT_CHUNK: usize = 64 << 10;
/// Stdin bytes held for a program that is not reading them; beyond this the client is not
/// read (its stdin writes then wait).
const STDIN_BUFFER: usize = 1 << 20;
/// Once the program has exited, its output pipes are closed after this long without output:
/// processes it left behind (`cmd &`) may hold them open forever. Such processes should
/// redirect their output (or they get EPIPE).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// How often to check for the exit when the kernel has no pidfd_open (before Linux 5.3).
const EXIT_POLL: Duration = Duration::from_millis(100);

/// Serves one exec on `stream`: the response, the relay, the exit frame.
pub(super) fn run(mut stream: Stream, request: &ExecRequest) {
    let name = request.argv.first().map_or("", String::as_str).to_owned();
    let started = Instant::now();
    let child = match spawn(request) {
        Ok(child) => child,
        Err(message) => {
            log(format_args!("exec: {message}"));
            if respond(&mut stream, Response::Error(message)) {
                linger(&mut stream, Instant::now() + LINGER);
            }
            return;
        }
    };
    let client_present = respond(&mut stream, Response::Ok(serde_json::Value::Null));
    let mut session = Session::new(stream, child);
    session.kill_at = request.timeout_ms.map(|ms| started + Duration::from_millis(ms));
    if !client_present {
        session.client_gone();
    }
    let code = session.relay();
    log(format_args!("exec {name}: exit {code} after {:.1}s", started.elapsed().as_secs_f64()));
}

/// Starts the program with piped stdio; the error is one line naming the cause.
fn spawn(request: &ExecRequest) -> Result<Child, String> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err("argv is empty".into());
    };
    if let Some((name, _)) =
        request.env.iter().find(|(name, _)| name.is_empty() || name.contains(['=', '\0']))
    {
        return Err(format!("bad environment variable name {name:?}"));
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills what it started too.
        .process_group(0);
    if let Some(cwd) = &request.cwd {
        // Checked here: spawn would report a bad cwd as the program not found.
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("cannot change to '{cwd}': Not a directory")),
            Err(e) => return Err(format!("cannot change to '{cwd}': {}", describe(&e))),
        }
        command.current_dir(cwd);
    }
    command.spawn().map_err(|e| format!("cannot run '{program}': {}", describe(&e)))
}

/// The state of one running exec.
struct Session {
    stream: Stream,
    decoder: Decoder,
    /// Whether frames from the client are still read (false after its end, an error or a
    /// protocol violation).
    reading: bool,
    /// Whether frames are still sent (false once a write failed).
    writing: bool,
    child: Child,
    pidfd: Option<OwnedFd>,
    stdin: Option<ChildStdin>,
    /// Stdin bytes received but not yet taken by the program.
    pending: Vec<u8>,
    /// The client sent the stdin EOF frame: close stdin once `pending` is written.
    stdin_eof: bool,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// The exit code, once reaped.
    exit: Option<i32>,
    /// When output last arrived, or the exit if later: the start of the [`OUTPUT_GRACE`].
    quiet_since: Instant,
    /// Once the exit frame is sent: until when to wait for the client to close.
    linger_until: Option<Instant>,
    /// When the program's time is up (see `ExecRequest::timeout_ms`).
    kill_at: Option<Instant>,
}

/// Slots in the poll set.
const SOCKET: usize = 0;
const STDIN: usize = 1;
const STDOUT: usize = 2;
const STDERR: usize = 3;
const PIDFD: usize = 4;

impl Session {
    fn new(stream: Stream, mut child: Child) -> Session {
        let stdin = child.stdin.take();
        if let Some(stdin) = &stdin {
            set_nonblocking(stdin.as_raw_fd());
        }
        Session {
            stream,
            decoder: Decoder::new(),
            reading: true,
            writing: true,
            pidfd: pidfd_open(child.id()),
            stdin,
            pending: Vec::new(),
            stdin_eof: false,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            exit: None,
            quiet_since: Instant::now(),
            linger_until: None,
            kill_at: None,
        }
    }

    /// Relays until the program has exited, its output is relayed and the client has closed
    /// (or lingering timed out). Returns the exit code.
    fn relay(&mut self) -> i32 {
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        loop {
            let now = Instant::now();
            if let Some(code) = self.exit {
                if now >= self.quiet_since + OUTPUT_GRACE {
                    self.stdout = None;
                    self.stderr = None;
                }
                if self.stdout.is_none() && self.stderr.is_none() && self.linger_until.is_none() {
                    let status = serde_json::to_vec(&ExitStatus { code }).unwrap_or_default();
                    self.send(Kind::Exit, &status);
                    self.linger_until = Some(now + LINGER);
                }
                if self.linger_until.is_some_and(|until| !self.reading || now >= until) {
                    return code;
                }
            }

            let mut fds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; 5];
            let want_input = self.linger_until.is_some() || self.pending.len() < STDIN_BUFFER;
            if self.reading && want_input {
                fds[SOCKET] = poll_for(self.stream.as_raw_fd(), libc::POLLIN);
            }
            if let (Some(stdin), false) = (&self.stdin, self.pending.is_empty()) {
                fds[STDIN] = poll_for(stdin.as_raw_fd(), libc::POLLOUT);
            }
            if let Some(stdout) = &self.stdout {
                fds[STDOUT] = poll_for(stdout.as_raw_fd(), libc::POLLIN);
            }
            if let Some(stderr) = &self.stderr {
                fds[STDERR] = poll_for(stderr.as_raw_fd(), libc::POLLIN);
            }
            if let (Some(pidfd), None) = (&self.pidfd, self.exit) {
                fds[PIDFD] = poll_for(pidfd.as_raw_fd(), libc::POLLIN);
            }
            let deadline = [
                (self.exit.is_some() && (self.stdout.is_some() || self.stderr.is_some()))
                    .then(|| self.quiet_since + OUTPUT_GRACE),
                self.linger_until,
                (self.exit.is_none() && self.pidfd.is_none()).then(|| now + EXIT_POLL),
                self.kill_at.filter(|_| self.exit.is_none()),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout_ms = deadline.map_or(-1, |d| {
                // Rounded up, so a sub-millisecond wait does not spin.
                d.saturating_duration_since(now).as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            });
            // SAFETY: `fds` is a live array of the length given; negative fds are ignored.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log(format_args!("exec: poll: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }

            if fds[SOCKET].revents != 0 {
                self.read_client(&mut buf);
            }
            if fds[STDIN].revents != 0 {
                self.feed_stdin();
            }
            if fds[STDOUT].revents != 0 {
                if let Some(mut out) = self.stdout.take() {
                    if self.forward(&mut out, Kind::Stdout, &mut buf) {
                        self.stdout = Some(out);
                    }
                }
            }
            if fds[STDERR].revents != 0 {
                if let Some(mut err) = self.stderr.take() {
                    if self.forward(&mut err, Kind::Stderr, &mut buf) {
                        self.stderr = Some(err);
                    }
                }
            }
            if self.exit.is_none() && self.kill_at.is_some_and(|at| Instant::now() >= at) {
                self.kill_at = None;
                self.time_up();
            }
            if self.exit.is_none() && (self.pidfd.is_none() || fds[PIDFD].revents != 0) {
                self.check_exit();
            }
            if self.stdin_eof && self.pending.is_empty() {
                self.stdin = None;
            }
        }
    }

    /// Reads what the client sent: stdin frames while the program runs, anything (ignored)
    /// while lingering.
    fn read_client(&mut self, buf: &mut [u8]) {
        let n = match self.stream.read(buf) {
            // The client ended its side: no more stdin can come.
            Ok(0) => return self.end_input(),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => return,
            Err(_) => return self.client_gone(),
        };
        if self.linger_until.is_some() {
            return;
        }
        self.decoder.push(&buf[..n]);
        loop {
            match self.decoder.next_frame() {
                Ok(None) => return,
                Ok(Some(frame)) if frame.kind == Kind::Stdin => {
                    // After the program exited or closed stdin, its input has nowhere to go.
                    if self.stdin.is_some() && !self.stdin_eof {
                        self.pending.extend_from_slice(&frame.payload);
                    }
                }
                Ok(Some(frame)) if frame.kind == Kind::StdinEof => self.stdin_eof = true,
                Ok(Some(frame)) => {
                    return self.protocol_violation(&format!("unexpected {:?} frame", frame.kind))
                }
                Err(e) => return self.protocol_violation(&e.to_string()),
            }
        }
    }

    /// Stops listening to a client that broke the protocol; the program keeps running and its
    /// output is still sent.
    fn protocol_violation(&mut self, what: &str) {
        log(format_args!("exec: client protocol error: {what}; ignoring its input"));
        self.end_input();
    }

    /// The client is unreachable: stop talking to it, let the program finish.
    fn client_gone(&mut self) {
        self.writing = false;
        self.stream.shutdown();
        self.end_input();
    }

    /// No more input from the client: the program gets what came before, then the end of stdin.
    fn end_input(&mut self) {
        self.reading = false;
        self.stdin_eof = true;
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
        self.pending = Vec::new();
    }

    /// Writes buffered stdin to the program as far as its pipe takes it.
    fn feed_stdin(&mut self) {
        let Some(stdin) = &mut self.stdin else { return };
        match stdin.write(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
            // Usually EPIPE: the program closed its stdin and wants no more.
            Err(_) => self.close_stdin(),
        }
    }

    /// Relays one read of a program output; false at its end.
    fn forward(&mut self, pipe: &mut impl Read, kind: Kind, buf: &mut [u8]) -> bool {
        match pipe.read(buf) {
            Ok(0) => false,
            Ok(n) => {
                self.send(kind, &buf[..n]);
                self.quiet_since = Instant::now();
                true
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }

    /// Sends a frame unless the client is gone; a failed write makes it gone (output is then
    /// discarded).
    fn send(&mut self, kind: Kind, payload: &[u8]) {
        if self.writing && frame::write_frame(&mut self.stream, kind, payload).is_err() {
            self.client_gone();
        }
    }

    /// Reaps the program if it has exited.
    /// The program ran out of time: it and its process group are killed (the exit follows).
    fn time_up(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        log(format_args!("exec: pid {pid} ran past its timeout: killed"));
        // SAFETY: signals the process group our child leads (`process_group(0)` at spawn);
        // the child is not reaped yet, so its pid (the group id) cannot have been reused.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }

    fn check_exit(&mut self) {
        let code = match self.child.try_wait() {
            Ok(None) => return,
            Ok(Some(status)) => status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            Err(e) => {
                // Cannot happen for our own unreaped child; report a failure rather than spin.
                log(format_args!("exec: waiting for pid {}: {e}", self.child.id()));
                -1
            }
        };
        self.exit = Some(code);
        self.quiet_since = Instant::now();
        self.pidfd = None;
        self.close_stdin();
    }
}

fn poll_for(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl flag calls on a pipe we own; a failure leaves it blocking, which only
    // means a slower relay if the program stops reading.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// A descriptor that polls readable when process `pid` exits; `None` on kernels without
/// pidfd_open (the relay then checks periodically).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor (close-on-exec)
    // or -1; the pid is our unreaped child, so it cannot name another process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor is new and owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
