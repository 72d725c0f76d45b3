//! `stratus vm ...` and `stratus vmm`: run a VM in the foreground, run a VMM that serves its
//! API, and the commands that drive a running VMM through that API.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use stratus_vmm::console::{self, ConsoleConfig, ConsoleEnd, RawTerminal};
use stratus_vmm::service::{Identity, RestoreRequest, Vmm};
use stratus_vmm::{BootSource, DiskConfig, GuestExit, NetConfig, RateLimit, VmConfig, VsockConfig};
use stratus_vmm_api::{Balloon, Drive, MemoryKind, Migrate, Net, Phase, Restore, Snapshot, VmmClient};

/// Exit status when the guest kernel panicked.
const EXIT_GUEST_PANIC: i32 = 3;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a VM in the foreground with its serial console on this terminal.
    ///
    /// Without --kernel, boots the default image (building it first if needed) to a shell.
    /// Ctrl-A then x stops the VM. Guest reboot or power-off ends the command with status 0;
    /// a guest kernel panic with status 3.
    Run(RunArgs),
    /// Show a VMM's VM: state, exit reason, uptime, configuration (JSON).
    Info(ApiSock),
    /// Show a VMM's counters: exits per vCPU, requests and bytes per device (JSON).
    Metrics(ApiSock),
    /// Watch exits and device activity per second, like top (Ctrl-C to leave).
    Trace(TraceArgs),
    /// Start a configured VM.
    Start(ApiSock),
    /// Pause the VM: vCPUs and devices stop at a safe point.
    Pause(ApiSock),
    /// Resume a paused VM.
    Resume(ApiSock),
    /// Ask the guest to power off (ACPI power button) and wait for it.
    Shutdown(ShutdownArgs),
    /// Stop the VM at once (no guest cooperation).
    Stop(ApiSock),
    /// Save the VM to a state file and a memory file (pausing it while saving).
    Snapshot(SnapshotArgs),
    /// Restore a VM from a snapshot into a VMM that has not started one.
    Restore(RestoreArgs),
    /// Show the balloon (target, what the guest gave, its memory statistics) or set its target.
    Balloon(BalloonArgs),
    /// Move the running VM to a VMM started with --incoming (live: the guest keeps running
    /// until the last, short stop-and-copy).
    Migrate(MigrateArgs),
    /// Call off the migration under way, before the guest pauses for the move: the guest
    /// runs on here and the destination VMM gives up. (Ctrl-C in `vm migrate` does the same.)
    MigrateCancel(ApiSock),
    /// Move the guest of a migration started with --postcopy now, and send the rest of its
    /// memory after it, instead of waiting for the dirty rounds to converge.
    MigratePostcopy(ApiSock),
    /// End the VMM process.
    Quit(ApiSock),
}

/// The VMM to talk to.
#[derive(clap::Args)]
pub struct ApiSock {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
}

#[derive(clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    sock: ApiSock,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
}

#[derive(clap::Args)]
pub struct ShutdownArgs {
    #[command(flatten)]
    sock: ApiSock,
    /// How long to wait for the guest to power off, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    sock: ApiSock,
    /// Where the destination VMM listens: tcp:HOST:PORT or a Unix socket path.
    #[arg(long)]
    to: String,
    /// The longest pause the guest should see, in milliseconds.
    #[arg(long, default_value_t = 20)]
    max_downtime_ms: u64,
    /// The most to send per second, e.g. 100M (default: as fast as the link goes).
    #[arg(long, value_parser = crate::size::parse)]
    bandwidth: Option<u64>,
    /// Never slow the guest's vCPUs down to make a migration converge.
    #[arg(long)]
    no_auto_converge: bool,
    /// When the guest dirties memory faster than it can be sent, move it at once and send the
    /// rest after it (post-copy) instead of slowing it down. Until the last page is over, a
    /// failure of either host or the link loses the guest.
    #[arg(long)]
    postcopy: bool,
    /// Copy the disks as well, into the destination's own disk files (`--disk` there, each of
    /// the same size), instead of handing them over on shared storage.
    #[arg(long)]
    with_disks: bool,
    /// The file holding the destination's migration secret (its --migration-secret-file).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct BalloonArgs {
    #[command(flatten)]
    sock: ApiSock,
    /// Ask the guest to give back this much memory, e.g. 128M (0 gives it all back).
    #[arg(long, value_parser = crate::size::parse)]
    target: Option<u64>,
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    sock: ApiSock,
    /// Where to write the state file.
    #[arg(long, value_name = "PATH")]
    state: PathBuf,
    /// Where to write the memory file.
    #[arg(long, value_name = "PATH")]
    memory: PathBuf,
    /// Write only the pages changed since the previous snapshot (restore lays it over the
    /// full memory file).
    #[arg(long)]
    diff: bool,
    /// Leave the VM paused afterwards (default: a VM that was running runs again).
    #[arg(long)]
    leave_paused: bool,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    sock: ApiSock,
    #[command(flatten)]
    from: RestoreFrom,
}

/// Which snapshot to restore and with what new identity.
#[derive(clap::Args)]
pub struct RestoreFrom {
    /// The state file.
    #[arg(long = "restore", value_name = "STATE")]
    state: PathBuf,
    /// The full memory file, then any diff memory files in order (repeat the option).
    #[arg(long = "memory-file", value_name = "PATH", required = true)]
    memory: Vec<PathBuf>,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Keep the restored VM paused.
    #[arg(long)]
    paused: bool,
    /// Track written pages from the restore on, for a later `snapshot --diff`.
    #[arg(long)]
    track_dirty: bool,
}

/// The host-side identity a restored clone or an arriving VM takes instead of the saved one.
#[derive(clap::Args, Default)]
pub struct IdentityArgs {
    /// A network card (tap, MAC) on this host for each saved card, in order (repeat).
    #[arg(long = "net", value_name = "tap=NAME[,mac=..]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// The VM's own disks, one per saved disk, in order (repeat).
    #[arg(long = "disk", value_name = "PATH[,readonly]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// The VM's vsock CID and socket.
    #[arg(long, value_name = "cid=N,socket=PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
}

impl IdentityArgs {
    fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.disks.is_empty() && self.vsock.is_none()
    }

    fn into_identity(self) -> Identity {
        Identity {
            nets: (!self.nets.is_empty()).then_some(self.nets),
            disks: (!self.disks.is_empty()).then_some(self.disks),
            vsock: self.vsock,
        }
    }
}

/// `stratus vmm`.
#[derive(clap::Args)]
pub struct VmmArgs {
    /// Serve the API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Where the guest console goes: stdout, file:PATH, socket:PATH or none.
    #[arg(long, default_value = "stdout", value_parser = parse_console)]
    console: ConsoleConfig,
    /// Wait for a live migration on tcp:HOST:PORT (or a Unix socket path) instead of a
    /// configuration; the VM runs here once it has arrived.
    #[arg(long, value_name = "tcp:HOST:PORT", conflicts_with = "restore")]
    incoming: Option<String>,
    /// Restore the snapshot with this state file at once, instead of waiting for a
    /// configuration.
    #[arg(long, value_name = "STATE", requires = "memory_file")]
    restore: Option<PathBuf>,
    /// With --restore: the full memory file, then any diff memory files in order (repeat).
    #[arg(long = "memory-file", value_name = "PATH", requires = "restore")]
    memory_file: Vec<PathBuf>,
    /// With --restore or --incoming: the VM's identity on this host.
    #[command(flatten)]
    identity: IdentityArgs,
    /// With --restore: keep the restored VM paused.
    #[arg(long, requires = "restore")]
    paused: bool,
    /// With --restore: track written pages from the restore on, for a later diff snapshot.
    #[arg(long, requires = "restore")]
    track_dirty: bool,
    /// With --incoming: take a migration only from a source that sends the secret this file
    /// holds (`stratus vm migrate --secret-file`); other connections are refused, and the VMM
    /// waits on for the real one.
    #[arg(long, value_name = "FILE", requires = "incoming")]
    migration_secret_file: Option<PathBuf>,
    /// Run only while FILE holds a deadline (boot-clock milliseconds) still to come, and exit
    /// at once after it: the host agent renews it while the control plane counts the host
    /// alive, so a host cut off from it stops its shared-disk guests before another host
    /// starts them.
    #[arg(long, value_name = "FILE")]
    fence: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Also serve the VMM API on this Unix socket (pause, snapshot, metrics, ...).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Kernel: ELF vmlinux (PVH entry when present) or bzImage. Default: the default image's.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk: cpio archive, plain or gzip-compressed.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: console=ttyS0 panic=1, or the image's own).
    #[arg(long)]
    cmdline: Option<String>,
    /// Words to add to the command line, e.g. --append stratus.mode=poweroff.
    #[arg(long)]
    append: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// A raw disk image as a virtio block device; repeat for more (vda, vdb, ...).
    #[arg(long = "disk", value_name = "PATH[,readonly]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A network card on an existing tap device; repeat for more (eth0, eth1, ...).
    #[arg(long = "net", value_name = "tap=NAME[,mac=52:54:00:..]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A vsock device: host programs connect to the Unix socket PATH and write
    /// "CONNECT <port>"; guest connections to host port P reach PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Give the guest a virtio entropy device (/dev/hwrng).
    #[arg(long)]
    rng: bool,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, default_value = "256M", value_parser = crate::size::parse)]
    memory: u64,
}

fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut parts = text.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or("--disk needs a file path")?;
    let mut readonly = false;
    for option in parts {
        match option {
            "readonly" | "ro" => readonly = true,
            other => return Err(format!("unknown disk option '{other}' (known: readonly)")),
        }
    }
    Ok(DiskConfig { path: path.into(), readonly, rate_limit: RateLimit::default() })
}

fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for option in text.split(',') {
        match option.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_owned()),
            Some(("mac", value)) => {
                mac = Some(
                    stratus_vmm::parse_mac(value)
                        .ok_or_else(|| format!("'{value}' is not a MAC address (like 52:54:00:12:34:56)"))?,
                )
            }
            _ => return Err(format!("unknown network option '{option}' (known: tap=NAME, mac=ADDRESS)")),
        }
    }
    let tap = tap.ok_or("--net needs tap=NAME")?;
    Ok(NetConfig { tap, mac, rate_limit: RateLimit::default() })
}

fn parse_vsock(text: &str) -> Result<VsockConfig, String> {
    let mut cid = None;
    let mut socket = None;
    for option in text.split(',') {
        match option.split_once('=') {
            Some(("cid", n)) => {
                cid = Some(n.parse::<u64>().map_err(|_| format!("vsock cid '{n}' is not a number"))?)
            }
            Some(("socket", path)) if !path.is_empty() => socket = Some(path.into()),
            _ => return Err(format!("unknown vsock option '{option}' (known: cid=N, socket=PATH)")),
        }
    }
    Ok(VsockConfig {
        cid: cid.ok_or("--vsock needs cid=N")?,
        socket: socket.ok_or("--vsock needs socket=PATH")?,
    })
}

fn vm_run(args: RunArgs) -> anyhow::Result<i32> {
    stratus_vmm::pvm::warn_about_guest_faults();
    let boot = match args.kernel {
        Some(kernel) => BootSource {
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline.unwrap_or_else(|| stratus_vmm::api::DEFAULT_CMDLINE.to_owned()),
        },
        None => {
            let image = crate::image::build("default")?;
            BootSource {
                kernel: image.kernel(),
                initrd: Some(args.initrd.unwrap_or_else(|| image.initrd())),
                cmdline: match args.cmdline {
                    Some(cmdline) => cmdline,
                    None => image.cmdline()?,
                },
            }
        }
    };
    let mut boot = boot;
    if let Some(extra) = args.append {
        boot.cmdline = format!("{} {extra}", boot.cmdline);
    }
    let config = VmConfig {
        vcpus: args.cpus,
        memory: args.memory,
        boot,
        disks: args.disks,
        nets: args.nets,
        rng: args.rng,
        vsock: args.vsock,
        balloon: None,
    };
    let vsock_socket = config.vsock.as_ref().map(|v| v.socket.clone());
    let mut vmm = Vmm::with_config(config, ConsoleConfig::Stdout);
    vmm.start()?;
    let (exit, serial) = {
        let vm = vmm.vm().expect("a started VMM has a VM");
        (vm.exit.clone(), vm.serial.clone())
    };
    let vmm = Arc::new(Mutex::new(vmm));
    if let Some(path) = &args.api_sock {
        let listener =
            stratus_vmm::api::bind(path).with_context(|| format!("serving the API on {}", path.display()))?;
        let (vmm, path) = (vmm.clone(), path.clone());
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || stratus_vmm::api::serve(listener, &path, vmm))?;
    }
    let stdin = std::io::stdin();
    let terminal = RawTerminal::enable(std::os::fd::AsFd::as_fd(&stdin));
    let end = console::run(&exit, &serial, terminal.is_some());
    drop(terminal);
    // The process leaves without unwinding the devices: remove the sockets here.
    if let Some(socket) = &vsock_socket {
        let _ = std::fs::remove_file(socket);
    }
    if let Some(path) = &args.api_sock {
        let _ = std::fs::remove_file(path);
    }
    let (message, code) = match end {
        ConsoleEnd::Detached => ("console detached (Ctrl-A x): VM stopped".to_owned(), 0),
        ConsoleEnd::Guest(GuestExit::PowerOff) => ("guest powered off".to_owned(), 0),
        ConsoleEnd::Guest(GuestExit::Reset(how)) => (format!("guest rebooted ({how})"), 0),
        ConsoleEnd::Guest(GuestExit::Panic) => {
            ("guest kernel panicked (pvpanic)".to_owned(), EXIT_GUEST_PANIC)
        }
        ConsoleEnd::Guest(GuestExit::Error(e)) => anyhow::bail!("{e}"),
    };
    eprintln!("stratus: {message}");
    Ok(code)
}

fn parse_console(text: &str) -> Result<ConsoleConfig, String> {
    match text.split_once(':') {
        None if text == "stdout" => Ok(ConsoleConfig::Stdout),
        None if text == "none" => Ok(ConsoleConfig::None),
        Some(("file", path)) if !path.is_empty() => Ok(ConsoleConfig::File { path: path.into() }),
        Some(("socket", path)) if !path.is_empty() => Ok(ConsoleConfig::Socket { path: path.into() }),
        _ => Err(format!("'{text}': use stdout, file:PATH, socket:PATH or none")),
    }
}

fn restore_request(from: RestoreFrom) -> RestoreRequest {
    let Identity { nets, disks, vsock } = from.identity.into_identity();
    RestoreRequest {
        state: from.state,
        memory: from.memory,
        nets,
        disks,
        vsock,
        paused: from.paused,
        track_dirty_pages: from.track_dirty,
    }
}

/// `stratus vmm`: serves the API until a quit request (or a signal).
pub fn vmm(mut args: VmmArgs) -> anyhow::Result<i32> {
    if let Some(fence) = args.fence.take() {
        if stratus_agent::fence::remaining(&fence).is_zero() {
            anyhow::bail!(
                "fenced: {} holds no deadline to come (the host agent has not renewed it)",
                fence.display()
            );
        }
        stratus_agent::fence::watch(fence).context("watching the fence file")?;
    }
    // Listening for the migration before the API answers: a caller that sees the API up may
    // start the migration at once.
    let incoming = match &args.incoming {
        Some(on) => Some(
            stratus_vmm::migration::listen(on)
                .with_context(|| format!("listening for a migration on {on}"))?,
        ),
        None => None,
    };
    let listener = stratus_vmm::api::bind(&args.api_sock)
        .with_context(|| format!("serving the API on {}", args.api_sock.display()))?;
    if args.restore.is_none() && args.incoming.is_none() && !args.identity.is_empty() {
        anyhow::bail!("--net, --disk and --vsock give a restored or arriving VM its identity: use them with --restore or --incoming");
    }
    let stdin_console = args.console == ConsoleConfig::Stdout;
    let mut vmm = Vmm::new(args.console);
    if stdin_console {
        forward_stdin(vmm.console_input());
    }
    if let Some(state) = args.restore {
        let from = RestoreFrom {
            state,
            memory: std::mem::take(&mut args.memory_file),
            identity: std::mem::take(&mut args.identity),
            paused: args.paused,
            track_dirty: args.track_dirty,
        };
        let report = vmm.restore(restore_request(from))?;
        eprintln!("stratus: restored in {:.2} ms", report.duration_ms);
    }
    let vmm = Arc::new(Mutex::new(vmm));
    let Some(on) = args.incoming else {
        stratus_vmm::api::serve(listener, &args.api_sock, vmm);
        return Ok(0);
    };
    // The API answers while the migration arrives (the VM shows as not started).
    let (api_vmm, api_sock) = (vmm.clone(), args.api_sock.clone());
    let api = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || stratus_vmm::api::serve(listener, &api_sock, api_vmm))?;
    let incoming = incoming.context("no migration listener")?;
    let secret = match &args.migration_secret_file {
        Some(path) => Some(read_secret(path)?.into_bytes()),
        None => None,
    };
    let identity = args.identity.into_identity();
    let mut built_ms = 0.0;
    let arrival = loop {
        let conn = incoming.accept().with_context(|| format!("waiting for a migration on {on}"))?;
        let identity = identity.clone();
        let received =
            stratus_vmm::migration::receive(conn, secret.as_deref(), |config, memory, copied_disks| {
                let t = Instant::now();
                let prepared = vmm.lock().unwrap_or_else(|p| p.into_inner()).prepare_incoming(
                    config,
                    memory,
                    identity,
                    copied_disks,
                );
                built_ms = t.elapsed().as_secs_f64() * 1e3;
                let prepared = prepared.map_err(|e| e.to_string())?;
                let disks = prepared.0.disks.iter().map(|d| d.path.clone()).collect();
                Ok((prepared, disks))
            });
        match received {
            Err(stratus_vmm::migration::MigrationError::Unauthorized(why)) => {
                eprintln!(
                    "stratus: refused a migration connection ({why}); waiting on for the one with the secret"
                );
            }
            other => break other?,
        }
    };
    incoming.close();
    let t = Instant::now();
    let postcopy = vmm.lock().unwrap_or_else(|p| p.into_inner()).adopt_incoming(arrival)?;
    eprintln!(
        "stratus: migration arrived, VM running ({built_ms:.1} ms to build ahead, {:.1} ms to finish)",
        t.elapsed().as_secs_f64() * 1e3
    );
    if let Some(rest) = postcopy {
        match rest.wait() {
            Ok(done) => eprintln!(
                "stratus: post-copy complete: {} pages in {:.0} ms after the VM started, {} of them waited for",
                done.pages, done.ms, done.faults
            ),
            Err(e) => {
                // The guest would run on memory that is not there: stop it, saying why.
                eprintln!("stratus: post-copy failed: {e}; the guest cannot go on without its memory, stopping");
                std::process::exit(1);
            }
        }
    }
    let _ = api.join();
    Ok(0)
}

/// The migration secret in the file at `path` (its first line, at least 16 characters).
fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim();
    if secret.len() < 16 {
        anyhow::bail!("{}: a migration secret is at least 16 characters", path.display());
    }
    Ok(secret.to_owned())
}

/// Feeds standard input to the guest's UART (once a VM exists) until it closes.
fn forward_stdin(input: stratus_vmm::console::ConsoleInput) {
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                return;
            }
            let mut pending = &buf[..n];
            while !pending.is_empty() {
                // Input typed before the VM exists (a migration arriving) waits for it.
                let Some(serial) = input.wait_serial(Duration::from_secs(3600)) else { continue };
                let taken = serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(pending);
                pending = &pending[taken..];
                if taken == 0 {
                    // The UART's receive FIFO is full: look again soon.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    });
}

/// The API of the VMM at `sock`.
fn client(sock: &ApiSock) -> VmmClient {
    VmmClient::new(&sock.api_sock)
}

fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// Dispatches a `stratus vm` subcommand.
pub fn run(command: VmCommand) -> anyhow::Result<i32> {
    match command {
        VmCommand::Run(args) => return vm_run(args),
        VmCommand::Info(sock) => print_json(&client(&sock).info()?),
        VmCommand::Metrics(sock) => print_json(&client(&sock).metrics()?),
        VmCommand::Trace(args) => {
            crate::trace::run(args.interval, args.count, || Ok(client(&args.sock).metrics()?))?
        }
        VmCommand::Start(sock) => client(&sock).start()?,
        VmCommand::Pause(sock) => client(&sock).pause()?,
        VmCommand::Resume(sock) => client(&sock).resume()?,
        VmCommand::Stop(sock) => client(&sock).stop()?,
        VmCommand::Quit(sock) => client(&sock).quit()?,
        VmCommand::Shutdown(args) => {
            let vmm = client(&args.sock);
            vmm.shutdown()?;
            let deadline = Instant::now() + Duration::from_secs(args.timeout);
            loop {
                let info = vmm.info()?;
                if info.state == Phase::Stopped {
                    eprintln!("stratus: {}", info.exit_reason.as_deref().unwrap_or("stopped"));
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "the guest did not power off within {} s (it may not listen to the ACPI power button): `stratus vm stop` ends it at once",
                        args.timeout
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        VmCommand::Migrate(args) => {
            let request = Migrate {
                to: args.to,
                max_downtime_ms: Some(args.max_downtime_ms),
                max_rounds: None,
                bandwidth: args.bandwidth,
                auto_converge: Some(!args.no_auto_converge),
                postcopy: Some(args.postcopy),
                with_disks: Some(args.with_disks),
                secret: args.secret_file.as_deref().map(read_secret).transpose()?,
            };
            // The migration call returns when it is over; meanwhile its progress is polled.
            let vmm = client(&args.sock);
            let caller = vmm.clone();
            let migration = std::thread::spawn(move || caller.migrate(&request));
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let interrupted = on_first_interrupt();
            let mut cancelling = false;
            while !migration.is_finished() {
                std::thread::sleep(Duration::from_millis(250));
                if !cancelling && interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                    cancelling = true;
                    match vmm.cancel_migration() {
                        Ok(_) => eprintln!("\nstratus: calling the migration off; the guest stays here"),
                        Err(e) => eprintln!("\nstratus: {e}"),
                    }
                }
                if let Ok(p) = vmm.migration() {
                    let line = format!(
                        "{:<14} round {:>3}  sent {:>8.1} MiB  left {:>7.1} MiB  {:>7.1} MiB/s  dirtying {:>7.1} MiB/s  throttle {:>2}%",
                        p.phase,
                        p.round,
                        p.bytes_sent as f64 / 1048576.0,
                        p.remaining_bytes as f64 / 1048576.0,
                        p.bandwidth / 1048576.0,
                        p.dirty_rate / 1048576.0,
                        p.throttle_percent
                    );
                    if tty {
                        eprint!("\r{line}");
                    } else {
                        eprintln!("{line}");
                    }
                }
            }
            if tty {
                eprintln!();
            }
            let report = migration.join().map_err(|_| anyhow::anyhow!("the migration call panicked"))??;
            print_json(&report);
        }
        VmCommand::MigrateCancel(sock) => {
            client(&sock).cancel_migration()?;
            eprintln!("stratus: the migration is being called off; the guest stays here");
        }
        VmCommand::MigratePostcopy(sock) => {
            client(&sock).start_postcopy()?;
            eprintln!("stratus: the guest moves now; the rest of its memory follows it");
        }
        VmCommand::Balloon(args) => {
            let vmm = client(&args.sock);
            if let Some(target) = args.target {
                vmm.set_balloon(&Balloon { target_mib: target >> 20, deflate_on_oom: None })?;
            }
            print_json(&vmm.balloon()?);
        }
        VmCommand::Snapshot(args) => {
            let vmm = client(&args.sock);
            let was_running = vmm.info()?.state == Phase::Running;
            vmm.pause()?;
            let request = Snapshot {
                state_file: absolute(&args.state)?,
                memory_file: absolute(&args.memory)?,
                diff: args.diff,
            };
            let result = vmm.snapshot(&request);
            if was_running && !args.leave_paused {
                vmm.resume()?;
            }
            let report = result?;
            eprintln!(
                "stratus: {} snapshot: {:.1} MiB of memory, {:.1} KiB of state, in {:.1} ms",
                match report.kind {
                    MemoryKind::Full => "full",
                    MemoryKind::Diff => "diff",
                },
                report.memory_bytes as f64 / 1048576.0,
                report.state_bytes as f64 / 1024.0,
                report.duration_ms
            );
        }
        VmCommand::Restore(args) => {
            let from = args.from;
            let memory = from.memory.iter().map(|p| absolute(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let nets: Vec<Net> = from
                .identity
                .nets
                .iter()
                .map(|n| Net {
                    tap: n.tap.clone(),
                    mac: n.mac.map(|m| stratus_vmm::format_mac(&m)),
                    rate_limit: Default::default(),
                })
                .collect();
            let drives = from
                .identity
                .disks
                .iter()
                .map(|d| {
                    Ok(Drive {
                        path: absolute(&d.path)?,
                        readonly: d.readonly,
                        rate_limit: Default::default(),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let request = Restore {
                state_file: absolute(&from.state)?,
                memory_files: memory,
                nets: (!nets.is_empty()).then_some(nets),
                drives: (!drives.is_empty()).then_some(drives),
                vsock: from.identity.vsock.clone(),
                paused: from.paused,
                track_dirty_pages: from.track_dirty,
            };
            let report = client(&args.sock).restore(&request)?;
            eprintln!("stratus: restored in {:.2} ms", report.duration_ms);
        }
    }
    Ok(0)
}

/// Paths go to the VMM as absolute paths: it may run in another directory.
fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{}", path.display()))
}

/// The flag the first Ctrl-C (SIGINT) raises; a second one ends the process as usual.
fn on_first_interrupt() -> &'static std::sync::atomic::AtomicBool {
    static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn raise(_: libc::c_int) {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe); SA_RESTART keeps the
    // API calls of other threads going; SA_RESETHAND puts the default action back for the
    // next SIGINT.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = raise as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
    &INTERRUPTED
}
