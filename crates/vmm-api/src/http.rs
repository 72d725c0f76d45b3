//! Just enough HTTP/1.1 for a control API on a Unix socket: one request per connection
//! (`Connection: close`), bodies by `Content-Length` only, and hard limits on what a client
//! may send. A malformed request gets a 4xx answer, never a panic.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The longest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 << 10;
/// The largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body (empty when none).
    pub body: Vec<u8>,
}

/// A response: a status and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON text (may be empty for 204).
    pub body: String,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Self { status, body: serde_json::to_string(value).unwrap_or_else(|_| "{}".into()) }
    }

    /// An error with its message in `{"error": ...}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    /// 204: done, nothing to say.
    pub fn no_content() -> Self {
        Self { status: 204, body: String::new() }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

/// Reads one request from `stream`; an `Err` is the response to send instead.
pub fn read_request(stream: &UnixStream) -> Result<Request, Response> {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let mut reader = BufReader::new(stream);
    let mut head = Vec::new();
    // Read header lines until the empty line, within MAX_HEAD.
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take((MAX_HEAD + 1 - head.len().min(MAX_HEAD)) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| Response::error(400, format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(Response::error(400, "the request ended before its headers did"));
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(Response::error(431, format!("request headers longer than {MAX_HEAD} bytes")));
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let head =
        std::str::from_utf8(&head).map_err(|_| Response::error(400, "request headers are not UTF-8"))?;
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Response::error(400, format!("malformed request line '{request_line}'")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Response::error(400, format!("unsupported protocol '{version}'")));
    }
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| Response::error(400, "bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(501, "chunked bodies are not supported: send Content-Length"));
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Err(Response::error(413, format!("request body larger than {MAX_BODY} bytes")));
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| Response::error(400, format!("reading the request body: {e}")))?;
    let path = target.split('?').next().unwrap_or(target).to_owned();
    Ok(Request { method: method.to_owned(), path, body })
}

/// Writes `response` and closes the exchange.
pub fn write_response(mut stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(response.body.as_bytes())?;
    stream.flush()
}

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No VMM listens on the socket.
    #[error("cannot reach the VMM at {path}: {cause}")]
    Connect {
        /// The API socket.
        path: std::path::PathBuf,
        /// The cause (kept out of the error chain: the message carries it).
        cause: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("talking to the VMM: {0}")]
    Io(#[from] std::io::Error),
    /// The answer was not HTTP.
    #[error("the VMM sent a malformed response")]
    Malformed,
}

/// Sends one request to the API socket at `path` and returns the response.
pub fn call(path: &Path, method: &str, target: &str, body: Option<&str>) -> Result<Response, ClientError> {
    exchange(path, method, target, body, None)
}

/// Largest response `call_within` reads: a VMM's answers are small JSON documents.
const MAX_RESPONSE: u64 = 16 << 20;

/// `call` for a caller that must not hang on a VMM that stopped answering: each read and
/// write may take at most `timeout`, and the response at most 16 MiB.
pub fn call_within(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
    timeout: std::time::Duration,
) -> Result<Response, ClientError> {
    exchange(path, method, target, body, Some(timeout))
}

fn exchange(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
    timeout: Option<std::time::Duration>,
) -> Result<Response, ClientError> {
    let mut stream =
        stratus_unix::connect(path).map_err(|cause| ClientError::Connect { path: path.to_owned(), cause })?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let limit = if timeout.is_some() { MAX_RESPONSE } else { u64::MAX };
    (&mut stream).take(limit).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(ClientError::Malformed)?;
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).ok_or(ClientError::Malformed)?;
    Ok(Response { status, body: body.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(raw: &[u8]) -> Result<Request, Response> {
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(raw).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        read_request(&server)
    }

    #[test]
    fn parses_a_request_with_a_body() {
        let req = exchange(b"PUT /vm/machine?x=1 HTTP/1.1\r\nContent-Length: 4\r\n\r\n{\"a\"").unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.body.as_slice()),
            ("PUT", "/vm/machine", &b"{\"a\""[..])
        );
    }

    #[test]
    fn refuses_what_it_does_not_take() {
        let status = |raw: &[u8]| exchange(raw).unwrap_err().status;
        assert_eq!(status(b"garbage\r\n\r\n"), 400);
        assert_eq!(status(b"GET / SPDY/3\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: lots\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"), 413);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 501);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\n"), 400);
        let mut long = b"GET / HTTP/1.1\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_HEAD + 10));
        assert_eq!(status(&long), 431);
        assert_eq!(status(&[0xff, 0xfe, b'\r', b'\n', b'\r', b'\n']), 400);
    }
}
