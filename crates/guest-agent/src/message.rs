//! The JSON messages carried in request, response and exit frames.

use serde::{Deserialize, Serialize};

/// A request: the first frame of every connection. `{"op": "info"}`,
/// `{"op": "exec", "argv": [...], ...}`, `{"op": "configure", "hostname": ..., ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Describe the guest ([`GuestInfo`]); also the readiness probe.
    Info,
    /// Run a program, streaming its stdio.
    Exec(ExecRequest),
    /// Take a new identity (hostname, MAC, address, route).
    Configure(Identity),
}

/// The answer to a request: `{"ok": VALUE}` (`null` for `exec` and `configure`) or
/// `{"error": "one line for a human"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The request succeeded (for `exec`: the program started).
    Ok(serde_json::Value),
    /// The request failed; nothing else follows.
    Error(String),
}

/// What the guest reports about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// The kernel's hostname.
    pub hostname: String,
    /// Non-loopback IPv4 addresses in CIDR form, e.g. `10.210.0.5/24`.
    pub addresses: Vec<String>,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// Seconds since the guest kernel booted (`/proc/uptime`).
    pub uptime_secs: f64,
    /// The agent's version (its crate version).
    pub agent_version: String,
    /// The guest's vsock context id as its kernel sees it (absent when it cannot be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<u32>,
}

/// A program to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program (looked up in the agent's `PATH` unless it contains a `/`) and its arguments.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those of) the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory; the agent's (`/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Milliseconds the program may run: past them it and every process it started are
    /// killed (SIGKILL to its process group), so its exit code is 137. No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A guest identity to take: every field is optional and only given ones change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// The hostname (set in the kernel and written to `/etc/hostname`).
    #[serde(default)]
    pub hostname: Option<String>,
    /// The interface's MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub mac: Option<String>,
    /// The interface's only IPv4 address, in CIDR form (`10.210.0.5/24`). Replacing the
    /// addresses drops the routes through them: give `gateway` too.
    #[serde(default)]
    pub address: Option<String>,
    /// The default route's gateway (`10.210.0.1`).
    #[serde(default)]
    pub gateway: Option<String>,
    /// The interface to configure; `eth0` when absent.
    #[serde(default)]
    pub interface: Option<String>,
}

/// The payload of the exit frame that ends an `exec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, or 128 + N if signal N killed the program (as shells report it).
    pub code: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_shapes() {
        assert_eq!(serde_json::to_value(Request::Info).unwrap(), json!({"op": "info"}));
        let exec = Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec![("A".into(), "1".into())],
            cwd: None,
            timeout_ms: None,
        });
        assert_eq!(
            serde_json::to_value(&exec).unwrap(),
            json!({"op": "exec", "argv": ["sh", "-c", "true"], "env": [["A", "1"]], "cwd": null})
        );
        let limited = Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            timeout_ms: Some(5),
            ..Default::default()
        });
        assert_eq!(serde_json::to_value(&limited).unwrap()["timeout_ms"], json!(5));
        // Optional fields may be left out, unknown ones are ignored (newer clients).
        let parsed: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"],"later":1}"#).unwrap();
        assert_eq!(parsed, Request::Exec(ExecRequest { argv: vec!["true".into()], ..Default::default() }));
        let parsed: Request = serde_json::from_str(r#"{"op":"configure","hostname":"a"}"#).unwrap();
        assert_eq!(parsed, Request::Configure(Identity { hostname: Some("a".into()), ..Default::default() }));
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"argv":[]}"#).is_err());
    }

    #[test]
    fn response_wire_shapes() {
        assert_eq!(serde_json::to_value(Response::Ok(json!(null))).unwrap(), json!({"ok": null}));
        assert_eq!(serde_json::to_value(Response::Error("no".into())).unwrap(), json!({"error": "no"}));
        assert_eq!(serde_json::to_value(ExitStatus { code: 137 }).unwrap(), json!({"code": 137}));
    }
}
