//! The cloud's commands: `serve`, and the client commands that talk only to its REST API
//! (`launch`, `list`, `show`, `exec`, `console`, `stop`, `start`, `restart`, `delete`,
//! `image list|delete`, `network list|create|delete`, `host list`, `events`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use stratus_api::client::{ApiClient, ClientError};
use stratus_api::model::{
    ClusterConfig, ConsolidationPlan, Event, Host, Image, Instance, InstanceState, Network, Operation,
    OperationState, CONFIG_KEYS,
};

/// Where the API is and who we are.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// API address (default: from ~/.config/stratus/config.toml or STRATUS_URL).
    #[arg(long, global = true)]
    url: Option<String>,
    /// API token (default: from the config file or STRATUS_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

impl Connection {
    fn client(&self) -> Result<ApiClient> {
        Ok(ApiClient::configured(self.url.clone(), self.token.clone())?)
    }
}

/// `stratus serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where the store, images and instance disks live.
    #[arg(long, default_value = "/var/lib/stratus")]
    data_dir: PathBuf,
    /// Address of the REST API and dashboard.
    #[arg(long, default_value = "127.0.0.1:7440")]
    listen: SocketAddr,
    /// Subnet of the default network (first start only).
    #[arg(long, default_value = "10.210.0.0/24")]
    network_cidr: String,
    /// Bridge of the default network (first start only).
    #[arg(long, default_value = "stratus0")]
    bridge: String,
    /// Do not build or install images: no default image, and no builds through the API.
    #[arg(long)]
    no_default_image: bool,
    /// Once the server answers, launch an instance of this name (unless it exists) and say
    /// how to reach it: the quickest way from a fresh machine to a running VM.
    #[arg(long, value_name = "NAME")]
    launch: Option<String>,
    /// This machine's name as a host of the cluster (default: its hostname).
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,
    /// Where to write the CLI's configuration (address and token).
    #[arg(long, value_name = "PATH")]
    client_config: Option<PathBuf>,
    /// Where the state lives: sqlite (DATA/stratus.db, the default) or
    /// etcd:http://HOST:2379[,http://HOST:2379...].
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
}

#[derive(Args)]
pub struct ControlArgs {
    /// Where this replica keeps its image files and a copy of the API token.
    #[arg(long, default_value = "/var/lib/stratus-control")]
    data_dir: PathBuf,
    /// Address of the REST API and dashboard.
    #[arg(long, default_value = "127.0.0.1:7440")]
    listen: SocketAddr,
    /// Where the state lives: etcd:http://HOST:2379[,http://HOST:2379...] (shared by every
    /// replica), or sqlite (DATA/stratus.db: one replica only).
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// This replica's name in the election (default: HOSTNAME-PORT).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The URL the other replicas reach this one at, for passing requests to the leader and
    /// copying image files (default: http://LISTEN; needed when listening on 0.0.0.0).
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
    /// Subnet of the default network (when the store has none yet).
    #[arg(long, default_value = "10.210.0.0/24")]
    network_cidr: String,
    /// Bridge of the default network on every host (when the store has none yet).
    #[arg(long, default_value = "stratus0")]
    bridge: String,
    /// Do not build or install images: no default image, and no builds through the API.
    #[arg(long)]
    no_default_image: bool,
    /// Where to write the CLI's configuration (address and token).
    #[arg(long, value_name = "PATH")]
    client_config: Option<PathBuf>,
}

/// Runs one replica of the control plane (no host of its own) until Ctrl-C.
pub fn control(args: ControlArgs) -> Result<i32> {
    let default_image = if args.no_default_image {
        None
    } else {
        eprintln!("stratus control: checking the default image (the first build takes ~10 minutes)");
        Some(crate::image::build("default")?.dir)
    };
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), args.listen.port())
    });
    stratus_control::server::serve(stratus_control::server::ServeConfig {
        data_dir: args.data_dir,
        host_name: None,
        store: args.store,
        listen: args.listen,
        vmm_binary: std::env::current_exe().context("finding the stratus binary")?,
        default_image,
        default_cidr: args.network_cidr,
        default_bridge: args.bridge,
        client_config: args.client_config,
        on_ready: None,
        image_builder: None,
        replica: Some(name),
        advertise: args.advertise,
    })?;
    Ok(0)
}

/// Runs the cloud on this machine until Ctrl-C.
pub fn serve(args: ServeArgs) -> Result<i32> {
    let default_image = if args.no_default_image {
        None
    } else {
        eprintln!("stratus serve: checking the default image (the first build takes ~10 minutes)");
        Some(crate::image::build("default")?.dir)
    };
    let config = stratus_control::server::ServeConfig {
        data_dir: args.data_dir,
        host_name: args.host_name,
        store: args.store,
        listen: args.listen,
        vmm_binary: std::env::current_exe().context("finding the stratus binary")?,
        default_image,
        default_cidr: args.network_cidr,
        default_bridge: args.bridge,
        client_config: Some(args.client_config.unwrap_or_else(stratus_api::client::config_path)),
        image_builder: (!args.no_default_image).then(|| -> stratus_control::image::ImageBuilder {
            std::sync::Arc::new(|recipe: &str, progress: &mut dyn FnMut(&str)| {
                crate::image::build_with_progress(recipe, progress).map(|image| image.dir)
            })
        }),
        on_ready: args.launch.map(|name| -> stratus_control::server::OnReady {
            Box::new(move |url, token| {
                if let Err(e) = launch_first(&url, &token, &name) {
                    eprintln!("stratus serve: launching {name}: {e:#}");
                }
            })
        }),
        replica: None,
        advertise: None,
    };
    stratus_control::server::serve(config)?;
    Ok(0)
}

/// `serve --launch NAME`: launches NAME with the defaults unless it exists, and says how to
/// reach it.
fn launch_first(url: &str, token: &str, name: &str) -> Result<()> {
    let client = ApiClient::new(url, token);
    let instance = match client.get::<Instance>(&format!("/v1/instances/{name}")) {
        Ok(existing) => existing,
        Err(ClientError::Api { status: 404, .. }) => {
            let since = now_ms().saturating_sub(1);
            let accepted: Accepted = client.post("/v1/instances", &json!({ "name": name }))?;
            eprintln!("stratus serve: launching {name} (address {})", accepted.instance.status.ip);
            let op = follow(&client, &accepted.operation, since)?;
            if op.state == OperationState::Failed {
                bail!("{}", op.error);
            }
            client.get(&format!("/v1/instances/{name}"))?
        }
        Err(e) => return Err(e.into()),
    };
    let me = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "stratus".into());
    let ip = &instance.status.ip;
    eprintln!(
        "stratus serve: {name} is {} at {ip}. In another terminal:\n    {me} exec {name} -- uname -a\n    ping {ip}\n    {me} console {name}    (Ctrl-A then x leaves)\n    {me} list\nDashboard: {url}/ (the token is in {})",
        instance.status.state.as_str(),
        stratus_api::client::config_path().display()
    );
    Ok(())
}

/// `stratus launch`.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Instance name (lowercase letters, digits, '-').
    name: String,
    /// Image to boot.
    #[arg(long, default_value = "default")]
    image: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory (e.g. 256M, 1G).
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Root disk size (e.g. 2G).
    #[arg(long, default_value = "1G")]
    disk: String,
    /// Network to attach to.
    #[arg(long, default_value = "default")]
    network: String,
    /// Restart policy when the VMM exits on its own.
    #[arg(long, default_value = "on-failure", value_parser = ["always", "on-failure", "never"])]
    restart: String,
    /// Run on this host (see `stratus host list`) instead of where the scheduler places it.
    #[arg(long)]
    host: Option<String>,
    /// How the scheduler picks a host: spread (most memory free) or pack (fill hosts up).
    #[arg(long, default_value = "spread", value_parser = ["spread", "pack"])]
    placement: String,
    /// Keep it off every host where another instance of this group runs (replicas of one
    /// service, so one host's failure takes only one of them).
    #[arg(long, value_name = "GROUP")]
    anti_affinity: Option<String>,
    /// Restart it on another host if its host fails: its disk goes on the shared pool
    /// (hosts whose agents run with --shared-pool), and it runs only on such hosts.
    #[arg(long)]
    ha: bool,
    /// Where its disk lives: local (the host's own storage) or shared (the pool every host
    /// mounts: live moves copy no disk). The default is shared with --ha, else local.
    #[arg(long, value_parser = ["local", "shared"])]
    pool: Option<String>,
    /// Return once the request is accepted instead of waiting for the guest.
    #[arg(long)]
    no_wait: bool,
}

/// Commands on one instance by name.
#[derive(Args, Debug)]
pub struct NameArg {
    /// Instance name.
    name: String,
    /// Return once the request is accepted.
    #[arg(long)]
    no_wait: bool,
}

/// `stratus exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Instance name.
    name: String,
    /// Seconds the command may run; then it and what it started are killed (exit code 137).
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    timeout: u64,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `stratus image ...` (API side).
#[derive(Subcommand, Debug)]
pub enum ImageApi {
    /// List the images the server has.
    List,
    /// Delete an image no instance uses.
    Delete {
        /// Image name.
        name: String,
    },
    /// Have the server build an image from a recipe (`default`, `debian`), install it and make
    /// its warm snapshot; shows the build's steps.
    Create {
        /// Image name.
        name: String,
        /// Recipe to build (default: the name).
        #[arg(long)]
        recipe: Option<String>,
        /// Return once the request is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Import an image from files here, uploaded to the server: a raw root filesystem (ext4)
    /// or a root filesystem tarball (booted with the default image's init, busybox and guest
    /// agent, which the import adds), with a kernel (default: the default image's).
    Import {
        /// Image name.
        name: String,
        /// Kernel (ELF vmlinux or bzImage); the default image's when absent.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Root filesystem image (raw ext4).
        #[arg(long, conflicts_with = "tarball", required_unless_present = "tarball")]
        rootfs: Option<PathBuf>,
        /// Root filesystem tarball (.tar, .tar.gz, .tar.xz, ...).
        #[arg(long)]
        tarball: Option<PathBuf>,
        /// Initial ramdisk.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line (launches add root=, address and hostname).
        #[arg(long)]
        cmdline: Option<String>,
        /// Replace an image of that name (refused while instances use it).
        #[arg(long)]
        replace: bool,
    },
}

/// `stratus network ...`.
#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// List networks.
    List,
    /// Create a network: a bridge with a subnet, NATed to the host's uplink.
    Create {
        /// Network name.
        name: String,
        /// Subnet, e.g. 10.211.0.0/24.
        #[arg(long)]
        cidr: String,
        /// No NAT: guests reach only this host and each other.
        #[arg(long)]
        no_nat: bool,
    },
    /// Delete a network no instance uses.
    Delete {
        /// Network name.
        name: String,
    },
}

/// `stratus host ...`.
#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Hosts with their state, capacity and allocation.
    List,
    /// One host in detail.
    Show {
        /// Host name.
        name: String,
    },
    /// Invite a host into the cluster: prints a one-time join token and the command that
    /// joins (run it on the new host, with the address the control plane reaches it at).
    Add {
        /// The new host's name (lowercase letters, digits, '-').
        name: String,
        /// How long the token is good for, in seconds (default an hour, at most a day).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
    },
    /// Take a host out of the cluster (refused while instances are placed there).
    #[command(alias = "rm")]
    Remove {
        /// Host name.
        name: String,
    },
    /// Maintenance: the host takes no new instances, and every instance on it moves to
    /// another host (running ones live, stopped ones cold), two at a time, each placed by the
    /// scheduler. Safe to run again; `host restore` undoes it.
    Evacuate {
        /// Host name.
        name: String,
        /// Leave stopped instances on the host.
        #[arg(long)]
        keep_stopped: bool,
        /// Return once the request is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// End a host's maintenance and bring back the instances its evacuation moved off.
    Restore {
        /// Host name.
        name: String,
        /// Return once the request is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show what a policy would do, without doing it. `consolidate`: the moves that pack the
    /// instances onto as few hosts as fit (memory first, at most 4 vCPUs per CPU, groups kept
    /// apart), the hosts it would empty (to switch off), and why each other host stays.
    Plan {
        /// The policy.
        #[arg(value_enum)]
        policy: PlanPolicy,
    },
    /// Consolidate: carry out `host plan consolidate` as it stands now. The hosts it empties go
    /// into maintenance first and stay there (`host restore` brings one back); each instance
    /// moves live (stopped ones cold), two at a time.
    Consolidate {
        /// Return once the request is accepted.
        #[arg(long)]
        no_wait: bool,
    },
}

/// `stratus config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Every setting with its value (defaults included).
    Show,
    /// Set one or more settings, all or none: `stratus config set rebalance.enabled=false`.
    /// Keys: rebalance.enabled (true/false, on by default), rebalance.window_s (seconds of
    /// measured CPU use a decision looks at, 300), rebalance.threshold_percent (points of CPU
    /// use between the busiest and the idlest host that start a move, 25),
    /// rebalance.min_gain_percent (points a move must narrow that gap by, 10),
    /// rebalance.cooldown_s (seconds a moved instance stays put, 1800), rebalance.max_moves
    /// (moves per round, 2), rebalance.memory_percent (percent of a host's memory its guests
    /// may use, measured, before one moves off, 90).
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
}

/// `stratus config ...`.
pub fn config(conn: &Connection, command: ConfigCommand) -> Result<i32> {
    let client = conn.client()?;
    let config: ClusterConfig = match command {
        ConfigCommand::Show => client.get("/v1/config")?,
        ConfigCommand::Set { settings } => {
            let mut changes = serde_json::Map::new();
            for setting in settings {
                let Some((key, value)) = setting.split_once('=') else {
                    bail!("'{setting}' is not KEY=VALUE (e.g. rebalance.enabled=false)");
                };
                changes.insert(key.trim().to_owned(), Value::String(value.trim().to_owned()));
            }
            client.patch("/v1/config", &Value::Object(changes))?
        }
    };
    if conn.output == Output::Json {
        print_json(&config)?;
        return Ok(0);
    }
    let value = serde_json::to_value(&config)?;
    let rows: Vec<Vec<String>> = CONFIG_KEYS
        .iter()
        .map(|(key, meaning)| {
            let (section, field) = key.split_once('.').unwrap_or(("", key));
            vec![key.to_string(), value[section][field].to_string(), meaning.to_string()]
        })
        .collect();
    print_table(&["KEY", "VALUE", "MEANING"], &rows);
    Ok(0)
}

/// The policies `stratus host plan` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanPolicy {
    /// Pack the instances onto as few hosts as fit.
    Consolidate,
}

/// `stratus agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The control plane's URL, as `stratus serve` or `stratus control` listens (several
    /// replicas: their URLs separated by commas).
    #[arg(long, value_name = "URL")]
    control: String,
    /// The token from `stratus host add NAME` (needed once; the credential is kept).
    #[arg(long, value_name = "TOKEN")]
    join_token: Option<String>,
    /// This host's name in the cluster (as given to `stratus host add`).
    #[arg(long)]
    name: String,
    /// The address the control plane reaches this agent at: IP or IP:PORT (port 7441 if none).
    #[arg(long)]
    address: String,
    /// Listen here instead of on the address (e.g. 0.0.0.0:7441).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where instances, their disks and the host's credential live.
    #[arg(long, default_value = "/var/lib/stratus-agent")]
    data_dir: PathBuf,
    /// Simulate the host: run no VMM, report guests running this many milliseconds after
    /// their order (for tests and scale runs of the control plane).
    #[arg(long, value_name = "BOOT_MS")]
    simulate: Option<u64>,
    /// The cluster's shared storage pool, as this host mounts it (an NFS mount, say: every
    /// host's path to the same directory). `--ha` instances keep their disks there and may
    /// run only on hosts that have it. Their VMMs stop on their own when this agent's
    /// heartbeats have not gone through for 70% of the lease (10 s): the control plane then
    /// restarts them on another host, and two copies never write one disk.
    #[arg(long, value_name = "DIR")]
    shared_pool: Option<PathBuf>,
}

/// Runs the host agent until Ctrl-C; instances keep running after it stops (those on the
/// shared pool until their fence runs out: a few seconds).
pub fn agent(args: AgentArgs) -> Result<i32> {
    stratus_agent::daemon::run_agent(stratus_agent::daemon::AgentConfig {
        control: args.control,
        join_token: args.join_token,
        name: args.name,
        address: args.address,
        listen: args.listen,
        data_dir: args.data_dir,
        vmm_binary: std::env::current_exe().context("finding the stratus binary")?,
        simulate: args.simulate.map(std::time::Duration::from_millis),
        shared_pool: args.shared_pool,
    })?;
    Ok(0)
}

fn mib(text: &str, what: &str) -> Result<u64> {
    let bytes = crate::size::parse(text).map_err(|e| anyhow::anyhow!("--{what}: {e}"))?;
    if bytes % (1 << 20) != 0 {
        bail!("--{what}: {text} is not a whole number of MiB");
    }
    Ok(bytes >> 20)
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows as aligned columns under `header`.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn age(since: u64) -> String {
    let secs = stratus_api::model::now().saturating_sub(since);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn state_of(i: &Instance) -> String {
    let state = i.status.state.as_str();
    use stratus_api::model::InstanceState;
    if i.status.message.is_empty() || !matches!(i.status.state, InstanceState::Error | InstanceState::Lost) {
        state.to_owned()
    } else {
        format!("{state}: {}", i.status.message)
    }
}

/// Follows an operation, printing the instance's events as they come, until it finishes.
fn follow(client: &ApiClient, op: &Operation, since_ms: u64) -> Result<Operation> {
    let mut after = since_ms;
    let started = Instant::now();
    loop {
        let done: Operation = client.get(&format!("/v1/operations/{}/wait?timeout=1", op.id))?;
        let events: Vec<Event> = client.get(&format!("/v1/events?instance={}&after={after}", op.instance))?;
        for e in events {
            after = after.max(e.time_ms);
            eprintln!("  [{:5.1}s] {}", started.elapsed().as_secs_f64(), e.message);
        }
        if done.state != OperationState::Running {
            return Ok(done);
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(serde::Deserialize)]
struct Accepted {
    operation: Operation,
    instance: Instance,
}

/// Waits for `accepted` unless told not to; the exit code.
fn finish(
    client: &ApiClient,
    accepted: Accepted,
    since_ms: u64,
    no_wait: bool,
    done_line: impl Fn(&Instance) -> String,
) -> Result<i32> {
    if no_wait || accepted.operation.state != OperationState::Running {
        if accepted.operation.state == OperationState::Failed {
            bail!("{}", accepted.operation.error);
        }
        eprintln!(
            "{}: {} accepted (operation {})",
            accepted.instance.name, accepted.operation.kind, accepted.operation.id
        );
        return Ok(0);
    }
    let op = follow(client, &accepted.operation, since_ms)?;
    if op.state == OperationState::Failed {
        bail!("{} {}: {}", op.kind, op.instance, op.error);
    }
    let instance = client.get::<Instance>(&format!("/v1/instances/{}", op.instance));
    match instance {
        Ok(i) => println!("{}", done_line(&i)),
        Err(ClientError::Api { status: 404, .. }) => println!("{}: deleted", op.instance),
        Err(e) => return Err(e.into()),
    }
    Ok(0)
}

/// `stratus launch`.
pub fn launch(conn: &Connection, args: LaunchArgs) -> Result<i32> {
    let client = conn.client()?;
    let body = json!({
        "name": args.name,
        "image": args.image,
        "cpus": args.cpus,
        "memory_mib": mib(&args.memory, "memory")?,
        "disk_mib": mib(&args.disk, "disk")?,
        "network": args.network,
        "restart": args.restart,
        "host": args.host,
        "placement": args.placement,
        "anti_affinity": args.anti_affinity,
        "ha": args.ha,
        "pool": args.pool,
    });
    let since = now_ms().saturating_sub(1);
    let accepted: Accepted = client.post("/v1/instances", &body)?;
    eprintln!(
        "Launching {} ({} vCPU, {}, address {}) on host {}",
        args.name, args.cpus, args.memory, accepted.instance.status.ip, accepted.instance.status.host
    );
    finish(&client, accepted, since, args.no_wait, |i| {
        format!(
            "{} is running at {} ({} boot, guest ready in {:.1} s)",
            i.name,
            i.status.ip,
            i.status.boot,
            i.status.boot_ms as f64 / 1e3
        )
    })
}

/// `stratus move`.
#[derive(Args, Debug)]
pub struct MoveArgs {
    /// Instance name.
    name: String,
    /// The host to move it to; the scheduler picks one when not given.
    #[arg(long)]
    to: Option<String>,
    /// Return once the request is accepted.
    #[arg(long)]
    no_wait: bool,
}

/// `stratus move NAME [--to HOST]`: live migration to another host.
pub fn move_instance(conn: &Connection, args: MoveArgs) -> Result<i32> {
    let client = conn.client()?;
    let since = now_ms().saturating_sub(1);
    let accepted: Accepted =
        client.post(&format!("/v1/instances/{}/move", args.name), &json!({ "to": args.to }))?;
    let live = accepted.instance.status.state == InstanceState::Running;
    eprintln!(
        "Moving {} {} from {} to {}",
        args.name,
        if live { "live" } else { "stopped (copying its disk)" },
        accepted.instance.status.host,
        accepted.instance.status.moving
    );
    finish(&client, accepted, since, args.no_wait, |i| match live {
        true => format!("{} runs on {} at {} (same address and disk)", i.name, i.status.host, i.status.ip),
        false => format!("{} is on {}, stopped (same address and disk)", i.name, i.status.host),
    })
}

/// `stratus stop|start|restart|delete NAME`.
pub fn lifecycle(conn: &Connection, action: &str, args: NameArg) -> Result<i32> {
    let client = conn.client()?;
    let since = now_ms().saturating_sub(1);
    let accepted: Accepted = if action == "delete" {
        let value = client.delete(&format!("/v1/instances/{}", args.name))?.unwrap_or(Value::Null);
        serde_json::from_value(value).context("decoding the API's answer")?
    } else {
        client.post(&format!("/v1/instances/{}/{action}", args.name), &json!({}))?
    };
    finish(&client, accepted, since, args.no_wait, |i| format!("{}: {}", i.name, state_of(i)))
}

/// `stratus list`.
pub fn list(conn: &Connection) -> Result<i32> {
    let instances: Vec<Instance> = conn.client()?.get("/v1/instances")?;
    if conn.output == Output::Json {
        print_json(&instances)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                state_of(i),
                i.status.host.clone(),
                i.status.ip.clone(),
                i.spec.cpus.to_string(),
                format!("{}M", i.spec.memory_mib),
                age(i.created_at),
            ]
        })
        .collect();
    print_table(&["NAME", "STATE", "HOST", "IP", "CPUS", "MEMORY", "AGE"], &rows);
    Ok(0)
}

/// `stratus show NAME`.
pub fn show(conn: &Connection, name: &str) -> Result<i32> {
    let client = conn.client()?;
    let instance: Instance = client.get(&format!("/v1/instances/{name}"))?;
    if conn.output == Output::Json {
        print_json(&instance)?;
        return Ok(0);
    }
    let s = &instance.status;
    println!("name:     {}", instance.name);
    println!("id:       {}", instance.id);
    println!("state:    {} (wanted: {:?})", state_of(&instance), instance.desired);
    println!("host:     {}", s.host);
    println!("address:  {} ({})", s.ip, s.mac);
    println!("image:    {}", instance.spec.image);
    println!(
        "size:     {} vCPU, {} MiB memory, {} MiB disk",
        instance.spec.cpus, instance.spec.memory_mib, instance.spec.disk_mib
    );
    let pool = match instance.spec.pool {
        stratus_api::model::Pool::Local => "local (on its host)",
        stratus_api::model::Pool::Shared => "shared (every host with the pool reaches it)",
    };
    println!(
        "disk:     {pool}{}",
        if instance.spec.ha { "; ha: restarted elsewhere if its host fails" } else { "" }
    );
    if s.boot_ms > 0 {
        println!("boot:     {} in {:.1} s", s.boot, s.boot_ms as f64 / 1e3);
    }
    println!("created:  {} ago", age(instance.created_at));
    let events: Vec<Event> = client.get(&format!("/v1/events?instance={name}"))?;
    println!("events:");
    for e in events.iter().rev().take(10).rev() {
        println!("  {} {:5} {}", age(e.time_ms / 1000), e.level, e.message);
    }
    Ok(0)
}

/// `stratus exec NAME -- COMMAND...`: the command's output and exit code are ours.
pub fn exec(conn: &Connection, args: ExecArgs) -> Result<i32> {
    let client = conn.client()?;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Standard input goes along when it is not a terminal (a pipe or a file).
    // SAFETY: isatty only inspects the descriptor.
    let mut stdin = Vec::new();
    if unsafe { libc::isatty(0) } != 1 {
        std::io::stdin().read_to_end(&mut stdin).context("reading standard input")?;
    }
    let answer: Value = client.post_within(
        &format!("/v1/instances/{}/exec", args.name),
        &json!({"command": args.command, "stdin": b64.encode(stdin), "timeout_secs": args.timeout}),
        Duration::from_secs(args.timeout) + Duration::from_secs(90),
    )?;
    if answer.get("timed_out").and_then(Value::as_bool) == Some(true) {
        eprintln!("stratus: {} ran past its {} s and was killed (--timeout)", args.command[0], args.timeout);
    }
    let field = |name: &str| -> Result<Vec<u8>> {
        Ok(b64.decode(answer.get(name).and_then(|v| v.as_str()).unwrap_or_default())?)
    };
    std::io::stdout().write_all(&field("stdout")?)?;
    std::io::stderr().write_all(&field("stderr")?)?;
    Ok(answer.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(1) as i32)
}

/// `stratus console NAME`: the serial console; Ctrl-A then `x` detaches.
pub fn console(conn: &Connection, name: &str) -> Result<i32> {
    let client = conn.client()?;
    let mut socket = client.console(name)?;
    socket.get_ref().set_read_timeout(Some(Duration::from_millis(20)))?;
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let terminal = stratus_vmm::console::RawTerminal::enable(stdin.as_fd());
    if terminal.is_some() {
        eprint!("Connected to {name}'s console; Ctrl-A then x detaches.\r\n");
    }
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            // An empty message says standard input ended.
            if tx.send(buf[..n].to_vec()).is_err() || n == 0 {
                return;
            }
        }
        let _ = tx.send(Vec::new());
    });
    let mut escape = false;
    let mut out = std::io::stdout();
    // Input from a pipe or file: once it ends, give the guest a moment to answer, then leave.
    let mut leave_at: Option<Instant> = None;
    loop {
        if leave_at.is_some_and(|t| Instant::now() >= t) {
            return Ok(0);
        }
        match socket.read() {
            Ok(tungstenite::Message::Binary(data)) => {
                out.write_all(&data)?;
                out.flush()?;
            }
            Ok(tungstenite::Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        while let Ok(bytes) = rx.try_recv() {
            if bytes.is_empty() {
                if terminal.is_none() {
                    leave_at.get_or_insert(Instant::now() + Duration::from_secs(2));
                }
                continue;
            }
            let mut send = Vec::new();
            for b in bytes {
                if terminal.is_some() && escape {
                    escape = false;
                    if b == b'x' {
                        drop(terminal);
                        eprintln!("\nDetached from {name}.");
                        return Ok(0);
                    }
                    if b != 0x01 {
                        send.push(0x01);
                    }
                } else if terminal.is_some() && b == 0x01 {
                    escape = true;
                    continue;
                }
                send.push(b);
            }
            if !send.is_empty() {
                socket.send(tungstenite::Message::Binary(send.into()))?;
            }
        }
    }
    drop(terminal);
    eprintln!("\nThe console of {name} closed.");
    Ok(0)
}

/// `stratus image list|delete`.
pub fn image(conn: &Connection, command: ImageApi) -> Result<i32> {
    let client = conn.client()?;
    match command {
        ImageApi::List => {
            let images: Vec<Image> = client.get("/v1/images")?;
            if conn.output == Output::Json {
                print_json(&images)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        format!("{}M", i.rootfs_bytes >> 20),
                        age(i.created_at),
                        i.kernel.clone(),
                    ]
                })
                .collect();
            print_table(&["NAME", "ROOTFS", "AGE", "KERNEL"], &rows);
        }
        ImageApi::Delete { name } => {
            client.delete(&format!("/v1/images/{name}"))?;
            println!("image {name} deleted");
        }
        ImageApi::Create { name, recipe, no_wait } => {
            let since = now_ms().saturating_sub(1);
            let recipe = recipe.unwrap_or_else(|| name.clone());
            let op: Operation = client.post("/v1/images/build", &json!({"recipe": recipe, "name": name}))?;
            if no_wait {
                eprintln!("image {name}: build accepted (operation {})", op.id);
                return Ok(0);
            }
            let op = follow(&client, &op, since)?;
            if op.state == OperationState::Failed {
                bail!("building image {name}: {}", op.error);
            }
            println!("image {name} ready");
        }
        ImageApi::Import { name, kernel, rootfs, tarball, initrd, cmdline, replace } => {
            // Refused before anything is uploaded, if it will be.
            if !replace && client.get::<Image>(&format!("/v1/images/{name}")).is_ok() {
                bail!("image '{name}' exists: import under another name, or give --replace");
            }
            // Each file goes up first; the import names the uploads.
            let mut uploaded = serde_json::Map::new();
            for (what, path) in
                [("kernel", kernel), ("rootfs", rootfs), ("tarball", tarball), ("initrd", initrd)]
            {
                let Some(path) = path else { continue };
                let upload = format!("{name}-{what}");
                let file =
                    std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                eprintln!("uploading {} ({:.1} MiB) as {upload}...", path.display(), size as f64 / 1048576.0);
                client.upload(&upload, file, size)?;
                uploaded.insert(what.into(), Value::String(upload));
            }
            uploaded.insert("name".into(), Value::String(name.clone()));
            uploaded.insert("cmdline".into(), cmdline.map_or(Value::Null, Value::String));
            uploaded.insert("replace".into(), Value::Bool(replace));
            let image: Image = client.post("/v1/images", &Value::Object(uploaded))?;
            println!("image {} imported ({} MiB root filesystem)", image.name, image.rootfs_bytes >> 20);
        }
    }
    Ok(0)
}

/// `stratus network list|create|delete`.
pub fn network(conn: &Connection, command: NetworkCommand) -> Result<i32> {
    let client = conn.client()?;
    match command {
        NetworkCommand::List => {
            let networks: Vec<Network> = client.get("/v1/networks")?;
            if conn.output == Output::Json {
                print_json(&networks)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = networks
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.cidr.clone(),
                        n.gateway.clone(),
                        n.bridge.clone(),
                        if n.nat { "yes" } else { "no" }.into(),
                    ]
                })
                .collect();
            print_table(&["NAME", "SUBNET", "GATEWAY", "BRIDGE", "NAT"], &rows);
        }
        NetworkCommand::Create { name, cidr, no_nat } => {
            let network: Network =
                client.post("/v1/networks", &json!({"name": name, "cidr": cidr, "nat": !no_nat}))?;
            println!("network {} created: {} on bridge {}", network.name, network.cidr, network.bridge);
        }
        NetworkCommand::Delete { name } => {
            client.delete(&format!("/v1/networks/{name}"))?;
            println!("network {name} deleted");
        }
    }
    Ok(0)
}

/// `stratus host list|show|add|remove`.
pub fn host(conn: &Connection, command: HostCommand) -> Result<i32> {
    let client = conn.client()?;
    match command {
        HostCommand::List => {
            let hosts: Vec<Host> = client.get("/v1/hosts")?;
            if conn.output == Output::Json {
                print_json(&hosts)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = hosts
                .iter()
                .map(|h| {
                    vec![
                        h.name.clone(),
                        if h.address.is_empty() { "(local)".into() } else { h.address.clone() },
                        if h.maintenance { format!("{} (maintenance)", h.state) } else { h.state.clone() },
                        if h.seen_at == 0 { "never".into() } else { format!("{} ago", age(h.seen_at)) },
                        h.hypervisor.clone(),
                        format!("{}/{}", h.allocated_cpus, h.cpus),
                        h.cpu_percent.map_or("-".to_string(), |p| format!("{p:.0}%")),
                        format!("{}M/{}M", h.allocated_mib, h.allocatable_mib),
                        h.instances.to_string(),
                        if h.shared_pool { "shared" } else { "-" }.into(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "ADDRESS",
                    "STATE",
                    "SEEN",
                    "KVM",
                    "VCPUS",
                    "CPU USE",
                    "MEMORY",
                    "INSTANCES",
                    "POOL",
                ],
                &rows,
            );
        }
        HostCommand::Show { name } => {
            let host: Host = client.get(&format!("/v1/hosts/{name}"))?;
            print_json(&host)?;
        }
        HostCommand::Add { name, ttl } => {
            let answer: serde_json::Value =
                client.post("/v1/hosts", &json!({ "name": name, "ttl_secs": ttl }))?;
            if conn.output == Output::Json {
                print_json(&answer)?;
                return Ok(0);
            }
            let expires =
                answer["expires_at"].as_u64().unwrap_or(0).saturating_sub(stratus_api::model::now());
            println!("Join token for host {name} (single use, expires in {} s):", expires);
            println!("    {}", answer["token"].as_str().unwrap_or_default());
            println!("On {name}, run (with the address this control plane reaches it at):");
            println!("    {}", answer["command"].as_str().unwrap_or_default());
        }
        HostCommand::Remove { name } => {
            client.delete(&format!("/v1/hosts/{name}"))?;
            println!("host {name} removed");
        }
        HostCommand::Evacuate { name, keep_stopped, no_wait } => {
            let body = json!({ "keep_stopped": keep_stopped });
            return maintenance(&client, &format!("/v1/hosts/{name}/evacuate"), &body, no_wait);
        }
        HostCommand::Restore { name, no_wait } => {
            return maintenance(&client, &format!("/v1/hosts/{name}/restore"), &json!({}), no_wait);
        }
        HostCommand::Plan { policy: PlanPolicy::Consolidate } => {
            let plan: ConsolidationPlan = client.get("/v1/consolidation")?;
            if conn.output == Output::Json {
                print_json(&plan)?;
                return Ok(0);
            }
            print_consolidation(&plan);
        }
        HostCommand::Consolidate { no_wait } => {
            return maintenance(&client, "/v1/consolidation", &json!({}), no_wait);
        }
    }
    Ok(0)
}

/// A consolidation plan for people: the moves, then every host's part.
fn print_consolidation(plan: &ConsolidationPlan) {
    if plan.emptied.is_empty() {
        println!("No host can be emptied: every host keeps instances that fit nowhere else.");
    } else {
        println!(
            "{} move(s) empty {} host(s), which may then be switched off: {}",
            plan.moves.len(),
            plan.emptied.len(),
            plan.emptied.join(", ")
        );
        println!();
        let rows: Vec<Vec<String>> = plan
            .moves
            .iter()
            .map(|m| vec![m.instance.clone(), m.from.clone(), m.to.clone(), m.reason.clone()])
            .collect();
        print_table(&["INSTANCE", "FROM", "TO", "WHY"], &rows);
    }
    println!();
    let rows: Vec<Vec<String>> = plan
        .kept
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                format!("{}M/{}M", k.allocated_mib, k.allocatable_mib),
                k.vcpus.to_string(),
                format!("kept: {}", k.why),
            ]
        })
        .chain(plan.emptied.iter().map(|h| vec![h.clone(), "0M".into(), "0".into(), "emptied".into()]))
        .chain(plan.skipped.iter().map(|s| {
            let (name, why) = s.split_once(": ").unwrap_or((s, ""));
            vec![name.to_owned(), "-".into(), "-".into(), format!("left out: {why}")]
        }))
        .collect();
    print_table(&["HOST", "MEMORY AFTER", "VCPUS AFTER", "PART"], &rows);
}

/// Posts an evacuation or restoration and follows it: every move's events as they come, then
/// the outcome of each instance; the exit code says whether all moved.
fn maintenance(client: &ApiClient, path: &str, body: &Value, no_wait: bool) -> Result<i32> {
    let since = now_ms().saturating_sub(1);
    let op: Operation = client.post(path, body)?;
    if no_wait {
        eprintln!("{} accepted (operation {})", op.kind, op.id);
        return Ok(0);
    }
    let done = follow(client, &op, since)?;
    if done.state == OperationState::Failed {
        bail!("{}: {}", done.kind, done.error);
    }
    println!("{} done", done.kind);
    Ok(0)
}

/// `stratus events [NAME]`.
pub fn events(conn: &Connection, instance: Option<String>, follow: bool) -> Result<i32> {
    let client = conn.client()?;
    let path = |after: u64| match &instance {
        Some(name) => format!("/v1/events?instance={name}&after={after}"),
        None => format!("/v1/events?after={after}"),
    };
    let events: Vec<Event> = client.get(&path(0))?;
    if !follow {
        if conn.output == Output::Json {
            print_json(&events)?;
        } else {
            events.iter().for_each(print_event);
        }
        return Ok(0);
    }
    // Followed, each event is a line as it comes (JSON Lines with `--output json`). Events of
    // one millisecond can arrive apart: the last millisecond is asked for again, and what was
    // printed of it is skipped.
    let mut last_ms = 0;
    let mut printed: Vec<Event> = Vec::new();
    let mut batch = events;
    loop {
        for e in batch {
            if e.time_ms == last_ms && printed.contains(&e) {
                continue;
            }
            if e.time_ms > last_ms {
                last_ms = e.time_ms;
                printed.clear();
            }
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                print_event(&e);
            }
            printed.push(e);
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_millis(500));
        batch = client.get(&path(last_ms.saturating_sub(1)))?;
    }
}

fn print_event(e: &Event) {
    println!("{:>5} ago  {:10} {:5} {}", age(e.time_ms / 1000), e.instance, e.level, e.message);
}
