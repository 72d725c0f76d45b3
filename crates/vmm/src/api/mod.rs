//! The VMM's control API: HTTP/1.1 and JSON on a Unix socket, one VM per socket. Requests are
//! decoded strictly (an unknown field is an error, not ignored) and turned into `Vmm`
//! operations; every error is `{"error": "..."}` with a 4xx or 5xx status, and leaves the VM
//! as it was.
//!
//! | method | path | body | does |
//! |--------|------|------|------|
//! | GET | /vm | | state, exit reason, uptime, configuration |
//! | GET | /vm/config | | the configuration |
//! | PUT | /vm/machine | `{"vcpus": 2, "memory_mib": 512}` | before start |
//! | PUT | /vm/boot | `{"kernel": P, "initrd": P, "cmdline": S}` | before start |
//! | PUT | /vm/drives/{id} | `{"path": P, "readonly": false, "rate_limit": L}` | before start |
//! | PUT | /vm/nets/{id} | `{"tap": "tap0", "mac": "52:54:00:...", "rate_limit": L}` | before start |
//! | PATCH | /vm/drives/{id}, /vm/nets/{id} | `{"rate_limit": {"bytes_per_sec": N, "ops_per_sec": N}}` | any time |
//! | PUT | /vm/balloon | `{"target_mib": N, "deflate_on_oom": true}` | configures before start, sets the target after |
//! | GET | /vm/balloon | | target, actual, the guest's memory statistics |
//! | PUT, DELETE | /vm/vsock | `{"cid": 3, "socket": P}` | before start |
//! | PUT | /vm/rng | `{"enabled": true}` | before start |
//! | PUT | /vm/console | `{"kind": "stdout"}`, `{"kind": "file"/"socket", "path": P}`, `{"kind": "none"}` | before start |
//! | POST | /vm/start, /vm/pause, /vm/resume | | lifecycle |
//! | POST | /vm/shutdown | | ACPI power button: the guest powers off |
//! | POST | /vm/stop | | hard stop |
//! | POST | /vm/snapshot | `{"state_file": P, "memory_file": P, "diff": false}` | paused VM only |
//! | POST | /vm/restore | `{"state_file": P, "memory_files": [P, ...], "drives": [...], "nets": [...], "vsock": {...}, "paused": false, "track_dirty_pages": false}` | instead of start |
//! | POST | /vm/migrate | `{"to": "tcp:HOST:PORT", "max_downtime_ms": 20, "bandwidth": BYTES_PER_S, "auto_converge": true, "postcopy": false, "with_disks": false}` | live migration to a `--incoming` VMM |
//! | GET | /migration | | the current or last migration: phase, round, bytes sent, remaining, dirty rate, result |
//! | DELETE | /migration | | call the migration off before the guest pauses (202; 409 once it is moving) |
//! | POST | /migration/postcopy | | move the guest now, the rest after it (a migration started with `postcopy`) |
//! | GET | /metrics | | counters per vCPU and device |
//! | POST | /vmm/quit | | the VMM process exits |

pub use stratus_vmm_api::http;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use stratus_devices::bus::lock;
use stratus_vmm_api::{Balloon, Boot, Drive, Machine, Migrate, Net, RateLimitPatch, Restore, Rng, Snapshot};

use crate::console::ConsoleConfig;
use crate::service::{ApiError, Device, RestoreRequest, Vmm};
use crate::vm::{DiskConfig, NetConfig, VsockConfig};
use crate::BootSource;
use http::{Request, Response};

/// The default command line of a boot source that gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=1";

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest("this request needs a JSON body".into()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("bad request body: {e}")))
}

fn net_config(body: Net) -> Result<NetConfig, ApiError> {
    let mac = match body.mac {
        Some(text) => Some(stratus_virtio::net::parse_mac(&text).ok_or_else(|| {
            ApiError::BadRequest(format!("'{text}' is not a MAC address (like 52:54:00:12:34:56)"))
        })?),
        None => None,
    };
    Ok(NetConfig { tap: body.tap, mac, rate_limit: body.rate_limit })
}

fn valid_id(id: &str) -> Result<&str, ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(ApiError::BadRequest(format!("'{id}' is not a valid id (letters, digits, - and _, at most 64)")))
    }
}

/// What the server loop does after answering.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Serve the next request.
    Continue,
    /// Exit the process.
    Quit,
}

/// Routes one request to the VMM.
pub fn handle(vmm: &Mutex<Vmm>, request: &Request) -> (Response, After) {
    let done = |r: Result<(), ApiError>| match r {
        Ok(()) => Response::no_content(),
        Err(e) => Response::error(e.status(), e),
    };
    let json = |r: Result<serde_json::Value, ApiError>| match r {
        Ok(v) => Response::json(200, &v),
        Err(e) => Response::error(e.status(), e),
    };
    let body = request.body.as_slice();
    let segments: Vec<&str> = request.path.trim_end_matches('/').split('/').skip(1).collect();
    let mut v = lock(vmm);
    let response = match (request.method.as_str(), segments.as_slice()) {
        ("GET", ["vm"]) => Response::json(200, &v.info()),
        ("GET", ["vm", "config"]) => Response::json(200, &v.config_view()),
        ("GET", ["metrics"]) => Response::json(200, &v.metrics()),
        ("PUT", ["vm", "machine"]) => done(
            parse::<Machine>(body).and_then(|m| v.set_machine(m.vcpus, m.memory_mib.saturating_mul(1 << 20))),
        ),
        ("PUT", ["vm", "boot"]) => done(parse::<Boot>(body).and_then(|b| {
            v.set_boot(BootSource {
                kernel: b.kernel,
                initrd: b.initrd,
                cmdline: b.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
            })
        })),
        ("PUT", ["vm", "drives", id]) => {
            done(valid_id(id).and_then(|id| Ok((id, parse::<Drive>(body)?))).and_then(|(id, d)| {
                v.put_drive(id, DiskConfig { path: d.path, readonly: d.readonly, rate_limit: d.rate_limit })
            }))
        }
        ("PUT", ["vm", "nets", id]) => done(
            valid_id(id)
                .and_then(|id| Ok((id, net_config(parse::<Net>(body)?)?)))
                .and_then(|(id, n)| v.put_net(id, n)),
        ),
        ("PATCH", ["vm", "drives", id]) => done(
            parse::<RateLimitPatch>(body).and_then(|r| v.set_rate_limit(Device::Drive, id, r.rate_limit)),
        ),
        ("PATCH", ["vm", "nets", id]) => {
            done(parse::<RateLimitPatch>(body).and_then(|r| v.set_rate_limit(Device::Net, id, r.rate_limit)))
        }
        ("GET", ["vm", "balloon"]) => json(v.balloon()),
        ("PUT", ["vm", "balloon"]) => {
            done(parse::<Balloon>(body).and_then(|b| v.set_balloon(b.target_mib, b.deflate_on_oom)))
        }
        ("PUT", ["vm", "vsock"]) => done(parse::<VsockConfig>(body).and_then(|c| v.set_vsock(Some(c)))),
        ("DELETE", ["vm", "vsock"]) => done(v.set_vsock(None)),
        ("PUT", ["vm", "rng"]) => done(parse::<Rng>(body).and_then(|r| v.set_rng(r.enabled))),
        ("PUT", ["vm", "console"]) => done(parse::<ConsoleConfig>(body).and_then(|c| v.set_console(c))),
        ("POST", ["vm", "start"]) => done(v.start()),
        ("POST", ["vm", "pause"]) => done(v.pause()),
        ("POST", ["vm", "resume"]) => done(v.resume()),
        ("POST", ["vm", "shutdown"]) => done(v.shutdown()),
        ("POST", ["vm", "stop"]) => done(v.stop()),
        ("POST", ["vm", "snapshot"]) => json(parse::<Snapshot>(body).and_then(|s| {
            let report = v.snapshot(&s.state_file, &s.memory_file, s.diff)?;
            Ok(serde_json::to_value(report).unwrap_or_default())
        })),
        ("POST", ["vm", "restore"]) => json(parse::<Restore>(body).and_then(|r| {
            let nets = match r.nets {
                Some(nets) => Some(nets.into_iter().map(net_config).collect::<Result<Vec<_>, _>>()?),
                None => None,
            };
            let disks = r.drives.map(|drives| {
                drives
                    .into_iter()
                    .map(|d| DiskConfig { path: d.path, readonly: d.readonly, rate_limit: d.rate_limit })
                    .collect()
            });
            let report = v.restore(RestoreRequest {
                state: r.state_file,
                memory: r.memory_files,
                nets,
                disks,
                vsock: r.vsock,
                paused: r.paused,
                track_dirty_pages: r.track_dirty_pages,
            })?;
            Ok(serde_json::to_value(report).unwrap_or_default())
        })),
        ("POST", ["vm", "migrate"]) => json(parse::<Migrate>(body).and_then(|m| {
            let mut options = crate::migration::Options::default();
            if let Some(ms) = m.max_downtime_ms {
                options.max_downtime = std::time::Duration::from_millis(ms);
            }
            if let Some(rounds) = m.max_rounds {
                options.max_rounds = rounds;
            }
            if m.bandwidth == Some(0) {
                return Err(ApiError::BadRequest("a bandwidth of 0 would never finish: leave it out".into()));
            }
            options.bandwidth = m.bandwidth;
            if let Some(auto) = m.auto_converge {
                options.auto_converge = auto;
            }
            options.postcopy = m.postcopy.unwrap_or(false);
            options.with_disks = m.with_disks.unwrap_or(false);
            let secret = m.secret.unwrap_or_default();
            let report = v.migrate(&m.to, options, secret.as_bytes())?;
            Ok(serde_json::to_value(report).unwrap_or_default())
        })),
        ("POST", ["vmm", "quit"]) => return (Response::no_content(), After::Quit),
        (
            _,
            ["vm"]
            | ["vm", "config"]
            | ["metrics"]
            | ["vm", "machine"]
            | ["vm", "boot"]
            | ["vm", "drives", _]
            | ["vm", "nets", _]
            | ["vm", "vsock"]
            | ["vm", "rng"]
            | ["vm", "console"]
            | ["vm", "start"]
            | ["vm", "pause"]
            | ["vm", "resume"]
            | ["vm", "shutdown"]
            | ["vm", "stop"]
            | ["vm", "snapshot"]
            | ["vm", "restore"]
            | ["vmm", "quit"],
        ) => Response::error(405, format!("{} is not allowed on {}", request.method, request.path)),
        _ => Response::error(404, format!("no such resource: {}", request.path)),
    };
    (response, After::Continue)
}

/// The requests answered without the VMM, which a migration holds while it runs: its
/// progress, calling it off, switching it to post-copy, and `GET /vm` (the VM as the
/// migration began, with its progress); anything else during a migration is refused at once
/// rather than left waiting for it.
fn migration_request(progress: &crate::migration::Progress, request: &http::Request) -> Option<Response> {
    let path = request.path.trim_end_matches('/');
    let refused = |e: String| Response::error(409, e);
    if (request.method.as_str(), path) == ("GET", "/vm") {
        if let Some(info) = progress.vm_info() {
            return Some(Response::json(200, &info));
        }
    }
    Some(match (request.method.as_str(), path) {
        ("GET", "/migration") => Response::json(200, &progress.get()),
        ("DELETE", "/migration") => match progress.cancel() {
            Ok(()) => Response::json(202, &progress.get()),
            Err(e) => refused(e),
        },
        ("POST", "/migration/postcopy") => match progress.start_postcopy() {
            Ok(()) => Response::json(202, &progress.get()),
            Err(e) => refused(e),
        },
        (_, "/migration" | "/migration/postcopy") => {
            Response::error(405, format!("{} is not allowed on {}", request.method, request.path))
        }
        _ if progress.active() => {
            let p = progress.get();
            refused(format!(
                "a migration to {} is under way ({}): GET /migration follows it, DELETE /migration calls it off",
                p.to, p.phase
            ))
        }
        _ => return None,
    })
}

/// Binds the API socket at `path` (replacing a stale one nobody listens on).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match stratus_unix::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if stratus_unix::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{}: another VMM is serving this socket", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
            stratus_unix::bind(path)
        }
        other => other,
    }
}

/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 32;

/// Serves the API on `listener` until a quit request; then removes the socket at `path` and
/// returns. Each connection has its own thread, so that `GET /migration` answers while a
/// migration (which holds the VMM) runs; other requests wait for the VMM.
pub fn serve(listener: UnixListener, path: &Path, vmm: Arc<Mutex<Vmm>>) {
    let progress = lock(&vmm).migration_progress();
    let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        // A client opening connections without sending requests must not pile up threads:
        // at the cap, new connections wait in the listen backlog until a request ends.
        while in_flight.load(std::sync::atomic::Ordering::SeqCst) >= MAX_CONNECTIONS {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let stream = listener.accept().map(|(s, _)| s);
        if quit.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_file(path);
            return;
        }
        let Ok(stream) = stream else { continue };
        in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let slot = in_flight.clone();
        let (vmm, progress, quit, path) = (vmm.clone(), progress.clone(), quit.clone(), path.to_owned());
        let spawned = std::thread::Builder::new().name("api-request".into()).spawn(move || {
            let (response, after) = match http::read_request(&stream) {
                Ok(request) => match migration_request(&progress, &request) {
                    Some(response) => (response, After::Continue),
                    None => handle(&vmm, &request),
                },
                Err(response) => (response, After::Continue),
            };
            let _ = http::write_response(&stream, &response);
            slot.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            if after == After::Quit {
                quit.store(true, std::sync::atomic::Ordering::SeqCst);
                // Wake the accept loop so that it sees the flag.
                let _ = stratus_unix::connect(&path);
            }
        });
        if spawned.is_err() {
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            eprintln!("[stratus] api: cannot start a request thread");
        }
    }
}
