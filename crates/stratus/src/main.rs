//! `stratus`: one binary for every role. This build has the VMM (`stratus vm run`) and the
//! guest image builder (`stratus image build`).

mod image;
mod size;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use stratus_vmm::console::{self, ConsoleEnd, RawTerminal};
use stratus_vmm::{BootSource, DiskConfig, GuestExit, NetConfig, VmConfig, VsockConfig};

/// Exit status when the guest kernel panicked.
const EXIT_GUEST_PANIC: i32 = 3;

#[derive(Parser)]
#[command(name = "stratus", version, about = "Stratus: an IaaS cloud built from the hypervisor up")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run virtual machines directly, without the cloud.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Build and manage guest images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot a VM in the foreground with its serial console on this terminal.
    ///
    /// Without --kernel, boots the default image (building it first if needed) to a shell.
    /// Ctrl-A then x stops the VM. Guest reboot or power-off ends the command with status 0;
    /// a guest kernel panic with status 3.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
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
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    memory: u64,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the default guest image from Debian packages (cached: a second run is instant).
    Build {
        /// Image name.
        #[arg(default_value = "default")]
        name: String,
    },
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
    Ok(DiskConfig { path: path.into(), readonly })
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
    Ok(NetConfig { tap, mac })
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

/// Default command line for a kernel given with --kernel.
const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=1";

fn vm_run(args: RunArgs) -> anyhow::Result<i32> {
    let boot = match args.kernel {
        Some(kernel) => BootSource {
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
        },
        None => {
            let image = image::build("default")?;
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
    if stratus_vmm::pvm::host_is_pvm() {
        boot.cmdline = format!("{} {}", boot.cmdline, stratus_vmm::pvm::GUEST_CMDLINE);
    }
    let config = VmConfig {
        vcpus: args.cpus,
        memory: args.memory,
        boot,
        disks: args.disks,
        nets: args.nets,
        rng: args.rng,
        vsock: args.vsock,
    };
    let vm = stratus_vmm::start(&config, Box::new(std::io::stdout()))?;
    let stdin = std::io::stdin();
    let terminal = RawTerminal::enable(std::os::fd::AsFd::as_fd(&stdin));
    let end = console::run(&vm, terminal.is_some());
    drop(terminal);
    // The process leaves without unwinding the devices: remove the vsock socket here.
    if let Some(vsock) = &config.vsock {
        let _ = std::fs::remove_file(&vsock.socket);
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

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(VmCommand::Run(args)) => vm_run(args),
        Command::Image(ImageCommand::Build { name }) => image::build(&name).map(|image| {
            println!("{}", image.dir.display());
            0
        }),
    };
    let code = result.unwrap_or_else(|e| {
        eprintln!("stratus: error: {e:#}");
        1
    });
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // A VM's vCPU threads are still inside KVM_RUN: leave without waiting for them.
    std::process::exit(code)
}
