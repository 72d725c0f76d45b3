//! The etcd backend, over etcd's v3 JSON gateway (`/v3/kv/...`, `/v3/watch`, `/v3/lease/...`).
//!
//! The gateway is plain HTTP/1.1 and JSON (64-bit numbers as strings, bytes as base64), so
//! the store stays synchronous and needs no gRPC code generation (tonic's `protoc` would be a
//! build-time package on every developer's machine). Every key lives under a namespace
//! (`/stratus/` by default), so several stores can share one cluster.
//!
//! Failover: requests go to the endpoint that last answered, and move on to the next one when
//! an endpoint refuses connections or has no leader; reads are retried on any failure until the
//! request timeout. A write that failed after it was sent may have been applied (etcd cannot
//! say), so it is reported as [`StoreError::Backend`] instead of being sent twice. No connection
//! is pooled: a request on a fresh connection to a dead member fails to connect, which proves it
//! was never applied.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::{
    ttl_seconds, validate_key, validate_prefix, Entry, Event, LeaseId, Listing, Op, Revision, Store,
    StoreError, Txn, Watch,
};

/// Where the cluster is and how long to wait for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members, `http://HOST:PORT`.
    pub endpoints: Vec<String>,
    /// Prepended to every key; ends with `/`.
    pub namespace: String,
    /// How long to try to connect to one member.
    pub connect_timeout: Duration,
    /// How long one request may take, failovers and leader elections included.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Parses `http://A:2379,http://B:2379` (the part after `etcd:` in `--store`).
    pub fn parse(endpoints: &str) -> Result<EtcdConfig, StoreError> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|endpoint| !endpoint.is_empty())
            .map(|endpoint| endpoint.trim_end_matches('/').to_string())
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoint given (etcd:http://HOST:2379,...)".into()));
        }
        for endpoint in &endpoints {
            let Some(address) = endpoint.strip_prefix("http://") else {
                return Err(StoreError::Invalid(format!(
                    "etcd endpoint {endpoint:?} must start with http:// (the JSON gateway without TLS)"
                )));
            };
            if address.is_empty() || address.contains('/') {
                return Err(StoreError::Invalid(format!(
                    "etcd endpoint {endpoint:?} must be http://HOST:PORT"
                )));
            }
        }
        Ok(EtcdConfig {
            endpoints,
            namespace: "/stratus/".to_string(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
        })
    }

    /// The same cluster with keys under `namespace` (a trailing `/` is added if missing).
    pub fn with_namespace(mut self, namespace: &str) -> EtcdConfig {
        self.namespace = namespace.to_string();
        if !self.namespace.ends_with('/') {
            self.namespace.push('/');
        }
        self
    }
}

/// A [`Store`] in an etcd cluster (3.4 or later).
pub struct EtcdStore {
    client: Arc<Client>,
}

struct Client {
    config: EtcdConfig,
    /// The endpoint that answered last: the next request starts there.
    preferred: AtomicUsize,
}

/// How a failed request may be retried.
enum Failure {
    /// It never reached etcd, or etcd refused it before applying anything: try again.
    Retry(String),
    /// It may have been applied, or etcd gave a definite answer: report it.
    Final(StoreError),
}

impl EtcdStore {
    /// Connects to the cluster (checking that one endpoint answers) and returns the store.
    pub fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        let store = EtcdStore { client: Arc::new(Client { config, preferred: AtomicUsize::new(0) }) };
        store.revision()?;
        Ok(store)
    }

    /// The key as stored in etcd, base64-encoded.
    fn key(&self, key: &str) -> String {
        BASE64.encode(format!("{}{key}", self.client.config.namespace))
    }

    /// The `[key, range_end)` pair covering every key under `prefix`, base64-encoded.
    fn prefix_range(&self, prefix: &str) -> (String, String) {
        let start = format!("{}{prefix}", self.client.config.namespace).into_bytes();
        let end = byte_successor(&start);
        (BASE64.encode(start), BASE64.encode(end))
    }

    /// Decodes an etcd key-value into an [`Entry`] with the namespace taken off.
    fn entry(&self, kv: &Value) -> Result<Entry, StoreError> {
        let key = bytes(&kv["key"])?;
        let key = String::from_utf8(key).map_err(|_| malformed("a key that is not UTF-8"))?;
        let key = key
            .strip_prefix(&self.client.config.namespace)
            .ok_or_else(|| malformed("a key outside the namespace"))?
            .to_string();
        Ok(Entry { key, value: bytes(&kv["value"])?, revision: number(&kv["mod_revision"]) })
    }
}

impl Client {
    /// Posts `body` to `path`, failing over between endpoints until the request timeout.
    /// `read_only` requests are retried on any transport failure.
    fn call(&self, path: &str, body: &Value, read_only: bool) -> Result<Value, StoreError> {
        let deadline = Instant::now() + self.config.request_timeout;
        let count = self.config.endpoints.len();
        let mut attempt = 0;
        loop {
            let index = (self.preferred.load(Ordering::Relaxed) + attempt) % count;
            let endpoint = &self.config.endpoints[index];
            let body = body.to_string();
            let failure = match Exchange::post(endpoint, path, &body, self.config.connect_timeout) {
                // Nothing reached etcd: any request may go to the next member.
                Err(PostError::Connect(error)) => Failure::Retry(format!("{endpoint}: {error}")),
                Err(PostError::Exchange(error)) if read_only => {
                    Failure::Retry(format!("{endpoint}: {error}"))
                }
                // Sent, then lost: etcd may have applied it. Never sent twice.
                Err(PostError::Exchange(error)) => Failure::Final(StoreError::Backend(format!(
                    "{endpoint}: {error} (the write may or may not have been applied)"
                ))),
                Ok(mut exchange) => match exchange.whole_body(deadline) {
                    Ok(text) => {
                        // The gateway may put its gRPC trailer after the JSON: take the first value.
                        let answer = serde_json::Deserializer::from_slice(&text).into_iter::<Value>().next();
                        match (exchange.status, answer) {
                            (200, Some(Ok(answer))) => {
                                self.preferred.store(index, Ordering::Relaxed);
                                return Ok(answer);
                            }
                            (_, Some(Ok(answer))) => classify(&answer, read_only),
                            (status, _) => Failure::Final(StoreError::Backend(format!(
                                "{endpoint} answered HTTP {status} with {:?}",
                                String::from_utf8_lossy(&text)
                            ))),
                        }
                    }
                    Err(error) if read_only => Failure::Retry(format!("{endpoint}: {error}")),
                    Err(error) => Failure::Final(StoreError::Backend(format!(
                        "{endpoint}: {error} (the write may or may not have been applied)"
                    ))),
                },
            };
            match failure {
                Failure::Final(error) => return Err(error),
                Failure::Retry(reason) => {
                    attempt += 1;
                    if Instant::now() >= deadline {
                        return Err(StoreError::Backend(format!(
                            "etcd did not answer within {:?}: {reason}",
                            self.config.request_timeout
                        )));
                    }
                    // Each round over all members waits a little: an election takes ~1 s.
                    if attempt % count == 0 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }
}

/// Maps an error answer of the gateway (`{"error": ..., "code": ...}`, gRPC codes). Reads are
/// retried on anything transient; writes only when etcd refused them before proposing.
fn classify(answer: &Value, read_only: bool) -> Failure {
    let message =
        answer["message"].as_str().or(answer["error"].as_str()).unwrap_or("no error message").to_string();
    let code = answer["code"].as_i64().unwrap_or(-1);
    if message.contains("requested lease not found") {
        // The lease id is filled in by the caller, which knows which lease it asked about.
        return Failure::Final(StoreError::LeaseExpired(0));
    }
    if message.contains("required revision has been compacted") {
        return Failure::Final(StoreError::Compacted { requested: 0, compacted: 0 });
    }
    // gRPC's Unavailable (14) and DeadlineExceeded (4): no leader, leader changed, timeouts.
    let transient = code == 14 || code == 4 || message.contains("leader changed");
    if message.contains("no leader") || (read_only && transient) {
        return Failure::Retry(message);
    }
    let maybe = if transient { " (the write may or may not have been applied)" } else { "" };
    Failure::Final(StoreError::Backend(format!("etcd: {message}{maybe}")))
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        validate_key(key)?;
        let answer = self.client.call("/v3/kv/range", &json!({ "key": self.key(key) }), true)?;
        answer["kvs"].as_array().and_then(|kvs| kvs.first()).map(|kv| self.entry(kv)).transpose()
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        validate_key(key)?;
        let answer = self.client.call("/v3/kv/deleterange", &json!({ "key": self.key(key) }), false)?;
        Ok(number(&answer["deleted"]) > 0)
    }

    fn txn(&self, txn: &Txn) -> Result<Revision, StoreError> {
        txn.validate()?;
        let compare: Vec<Value> = txn
            .compares
            .iter()
            .map(|(key, expected)| {
                json!({
                    "key": self.key(key), "target": "MOD", "result": "EQUAL",
                    "mod_revision": expected.unwrap_or(0).to_string(),
                })
            })
            .collect();
        let success: Vec<Value> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => json!({ "request_put": {
                    "key": self.key(key), "value": BASE64.encode(value),
                    "lease": lease.unwrap_or(0).to_string(),
                }}),
                Op::Delete { key } => json!({ "request_delete_range": { "key": self.key(key) } }),
            })
            .collect();
        // On failure, read the compared keys back to say which one moved and where to.
        let failure: Vec<Value> = txn
            .compares
            .iter()
            .map(|(key, _)| json!({ "request_range": { "key": self.key(key) } }))
            .collect();
        let body = json!({ "compare": compare, "success": success, "failure": failure });
        let answer = self.client.call("/v3/kv/txn", &body, false).map_err(|error| match error {
            StoreError::LeaseExpired(_) => StoreError::LeaseExpired(
                txn.ops
                    .iter()
                    .find_map(|op| match op {
                        Op::Put { lease: Some(lease), .. } => Some(*lease),
                        _ => None,
                    })
                    .unwrap_or(0),
            ),
            other => other,
        })?;
        if answer["succeeded"].as_bool().unwrap_or(false) {
            return Ok(number(&answer["header"]["revision"]));
        }
        let responses = answer["responses"].as_array().cloned().unwrap_or_default();
        for ((key, expected), response) in txn.compares.iter().zip(&responses) {
            let actual = response["response_range"]["kvs"]
                .as_array()
                .and_then(|kvs| kvs.first())
                .map(|kv| number(&kv["mod_revision"]));
            if actual != *expected {
                return Err(StoreError::Conflict { key: key.clone(), expected: *expected, actual });
            }
        }
        // Every key is where it was expected now: one moved and moved back between the
        // transaction and the read-back. Report the first compare as the one that failed.
        let (key, expected) = txn.compares.first().cloned().unwrap_or_default();
        Err(StoreError::Conflict { key, expected, actual: None })
    }

    fn range(&self, prefix: &str) -> Result<Listing, StoreError> {
        validate_prefix(prefix)?;
        let (key, range_end) = self.prefix_range(prefix);
        let answer =
            self.client.call("/v3/kv/range", &json!({ "key": key, "range_end": range_end }), true)?;
        let entries = match answer["kvs"].as_array() {
            Some(kvs) => kvs.iter().map(|kv| self.entry(kv)).collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        Ok(Listing { entries, revision: number(&answer["header"]["revision"]) })
    }

    fn watch_from(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        validate_prefix(prefix)?;
        let (key, range_end) = self.prefix_range(prefix);
        let body = json!({ "create_request": {
            "key": key, "range_end": range_end, "start_revision": (after + 1).to_string(),
        }})
        .to_string();
        let deadline = Instant::now() + self.client.config.request_timeout;
        let mut last = String::new();
        let count = self.client.config.endpoints.len();
        for attempt in 0.. {
            if attempt > 0 && Instant::now() >= deadline {
                return Err(StoreError::Backend(format!("no etcd member accepted the watch: {last}")));
            }
            if attempt > 0 && attempt % count == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            let index = (self.client.preferred.load(Ordering::Relaxed) + attempt) % count;
            let endpoint = &self.client.config.endpoints[index];
            match Exchange::post(endpoint, "/v3/watch", &body, self.client.config.connect_timeout) {
                Ok(mut stream) if stream.status == 200 => {
                    // The first message says whether the watch exists, or why not.
                    match stream.next_message(self.client.config.request_timeout) {
                        Ok(first) if first["result"]["created"].as_bool() == Some(true) => {
                            // etcd creates a watch on compacted history and cancels it a moment
                            // later; a read at the first revision asked for tells at once.
                            let current = number(&first["result"]["header"]["revision"]);
                            if after < current && self.compacted_at(after + 1)? {
                                if let Ok(second) = stream.next_message(self.client.config.request_timeout) {
                                    if let Some(error) = watch_ended(&second["result"], after) {
                                        return Err(error);
                                    }
                                }
                                return Err(StoreError::Compacted {
                                    requested: after + 1,
                                    compacted: after + 2,
                                });
                            }
                            return Ok(self.run_watch(stream, after));
                        }
                        Ok(first) => match watch_ended(&first["result"], after) {
                            Some(error @ StoreError::Compacted { .. }) => return Err(error),
                            Some(error) => last = format!("{endpoint}: {error}"),
                            None => last = format!("{endpoint}: unexpected first message {first}"),
                        },
                        Err(error) => last = format!("{endpoint}: {error}"),
                    }
                }
                Ok(mut refused) => {
                    let answer = refused.whole_body(deadline).unwrap_or_default();
                    last =
                        format!("{endpoint}: HTTP {}: {}", refused.status, String::from_utf8_lossy(&answer));
                }
                Err(error) => last = format!("{endpoint}: {error}"),
            }
        }
        unreachable!("the loop above only ends by returning")
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        // Any read carries the cluster's revision in its header; the namespace key itself
        // is never written.
        let key = BASE64.encode(&self.client.config.namespace);
        let answer = self.client.call("/v3/kv/range", &json!({ "key": key, "count_only": true }), true)?;
        Ok(number(&answer["header"]["revision"]))
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = ttl_seconds(ttl)?;
        // Granting twice leaves an unused lease that expires on its own: safe to retry.
        let answer = self.client.call("/v3/lease/grant", &json!({ "TTL": seconds.to_string() }), true)?;
        match number(&answer["ID"]) {
            0 => Err(malformed("a lease grant without an id")),
            id => Ok(id as LeaseId),
        }
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        // The gateway streams one answer per request object; with one object it answers once.
        let answer = self.client.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }), true)?;
        if number(&answer["result"]["TTL"]) > 0 {
            Ok(())
        } else {
            Err(StoreError::LeaseExpired(lease))
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.client.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() }), true) {
            Ok(_) | Err(StoreError::LeaseExpired(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let body = json!({ "revision": revision.to_string(), "physical": true });
        match self.client.call("/v3/kv/compaction", &body, true) {
            // Compacted there or further already: what was asked holds.
            Ok(_) | Err(StoreError::Compacted { .. }) => Ok(()),
            Err(StoreError::Backend(message)) if message.contains("future revision") => {
                Err(StoreError::Invalid(format!(
                    "cannot compact to revision {revision}: the store has not reached it"
                )))
            }
            Err(error) => Err(error),
        }
    }
}

impl EtcdStore {
    /// Whether the history at `revision` has been compacted away.
    fn compacted_at(&self, revision: Revision) -> Result<bool, StoreError> {
        let key = BASE64.encode(&self.client.config.namespace);
        let body = json!({ "key": key, "count_only": true, "revision": revision.to_string() });
        match self.client.call("/v3/kv/range", &body, true) {
            Ok(_) => Ok(false),
            Err(StoreError::Compacted { .. }) => Ok(true),
            Err(error) => Err(error),
        }
    }

    /// Hands the open stream to a thread that turns its messages into events until the
    /// watch is dropped (which shuts the connection down) or the stream ends.
    fn run_watch(&self, mut stream: Exchange, after: Revision) -> Watch {
        let (sender, receiver) = mpsc::channel();
        let socket = stream.socket.try_clone();
        let decoder = EtcdStore { client: Arc::clone(&self.client) };
        std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || loop {
                let message = match stream.next_message(Duration::ZERO) {
                    Ok(message) => message,
                    Err(error) => {
                        let _ =
                            sender.send(Err(StoreError::Backend(format!("the etcd watch broke: {error}"))));
                        return;
                    }
                };
                let result = &message["result"];
                for event in result["events"].as_array().into_iter().flatten() {
                    let kv = &event["kv"];
                    let item = if event["type"].as_str() == Some("DELETE") {
                        decoder
                            .entry(&json!({ "key": kv["key"], "mod_revision": kv["mod_revision"] }))
                            .map(|entry| Event::Delete { key: entry.key, revision: entry.revision })
                    } else {
                        decoder.entry(kv).map(Event::Put)
                    };
                    if sender.send(item).is_err() {
                        return;
                    }
                }
                if let Some(error) = watch_ended(result, after) {
                    let _ = sender.send(Err(error));
                    return;
                }
                if message.get("error").is_some() {
                    let _ = sender.send(Err(StoreError::Backend(format!("the etcd watch broke: {message}"))));
                    return;
                }
            })
            .expect("spawning a thread");
        match socket {
            Ok(socket) => Watch::with_cancel(receiver, move || {
                let _ = socket.shutdown(Shutdown::Both);
            }),
            Err(_) => Watch::new(receiver),
        }
    }
}

/// Why etcd cancelled a watch, if it did.
fn watch_ended(result: &Value, after: Revision) -> Option<StoreError> {
    if result["canceled"].as_bool() != Some(true) {
        return None;
    }
    let compacted = number(&result["compact_revision"]);
    if compacted > 0 {
        return Some(StoreError::Compacted { requested: after + 1, compacted });
    }
    let reason = result["cancel_reason"].as_str().unwrap_or("no reason given");
    Some(StoreError::Backend(format!("etcd cancelled the watch: {reason}")))
}

/// Why a `POST` did not get its answer's head.
enum PostError {
    /// No connection: the request was not sent.
    Connect(std::io::Error),
    /// Connected, and the request may have been sent.
    Exchange(std::io::Error),
}

impl std::fmt::Display for PostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostError::Connect(error) => write!(f, "connecting: {error}"),
            PostError::Exchange(error) => write!(f, "{error}"),
        }
    }
}

/// One HTTP/1.1 `POST` on a connection of its own (`Connection: close`): the gateway's answers
/// are chunked, and a watch's answer is a stream of newline-separated JSON messages that lasts
/// as long as the watch. (A general HTTP client stumbled over the gateway's chunk trailers.)
struct Exchange {
    socket: TcpStream,
    reader: BufReader<TcpStream>,
    status: u16,
    chunked: bool,
    /// Bytes of the current chunk not yet read.
    chunk_left: usize,
    /// Whether the last chunk (or, unchunked, the end of the connection) was seen.
    ended: bool,
    /// Decoded bytes not yet handed out.
    pending: Vec<u8>,
}

impl Exchange {
    /// Connects to `endpoint`, sends the request and reads the answer's head. A connection
    /// failure is an error of kind `ConnectionRefused`/`TimedOut` before anything was sent.
    fn post(
        endpoint: &str,
        path: &str,
        body: &str,
        connect_timeout: Duration,
    ) -> Result<Exchange, PostError> {
        let address = endpoint.trim_start_matches("http://");
        let connect = || -> std::io::Result<TcpStream> {
            let target = address
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
            TcpStream::connect_timeout(&target, connect_timeout)
        };
        let socket = connect().map_err(PostError::Connect)?;
        Exchange::send(socket, address, path, body, connect_timeout).map_err(PostError::Exchange)
    }

    /// Sends the request on a connected `socket` and reads the answer's head.
    fn send(
        mut socket: TcpStream,
        address: &str,
        path: &str,
        body: &str,
        connect_timeout: Duration,
    ) -> std::io::Result<Exchange> {
        socket.set_nodelay(true)?;
        socket.set_read_timeout(Some(connect_timeout.max(Duration::from_secs(5))))?;
        // `Grpc-Metadata-hasleader` is etcd's require-leader option: a member that has lost
        // its leader refuses (or, for a watch, cancels) instead of answering stale.
        write!(
            socket,
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
             Grpc-Metadata-hasleader: true\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut reader = BufReader::new(socket.try_clone()?);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let code = status
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {:?}", status.trim())))?;
        let mut chunked = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Err(std::io::Error::other("the connection closed in the headers"));
            }
            let header = header.trim().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if header.starts_with("transfer-encoding:") && header.contains("chunked") {
                chunked = true;
            }
        }
        Ok(Exchange {
            socket,
            reader,
            status: code,
            chunked,
            chunk_left: 0,
            ended: false,
            pending: Vec::new(),
        })
    }

    /// Reads more of the body into `pending`; false at its end.
    fn fill(&mut self) -> std::io::Result<bool> {
        if self.ended {
            return Ok(false);
        }
        if self.chunked && self.chunk_left == 0 {
            let mut size = String::new();
            loop {
                size.clear();
                if self.reader.read_line(&mut size)? == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the stream ended"));
                }
                if !size.trim().is_empty() {
                    break; // skip the CRLF that ends the previous chunk's data
                }
            }
            let size = size.trim();
            let size = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                // Trailers may follow; nothing after them matters on a closing connection.
                self.ended = true;
                return Ok(false);
            }
            self.chunk_left = size;
        }
        let want = if self.chunked { self.chunk_left.min(64 * 1024) } else { 64 * 1024 };
        let mut buffer = vec![0; want];
        let read = self.reader.read(&mut buffer)?;
        if read == 0 {
            if self.chunked {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the stream ended"));
            }
            self.ended = true;
            return Ok(false);
        }
        if self.chunked {
            self.chunk_left -= read;
        }
        self.pending.extend_from_slice(&buffer[..read]);
        Ok(true)
    }

    /// The whole body, read before `deadline`.
    fn whole_body(&mut self, deadline: Instant) -> std::io::Result<Vec<u8>> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.socket.set_read_timeout(Some(left))?;
            if !self.fill()? {
                return Ok(std::mem::take(&mut self.pending));
            }
        }
    }

    /// The next newline-terminated JSON message of a streamed body. `timeout` bounds the wait
    /// (`ZERO`: wait as long as it takes).
    fn next_message(&mut self, timeout: Duration) -> std::io::Result<Value> {
        self.socket.set_read_timeout(if timeout.is_zero() { None } else { Some(timeout) })?;
        loop {
            if let Some(end) = self.pending.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map_err(std::io::Error::other);
            }
            if !self.fill()? {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the stream ended"));
            }
        }
    }
}

/// The smallest byte string greater than every string starting with `prefix` (etcd's
/// `GetPrefixRangeEnd`); `[0]` ("to the end of the key space") when there is none.
fn byte_successor(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A 64-bit number the gateway sends as a string (absent fields are zero).
fn number(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.parse::<i64>().map(|n| n as u64).unwrap_or(0),
        Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|n| n as u64)).unwrap_or(0),
        _ => 0,
    }
}

/// Bytes the gateway sends as base64 (absent fields are empty).
fn bytes(value: &Value) -> Result<Vec<u8>, StoreError> {
    match value.as_str() {
        Some(text) => BASE64.decode(text).map_err(|_| malformed("bytes that are not base64")),
        None => Ok(Vec::new()),
    }
}

/// An answer from etcd that does not make sense.
fn malformed(what: &str) -> StoreError {
    StoreError::Backend(format!("etcd answered with {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed() {
        let config = EtcdConfig::parse("http://10.0.0.1:2379, http://10.0.0.2:2379/").unwrap();
        assert_eq!(config.endpoints, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(config.namespace, "/stratus/");
        assert_eq!(config.with_namespace("/test-1").namespace, "/test-1/");
        for bad in ["", ",", "10.0.0.1:2379", "https://a:1", "http://", "http://a:1/v3"] {
            assert!(EtcdConfig::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn prefix_ranges_end_after_the_prefix() {
        assert_eq!(byte_successor(b"/a/"), b"/a0");
        assert_eq!(byte_successor(b"a\xff"), b"b");
        assert_eq!(byte_successor(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn numbers_come_as_strings_or_not_at_all() {
        assert_eq!(number(&json!("42")), 42);
        assert_eq!(number(&json!(7)), 7);
        assert_eq!(number(&Value::Null), 0);
        assert_eq!(number(&json!("x")), 0);
    }
}
