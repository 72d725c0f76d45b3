//! `stratus`: one binary for every role. This build has the cloud on one machine (`stratus
//! serve`) and its client commands (`launch`, `list`, `exec`, ...), the VMM (`stratus vmm`,
//! `stratus vm run`), the commands that drive a running VMM (`stratus vm pause|snapshot|
//! trace|...`) and the guest image builder (`stratus image build`).

mod cloud;
mod image;
mod lab;
mod size;
mod trace;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stratus", version, about = "Stratus: an IaaS cloud built from the hypervisor up")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: cloud::Connection,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cloud on this machine: REST API, dashboard, scheduler and host agent.
    ///
    /// First start creates the data directory, an API token (written with the address to
    /// ~/.config/stratus/config.toml for the CLI), the default network and the default image.
    /// Instances keep running when the server stops and are adopted when it starts again.
    Serve(cloud::ServeArgs),
    /// Run one replica of the control plane, with no host of its own.
    ///
    /// Replicas sharing an etcd store (--store etcd:...) elect a leader through a lease: every
    /// replica serves the API, the leader alone drives the hosts, and another takes over within
    /// seconds when it dies. Hosts join with `stratus host add` and `stratus agent`.
    Control(cloud::ControlArgs),
    /// Run the host agent of one machine of a cluster (join it with `stratus host add`).
    ///
    /// It serves the agent protocol on its address, runs one VMM per instance placed here,
    /// and sends heartbeats to the control plane. Instances keep running when it stops and are
    /// re-adopted when it starts again.
    Agent(cloud::AgentArgs),
    /// A cluster of hosts in network namespaces on this machine, to try one out.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Create and boot an instance, and wait until its guest agent answers.
    Launch(cloud::LaunchArgs),
    /// List instances.
    #[command(alias = "ls")]
    List,
    /// Show one instance with its recent events.
    Show {
        /// Instance name.
        name: String,
    },
    /// Run a command in an instance (through its guest agent); its exit code is ours.
    Exec(cloud::ExecArgs),
    /// Attach to an instance's serial console (Ctrl-A then x detaches).
    Console {
        /// Instance name.
        name: String,
    },
    /// Start a stopped instance.
    Start(cloud::NameArg),
    /// Stop an instance (ACPI power button, then hard after 30 s); its disk is kept.
    Stop(cloud::NameArg),
    /// Stop and start an instance.
    Restart(cloud::NameArg),
    /// Move an instance to another host: a running one live (same address, MAC, disk and
    /// memory, no reboot), a stopped one cold (its disk copied).
    Move(cloud::MoveArgs),
    /// Delete an instance with its disk, tap and address.
    #[command(alias = "rm")]
    Delete(cloud::NameArg),
    /// Networks: bridges with a subnet and NAT.
    #[command(subcommand)]
    Network(cloud::NetworkCommand),
    /// Hosts and their capacity.
    #[command(subcommand)]
    Host(cloud::HostCommand),
    /// The cluster's settings (rebalancing, ...): `config show`, `config set KEY=VALUE ...`.
    #[command(subcommand)]
    Config(cloud::ConfigCommand),
    /// The event log, of one instance or all.
    Events {
        /// Instance name.
        name: Option<String>,
        /// Keep printing events as they happen (what the cluster decides, with the reasons),
        /// until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run virtual machines directly, without the cloud, and drive a running VMM.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Run one VMM process that waits for its configuration on an HTTP API socket.
    ///
    /// Configure it with PUT /vm/machine, /vm/boot, /vm/drives/ID, ... and start it with
    /// POST /vm/start (or restore it from a snapshot with --restore); `stratus vm` commands
    /// drive it by its socket.
    Vmm(vm::VmmArgs),
    /// Build and manage guest images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the default guest image from Debian packages (cached: a second run is instant).
    Build {
        /// Image name.
        #[arg(default_value = "default")]
        name: String,
    },
    #[command(flatten)]
    Api(cloud::ImageApi),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(command) => vm::run(command),
        Command::Vmm(args) => vm::vmm(args),
        Command::Image(ImageCommand::Build { name }) => image::build(&name).map(|image| {
            println!("{}", image.dir.display());
            0
        }),
        Command::Image(ImageCommand::Api(command)) => cloud::image(&cli.connection, command),
        Command::Serve(args) => {
            stratus_vmm::pvm::warn_about_guest_faults();
            cloud::serve(args)
        }
        Command::Control(args) => cloud::control(args),
        Command::Agent(args) => cloud::agent(args),
        Command::Lab(command) => lab::run(command),
        Command::Launch(args) => cloud::launch(&cli.connection, args),
        Command::List => cloud::list(&cli.connection),
        Command::Show { name } => cloud::show(&cli.connection, &name),
        Command::Exec(args) => cloud::exec(&cli.connection, args),
        Command::Console { name } => cloud::console(&cli.connection, &name),
        Command::Start(args) => cloud::lifecycle(&cli.connection, "start", args),
        Command::Stop(args) => cloud::lifecycle(&cli.connection, "stop", args),
        Command::Restart(args) => cloud::lifecycle(&cli.connection, "restart", args),
        Command::Delete(args) => cloud::lifecycle(&cli.connection, "delete", args),
        Command::Move(args) => cloud::move_instance(&cli.connection, args),
        Command::Network(command) => cloud::network(&cli.connection, command),
        Command::Host(command) => cloud::host(&cli.connection, command),
        Command::Config(command) => cloud::config(&cli.connection, command),
        Command::Events { name, follow } => cloud::events(&cli.connection, name, follow),
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
