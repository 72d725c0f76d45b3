//! An instance's serial console as a byte stream, wherever it is: the VMM's console socket on
//! this machine ([`UnixConsole`]), or another host's, through its agent's
//! `GET /v1/instances/{id}/console` WebSocket ([`WsConsole`]). [`bridge`] joins either to a
//! WebSocket a client holds: the control plane's console route and the agent's serve both
//! with it, so `stratus console` and the dashboard reach every host's instances alike.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};

/// A console's bytes, both ways.
pub trait ConsoleStream: Send {
    /// Waits up to `timeout` for the console's next bytes: empty when none came, an error
    /// once the console is gone.
    fn read(&mut self, timeout: Duration) -> std::io::Result<Vec<u8>>;
    /// Types `bytes` into the console.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

/// A VMM's console socket on this machine.
pub struct UnixConsole(UnixStream);

impl From<UnixStream> for UnixConsole {
    /// A console socket connected already (as `stratus_unix::connect` does for paths longer
    /// than a socket address holds).
    fn from(stream: UnixStream) -> UnixConsole {
        UnixConsole(stream)
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(ErrorKind::UnexpectedEof, "the console closed")
}

fn quiet(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted)
}

impl ConsoleStream for UnixConsole {
    fn read(&mut self, timeout: Duration) -> std::io::Result<Vec<u8>> {
        self.0.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buffer = vec![0; 16 << 10];
        match self.0.read(&mut buffer) {
            Ok(0) => Err(gone()),
            Ok(n) => {
                buffer.truncate(n);
                Ok(buffer)
            }
            Err(e) if quiet(&e) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes)
    }
}

/// Another host's console, through its agent.
pub struct WsConsole(tungstenite::WebSocket<TcpStream>);

impl WsConsole {
    /// Opens `url` (`ws://HOST:PORT/v1/instances/ID/console`) with `headers` (the caller's
    /// credential and protocol version); the agent's refusal as its text.
    pub fn connect(url: &str, headers: &[(&str, String)]) -> Result<WsConsole, String> {
        use tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().map_err(|e| format!("{url}: {e}"))?;
        for (name, value) in headers {
            let value = value.parse().map_err(|e| format!("{name}: {e}"))?;
            let name: tungstenite::http::HeaderName = name.parse().map_err(|e| format!("{name}: {e}"))?;
            request.headers_mut().insert(name, value);
        }
        let address = request.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        let stream = address.parse().map_err(|e| format!("{address}: {e}")).and_then(|a| {
            TcpStream::connect_timeout(&a, Duration::from_secs(2)).map_err(|e| format!("{address}: {e}"))
        })?;
        match tungstenite::client(request, stream) {
            Ok((socket, _)) => Ok(WsConsole(socket)),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                let body = response.body().as_deref().unwrap_or_default();
                let answer: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                Err(answer["error"]
                    .as_str()
                    .map_or_else(|| format!("answered {}", response.status()), str::to_owned))
            }
            Err(e) => Err(format!("{address}: {e}")),
        }
    }
}

impl ConsoleStream for WsConsole {
    fn read(&mut self, timeout: Duration) -> std::io::Result<Vec<u8>> {
        self.0.get_mut().set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match self.0.read() {
            Ok(tungstenite::Message::Binary(bytes)) => Ok(bytes.to_vec()),
            Ok(tungstenite::Message::Text(text)) => Ok(text.as_bytes().to_vec()),
            Ok(tungstenite::Message::Close(_)) => Err(gone()),
            Ok(_) => Ok(Vec::new()),
            Err(tungstenite::Error::Io(e)) if quiet(&e) => Ok(Vec::new()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.get_mut().set_read_timeout(None)?;
        self.0
            .send(tungstenite::Message::Binary(bytes.to_vec().into()))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// How long the pump waits for console output before looking for typed input.
const TURN: Duration = Duration::from_millis(20);

/// Carries `console`'s bytes to `socket` as binary messages and the messages `socket` sends
/// into `console`, until either side ends. The console is driven on a blocking thread.
pub async fn bridge(mut socket: WebSocket, console: Box<dyn ConsoleStream>) {
    let (to_client, mut output) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let (input, typed) = std::sync::mpsc::channel::<Vec<u8>>();
    let pump = tokio::task::spawn_blocking(move || {
        let mut console = console;
        loop {
            loop {
                match typed.try_recv() {
                    Ok(bytes) => {
                        if console.write(&bytes).is_err() {
                            return;
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            match console.read(TURN) {
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => {
                    if to_client.blocking_send(bytes).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    loop {
        tokio::select! {
            out = output.recv() => match out {
                Some(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(data))) => {
                    if input.send(data.to_vec()).is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if input.send(text.as_bytes().to_vec()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    drop(input);
    let _ = socket.send(Message::Close(None)).await;
    let _ = pump.await;
}
