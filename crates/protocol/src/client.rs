//! [`HttpAgent`]: the protocol over HTTP/JSON, as the control plane calls a remote host.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    check_id, Agent, AgentError, ExecOutput, ExecRequest, HostInfo, Incoming, InstanceOrder, MoveReport,
    NetworkConfig, Observed, SendRequest, PROTOCOL_VERSION, VERSION_HEADER,
};

/// How long a quick call (observe, ensure) may take before the host counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A remote host agent at `http://ADDRESS`, authenticated with the host's credential.
pub struct HttpAgent {
    base: String,
    credential: String,
    agent: ureq::Agent,
    /// For exec: the command's own limit plus this.
    slack: Duration,
}

impl HttpAgent {
    /// An agent listening at `address` (`HOST:PORT`), called with `credential`.
    pub fn new(address: &str, credential: &str) -> HttpAgent {
        let agent =
            ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(2)).timeout(CALL_TIMEOUT).build();
        HttpAgent {
            base: format!("http://{address}/v1"),
            credential: credential.to_string(),
            agent,
            slack: Duration::from_secs(90),
        }
    }

    fn request(&self, method: &str, path: &str, timeout: Duration) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .timeout(timeout)
            .set("authorization", &format!("Bearer {}", self.credential))
            .set(VERSION_HEADER, &PROTOCOL_VERSION.to_string())
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let request = self.request(method, path, timeout);
        let sent = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        match sent {
            Ok(response) => response
                .into_json()
                .map_err(|e| AgentError::Unreachable(format!("{}: reading the answer: {e}", self.base))),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let message = answer["error"].as_str().unwrap_or(text.trim()).to_string();
                Err(match answer["kind"].as_str() {
                    Some("not_running") => AgentError::NotRunning,
                    Some("failed") => AgentError::Failed(message),
                    _ if status >= 500 => AgentError::Failed(message),
                    _ => AgentError::Refused(message),
                })
            }
            Err(ureq::Error::Transport(transport)) => {
                Err(AgentError::Unreachable(format!("{}: {transport}", self.base)))
            }
        }
    }
}

impl Agent for HttpAgent {
    fn console(&self, id: &str) -> Result<Box<dyn crate::console::ConsoleStream>, AgentError> {
        crate::check_id(id)?;
        let url = format!("{}/instances/{id}/console", self.base.replacen("http://", "ws://", 1));
        let headers = [
            ("authorization", format!("Bearer {}", self.credential)),
            (VERSION_HEADER, PROTOCOL_VERSION.to_string()),
        ];
        crate::console::WsConsole::connect(&url, &headers)
            .map(|console| Box::new(console) as Box<dyn crate::console::ConsoleStream>)
            .map_err(AgentError::Failed)
    }

    fn host(&self) -> Result<HostInfo, AgentError> {
        self.call("GET", "/host", None::<&()>, CALL_TIMEOUT)
    }

    fn set_networks(&self, networks: &[NetworkConfig]) -> Result<(), AgentError> {
        // Bridges and NAT rules take a moment; nft may be installed at first use.
        self.call::<serde_json::Value>("PUT", "/networks", Some(&networks), Duration::from_secs(300))
            .map(drop)
    }

    fn ensure(&self, order: &InstanceOrder) -> Result<Observed, AgentError> {
        check_id(&order.id)?;
        self.call("PUT", &format!("/instances/{}", order.id), Some(order), CALL_TIMEOUT)
    }

    fn observe(&self, id: &str, after: u64) -> Result<Observed, AgentError> {
        check_id(id)?;
        self.call("GET", &format!("/instances/{id}?after={after}"), None::<&()>, CALL_TIMEOUT)
    }

    fn instances(&self) -> Result<Vec<Observed>, AgentError> {
        self.call("GET", "/instances", None::<&()>, CALL_TIMEOUT)
    }

    fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecOutput, AgentError> {
        check_id(id)?;
        let limit = Duration::from_millis(request.timeout_ms) + self.slack;
        self.call("POST", &format!("/instances/{id}/exec"), Some(request), limit)
    }

    fn metrics(&self, id: &str) -> Result<serde_json::Value, AgentError> {
        check_id(id)?;
        self.call("GET", &format!("/instances/{id}/metrics"), None::<&()>, CALL_TIMEOUT)
    }

    fn usage(&self) -> Result<Vec<crate::InstanceUsage>, AgentError> {
        self.call("GET", "/usage", None::<&()>, CALL_TIMEOUT)
    }

    fn disk_layout(&self, id: &str) -> Result<crate::DiskLayout, AgentError> {
        check_id(id)?;
        self.call("GET", &format!("/instances/{id}/disk"), None::<&()>, CALL_TIMEOUT)
    }

    fn read_disk(&self, id: &str, offset: u64, length: u64) -> Result<crate::DiskChunk, AgentError> {
        check_id(id)?;
        let path = format!("/instances/{id}/disk/chunk?offset={offset}&length={length}");
        self.call("GET", &path, None::<&()>, CALL_TIMEOUT)
    }

    fn write_disk(&self, id: &str, size: u64, chunk: &crate::DiskChunk) -> Result<(), AgentError> {
        check_id(id)?;
        let path = format!("/instances/{id}/disk/chunk?size={size}");
        self.call::<serde_json::Value>("PUT", &path, Some(chunk), CALL_TIMEOUT).map(drop)
    }

    fn receive(&self, order: &InstanceOrder) -> Result<Incoming, AgentError> {
        check_id(&order.id)?;
        self.call("POST", &format!("/instances/{}/receive", order.id), Some(order), Duration::from_secs(60))
    }

    fn send(&self, id: &str, to: &str, secret: &str) -> Result<MoveReport, AgentError> {
        check_id(id)?;
        let request = SendRequest { to: to.to_string(), secret: secret.to_string() };
        // As long as the guest's memory and disk take over the link.
        self.call("POST", &format!("/instances/{id}/send"), Some(&request), Duration::from_secs(1800))
    }
}
