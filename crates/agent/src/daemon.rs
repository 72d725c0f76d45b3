//! `stratus agent`: the host agent of one machine of a cluster. It joins the control plane
//! (trading its join token for the host's credential, kept in `DATA/agent.json`), serves the
//! agent protocol on its address, works on the orders it gets through [`AgentRuntime`] and
//! [`LocalAgent`], and sends a heartbeat every [`HEARTBEAT_EVERY`]. Its VMMs run in their own
//! sessions: stopping or killing the agent stops no guest, and a restarted agent re-adopts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stratus_protocol::{Agent, HeartbeatAnswer, HostInfo, HEARTBEAT_EVERY};

use crate::images::{HostImages, HttpImageSource};
use crate::runtime::{AgentRuntime, RuntimeAgent};
use crate::{HostAgent, LocalAgent};

/// The port an agent listens on unless told otherwise.
pub const AGENT_PORT: u16 = 7441;

/// How `stratus agent` runs.
pub struct AgentConfig {
    /// The control plane's URL, `http://HOST:PORT`, or its replicas' URLs separated by commas.
    pub control: String,
    /// The join token from `stratus host add`; not needed once joined.
    pub join_token: Option<String>,
    /// This host's name in the cluster.
    pub name: String,
    /// Where the control plane reaches this agent: `HOST` or `HOST:PORT`.
    pub address: String,
    /// Where to listen (default: the address).
    pub listen: Option<SocketAddr>,
    /// Instances, orders and the credential live here.
    pub data_dir: PathBuf,
    /// The `stratus` binary that runs `stratus vmm`.
    pub vmm_binary: PathBuf,
    /// `Some(boot)`: a simulated host (no VMM runs; guests are running `boot` after their
    /// order), for tests and scale runs of the control plane over real processes.
    pub simulate: Option<Duration>,
    /// The cluster's shared storage pool as this host mounts it (`--ha` instances' disks).
    pub shared_pool: Option<PathBuf>,
}

/// What the agent keeps of its membership.
#[derive(Serialize, Deserialize)]
struct Membership {
    control: String,
    name: String,
    credential: String,
}

/// Runs the agent until SIGINT or SIGTERM; instances keep running after it stops.
pub fn run_agent(config: AgentConfig) -> Result<()> {
    let data = &config.data_dir;
    std::fs::create_dir_all(data.join("instances"))
        .with_context(|| format!("creating {}", data.display()))?;
    let _lock = crate::process::lock_data_dir(data)?;
    let address = if config.address.contains(':') {
        config.address.clone()
    } else {
        format!("{}:{AGENT_PORT}", config.address)
    };
    let listen: SocketAddr = match config.listen {
        Some(listen) => listen,
        None => address.parse().with_context(|| format!("--address {address}: give it as IP or IP:PORT"))?,
    };
    let mut images = None;
    // The shared pool, and the fence file its VMMs run by (a host without it runs none).
    let shared = config.shared_pool.as_ref().map(|pool| (pool, data.join("fence")));
    if let Some((pool, _)) = &shared {
        if !std::fs::metadata(pool).is_ok_and(|m| m.is_dir()) {
            bail!("--shared-pool {}: not a directory this host can reach", pool.display());
        }
    }
    let agent: Arc<dyn Agent> = match config.simulate {
        None => {
            let ip = listen_ip(&address);
            let mut local =
                LocalAgent::new(data, config.vmm_binary.clone()).named(&config.name).with_address(&ip);
            if let Some((pool, fence)) = &shared {
                local = local.with_shared_pool(pool, fence);
            }
            let driver: Arc<dyn HostAgent> = Arc::new(local);
            let runtime = AgentRuntime::new(Arc::clone(&driver), &data.join("orders"), &address)
                .map_err(anyhow::Error::msg)?;
            images = Some((Arc::clone(&runtime), driver));
            Arc::new(RuntimeAgent(runtime))
        }
        Some(boot) => {
            let mut sim = stratus_protocol::SimAgent::new(&config.name, 64, 256 << 10).at(&address);
            if shared.is_some() {
                sim = sim.with_shared_pool();
            }
            sim.set_boot_delay(boot);
            // A simulated migration takes a quarter of a boot.
            sim.set_move_delay(boot / 4);
            eprintln!(
                "stratus agent: host {} is simulated: no VMM runs, guests \"boot\" in {boot:?}",
                config.name
            );
            Arc::new(sim)
        }
    };
    let info = agent.host().map_err(|e| anyhow::anyhow!("{e}"))?;
    let control = config.control.trim_end_matches('/').to_string();
    let credential = membership(data, &control, &config, &info)?;
    if let Some((runtime, driver)) = images {
        let source = HttpImageSource {
            replicas: replicas(&control),
            host: config.name.clone(),
            credential: credential.clone(),
        };
        runtime.use_images(HostImages::new(&data.join("images"), Arc::new(source), driver));
    }
    // Bridges recorded before a restart come back (they are gone after a reboot).
    if let Ok(bytes) = std::fs::read(data.join("orders").join("networks.json")) {
        if let Ok(networks) = serde_json::from_slice::<Vec<stratus_protocol::NetworkConfig>>(&bytes) {
            if let Err(e) = agent.set_networks(&networks) {
                eprintln!("stratus agent: restoring networks: {e}");
            }
        }
    }
    spawn_heartbeats(control.clone(), credential.clone(), Arc::clone(&agent), shared.map(|(_, fence)| fence));

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        eprintln!("stratus agent: host {} serving at {address}, control plane {control}", config.name);
        let router = stratus_protocol::server::router(agent, credential);
        axum::serve(listener, router).with_graceful_shutdown(crate::process::stop_signal()).await?;
        eprintln!("stratus agent: stopped; instances keep running and are adopted at the next start");
        Ok(())
    })
}

/// The control plane's replicas in `control` (`URL[,URL...]`).
fn replicas(control: &str) -> Vec<String> {
    control
        .split(',')
        .map(|url| url.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// POSTs `body` to `path` on the first replica that can be reached (an answer, even a
/// refusal, ends the search): the index of the replica tried last, and its outcome.
fn post_to_any(
    replicas: &[String],
    path: &str,
    credential: Option<&str>,
    timeout: Duration,
    body: &impl Serialize,
) -> (usize, Result<ureq::Response, ureq::Error>) {
    let mut last = (0, Err(ureq::Error::from(std::io::Error::other("no control plane address given"))));
    for (index, url) in replicas.iter().enumerate() {
        let mut request = ureq::post(&format!("{url}{path}")).timeout(timeout);
        if let Some(credential) = credential {
            request = request.set("authorization", &format!("Bearer {credential}"));
        }
        let body = serde_json::to_value(body).unwrap_or_default();
        match request.send_json(body) {
            Err(ureq::Error::Transport(e)) => last = (index, Err(ureq::Error::Transport(e))),
            outcome => return (index, outcome),
        }
    }
    last
}

/// The IP part of `HOST:PORT`.
pub fn listen_ip(address: &str) -> String {
    address.rsplit_once(':').map_or(address, |(ip, _)| ip).trim_matches(['[', ']']).to_string()
}

/// The host's credential: the one kept from an earlier join with this control plane, or a
/// new one traded for the join token.
fn membership(data: &Path, control: &str, config: &AgentConfig, info: &HostInfo) -> Result<String> {
    let path = data.join("agent.json");
    let kept = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Membership>(&bytes).ok())
        // The same cluster: a replica URL in common (replicas may have been added since).
        .filter(|kept| {
            kept.name == config.name
                && replicas(&kept.control).iter().any(|url| replicas(control).contains(url))
        });
    // A token given wins (the host was removed and invited again); the kept credential is
    // used without one.
    if let (Some(kept), None) = (&kept, &config.join_token) {
        return Ok(kept.credential.clone());
    }
    let Some(token) = &config.join_token else {
        bail!(
            "host {} has not joined {control} yet: give --join-token (from `stratus host add {}`)",
            config.name,
            config.name
        );
    };
    let body = serde_json::json!({ "token": token, "host": info });
    let answer = post_to_any(&replicas(control), "/agent/v1/join", None, Duration::from_secs(30), &body).1;
    let answer: serde_json::Value = match answer {
        Ok(response) => response.into_json().context("reading the control plane's answer")?,
        Err(ureq::Error::Status(_, response)) => {
            let text = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{message}");
        }
        Err(e) => bail!("cannot reach the control plane at {control}: {e}"),
    };
    let credential =
        answer["credential"].as_str().context("the control plane sent no credential")?.to_string();
    let kept = Membership {
        control: control.to_string(),
        name: config.name.clone(),
        credential: credential.clone(),
    };
    crate::process::write_private(&path, &serde_json::to_vec(&kept)?)?;
    eprintln!("stratus agent: host {} joined {control}", config.name);
    Ok(credential)
}

/// Sends this host's report to the control plane every [`HEARTBEAT_EVERY`], saying so once
/// when the control plane stops taking them, and once when it takes them again. Each
/// heartbeat taken renews the `fence` file's deadline, if there is one ([`crate::fence`]).
fn spawn_heartbeats(control: String, credential: String, agent: Arc<dyn Agent>, fence: Option<PathBuf>) {
    let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
        let mut failing = false;
        let mut replicas = replicas(&control);
        loop {
            let sent = agent.host().map_err(|e| e.to_string()).and_then(|info| {
                // Before the request: the lease the answer grants runs from no earlier.
                let at = crate::fence::uptime().map_err(|e| format!("reading the clock: {e}"))?;
                let (answered, result) = post_to_any(
                    &replicas,
                    "/agent/v1/heartbeat",
                    Some(&credential),
                    HEARTBEAT_EVERY * 2,
                    &info,
                );
                // The replica that answered is asked first next time.
                replicas.rotate_left(answered);
                let answer: HeartbeatAnswer = result
                    .map_err(|e| e.to_string())?
                    .into_json()
                    .map_err(|e| format!("the control plane's answer: {e}"))?;
                let Some(fence) = &fence else { return Ok(()) };
                crate::fence::renew(fence, at, Duration::from_millis(answer.lease_ms))
                    .map_err(|e| format!("writing {}: {e}", fence.display()))
            });
            match sent {
                Err(e) if !failing => {
                    eprintln!("stratus agent: heartbeat failed: {e}");
                    failing = true;
                }
                Ok(()) if failing => {
                    eprintln!("stratus agent: heartbeats go through again");
                    failing = false;
                }
                _ => {}
            }
            std::thread::sleep(HEARTBEAT_EVERY);
        }
    });
}
