//! [`VmmClient`]: the VMM's API as typed calls on its Unix socket, one method per route.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::{self, ClientError};
use crate::{
    Balloon, Boot, ConsoleConfig, Drive, Machine, Migrate, MigrationProgress, MigrationReport, Net,
    RateLimit, RateLimitPatch, Restore, RestoreReport, Rng, Snapshot, SnapshotReport, VmInfo, VsockConfig,
};

/// Why a call to the VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// No VMM answered: none listens on the socket, or the exchange broke off.
    #[error(transparent)]
    Unreachable(#[from] ClientError),
    /// The VMM refused the request; nothing changed.
    #[error("{method} {target}: {message}")]
    Refused {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        target: String,
        /// The HTTP status.
        status: u16,
        /// The VMM's `error` message.
        message: String,
    },
    /// The VMM answered something other than what the route returns.
    #[error("{method} {target}: unexpected answer: {cause}")]
    BadAnswer {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        target: String,
        /// What did not decode.
        cause: String,
    },
}

impl VmmError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            VmmError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The API of the VMM listening on one socket.
#[derive(Clone, Debug)]
pub struct VmmClient {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl VmmClient {
    /// The VMM whose API socket is `socket`; calls wait as long as the VMM takes.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), timeout: None }
    }

    /// Each read and write of a call may take at most `timeout` (and an answer may be at most
    /// 16 MiB): a caller that must not hang on a VMM that stopped answering.
    pub fn within(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /vm`.
    pub fn info(&self) -> Result<VmInfo, VmmError> {
        self.get("/vm")
    }

    /// `GET /vm/config`.
    pub fn config(&self) -> Result<serde_json::Value, VmmError> {
        self.get("/vm/config")
    }

    /// `GET /metrics`: counters per vCPU and device.
    pub fn metrics(&self) -> Result<serde_json::Value, VmmError> {
        self.get("/metrics")
    }

    /// `PUT /vm/machine`.
    pub fn set_machine(&self, machine: &Machine) -> Result<(), VmmError> {
        self.put("/vm/machine", machine)
    }

    /// `PUT /vm/boot`.
    pub fn set_boot(&self, boot: &Boot) -> Result<(), VmmError> {
        self.put("/vm/boot", boot)
    }

    /// `PUT /vm/drives/{id}`.
    pub fn put_drive(&self, id: &str, drive: &Drive) -> Result<(), VmmError> {
        self.put(&format!("/vm/drives/{id}"), drive)
    }

    /// `PUT /vm/nets/{id}`.
    pub fn put_net(&self, id: &str, net: &Net) -> Result<(), VmmError> {
        self.put(&format!("/vm/nets/{id}"), net)
    }

    /// `PATCH /vm/drives/{id}`.
    pub fn limit_drive(&self, id: &str, rate_limit: RateLimit) -> Result<(), VmmError> {
        self.send_unit("PATCH", &format!("/vm/drives/{id}"), Some(&RateLimitPatch { rate_limit }))
    }

    /// `PATCH /vm/nets/{id}`.
    pub fn limit_net(&self, id: &str, rate_limit: RateLimit) -> Result<(), VmmError> {
        self.send_unit("PATCH", &format!("/vm/nets/{id}"), Some(&RateLimitPatch { rate_limit }))
    }

    /// `PUT /vm/balloon`.
    pub fn set_balloon(&self, balloon: &Balloon) -> Result<(), VmmError> {
        self.put("/vm/balloon", balloon)
    }

    /// `GET /vm/balloon`: target, actual, the guest's memory statistics.
    pub fn balloon(&self) -> Result<serde_json::Value, VmmError> {
        self.get("/vm/balloon")
    }

    /// `PUT /vm/vsock`.
    pub fn set_vsock(&self, vsock: &VsockConfig) -> Result<(), VmmError> {
        self.put("/vm/vsock", vsock)
    }

    /// `PUT /vm/rng`.
    pub fn set_rng(&self, rng: &Rng) -> Result<(), VmmError> {
        self.put("/vm/rng", rng)
    }

    /// `PUT /vm/console`.
    pub fn set_console(&self, console: &ConsoleConfig) -> Result<(), VmmError> {
        self.put("/vm/console", console)
    }

    /// `POST /vm/start`.
    pub fn start(&self) -> Result<(), VmmError> {
        self.post_unit("/vm/start")
    }

    /// `POST /vm/pause`.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.post_unit("/vm/pause")
    }

    /// `POST /vm/resume`.
    pub fn resume(&self) -> Result<(), VmmError> {
        self.post_unit("/vm/resume")
    }

    /// `POST /vm/shutdown`: the ACPI power button.
    pub fn shutdown(&self) -> Result<(), VmmError> {
        self.post_unit("/vm/shutdown")
    }

    /// `POST /vm/stop`: a hard stop.
    pub fn stop(&self) -> Result<(), VmmError> {
        self.post_unit("/vm/stop")
    }

    /// `POST /vmm/quit`: the VMM process exits.
    pub fn quit(&self) -> Result<(), VmmError> {
        self.post_unit("/vmm/quit")
    }

    /// `POST /vm/snapshot` of a paused VM.
    pub fn snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotReport, VmmError> {
        self.send("POST", "/vm/snapshot", Some(snapshot))
    }

    /// `POST /vm/restore`.
    pub fn restore(&self, restore: &Restore) -> Result<RestoreReport, VmmError> {
        self.send("POST", "/vm/restore", Some(restore))
    }

    /// `POST /vm/migrate`: returns once the migration is over.
    pub fn migrate(&self, migrate: &Migrate) -> Result<MigrationReport, VmmError> {
        self.send("POST", "/vm/migrate", Some(migrate))
    }

    /// `GET /migration`.
    pub fn migration(&self) -> Result<MigrationProgress, VmmError> {
        self.get("/migration")
    }

    /// `DELETE /migration`: calls the migration off before the guest pauses.
    pub fn cancel_migration(&self) -> Result<MigrationProgress, VmmError> {
        self.send::<(), _>("DELETE", "/migration", None)
    }

    /// `POST /migration/postcopy`: moves the guest now, the rest of its memory after it.
    pub fn start_postcopy(&self) -> Result<MigrationProgress, VmmError> {
        self.send::<(), _>("POST", "/migration/postcopy", None)
    }

    fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, VmmError> {
        self.send::<(), T>("GET", target, None)
    }

    fn put(&self, target: &str, body: &impl Serialize) -> Result<(), VmmError> {
        self.send_unit("PUT", target, Some(body))
    }

    fn post_unit(&self, target: &str) -> Result<(), VmmError> {
        self.send_unit::<()>("POST", target, None)
    }

    fn send_unit<B: Serialize>(
        &self,
        method: &'static str,
        target: &str,
        body: Option<&B>,
    ) -> Result<(), VmmError> {
        self.exchange(method, target, body).map(drop)
    }

    fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &'static str,
        target: &str,
        body: Option<&B>,
    ) -> Result<T, VmmError> {
        let text = self.exchange(method, target, body)?;
        serde_json::from_str(&text).map_err(|e| VmmError::BadAnswer {
            method,
            target: target.to_owned(),
            cause: e.to_string(),
        })
    }

    /// One request; the answer's body when the VMM did what was asked.
    fn exchange<B: Serialize>(
        &self,
        method: &'static str,
        target: &str,
        body: Option<&B>,
    ) -> Result<String, VmmError> {
        let body = body.map(|b| serde_json::to_string(b).unwrap_or_default());
        let response = match self.timeout {
            Some(timeout) => http::call_within(&self.socket, method, target, body.as_deref(), timeout)?,
            None => http::call(&self.socket, method, target, body.as_deref())?,
        };
        if response.status >= 300 {
            let message = serde_json::from_str::<serde_json::Value>(&response.body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| response.body.trim().to_owned());
            return Err(VmmError::Refused {
                method,
                target: target.to_owned(),
                status: response.status,
                message,
            });
        }
        Ok(response.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A VMM stand-in on a socket in a fresh directory that answers one request with `answer`.
    fn answering(answer: &'static str) -> (VmmClient, std::thread::JoinHandle<String>) {
        let dir = std::env::temp_dir().join(format!("vmm-api-{}-{}", std::process::id(), answer.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let request = http::read_request(&stream).unwrap();
            let _ = stream.write_all(answer.as_bytes());
            format!("{} {} {}", request.method, request.path, String::from_utf8_lossy(&request.body))
        });
        (VmmClient::new(path).within(Duration::from_secs(5)), server)
    }

    #[test]
    fn a_refusal_carries_the_vmms_message_and_status() {
        let (client, server) = answering(
            "HTTP/1.1 409 Conflict\r\nContent-Length: 29\r\nConnection: close\r\n\r\n{\"error\": \"the VM is running\"}",
        );
        let error = client.set_machine(&Machine { vcpus: 2, memory_mib: 256 }).unwrap_err();
        assert_eq!(error.status(), Some(409));
        assert_eq!(error.to_string(), "PUT /vm/machine: the VM is running");
        assert_eq!(server.join().unwrap(), r#"PUT /vm/machine {"vcpus":2,"memory_mib":256}"#);
    }

    #[test]
    fn an_answer_of_the_wrong_shape_is_an_error_not_a_default() {
        let (client, server) = answering(
            "HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{\"state\": \"on\"}",
        );
        let error = client.info().unwrap_err();
        assert!(matches!(error, VmmError::BadAnswer { .. }), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn no_vmm_is_unreachable() {
        let client = VmmClient::new("/nonexistent/api.sock");
        assert!(matches!(client.start().unwrap_err(), VmmError::Unreachable(_)));
    }
}
