//! The control plane of a cluster on simulated hosts: the real REST API, scheduler,
//! reconciler, membership (join tokens, credentials, liveness leases) and agent protocol
//! adapter, over [`SimAgent`]s instead of machines, on a real SQLite store. No KVM, no root:
//! these run in milliseconds to seconds on any machine. Each runs on both stores: SQLite, and
//! a real one-member etcd (skipped loudly where etcd cannot be installed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stratus_agent::images::{HostImages, HttpImageSource, ImageSource};
use stratus_api::client::{ApiClient, ClientError};
use stratus_api::model::{Host, Image, Instance, Network, DEFAULT_PROJECT};
use stratus_control::api::{self, AppState};
use stratus_control::cluster::Cluster;
use stratus_control::db::{image_key, network_key, Db};
use stratus_control::hosts::Hosts;
use stratus_control::reconciler::Reconciler;
use stratus_control::remote::RemoteHost;
use stratus_protocol::{Agent, HostInfo, SimAgent};
use stratus_store::etcd_server::{ensure_etcd, EtcdCluster};
use stratus_store::{SqliteStore, Store};

/// Which store the control plane keeps its state in.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Etcd,
}

/// Each test on both stores.
macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn sqlite() {
                super::$test(super::Backend::Sqlite)
            }
            #[test]
            fn etcd() {
                super::$test(super::Backend::Etcd)
            }
        }
    )*};
}

on_both_stores!(
    join_tokens_are_single_use_expiring_and_for_one_host,
    launches_spread_over_hosts_and_say_why,
    a_silent_host_goes_offline_and_takes_no_launches,
    every_host_gets_every_peer_and_one_away_gets_them_on_return,
    hosts_copy_image_files_from_the_control_plane_once,
    anti_affinity_groups_keep_members_on_different_hosts,
    stopped_instances_move_cold_with_their_disk,
    evacuate_moves_everything_off_and_restore_brings_it_back,
    consolidation_plans_then_empties_the_lightest_hosts,
    the_rebalancer_moves_load_from_a_busy_host_once_and_explains_it,
    failures_on_a_host_are_retried_and_crashes_restarted,
    hosts_with_instances_cannot_be_removed,
    moves_change_the_host_only_once_the_destination_runs_it,
    ha_instances_restart_on_another_host_when_theirs_fails,
    the_rebalancer_relieves_a_host_whose_guests_use_its_memory,
    an_image_is_replaced_only_when_asked_and_never_under_its_instances,
);

/// How fast a silent host goes offline here.
const LIVENESS: Duration = Duration::from_secs(2);

/// A control plane serving its API on a loopback port, with simulated hosts joined.
struct SimCloud {
    client: ApiClient,
    url: String,
    hosts: Vec<(String, Arc<SimAgent>)>,
    state: Arc<AppState>,
    _dir: TempDir,
    _etcd: Option<EtcdCluster>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl SimCloud {
    /// A control plane with no host of its own on `backend`, and `hosts` (name, MiB) joined;
    /// `None` (said loudly) when the backend cannot run here.
    fn new(test: &str, backend: Backend, hosts: &[(&str, u64)]) -> Option<SimCloud> {
        let dir = std::env::temp_dir().join(format!("stratus-sim-{test}-{backend:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (store, etcd): (Arc<dyn Store>, _) = match backend {
            Backend::Sqlite => (Arc::new(SqliteStore::open(&dir.join("store.db")).unwrap()), None),
            Backend::Etcd => {
                if let Err(why) = ensure_etcd() {
                    println!("SKIPPED: {test} on etcd: {why}");
                    return None;
                }
                let cluster = EtcdCluster::start(&dir.join("etcd"), 1).unwrap();
                (Arc::new(cluster.store("/sim").unwrap()), Some(cluster))
            }
        };
        let db = Db::new(store);
        let network = Network {
            name: "default".into(),
            project: DEFAULT_PROJECT.into(),
            bridge: "stratus0".into(),
            cidr: "10.210.0.0/24".into(),
            gateway: "10.210.0.1".into(),
            nat: true,
            created_at: 0,
            peers: Vec::new(),
        };
        db.put(&network_key(DEFAULT_PROJECT, "default"), &network).unwrap();
        let image = Image {
            name: "default".into(),
            project: DEFAULT_PROJECT.into(),
            kernel: "/sim/vmlinux".into(),
            initrd: None,
            rootfs: "/sim/rootfs.ext4".into(),
            cmdline: "console=ttyS0".into(),
            rootfs_bytes: 64 << 20,
            source: "sim".into(),
            created_at: 0,
            warm: None,
        };
        db.put(&image_key(DEFAULT_PROJECT, "default"), &image).unwrap();
        let registry = Arc::new(Hosts::new());
        let cluster = Cluster::new(db.clone(), Arc::clone(&registry)).with_liveness(LIVENESS);
        let reconciler = Reconciler::new(db.clone(), Arc::clone(&registry));
        let token = "test-token".to_string();
        let state = Arc::new(AppState::new(
            dir.clone(),
            db,
            registry,
            cluster,
            Arc::clone(&reconciler),
            token.clone(),
        ));
        reconciler.spawn(Arc::clone(&state.leadership));
        state.networks.spawn(Arc::clone(&state.leadership));
        stratus_control::rebalance::spawn(Arc::clone(&state));
        stratus_control::ha::spawn(Arc::clone(&state));
        let router = api::router(Arc::clone(&state));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, router).await.unwrap();
            });
        });
        let mut cloud = SimCloud {
            client: ApiClient::new(&url, &token),
            url: url.clone(),
            hosts: Vec::new(),
            state,
            _dir: TempDir(dir),
            _etcd: etcd,
        };
        for (name, memory_mib) in hosts {
            cloud.join(name, *memory_mib);
        }
        Some(cloud)
    }

    /// Invites and joins simulated host `name`, then keeps its heartbeats going.
    fn join(&mut self, name: &str, memory_mib: u64) {
        self.join_host(SimAgent::new(name, 2, memory_mib));
    }

    /// [`SimCloud::join`] of a host made already (one with the shared pool, say).
    fn join_host(&mut self, sim: SimAgent) {
        let name = sim.host().unwrap().name;
        let name = name.as_str();
        let sim = Arc::new(sim);
        let invitation: Value = self.client.post("/v1/hosts", &json!({ "name": name })).unwrap();
        let info = sim.host().unwrap();
        self.state.cluster.join(invitation["token"].as_str().unwrap(), &info).unwrap();
        // Joining connects over HTTP to the address it gave; this host answers in memory.
        self.state.cluster.attach(name, Arc::clone(&sim) as Arc<dyn Agent>);
        let (state, beating) = (Arc::clone(&self.state), Arc::clone(&sim));
        std::thread::spawn(move || loop {
            if let Ok(info) = beating.host() {
                let _ = state.cluster.heartbeat(&info);
            }
            std::thread::sleep(Duration::from_millis(300));
        });
        self.hosts.push((name.to_string(), sim));
    }

    fn sim(&self, name: &str) -> &SimAgent {
        &self.hosts.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn launch(&self, body: Value) -> Result<Instance, ClientError> {
        let accepted: Value = self.client.post("/v1/instances", &body)?;
        Ok(serde_json::from_value(accepted["instance"].clone()).unwrap())
    }

    fn instance(&self, name: &str) -> Instance {
        self.client.get(&format!("/v1/instances/{name}")).unwrap()
    }

    fn wait_state(&self, name: &str, state: &str) -> Instance {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let instance = self.instance(name);
            if instance.status.state.as_str() == state {
                return instance;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never got {state}: {instance:?}\n{}",
                self.events(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn events(&self, name: &str) -> String {
        let events: Vec<Value> = self.client.get(&format!("/v1/events?instance={name}")).unwrap();
        events.iter().map(|e| e["message"].as_str().unwrap_or_default().to_owned() + "\n").collect()
    }

    fn hosts(&self) -> Vec<Host> {
        self.client.get("/v1/hosts").unwrap()
    }
}

fn refused(result: Result<Value, ClientError>) -> String {
    match result {
        Err(ClientError::Api { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn join_tokens_are_single_use_expiring_and_for_one_host(backend: Backend) {
    let Some(cloud) = SimCloud::new("join", backend, &[]) else { return };
    let info = |name: &str| HostInfo {
        name: name.into(),
        address: "192.0.2.1:7441".into(),
        cpus: 2,
        memory_mib: 4096,
        allocatable_mib: 3072,
        hypervisor: "sim".into(),
        version: "test".into(),
        shared_pool: false,
    };
    let join =
        |token: &str, name: &str| cloud.state.cluster.join(token, &info(name)).map_err(|e| e.to_string());

    let invitation: Value = cloud.client.post("/v1/hosts", &json!({ "name": "h1" })).unwrap();
    let token = invitation["token"].as_str().unwrap();
    assert!(invitation["command"].as_str().unwrap().contains(&format!("--join-token {token} --name h1")));
    assert!(join("deadbeef.not-the-secret", "h1").unwrap_err().contains("unknown or already used"));
    let (id, _) = token.split_once('.').unwrap();
    assert!(join(&format!("{id}.wrong"), "h1").unwrap_err().contains("unknown or already used"));
    assert!(join(token, "h2").unwrap_err().contains("the token is for host 'h1', not 'h2'"));
    let credential = join(token, "h1").expect("a good token joins");
    assert!(join(token, "h1").unwrap_err().contains("unknown or already used"), "a token joins once");
    cloud.state.cluster.authenticate("h1", &credential).unwrap();
    assert!(cloud.state.cluster.authenticate("h1", "forged").is_err());
    assert!(refused(cloud.client.post("/v1/hosts", &json!({ "name": "h1" }))).contains("has joined already"));

    let short: Value = cloud.client.post("/v1/hosts", &json!({ "name": "h3", "ttl_secs": 1 })).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    assert!(join(short["token"].as_str().unwrap(), "h3").unwrap_err().contains("expired"));
    for bad in [
        json!({ "name": "Bad_Name" }),
        json!({ "name": "h4", "ttl_secs": 0 }),
        json!({ "name": "h4", "x": 1 }),
    ] {
        refused(cloud.client.post("/v1/hosts", &bad));
    }
}

fn launches_spread_over_hosts_and_say_why(backend: Backend) {
    let Some(cloud) = SimCloud::new("spread", backend, &[("h1", 4096), ("h2", 4096), ("h3", 8192)]) else {
        return;
    };
    for n in 0..6 {
        cloud.launch(json!({ "name": format!("web{n}") })).unwrap();
    }
    let mut placed = std::collections::BTreeMap::<String, usize>::new();
    for n in 0..6 {
        let instance = cloud.wait_state(&format!("web{n}"), "running");
        *placed.entry(instance.status.host.clone()).or_default() += 1;
    }
    // Spread by the share of memory left: the 8 GiB host takes more, every host takes some.
    assert_eq!(placed.len(), 3, "{placed:?}");
    assert!(placed["h3"] >= placed["h1"] && placed["h3"] >= placed["h2"], "{placed:?}");
    let running: usize = ["h1", "h2", "h3"].iter().map(|h| cloud.sim(h).running()).sum();
    assert_eq!(running, 6, "each instance runs once, on its host");
    assert!(
        cloud.events("web0").contains("placed on h3: 7.0 GiB free, spread weight"),
        "{}",
        cloud.events("web0")
    );

    // Named host, and pack: the fullest host that fits.
    assert_eq!(cloud.launch(json!({ "name": "pinned", "host": "h1" })).unwrap().status.host, "h1");
    let packed = cloud.launch(json!({ "name": "packed", "placement": "pack" })).unwrap();
    let hosts = cloud.hosts();
    let fullest = hosts.iter().filter(|h| h.name != packed.status.host).all(|h| {
        let chosen = hosts.iter().find(|c| c.name == packed.status.host).unwrap();
        (chosen.allocatable_mib - chosen.allocated_mib) <= (h.allocatable_mib - h.allocated_mib)
    });
    assert!(fullest, "pack chose {} among {hosts:?}", packed.status.host);
    let message = refused(cloud.client.post("/v1/instances", &json!({ "name": "huge", "memory_mib": 7000 })));
    assert!(message.contains("no host can take") && message.contains("h1 refused"), "{message}");
    let message = refused(cloud.client.post("/v1/instances", &json!({ "name": "lost", "host": "h9" })));
    assert!(message.contains("not part of the cluster"), "{message}");
}

fn a_silent_host_goes_offline_and_takes_no_launches(backend: Backend) {
    let Some(cloud) = SimCloud::new("offline", backend, &[("h1", 4096), ("h2", 4096)]) else { return };
    let web = cloud.launch(json!({ "name": "web", "host": "h2" })).unwrap();
    cloud.wait_state("web", "running");
    assert!(cloud.hosts().iter().all(|h| h.state == "online"), "{:?}", cloud.hosts());

    cloud.sim("h2").set_unreachable(true);
    let deadline = Instant::now() + LIVENESS * 5;
    while cloud.hosts().iter().find(|h| h.name == "h2").unwrap().state != "offline" {
        assert!(Instant::now() < deadline, "h2 stayed online: {:?}", cloud.hosts());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unreachable is not down: the instance (not ha) is not restarted anywhere, nor marked
    // failed; it shows lost, with the cause.
    std::thread::sleep(Duration::from_secs(3));
    let instance = cloud.instance("web");
    assert_eq!((instance.status.state.as_str(), instance.status.host.as_str()), ("lost", "h2"));
    assert!(instance.status.message.contains("host h2 failed"), "{instance:?}");
    for n in 0..3 {
        assert_eq!(cloud.launch(json!({ "name": format!("new{n}") })).unwrap().status.host, "h1");
    }
    assert!(cloud.events("new0").contains("h2 refused: offline"), "{}", cloud.events("new0"));

    cloud.sim("h2").set_unreachable(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cloud.hosts().iter().find(|h| h.name == "h2").unwrap().state != "online" {
        assert!(Instant::now() < deadline, "h2 never came back: {:?}", cloud.hosts());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Back, it is found running there.
    cloud.wait_state("web", "running");
    assert_eq!(cloud.sim("h2").running(), 1, "nothing was duplicated meanwhile: {web:?}");
}

/// The underlay addresses each network on host `name` joins, once every network has them all
/// from `hosts` (waits up to ten seconds for it).
fn wait_peers(cloud: &SimCloud, name: &str, hosts: &[&str]) {
    let records = cloud.hosts();
    let address = |h: &str| records.iter().find(|r| r.name == h).unwrap().address.clone();
    let mut wanted: Vec<String> =
        hosts.iter().map(|h| address(h).split(':').next().unwrap().to_owned()).collect();
    wanted.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let networks = cloud.sim(name).networks();
        if !networks.is_empty() && networks.iter().all(|n| n.peers == wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never got peers {wanted:?}: {networks:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn every_host_gets_every_peer_and_one_away_gets_them_on_return(backend: Backend) {
    // Three joins back to back: each host's VXLAN must end up with all three.
    let Some(mut cloud) = SimCloud::new("peers", backend, &[("h1", 4096), ("h2", 4096), ("h3", 4096)]) else {
        return;
    };
    for host in ["h1", "h2", "h3"] {
        wait_peers(&cloud, host, &["h1", "h2", "h3"]);
    }
    // A host away while another joins gets the new peer when it answers again.
    cloud.sim("h3").set_unreachable(true);
    cloud.join("h4", 4096);
    for host in ["h1", "h2", "h4"] {
        wait_peers(&cloud, host, &["h1", "h2", "h3", "h4"]);
    }
    assert_eq!(cloud.sim("h3").networks()[0].peers.len(), 3, "h3 was unreachable");
    cloud.sim("h3").set_unreachable(false);
    wait_peers(&cloud, "h3", &["h1", "h2", "h3", "h4"]);
}

fn hosts_copy_image_files_from_the_control_plane_once(backend: Backend) {
    let Some(cloud) = SimCloud::new("images", backend, &[]) else { return };
    // An image whose files are where the control plane keeps images.
    let dir = cloud.state.data_dir.join("images").join("tiny-0123abcd");
    std::fs::create_dir_all(&dir).unwrap();
    let kernel: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let rootfs: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(7) % 253) as u8).collect();
    std::fs::write(dir.join("vmlinux"), &kernel).unwrap();
    std::fs::write(dir.join("rootfs.ext4"), &rootfs).unwrap();
    std::fs::write(cloud.state.data_dir.join("token"), "secret\n").unwrap();
    let image = Image {
        name: "tiny".into(),
        project: DEFAULT_PROJECT.into(),
        kernel: dir.join("vmlinux").display().to_string(),
        initrd: None,
        rootfs: dir.join("rootfs.ext4").display().to_string(),
        cmdline: "console=ttyS0".into(),
        rootfs_bytes: 3 << 20,
        source: "test".into(),
        created_at: 0,
        warm: None,
    };
    cloud.state.db.put(&image_key(DEFAULT_PROJECT, "tiny"), &image).unwrap();
    let invitation: Value = cloud.client.post("/v1/hosts", &json!({ "name": "h9" })).unwrap();
    let sim = Arc::new(SimAgent::new("h9", 2, 4096));
    let credential =
        cloud.state.cluster.join(invitation["token"].as_str().unwrap(), &sim.host().unwrap()).unwrap();
    let source = |credential: &str| HttpImageSource {
        replicas: vec![cloud.url.clone()],
        host: "h9".into(),
        credential: credential.into(),
    };
    let scratch = cloud.state.data_dir.join("h9");
    std::fs::create_dir_all(&scratch).unwrap();

    // Refused: a forged credential, a file no image on record has, paths out of the images.
    let forged = source("forged").fetch("tiny-0123abcd", "vmlinux", &scratch.join("x")).unwrap_err();
    assert!(forged.contains("wrong credential"), "{forged}");
    for (dir, file) in
        [("tiny-0123abcd", "initrd"), ("other-1", "vmlinux"), ("..", "token"), ("tiny-0123abcd", "..")]
    {
        let refused = source(&credential).fetch(dir, file, &scratch.join("x"));
        assert!(refused.is_err(), "{dir}/{file} was served");
    }
    assert!(!scratch.join("x").exists() || std::fs::read(scratch.join("x")).unwrap().is_empty());

    // A host's copy: made once, whole, and what it boots from.
    let agent = Arc::new(RemoteHost::new("h9", sim as Arc<dyn Agent>));
    let images = HostImages::new(&scratch.join("images"), Arc::new(source(&credential)), agent);
    let network = cloud.state.db.network(DEFAULT_PROJECT, "default").unwrap().unwrap();
    let mut said = Vec::new();
    let local = images.local(&image, &network, &mut |m| said.push(m)).unwrap();
    assert!(local.rootfs.starts_with(&scratch.display().to_string()), "{local:?}");
    assert_eq!(std::fs::read(&local.kernel).unwrap(), kernel);
    assert_eq!(std::fs::read(&local.rootfs).unwrap(), rootfs);
    assert!(said.iter().any(|m| m.contains("image tiny copied here")), "{said:?}");
    said.clear();
    assert_eq!(images.local(&image, &network, &mut |m| said.push(m)).unwrap(), local);
    assert!(said.is_empty(), "copied twice: {said:?}");
    assert!(cloud.events("").contains("host h9: copying image file tiny-0123abcd/rootfs.ext4 (3 MiB)"));
}

fn anti_affinity_groups_keep_members_on_different_hosts(backend: Backend) {
    // h3 has room for everything: without the group, spread would put all three there.
    let Some(cloud) = SimCloud::new("affinity", backend, &[("h1", 4096), ("h2", 4096), ("h3", 65536)]) else {
        return;
    };
    let mut placed = Vec::new();
    for name in ["web1", "web2", "web3"] {
        let instance = cloud.launch(json!({ "name": name, "anti_affinity": "web" })).unwrap();
        placed.push(instance.status.host.clone());
        cloud.wait_state(name, "running");
    }
    placed.sort();
    assert_eq!(placed, ["h1", "h2", "h3"], "one member per host");
    let said = cloud.events("web2");
    assert!(said.contains("refused: web1 of the same anti-affinity group runs there"), "{said}");
    // A fourth has nowhere to go, and says why for each host.
    let refusal =
        refused(cloud.client.post("/v1/instances", &json!({ "name": "web4", "anti_affinity": "web" })));
    for host in ["h1", "h2", "h3"] {
        assert!(refusal.contains(&format!("{host} refused: ")), "{refusal}");
    }
    assert!(refusal.contains("of the same anti-affinity group runs there"), "{refusal}");
    // Other groups and instances without one are not kept out.
    assert_eq!(cloud.launch(json!({ "name": "db1", "anti_affinity": "db" })).unwrap().status.host, "h3");
    cloud.launch(json!({ "name": "plain" })).unwrap();
    // A move onto another member's host is refused; a member deleted frees its host.
    let web1 = cloud.instance("web1");
    let other = ["h1", "h2", "h3"].into_iter().find(|h| *h != web1.status.host).unwrap();
    let moved = refused(cloud.client.post("/v1/instances/web1/move", &json!({ "to": other })));
    assert!(moved.contains("anti-affinity group"), "{moved}");
    let freed = cloud.instance("web2").status.host;
    cloud.client.delete("/v1/instances/web2").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let web4 = loop {
        match cloud.launch(json!({ "name": "web4", "anti_affinity": "web" })) {
            Ok(instance) => break instance,
            Err(e) => assert!(Instant::now() < deadline, "web4 never placed: {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(web4.status.host, freed);
    for bad in ["Bad_Group", ""] {
        let body = json!({ "name": "web5", "anti_affinity": bad });
        if bad.is_empty() {
            cloud.launch(body).unwrap();
        } else {
            refused(cloud.client.post("/v1/instances", &body));
        }
    }
}

fn stopped_instances_move_cold_with_their_disk(backend: Backend) {
    let Some(cloud) = SimCloud::new("cold", backend, &[("h1", 4096), ("h2", 4096)]) else { return };
    cloud.launch(json!({ "name": "db", "host": "h1" })).unwrap();
    cloud.wait_state("db", "running");
    let _: Value = cloud.client.post("/v1/instances/db/stop", &json!({})).unwrap();
    let stopped = cloud.wait_state("db", "stopped");
    let disk = |host: &str| {
        let sim = cloud.sim(host);
        let layout = sim.disk_layout(&stopped.id)?;
        let chunk = sim.read_disk(&stopped.id, 0, 4096)?;
        Ok::<_, stratus_protocol::AgentError>((layout, chunk.data))
    };
    let before = disk("h1").unwrap();
    let move_to = |to: &str| -> Result<Value, ClientError> {
        let accepted: Value = cloud.client.post("/v1/instances/db/move", &json!({ "to": to }))?;
        let op = accepted["operation"]["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let op: Value = cloud.client.get(&format!("/v1/operations/{op}")).unwrap();
            if op["state"] != "running" {
                return Ok(op);
            }
            assert!(Instant::now() < deadline, "the move never ended");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Stopped, it moves cold: the same disk on h2, none left on h1.
    let done = move_to("h2").unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    let moved = cloud.instance("db");
    assert_eq!((moved.status.host.as_str(), moved.status.state.as_str()), ("h2", "stopped"));
    assert_eq!(disk("h2").unwrap(), before, "the disk changed on its way");
    assert_eq!(cloud.sim("h1").observe(&stopped.id, 0).unwrap().phase, stratus_protocol::Phase::Absent);
    assert!(cloud.events("db").contains("moved to h2 stopped"), "{}", cloud.events("db"));
    // Started, it runs there.
    let _: Value = cloud.client.post("/v1/instances/db/start", &json!({})).unwrap();
    assert_eq!(cloud.wait_state("db", "running").status.host, "h2");
    assert_eq!(cloud.sim("h2").running(), 1);

    // A source that cannot be reached mid-way leaves it where it was, disk and all, and
    // nothing half-copied on the destination.
    let _: Value = cloud.client.post("/v1/instances/db/stop", &json!({})).unwrap();
    cloud.wait_state("db", "stopped");
    cloud.sim("h2").set_unreachable(true);
    let failed = move_to("h1").unwrap();
    cloud.sim("h2").set_unreachable(false);
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("h2"), "{failed}");
    let stayed = cloud.instance("db");
    assert_eq!((stayed.status.host.as_str(), stayed.status.moving.as_str()), ("h2", ""));
    assert_eq!(disk("h2").unwrap(), before);
    assert_eq!(cloud.sim("h1").observe(&stopped.id, 0).unwrap().phase, stratus_protocol::Phase::Absent);
}

/// Waits for operation `op` to end; the operation.
fn wait_operation(cloud: &SimCloud, op: &Value) -> Value {
    let id = op["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let op: Value = cloud.client.get(&format!("/v1/operations/{id}")).unwrap();
        if op["state"] != "running" {
            return op;
        }
        assert!(Instant::now() < deadline, "operation {id} never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn evacuate_moves_everything_off_and_restore_brings_it_back(backend: Backend) {
    let Some(cloud) = SimCloud::new("evacuate", backend, &[("h1", 4096), ("h2", 4096), ("h3", 4096)]) else {
        return;
    };
    for name in ["a", "b", "c", "d"] {
        cloud.launch(json!({ "name": name, "host": "h2" })).unwrap();
    }
    cloud.launch(json!({ "name": "elsewhere", "host": "h1" })).unwrap();
    for name in ["a", "b", "c", "d", "elsewhere"] {
        cloud.wait_state(name, "running");
    }
    let _: Value = cloud.client.post("/v1/instances/d/stop", &json!({})).unwrap();
    cloud.wait_state("d", "stopped");

    // Evacuate: h2 takes no new instances, the running ones leave live, the stopped one cold.
    let op: Value = cloud.client.post("/v1/hosts/h2/evacuate", &json!({})).unwrap();
    let done = wait_operation(&cloud, &op);
    assert_eq!(done["state"], "succeeded", "{done}");
    let h2 = cloud.hosts().into_iter().find(|h| h.name == "h2").unwrap();
    assert!(h2.maintenance, "{h2:?}");
    for name in ["a", "b", "c", "d"] {
        let instance = cloud.instance(name);
        assert!(["h1", "h3"].contains(&instance.status.host.as_str()), "{name} on {}", instance.status.host);
        assert_eq!(instance.status.home, "h2");
    }
    assert_eq!(cloud.instance("d").status.state.as_str(), "stopped");
    assert_eq!(cloud.sim("h2").running(), 0);
    assert_eq!(cloud.sim("h1").running() + cloud.sim("h3").running(), 4, "a, b, c and elsewhere");
    assert!(cloud.events("").contains("host h2 evacuated: a on h"), "{}", cloud.events(""));
    let launched = cloud.launch(json!({ "name": "new" })).unwrap();
    assert_ne!(launched.status.host, "h2", "a host in maintenance took a launch");
    // Again: nothing left to move, and it says so.
    let again: Value = cloud.client.post("/v1/hosts/h2/evacuate", &json!({})).unwrap();
    assert_eq!(wait_operation(&cloud, &again)["state"], "succeeded");
    assert!(cloud.events("").contains("host h2 evacuated: nothing to move"));

    // Restore: out of maintenance, everything that left comes back, the rest stays put.
    let op: Value = cloud.client.post("/v1/hosts/h2/restore", &json!({})).unwrap();
    let done = wait_operation(&cloud, &op);
    assert_eq!(done["state"], "succeeded", "{done}");
    for name in ["a", "b", "c", "d"] {
        let instance = cloud.instance(name);
        assert_eq!((instance.status.host.as_str(), instance.status.home.as_str()), ("h2", ""), "{name}");
    }
    assert_eq!(cloud.instance("elsewhere").status.host, "h1");
    assert!(!cloud.hosts().into_iter().find(|h| h.name == "h2").unwrap().maintenance);
    assert_eq!(cloud.sim("h2").running(), 3);

    // An instance with nowhere to go stays, and the evacuation says which and why.
    cloud.launch(json!({ "name": "g1", "host": "h1", "anti_affinity": "g" })).unwrap();
    cloud.launch(json!({ "name": "g3", "host": "h3", "anti_affinity": "g" })).unwrap();
    cloud.launch(json!({ "name": "g2", "host": "h2", "anti_affinity": "g" })).unwrap();
    cloud.wait_state("g2", "running");
    let op: Value = cloud.client.post("/v1/hosts/h2/evacuate", &json!({ "keep_stopped": true })).unwrap();
    let done = wait_operation(&cloud, &op);
    assert_eq!(done["state"], "failed", "{done}");
    let why = done["error"].as_str().unwrap();
    assert!(why.contains("g2 stayed") && why.contains("anti-affinity"), "{why}");
    assert!(!why.contains("d stayed"), "the stopped d is kept, not failed: {why}");
    assert_eq!(cloud.instance("g2").status.host, "h2");
    assert_eq!(cloud.instance("d").status.host, "h2", "kept: --keep-stopped");
    let missing: Result<Value, _> = cloud.client.post("/v1/hosts/h9/evacuate", &json!({}));
    assert!(refused(missing).contains("not found"));
}

fn consolidation_plans_then_empties_the_lightest_hosts(backend: Backend) {
    let Some(cloud) = SimCloud::new("consolidate", backend, &[("h1", 4096), ("h2", 4096), ("h3", 4096)])
    else {
        return;
    };
    for (name, host) in [("a", "h1"), ("b", "h1"), ("c", "h2"), ("d", "h3")] {
        cloud.launch(json!({ "name": name, "host": host })).unwrap();
    }
    for name in ["a", "b", "c", "d"] {
        cloud.wait_state(name, "running");
    }
    let _: Value = cloud.client.post("/v1/instances/d/stop", &json!({})).unwrap();
    cloud.wait_state("d", "stopped");

    // The plan: h3 (only a stopped instance) and h2 (one) are the lightest; both fit on h1.
    let plan: Value = cloud.client.get("/v1/consolidation").unwrap();
    assert_eq!(plan["emptied"], json!(["h3", "h2"]), "{plan}");
    let moves: Vec<(String, String)> = plan["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["instance"].as_str().unwrap().to_owned(), m["to"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(moves, [("d".to_owned(), "h1".to_owned()), ("c".to_owned(), "h1".to_owned())]);
    assert_eq!(plan["kept"][0]["why"], "takes d, c", "{plan}");
    // Showing it changes nothing.
    assert_eq!(cloud.instance("c").status.host, "h2");
    assert!(cloud.hosts().iter().all(|h| !h.maintenance));

    // Doing it: the emptied hosts go into maintenance and stay; everything runs on h1.
    let op: Value = cloud.client.post("/v1/consolidation", &json!({})).unwrap();
    let done = wait_operation(&cloud, &op);
    assert_eq!(done["state"], "succeeded", "{done}");
    for name in ["a", "b", "c", "d"] {
        assert_eq!(cloud.instance(name).status.host, "h1", "{name}");
    }
    assert_eq!(cloud.instance("d").status.state.as_str(), "stopped", "moved cold, not started");
    assert_eq!((cloud.sim("h1").running(), cloud.sim("h2").running(), cloud.sim("h3").running()), (3, 0, 0));
    let in_maintenance: Vec<String> =
        cloud.hosts().into_iter().filter(|h| h.maintenance).map(|h| h.name).collect();
    assert_eq!(in_maintenance, ["h2", "h3"]);
    let events = cloud.events("");
    assert!(
        events.contains("consolidation (emptying h3, h2, which may then be switched off): c on h1; d on h1"),
        "{events}"
    );
    let launched = cloud.launch(json!({ "name": "new" })).unwrap();
    assert_eq!(launched.status.host, "h1", "an emptied host took a launch");

    // Again: one usable host left, nothing to do, and the plan says why.
    let plan: Value = cloud.client.get("/v1/consolidation").unwrap();
    assert_eq!(plan["emptied"], json!([]), "{plan}");
    assert_eq!(plan["kept"][0]["why"], "the last host left");
    assert_eq!(plan["skipped"].as_array().unwrap().len(), 2, "{plan}");
}

fn the_rebalancer_moves_load_from_a_busy_host_once_and_explains_it(backend: Backend) {
    let Some(cloud) = SimCloud::new("rebalance", backend, &[("h1", 4096), ("h2", 4096), ("h3", 4096)]) else {
        return;
    };
    // Off while the guests get busy; a short window so the test need not wait five minutes.
    let settings = json!({ "rebalance.enabled": false, "rebalance.window_s": 2 });
    let config: Value = cloud.client.patch("/v1/config", &settings).unwrap();
    assert_eq!(
        (config["rebalance"]["enabled"].as_bool(), config["rebalance"]["window_s"].as_u64()),
        (Some(false), Some(2))
    );
    let refused: Result<Value, _> = cloud.client.patch("/v1/config", &json!({ "rebalance.window_s": 1 }));
    assert!(matches!(refused, Err(ClientError::Api { status: 400, .. })), "{refused:?}");
    for (name, host) in [("a", "h1"), ("b", "h1"), ("c", "h1"), ("d", "h2")] {
        cloud.launch(json!({ "name": name, "host": host })).unwrap();
    }
    // h1 at 95% of its 2 CPUs, h2 at 25%, h3 idle.
    for (name, cpus) in [("a", 1.0), ("b", 0.8), ("c", 0.1), ("d", 0.5)] {
        SimAgent::set_cpu_load(&cloud.wait_state(name, "running").id, cpus);
    }
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(cloud.instance("a").status.host, "h1", "the rebalancer moved while turned off");

    let _: Value = cloud.client.patch("/v1/config", &json!({ "rebalance.enabled": "true" })).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The event follows the move's end, so wait for it rather than for the new host.
    while !cloud.events("a").contains("rebalance:") {
        assert!(Instant::now() < deadline, "a never moved: {}", cloud.events(""));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cloud.instance("a").status.host, "h3");
    let events = cloud.events("a");
    assert!(
        events.contains("rebalance: h1 CPU 9")
            && events.contains("over 2 s, h3 0%: moved a (using 100% of a CPU) to h3"),
        "{events}"
    );
    // Then calm: h1 45%, h2 25%, h3 50% are within the threshold; nothing moves back or on.
    std::thread::sleep(Duration::from_secs(6));
    let moved: Vec<(String, String)> =
        ["a", "b", "c", "d"].iter().map(|n| (n.to_string(), cloud.instance(n).status.host)).collect();
    assert_eq!(
        moved,
        [("a", "h3"), ("b", "h1"), ("c", "h1"), ("d", "h2")].map(|(n, h)| (n.to_string(), h.to_string()))
    );
    let all: String = ["a", "b", "c", "d"].iter().map(|n| cloud.events(n)).collect();
    assert_eq!(all.matches("rebalance:").count(), 1, "{all}");
    // The hosts show the use the rebalancer measured: h2 runs d, half a CPU of its two.
    let h2 = cloud.hosts().into_iter().find(|h| h.name == "h2").unwrap();
    let shown = h2.cpu_percent.expect("h2's CPU use measured");
    assert!((20.0..30.0).contains(&shown), "h2 at {shown}%");
}

fn failures_on_a_host_are_retried_and_crashes_restarted(backend: Backend) {
    let Some(cloud) = SimCloud::new("faults", backend, &[("h1", 4096)]) else { return };
    cloud.sim("h1").fail_starts(1, "disk: no space left on device");
    cloud.launch(json!({ "name": "web" })).unwrap();
    let running = cloud.wait_state("web", "running");
    let events = cloud.events("web");
    assert!(
        events.contains("start failed: disk: no space left on device; retrying in 2 s (attempt 2/3)"),
        "{events}"
    );

    cloud.sim("h1").kill(&running.id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cloud.events("web").contains("VMM process is gone; restarting it") {
        assert!(Instant::now() < deadline, "{}", cloud.events("web"));
        std::thread::sleep(Duration::from_millis(100));
    }
    cloud.wait_state("web", "running");
    assert_eq!(cloud.sim("h1").running(), 1);

    // A guest that powers itself off stays off (the default policy restarts failures only).
    cloud.sim("h1").power_off(&running.id);
    let stopped = cloud.wait_state("web", "stopped");
    assert!(stopped.status.message.contains("guest powered off"), "{stopped:?}");
}

fn hosts_with_instances_cannot_be_removed(backend: Backend) {
    let Some(cloud) = SimCloud::new("remove", backend, &[("h1", 4096), ("h2", 4096)]) else { return };
    cloud.launch(json!({ "name": "web", "host": "h2" })).unwrap();
    cloud.wait_state("web", "running");
    let message = match cloud.client.delete("/v1/hosts/h2") {
        Err(ClientError::Api { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(message.contains("still has instances: web"), "{message}");

    cloud.client.delete("/v1/instances/web").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cloud.client.get::<Instance>("/v1/instances/web").is_ok() {
        assert!(Instant::now() < deadline, "web was never deleted: {}", cloud.events("web"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cloud.sim("h2").instances().unwrap().is_empty(), "the host holds nothing of it");
    cloud.client.delete("/v1/hosts/h2").unwrap();
    assert_eq!(cloud.hosts().iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["h1"]);
}

fn moves_change_the_host_only_once_the_destination_runs_it(backend: Backend) {
    let Some(cloud) = SimCloud::new("move", backend, &[("h1", 4096), ("h2", 4096), ("h3", 4096)]) else {
        return;
    };
    let web = cloud.launch(json!({ "name": "web", "host": "h1" })).unwrap();
    cloud.wait_state("web", "running");
    let wait_op = |accepted: &Value| {
        let id = accepted["operation"]["id"].as_str().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let op: Value = cloud.client.get(&format!("/v1/operations/{id}")).unwrap();
            if op["state"] != "running" {
                return op;
            }
            assert!(Instant::now() < deadline, "{op}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let accepted: Value = cloud.client.post("/v1/instances/web/move", &json!({ "to": "h2" })).unwrap();
    assert_eq!(accepted["instance"]["status"]["moving"], "h2");
    assert_eq!(wait_op(&accepted)["state"], "succeeded");
    let moved = cloud.wait_state("web", "running");
    assert_eq!((moved.status.host.as_str(), moved.status.ip.as_str()), ("h2", web.status.ip.as_str()));
    assert_eq!((cloud.sim("h1").running(), cloud.sim("h2").running()), (0, 1), "one copy, on h2");
    assert!(cloud.events("web").contains("moved to h2 live"), "{}", cloud.events("web"));

    // A failed send leaves the guest where it was, the destination's copy removed.
    cloud.sim("h2").fail_starts(1, "connection reset by peer");
    let accepted: Value = cloud.client.post("/v1/instances/web/move", &json!({ "to": "h3" })).unwrap();
    let op = wait_op(&accepted);
    assert_eq!(op["state"], "failed", "{op}");
    let stayed = cloud.instance("web");
    assert_eq!((stayed.status.host.as_str(), stayed.status.state.as_str()), ("h2", "running"));
    assert!(stayed.status.moving.is_empty());
    let events = cloud.events("web");
    assert!(
        events.contains("move to h3 failed: migrating to tcp:127.0.0.1:")
            && events.contains(": connection reset by peer; still running on h2"),
        "{events}"
    );
    assert!(cloud.sim("h3").instances().unwrap().is_empty(), "the half-made copy on h3 is gone");

    // No move to where it is, to an unknown host, or of what does not run; the scheduler picks.
    for (body, why) in [
        (json!({ "to": "h2" }), "runs on h2 already"),
        (json!({ "to": "h9" }), "not part of the cluster"),
        (json!({ "to": "x", "y": 1 }), "unknown field"),
    ] {
        let message = refused(cloud.client.post("/v1/instances/web/move", &body));
        assert!(message.contains(why), "{message}");
    }
    let accepted: Value = cloud.client.post("/v1/instances/web/move", &json!({})).unwrap();
    assert_eq!(wait_op(&accepted)["state"], "succeeded");
    assert_ne!(cloud.instance("web").status.host, "h2");
}

fn ha_instances_restart_on_another_host_when_theirs_fails(backend: Backend) {
    let Some(mut cloud) = SimCloud::new("ha", backend, &[]) else { return };
    cloud.join_host(SimAgent::new("s1", 2, 4096).with_shared_pool());
    cloud.join_host(SimAgent::new("s2", 2, 4096).with_shared_pool());
    // The emptiest host, but without the pool: spread would pick it for anything else.
    cloud.join_host(SimAgent::new("l3", 2, 16384));
    let refused_pool = cloud.launch(json!({ "name": "x", "ha": true, "pool": "local" })).unwrap_err();
    assert!(
        matches!(&refused_pool, ClientError::Api { status: 422, message } if message.contains("shared pool")),
        "{refused_pool:?}"
    );
    let refused_host = cloud.launch(json!({ "name": "x", "ha": true, "host": "l3" })).unwrap_err();
    assert!(refused_host.to_string().contains("l3 refused: no shared storage pool"), "{refused_host}");

    cloud.launch(json!({ "name": "db", "ha": true, "host": "s1" })).unwrap();
    cloud.launch(json!({ "name": "web", "host": "s1" })).unwrap();
    cloud.launch(json!({ "name": "spare", "ha": true })).unwrap();
    for name in ["db", "web", "spare"] {
        cloud.wait_state(name, "running");
    }
    let db = cloud.instance("db");
    assert_eq!((db.spec.pool, db.spec.ha), (stratus_api::model::Pool::Shared, true));
    assert_eq!(cloud.instance("spare").status.host, "s2", "an ha instance went to a host without the pool");

    // s1 stops answering: once its lease and the margin have passed, db starts on s2 (l3 has
    // no pool), and web, whose disk is on s1, is lost with the cause.
    cloud.sim("s1").set_unreachable(true);
    let failed = Instant::now();
    let deadline = failed + Duration::from_secs(20);
    while cloud.instance("db").status.host != "s2" {
        assert!(Instant::now() < deadline, "db never left s1: {}", cloud.events("db"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Never before the lease (2 s here) and the margin.
    assert!(failed.elapsed() >= LIVENESS + stratus_control::ha::MARGIN, "{:?}", failed.elapsed());
    cloud.wait_state("db", "running");
    let events = cloud.events("db");
    assert!(
        events.contains("host s1 failed (no heartbeat for")
            && events.contains("restarting it on s2 from its disk on the shared pool"),
        "{events}"
    );
    let web = cloud.wait_state("web", "lost");
    assert!(web.status.message.contains("not ha"), "{web:?}");
    assert_eq!(cloud.instance("spare").status.host, "s2");

    // s1 is back: web is found running there, and s1 forgets its copy of db.
    cloud.sim("s1").set_unreachable(false);
    cloud.wait_state("web", "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cloud.sim("s1").running() != 1 {
        assert!(Instant::now() < deadline, "s1 kept db: {}", cloud.events("db"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cloud
        .events("db")
        .contains("host s1 is back and has forgotten its copy (it was restarted on s2)"));
    assert!(cloud.events("web").contains("host s1 is back, and it runs there"));
    assert_eq!(cloud.instance("db").status.host, "s2");
    assert_eq!(cloud.sim("s2").running(), 2);
}

fn the_rebalancer_relieves_a_host_whose_guests_use_its_memory(backend: Backend) {
    let Some(cloud) = SimCloud::new("memory", backend, &[("h1", 4096), ("h2", 4096)]) else { return };
    let _: Value = cloud
        .client
        .patch("/v1/config", &json!({ "rebalance.enabled": false, "rebalance.window_s": 2 }))
        .unwrap();
    // Three guests using all of h1's 3 GiB for instances (a simulated guest uses what it has).
    for name in ["a", "b", "c"] {
        cloud.launch(json!({ "name": name, "host": "h1", "memory_mib": 1024 })).unwrap();
    }
    for name in ["a", "b", "c"] {
        cloud.wait_state(name, "running");
    }
    let _: Value = cloud.client.patch("/v1/config", &json!({ "rebalance.enabled": true })).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = |cloud: &SimCloud| ["a", "b", "c"].iter().map(|n| cloud.events(n)).collect::<String>();
    while !said(&cloud).contains("rebalance:") {
        assert!(Instant::now() < deadline, "nothing moved: {}", said(&cloud));
        std::thread::sleep(Duration::from_millis(200));
    }
    let events = said(&cloud);
    assert!(events.contains("rebalance: h1 memory 100% used over 2 s, h2 0%: moved"), "{events}");
    let on_h2 = ["a", "b", "c"].iter().filter(|n| cloud.instance(n).status.host == "h2").count();
    assert_eq!(on_h2, 1);
    // h1 at 67% is under the mark, and h2 at 33% is not worth another move: calm.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(said(&cloud).matches("rebalance:").count(), 1, "{}", said(&cloud));
}

fn an_image_is_replaced_only_when_asked_and_never_under_its_instances(backend: Backend) {
    let Some(cloud) = SimCloud::new("replace", backend, &[("h1", 4096)]) else { return };
    let import = |replace: bool| {
        refused(
            cloud
                .client
                .post("/v1/images", &json!({ "name": "default", "rootfs": "up", "replace": replace })),
        )
    };
    assert!(import(false).contains("image 'default' exists"), "{}", import(false));
    cloud.launch(json!({ "name": "web" })).unwrap();
    assert!(import(true).contains("image 'default' is used by web"), "{}", import(true));
}
