//! `stratus lab`: a cluster of N hosts on this one machine, each host a network namespace
//! (`stratus-lab-hN`, address 10.220.0.N on a veth to the bridge `stratuslab0`, where this
//! machine is 10.220.0.254). Host h1 runs `stratus serve` (the control plane and a host), the
//! others `stratus agent`, joined with tokens as real machines would be, sharing the storage
//! pool `DIR/shared` (what an NFS mount is to real hosts). For trying a cluster
//! on a laptop, and for the multi-host tests, which use the same code.
//!
//! Everything lives in one directory (`/var/lib/stratus-lab` by default, marked as the lab's)
//! and is recorded there; `lab down` removes it all — processes (VMMs included), namespaces,
//! bridge, files — and `lab up` does the same first for a lab a crash left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use stratus_api::client::ApiClient;

/// The bridge the hosts' veths are on.
const BRIDGE: &str = "stratuslab0";
/// The namespaces' name prefix.
const NAMESPACE: &str = "stratus-lab-h";
/// This machine's address on the lab bridge.
const GATEWAY: &str = "10.220.0.254";
/// The file that marks a directory as a lab's (nothing else is ever removed).
const MARK: &str = ".stratus-lab";
/// Most hosts a lab has.
const MAX_HOSTS: u32 = 32;

/// `stratus lab ...`.
#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Start a cluster of N hosts in network namespaces on this machine.
    Up {
        /// How many hosts (h1 runs the control plane too).
        #[arg(long, default_value_t = 3)]
        hosts: u32,
        /// Where the lab keeps everything (removed by `lab down`).
        #[arg(long, default_value = "/var/lib/stratus-lab")]
        dir: PathBuf,
    },
    /// Remove the lab: its processes and VMs, namespaces, bridge and directory.
    Down {
        /// The lab's directory.
        #[arg(long, default_value = "/var/lib/stratus-lab")]
        dir: PathBuf,
    },
}

/// Runs a `lab` command.
pub fn run(command: LabCommand) -> Result<i32> {
    match command {
        LabCommand::Up { hosts, dir } => up(hosts, &dir),
        LabCommand::Down { dir } => {
            down(&dir)?;
            println!("lab removed");
            Ok(0)
        }
    }
}

/// The address of lab host `n`.
pub fn host_address(n: u32) -> String {
    format!("10.220.0.{n}")
}

fn namespace(n: u32) -> String {
    format!("{NAMESPACE}{n}")
}

fn sh(args: &[&str]) -> Result<()> {
    let output =
        Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !output.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn up(count: u32, dir: &Path) -> Result<i32> {
    if !(1..=MAX_HOSTS).contains(&count) {
        bail!("--hosts must be 1 to {MAX_HOSTS}, not {count}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("a lab makes network namespaces and bridges: run it as root");
    }
    if dir.exists() && !dir.join(MARK).exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not a lab's directory: give another --dir", dir.display());
    }
    // A lab a crash left behind goes first.
    down(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARK), "")?;
    let stratus = std::env::current_exe().context("finding the stratus binary")?;
    eprintln!("stratus lab: checking the default image (the first build takes ~10 minutes)");
    crate::image::build("default")?;

    sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    sh(&["ip", "link", "set", BRIDGE, "mtu", "9000"])?;
    sh(&["ip", "addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE])?;
    sh(&["ip", "link", "set", BRIDGE, "up"])?;
    for n in 1..=count {
        let ns = namespace(n);
        let veth = format!("slab{n}");
        sh(&["ip", "netns", "add", &ns])?;
        // Jumbo frames between hosts: the VXLAN's 50 bytes still leave guests 1500.
        sh(&[
            "ip", "link", "add", &veth, "mtu", "9000", "type", "veth", "peer", "name", "eth0", "mtu", "9000",
            "netns", &ns,
        ])?;
        sh(&["ip", "link", "set", &veth, "master", BRIDGE])?;
        sh(&["ip", "link", "set", &veth, "up"])?;
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", host_address(n)), "dev", "eth0"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", GATEWAY])?;
    }

    let url = format!("http://{}:7440", host_address(1));
    let h1 = dir.join("h1");
    std::fs::create_dir_all(&h1)?;
    spawn_in(
        1,
        &stratus,
        &[
            "serve",
            "--data-dir",
            &h1.display().to_string(),
            "--listen",
            &format!("{}:7440", host_address(1)),
            "--host-name",
            "h1",
            "--client-config",
            &dir.join("client.toml").display().to_string(),
        ],
        &h1.join("serve.log"),
    )?;
    let token = wait_for_token(&h1, &url, &h1.join("serve.log"))?;
    let client = ApiClient::new(&url, &token);
    // The hosts' shared storage pool: one directory, as an NFS export would be.
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared)?;
    for n in 2..=count {
        let name = format!("h{n}");
        let invitation: serde_json::Value = client.post("/v1/hosts", &json!({ "name": name }))?;
        let join = invitation["token"].as_str().context("no join token")?.to_string();
        let data = dir.join(&name);
        std::fs::create_dir_all(&data)?;
        spawn_in(
            n,
            &stratus,
            &[
                "agent",
                "--control",
                &url,
                "--join-token",
                &join,
                "--name",
                &name,
                "--address",
                &host_address(n),
                "--data-dir",
                &data.display().to_string(),
                "--shared-pool",
                &shared.display().to_string(),
            ],
            &data.join("agent.log"),
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let hosts: Vec<stratus_api::model::Host> = client.get("/v1/hosts")?;
        let online = hosts.iter().filter(|h| h.state == "online").count();
        if online == count as usize {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {online} of {count} hosts came online (logs in {})", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("lab up: {count} hosts (h1 runs the control plane) in namespaces {NAMESPACE}1..{count}");
    println!("    export STRATUS_URL={url} STRATUS_TOKEN={token}");
    println!("    stratus host list");
    println!("    stratus launch web1 --host h2");
    println!("    stratus lab down                      # removes everything");
    Ok(0)
}

/// Starts `program args` in lab host `n`'s namespace, in a session of its own (it outlives
/// this command), with its output in `log`, and records its pid.
fn spawn_in(n: u32, program: &Path, args: &[&str], log: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &namespace(n)]).arg(program).args(args);
    command.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: setsid is async-signal-safe; the process leaves our session and terminal.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    command.spawn().with_context(|| format!("starting {}", program.display()))?;
    Ok(())
}

/// Waits for `serve` in `data` to answer at `url`, and returns its token.
fn wait_for_token(data: &Path, url: &str, log: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Ok(token) = std::fs::read_to_string(data.join("token")) {
            let client = ApiClient::new(url, token.trim());
            if client.get::<serde_json::Value>("/v1/hosts").is_ok() {
                return Ok(token.trim().to_string());
            }
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            bail!("the control plane did not answer at {url}; its log:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes everything of a lab: every process in its namespaces (VMMs, agents, the control
/// plane), the namespaces, the bridge, and the directory (only if it is marked as the lab's).
fn down(dir: &Path) -> Result<()> {
    let namespaces = Command::new("ip").args(["netns", "list"]).output().context("running ip netns")?;
    let namespaces: Vec<String> = String::from_utf8_lossy(&namespaces.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NAMESPACE))
        .map(str::to_owned)
        .collect();
    // Politely first (the agents and control plane stop cleanly), then for sure.
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut any = false;
        for ns in &namespaces {
            let pids =
                Command::new("ip").args(["netns", "pids", ns]).output().context("running ip netns pids")?;
            for pid in
                String::from_utf8_lossy(&pids.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok())
            {
                any = true;
                // SAFETY: sending a signal reads no memory of ours.
                unsafe { libc::kill(pid, signal) };
            }
        }
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(if signal == libc::SIGTERM { 1500 } else { 300 }));
    }
    for ns in &namespaces {
        sh(&["ip", "netns", "del", ns])?;
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        sh(&["ip", "link", "del", BRIDGE])?;
    }
    if dir.join(MARK).exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}
