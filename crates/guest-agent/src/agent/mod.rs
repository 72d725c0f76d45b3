//! The agent itself: accepts connections and serves one request on each, one thread per
//! connection. Nothing a client sends can stop it: bad input gets an error response, a client
//! that goes away mid-exec leaves the program to finish with its output discarded.

mod configure;
mod exec;
mod info;
pub mod listen;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use listen::{Address, Listener, Stream};

use crate::frame::{self, Frame, FrameError, Kind, MAX_PAYLOAD};
use crate::message::{Request, Response};

/// How long a client may pause while sending its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one write to a client may stall before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// After its last frame the agent waits up to this long for the client to close first (see
/// [`linger`]).
const LINGER: Duration = Duration::from_secs(10);
/// Connections served at once; more get a "busy" error.
const MAX_CONNECTIONS: usize = 32;
/// Connection threads need little: their buffers live on the heap.
const THREAD_STACK: usize = 512 << 10;

/// The agent's settings (none yet: a place for them that every handler already receives).
#[derive(Clone, Debug, Default)]
pub struct Config {}

/// Writes one line to the agent's log (stderr). Never fails: a full disk must not stop the agent.
pub fn log(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "stratus-guest-agent: {args}");
}

/// Serves connections on `listener` forever.
pub fn serve(listener: Listener, config: Config) -> ! {
    let config = Arc::new(config);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or memory: wait for connections to finish rather than spin.
                log(format_args!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            refuse(stream, "busy: too many connections");
            continue;
        }
        let slot = Slot(active.clone());
        let config = config.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-connection".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let _slot = slot;
                serve_connection(stream, &config);
            });
        if let Err(e) = spawned {
            // The closure (stream and slot) was dropped: the client sees the connection close.
            log(format_args!("cannot start a connection thread: {e}"));
        }
    }
}

/// One connection counted in `active`, released when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn refuse(mut stream: Stream, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    respond(&mut stream, Response::Error(why.into()));
    stream.shutdown();
}

/// Reads the request and answers it.
fn serve_connection(mut stream: Stream, config: &Config) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let request = match frame::read_frame(&mut stream) {
        Ok(Frame { kind: Kind::Request, payload }) => {
            serde_json::from_slice::<Request>(&payload).map_err(|e| format!("bad request: {e}"))
        }
        Ok(frame) => Err(format!("expected a request frame, got {:?}", frame.kind)),
        // Connected and left: a liveness check, not an error.
        Err(FrameError::Closed) => return,
        Err(FrameError::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(format!("no request within {}s", REQUEST_TIMEOUT.as_secs()))
        }
        Err(e) => Err(format!("bad request frame: {e}")),
    };
    let response = match request {
        Err(message) => {
            log(format_args!("{message}"));
            Response::Error(message)
        }
        Ok(Request::Info) => match info::gather() {
            Ok(info) => Response::Ok(serde_json::to_value(info).unwrap_or_default()),
            Err(message) => Response::Error(message),
        },
        Ok(Request::Configure(identity)) => match configure::apply(&identity, config) {
            Ok(()) => {
                log(format_args!("configured {identity:?}"));
                Response::Ok(serde_json::Value::Null)
            }
            Err(message) => {
                log(format_args!("configure {identity:?}: {message}"));
                Response::Error(message)
            }
        },
        Ok(Request::Exec(request)) => {
            // Exec answers, streams and lingers by itself.
            exec::run(stream, &request);
            return;
        }
    };
    if respond(&mut stream, response) {
        linger(&mut stream, Instant::now() + LINGER);
    }
}

/// Sends a response frame; false if the client is gone.
fn respond(stream: &mut Stream, response: Response) -> bool {
    let mut json = serde_json::to_vec(&response).unwrap_or_default();
    if json.len() > MAX_PAYLOAD {
        json = serde_json::to_vec(&Response::Error("response too large".into())).unwrap_or_default();
    }
    frame::write_frame(stream, Kind::Response, &json).is_ok()
}

/// Waits (discarding input) for the client to close its end, or until `deadline`.
///
/// Closing first would lose data: the VMM drops what it has not yet passed to the host program
/// when the guest ends a vsock connection, and a busy host may be behind. The client closes as
/// soon as it has read the last frame, so this normally returns at once.
fn linger(stream: &mut Stream, deadline: Instant) {
    let mut scratch = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Formats an I/O error without std's " (os error N)" suffix, as programs print it.
fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_owned(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_like_strerror() {
        assert_eq!(describe(&io::Error::from_raw_os_error(libc::ENOENT)), "No such file or directory");
        assert_eq!(describe(&io::Error::other("plain")), "plain");
    }
}
