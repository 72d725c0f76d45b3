//! `stratus serve`: control plane and host agent in one process on an embedded SQLite store —
//! the single-machine cloud. First start creates the data directory, the API token, the client
//! configuration, the default network and the default image; every start re-adopts the
//! instances whose VMMs still run (they live in their own sessions and outlive the server).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use stratus_agent::network::Subnet;
use stratus_agent::process::{lock_data_dir, stop_signal, write_private};
use stratus_agent::{HostAgent, LocalAgent};
use stratus_api::model::{now, Image, Network, DEFAULT_PROJECT};
use stratus_store::SqliteStore;

use crate::api::{self, AppState};
use crate::cluster::Cluster;
use crate::db::{host_key, network_key, Db};
use crate::hosts::Hosts;
use crate::leader::Leadership;
use crate::reconciler::Reconciler;

/// How `serve` runs.
pub struct ServeConfig {
    /// Where the store, images and instances live.
    pub data_dir: PathBuf,
    /// This machine's host name in the cluster (default: its hostname).
    pub host_name: Option<String>,
    /// Where the state lives: `None` for `DATA/stratus.db` (SQLite), or
    /// `etcd:http://A:2379,http://B:2379` for an etcd cluster.
    pub store: Option<String>,
    /// The API's address.
    pub listen: SocketAddr,
    /// The `stratus` binary that runs `stratus vmm`.
    pub vmm_binary: PathBuf,
    /// A built image directory (vmlinux, rootfs.ext4, cmdline, manifest) to install as `default`.
    pub default_image: Option<PathBuf>,
    /// Subnet of the default network, on first start.
    pub default_cidr: String,
    /// Bridge of the default network, on first start.
    pub default_bridge: String,
    /// Where to write the CLI's configuration (URL and token), if anywhere.
    pub client_config: Option<PathBuf>,
    /// Run on a thread of its own once the API answers, with its URL and token.
    pub on_ready: Option<OnReady>,
    /// Builds images by recipe name for `POST /v1/images/build`.
    pub image_builder: Option<crate::image::ImageBuilder>,
    /// `Some(name)`: run as control-plane replica `name` with no host of its own (`stratus
    /// control`), electing a leader with the other replicas on the same store.
    pub replica: Option<String>,
    /// The URL other replicas and agents reach this one at (default `http://LISTEN`).
    pub advertise: Option<String>,
}

/// Work to do once the server answers: gets the API's URL and token.
pub type OnReady = Box<dyn FnOnce(String, String) + Send>;

/// Runs the server until SIGINT or SIGTERM. Instances keep running after it stops.
pub fn serve(mut config: ServeConfig) -> Result<()> {
    let data = &config.data_dir;
    std::fs::create_dir_all(data.join("instances"))
        .with_context(|| format!("creating {}", data.display()))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))?;
    let _lock = lock_data_dir(data)?;
    // Half-made images of a server that stopped while installing one (only this server,
    // holding the lock, writes there).
    for entry in std::fs::read_dir(data.join("images")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.ends_with(".partial") || name.ends_with(".import")) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let db = Db::new(open_store(config.store.as_deref(), data)?);
    let replica = config.replica.clone();
    let role = if replica.is_some() { "control" } else { "serve" };
    let token = match &replica {
        None => load_or_create_token(&data.join("token"))?,
        Some(_) => shared_token(&db, &data.join("token"))?,
    };
    let url = match &config.advertise {
        Some(url) if url.starts_with("http://") => url.trim_end_matches('/').to_string(),
        Some(url) => {
            bail!("--advertise {url}: give the URL others reach this replica at, as http://ADDRESS:PORT")
        }
        None => {
            if replica.is_some() && config.listen.ip().is_unspecified() {
                eprintln!(
                    "stratus control: listening on {} and announcing it as is: other replicas cannot reach that; \
                     give --advertise http://ADDRESS:{}",
                    config.listen,
                    config.listen.port()
                );
            }
            format!("http://{}", config.listen)
        }
    };
    if let Some(path) = &config.client_config {
        write_client_config(path, &url, &token)?;
    }
    ensure_default_network(&db, &config)?;
    if let Some(dir) = &config.default_image {
        let files = crate::image::ImageFiles::of_build(dir)?;
        crate::image::install(&db, data, "default", &files)?;
    }
    let (hosts, local) = match &replica {
        None => {
            let agent = local_host(&db, &config)?;
            let name = agent.host().name;
            (Arc::new(Hosts::with_local(&name, Arc::clone(&agent))), Some((name, agent)))
        }
        Some(_) => (Arc::new(Hosts::new()), None),
    };
    let cluster = Cluster::new(db.clone(), Arc::clone(&hosts));
    cluster.refresh()?;
    if let Some((_, agent)) = &local {
        let networks = crate::netsync::networks_with_peers(&db)?;
        prepare_networks(agent.as_ref(), &networks)?;
    }
    let reconciler = Reconciler::new(db.clone(), Arc::clone(&hosts));
    let on_ready = config.on_ready.take();
    let token_for_ready = token.clone();
    let mut state = AppState::new(data.clone(), db, hosts, cluster, Arc::clone(&reconciler), token);
    state.builder = config.image_builder.take();
    state.leadership = match &replica {
        None => Leadership::sole(local.as_ref().map_or("", |(name, _)| name.as_str())),
        Some(name) => Leadership::elect(name, &url, Arc::clone(state.db.store()), crate::leader::LEADER_TTL),
    };
    let state = Arc::new(state);
    let elected = Arc::clone(&state);
    state.leadership.spawn(move || {
        // What a leader that died mid-way left: moves half done, hosts it had not met.
        let _ = elected.cluster.refresh();
        crate::moves::settle_interrupted(&elected.db, &elected.hosts);
        crate::maintenance::resume(&elected);
        elected.reconciler.wake();
        elected.networks.wake();
    });
    reconciler.spawn(Arc::clone(&state.leadership));
    reconciler.spawn_watch(Arc::clone(&state.leadership));
    state.networks.spawn(Arc::clone(&state.leadership));
    crate::rebalance::spawn(Arc::clone(&state));
    crate::ha::spawn(Arc::clone(&state));
    if let Some(name) = &replica {
        crate::imagesync::spawn(Arc::clone(&state), name, &url);
        // Hosts that joined through another replica, and hosts removed there.
        let refreshing = Arc::clone(&state);
        let _ = std::thread::Builder::new().name("membership".into()).spawn(move || loop {
            std::thread::sleep(stratus_protocol::HEARTBEAT_EVERY);
            let _ = refreshing.cluster.refresh();
        });
    }
    if let Some((_, agent)) = local {
        spawn_warming(state.db.clone(), agent);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        eprintln!(
            "stratus {role}: ready at {url} (data in {}, token in {})",
            data.display(),
            data.join("token").display()
        );
        if let Some(work) = on_ready {
            let _ =
                std::thread::Builder::new().name("on-ready".into()).spawn(move || work(url, token_for_ready));
        }
        let leadership = Arc::clone(&state.leadership);
        axum::serve(listener, api::router(state)).with_graceful_shutdown(stop_signal()).await?;
        // Another replica takes over now rather than when the lease runs out.
        leadership.resign();
        eprintln!("stratus {role}: stopped; instances keep running and are adopted at the next start");
        Ok(())
    })
}

/// This machine's host recorded under another name (its hostname changed since): the
/// instances placed there are this host's, under its name now. A host that joined (it has a
/// credential) or never did (an invitation) is another machine and stays as it is.
fn adopt_renamed_host(db: &Db, host: &stratus_api::model::Host) -> Result<()> {
    for old in db.list::<stratus_api::model::Host>("/hosts/")? {
        let joined = db.store().get(&format!("/host-credentials/{}", old.name))?.is_some();
        let ours = old.address.is_empty() || old.address == host.address;
        if old.name == host.name || joined || old.seen_at == 0 || !ours {
            continue;
        }
        for instance in db.instances()?.into_iter().filter(|i| i.status.host == old.name) {
            db.update(
                &crate::db::instance_key(&instance.project, &instance.name),
                |i: &mut stratus_api::model::Instance| {
                    i.status.host = host.name.clone();
                    true
                },
            )?;
        }
        db.delete(&host_key(&old.name))?;
        eprintln!(
            "stratus serve: this host was called {} before; its instances are on {} now",
            old.name, host.name
        );
    }
    Ok(())
}

/// The store `spec` names: SQLite in `data` when none, or `etcd:ENDPOINTS`.
pub fn open_store(spec: Option<&str>, data: &Path) -> Result<Arc<dyn stratus_store::Store>> {
    match spec {
        None | Some("sqlite") => {
            let store = SqliteStore::open(&data.join("stratus.db")).context("opening the store")?;
            Ok(Arc::new(store))
        }
        Some(spec) => {
            let Some(endpoints) = spec.strip_prefix("etcd:") else {
                bail!("--store {spec}: use sqlite or etcd:http://HOST:2379[,http://HOST:2379...]");
            };
            let config =
                stratus_store::EtcdConfig::parse(endpoints).with_context(|| format!("--store {spec}"))?;
            let store = stratus_store::EtcdStore::connect(config).context("connecting to etcd")?;
            Ok(Arc::new(store))
        }
    }
}

/// This machine's host agent, named and addressed as `config` says, recorded in the store
/// (taking over the instances of its earlier name).
fn local_host(db: &Db, config: &ServeConfig) -> Result<Arc<dyn HostAgent>> {
    let mut local = LocalAgent::new(&config.data_dir, config.vmm_binary.clone());
    if let Some(name) = &config.host_name {
        local = local.named(name);
    }
    // Other hosts reach this one where the API listens (unless that is loopback only).
    let ip = config.listen.ip();
    if !ip.is_loopback() && !ip.is_unspecified() {
        local = local.with_address(&ip.to_string());
    }
    let agent: Arc<dyn HostAgent> = Arc::new(local);
    let host = agent.host();
    db.put(&host_key(&host.name), &host)?;
    adopt_renamed_host(db, &host)?;
    Ok(agent)
}

/// The API token every replica answers to: made by the first replica, kept in the store (and
/// copied to `path` for this machine's CLI).
fn shared_token(db: &Db, path: &Path) -> Result<String> {
    const KEY: &str = "/control/token";
    let made = format!("{}{}", stratus_api::model::new_id(), stratus_api::model::new_id());
    let store = db.store();
    // Create it unless it exists; whoever created it, read it back.
    let _ = store.txn(&stratus_store::Txn::new().expect(KEY, None).put(KEY, made.as_bytes()));
    let entry = store.get(KEY)?.context("the store lost the API token")?;
    let token = String::from_utf8(entry.value).context("the API token in the store is not text")?;
    write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

fn load_or_create_token(path: &Path) -> Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let token = text.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token = format!("{}{}", stratus_api::model::new_id(), stratus_api::model::new_id());
    write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Writes `url` and `token` for the CLI, keeping the file's other settings; a file that
/// points at another cloud is left alone (a second server, on another data directory or port,
/// must not take the CLI away from the user's main one): it says so instead. Returns whether
/// it wrote.
fn write_client_config(path: &Path, url: &str, token: &str) -> Result<bool> {
    let mut table: toml::Table =
        std::fs::read_to_string(path).ok().and_then(|t| t.parse().ok()).unwrap_or_default();
    let current = table.get("url").and_then(|v| v.as_str());
    if current == Some(url) && table.get("token").and_then(|v| v.as_str()) == Some(token) {
        return Ok(false);
    }
    if let Some(other) = current.filter(|other| *other != url) {
        eprintln!(
            "stratus serve: {} points the CLI at {other}; left as it is. For this server: --url {url} --token (its data directory's token file)",
            path.display()
        );
        return Ok(false);
    }
    table.insert("url".into(), url.into());
    table.insert("token".into(), token.into());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(path, table.to_string().as_bytes())?;
    eprintln!("stratus serve: wrote the CLI's address and token to {}", path.display());
    Ok(true)
}

fn ensure_default_network(db: &Db, config: &ServeConfig) -> Result<()> {
    if db.network(DEFAULT_PROJECT, "default")?.is_some() {
        return Ok(());
    }
    let subnet = Subnet::parse(&config.default_cidr)?;
    let network = Network {
        name: "default".into(),
        project: DEFAULT_PROJECT.into(),
        bridge: config.default_bridge.clone(),
        cidr: subnet.to_string(),
        gateway: subnet.gateway().to_string(),
        nat: true,
        created_at: now(),
        peers: Vec::new(),
    };
    db.put(&network_key(DEFAULT_PROJECT, "default"), &network)?;
    eprintln!("stratus: created network 'default' ({subnet} on bridge {})", network.bridge);
    Ok(())
}

/// Bridges for every network, and NAT; installs nftables when it is missing.
fn prepare_networks(agent: &dyn HostAgent, networks: &[Network]) -> Result<()> {
    let which_nft = std::process::Command::new("sh").args(["-c", "command -v nft"]).output();
    if !which_nft.is_ok_and(|o| o.status.success()) {
        eprintln!("stratus serve: installing nftables (for NAT)");
        let install = || {
            std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "nftables"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // A fresh machine's package lists may be missing or stale: update once and retry.
        let installed = install()
            || (std::process::Command::new("apt-get")
                .args(["update", "-qq"])
                .status()
                .is_ok_and(|s| s.success())
                && install());
        if !installed {
            eprintln!(
                "stratus serve: warning: could not install nftables; guests will not reach beyond this host"
            );
        }
    }
    if let Err(e) = agent.prepare_networks(networks) {
        // Bridges are needed; NAT alone failing leaves guests reachable from this host.
        if networks.iter().all(|n| stratus_agent::network::tap_exists(&n.bridge)) {
            eprintln!("stratus serve: warning: {e}");
        } else {
            return Err(e).context("setting up networks");
        }
    }
    Ok(())
}

/// Makes the warm snapshot of every image that lacks one (or has one of another VMM
/// version), on a thread of its own: launches boot cold until it is there.
fn spawn_warming(db: Db, agent: Arc<dyn HostAgent>) {
    let _ = std::thread::Builder::new().name("warm-images".into()).spawn(move || {
        for image in db.list::<Image>("/images/").unwrap_or_default() {
            if !stratus_agent::images::warm_is_current(&image) {
                let _ = crate::image::warm(&db, agent.as_ref(), &image);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_config_is_written_for_its_own_cloud_and_never_taken_from_another() {
        let dir = std::env::temp_dir().join(format!("stratus-client-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("config.toml");
        let read = || std::fs::read_to_string(&path).unwrap().parse::<toml::Table>().unwrap();
        // First start: written, private.
        assert!(write_client_config(&path, "http://127.0.0.1:7440", "main").unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // The same cloud with a new token: updated, other settings kept.
        let mut table = read();
        table.insert("output".into(), "json".into());
        std::fs::write(&path, table.to_string()).unwrap();
        assert!(write_client_config(&path, "http://127.0.0.1:7440", "rotated").unwrap());
        assert_eq!((read()["token"].as_str(), read()["output"].as_str()), (Some("rotated"), Some("json")));
        // Another server (another data directory, another port): the user's main cloud stays.
        assert!(!write_client_config(&path, "http://127.0.0.1:7441", "other").unwrap());
        assert_eq!(
            (read()["url"].as_str(), read()["token"].as_str()),
            (Some("http://127.0.0.1:7440"), Some("rotated"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
