//! The REST API's client, as the CLI uses it. It finds the server's address and token in
//! `~/.config/stratus/config.toml` (written by `stratus serve` on first start; the file itself
//! can be moved with `STRATUS_CONFIG`), overridden by `STRATUS_URL` / `STRATUS_TOKEN` and by
//! explicit values.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Errors of API calls, each one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No address or token configured.
    #[error("{0}")]
    Config(String),
    /// The server did not answer.
    #[error("cannot reach the Stratus API at {url}: {cause} (is `stratus serve` running?)")]
    Unreachable {
        /// The server's address.
        url: String,
        /// The cause.
        cause: String,
    },
    /// The server refused the request.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's error message.
        message: String,
    },
    /// The answer did not decode.
    #[error("unexpected answer from the API: {0}")]
    Decode(String),
}

/// Where the CLI's configuration lives.
pub fn config_path() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATUS_CONFIG") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".config/stratus/config.toml")
}

/// A client of one server.
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// A client for `url` with `token` when given, else from the environment and the
    /// configuration file.
    pub fn configured(url: Option<String>, token: Option<String>) -> Result<Self, ClientError> {
        let file: toml::Table =
            std::fs::read_to_string(config_path()).ok().and_then(|t| t.parse().ok()).unwrap_or_default();
        let from_file = |key: &str| file.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let url = url
            .or_else(|| std::env::var("STRATUS_URL").ok())
            .or_else(|| from_file("url"))
            .unwrap_or_else(|| "http://127.0.0.1:7440".into());
        let token = token
            .or_else(|| std::env::var("STRATUS_TOKEN").ok())
            .or_else(|| from_file("token"))
            .ok_or_else(|| {
                ClientError::Config(format!(
                    "no API token: run `stratus serve` once (it writes {}), or set STRATUS_TOKEN or --token",
                    config_path().display()
                ))
            })?;
        Ok(Self::new(&url, &token))
    }

    /// A client for `url` with `token`.
    pub fn new(url: &str, token: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(330))
            .build();
        ApiClient { base: url.trim_end_matches('/').to_owned(), token: token.to_owned(), agent }
    }

    /// The server's address.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The token.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Option<Value>, ClientError> {
        self.send_within(method, path, body, None)
    }

    fn send_within(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        limit: Option<Duration>,
    ) -> Result<Option<Value>, ClientError> {
        let mut request = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        if let Some(limit) = limit {
            request = request.timeout(limit);
        }
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(e) => return Err(self.failure(e)),
        };
        if response.status() == 204 {
            return Ok(None);
        }
        let text = response.into_string().map_err(|e| ClientError::Decode(e.to_string()))?;
        serde_json::from_str(&text).map(Some).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A failed request as one clear error: the API's own message, or why it was unreachable.
    fn failure(&self, error: ureq::Error) -> ClientError {
        match error {
            ureq::Error::Status(status, response) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| format!("the API answered {status}: {}", text.trim()));
                ClientError::Api { status, message }
            }
            ureq::Error::Transport(t) => {
                ClientError::Unreachable { url: self.base.clone(), cause: t.to_string() }
            }
        }
    }

    fn decode<T: DeserializeOwned>(value: Option<Value>) -> Result<T, ClientError> {
        serde_json::from_value(value.unwrap_or(Value::Null)).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::decode(self.send("GET", path, None)?)
    }

    /// `POST path` with a JSON body.
    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, ClientError> {
        Self::decode(self.send("POST", path, Some(body))?)
    }

    /// `PATCH path` with a JSON body.
    pub fn patch<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, ClientError> {
        Self::decode(self.send("PATCH", path, Some(body))?)
    }

    /// `POST path` with a JSON body, waiting up to `limit` for the whole answer (instead of
    /// the usual 330 s between reads).
    pub fn post_within<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
        limit: Duration,
    ) -> Result<T, ClientError> {
        Self::decode(self.send_within("POST", path, Some(body), Some(limit))?)
    }

    /// `PUT /v1/uploads/{name}` with `size` bytes read from `file`.
    pub fn upload(&self, name: &str, file: std::fs::File, size: u64) -> Result<(), ClientError> {
        let response = self
            .agent
            .put(&format!("{}/v1/uploads/{name}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &size.to_string())
            .send(file);
        match response {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failure(e)),
        }
    }

    /// `DELETE path`; the answer, if any.
    pub fn delete(&self, path: &str) -> Result<Option<Value>, ClientError> {
        self.send("DELETE", path, None)
    }

    /// Opens the WebSocket of an instance's console.
    pub fn console(&self, name: &str) -> Result<tungstenite::WebSocket<std::net::TcpStream>, ClientError> {
        let address = self.base.strip_prefix("http://").ok_or_else(|| {
            ClientError::Config(format!("the console needs an http:// API address, not {}", self.base))
        })?;
        let unreachable = |cause: String| ClientError::Unreachable { url: self.base.clone(), cause };
        let stream = std::net::TcpStream::connect(address).map_err(|e| unreachable(e.to_string()))?;
        let request = tungstenite::handshake::client::Request::builder()
            .uri(format!("ws://{address}/v1/instances/{name}/console"))
            .header("Host", address)
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", tungstenite::handshake::client::generate_key())
            .body(())
            .map_err(|e| ClientError::Config(e.to_string()))?;
        match tungstenite::client(request, stream) {
            Ok((socket, _)) => Ok(socket),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                let message = response
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| format!("the console was refused ({status})"));
                Err(ClientError::Api { status, message })
            }
            Err(e) => Err(unreachable(e.to_string())),
        }
    }
}
