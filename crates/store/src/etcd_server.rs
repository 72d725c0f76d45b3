//! Real etcd members started from Debian's `etcd-server` package, on loopback ports of their
//! own with data in a scratch directory: for tests of the etcd backend and of control-plane
//! replicas, and for trying a cluster on one machine. Members die with the [`EtcdCluster`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EtcdConfig, EtcdStore, StoreError};

/// Where Debian puts the server.
const ETCD: &str = "etcd";

/// Whether an `etcd` binary can be run (installing it first if we are root and it is missing,
/// with apt, waiting for dpkg's lock). `Err` says why not, for a test's `SKIPPED:` line.
pub fn ensure_etcd() -> Result<(), String> {
    let runs = || Command::new(ETCD).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if runs().is_ok_and(|status| status.success()) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("etcd is not installed (apt-get install etcd-server) and we are not root".into());
    }
    let status = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends", "etcd-server"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .map_err(|error| format!("running apt-get: {error}"))?;
    if !status.success() || !runs().is_ok_and(|status| status.success()) {
        return Err(format!("apt-get install etcd-server failed ({status})"));
    }
    Ok(())
}

/// One member: its process, name and ports.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A cluster of `etcd` processes on 127.0.0.1, removed (processes and data) when dropped.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `size` members with fast elections (250 ms) and pre-vote, data under `dir`
    /// (created; emptied first), and waits until the cluster takes writes.
    pub fn start(dir: &Path, size: usize) -> Result<EtcdCluster, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|error| format!("creating {}: {error}", dir.display()))?;
        let members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial: Vec<String> =
            members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        let mut cluster = EtcdCluster { dir: dir.to_path_buf(), members };
        let initial = initial.join(",");
        for index in 0..size {
            cluster.spawn(index, &initial)?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match EtcdStore::connect(cluster.config()).and_then(|store| {
                use crate::Store;
                store.put("health", b"ok").map(drop)
            }) {
                Ok(()) => return Ok(cluster),
                Err(error) if Instant::now() > deadline => {
                    return Err(format!("etcd did not come up within 30 s: {error}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn spawn(&mut self, index: usize, initial: &str) -> Result<(), String> {
        let member = &self.members[index];
        let data = self.dir.join(&member.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", member.name)))
            .map_err(|error| format!("creating the etcd log: {error}"))?;
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let child = Command::new(ETCD)
            .args(["--name", &member.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", initial, "--initial-cluster-state", "new"])
            .args(["--election-timeout", "250", "--heartbeat-interval", "25", "--pre-vote=true"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|error| error.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|error| format!("starting etcd: {error}"))?;
        self.members[index].child = Some(child);
        Ok(())
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect()
    }

    /// A store configuration for this cluster (every member, the default namespace).
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig::parse(&self.endpoints().join(",")).expect("loopback endpoints parse")
    }

    /// A store on this cluster with its keys under `namespace`.
    pub fn store(&self, namespace: &str) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect(self.config().with_namespace(namespace))
    }

    /// Kills member `index` with SIGKILL, as a crash would.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).map(|a| a.port()).unwrap_or(0)
}
