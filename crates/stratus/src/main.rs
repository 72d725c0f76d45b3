//! `stratus`: one binary for every role. This build has the VMM (`stratus vmm`, `stratus vm
//! run`), the commands that drive a running VMM (`stratus vm pause|snapshot|trace|...`) and the
//! guest image builder (`stratus image build`).

mod image;
mod size;
mod trace;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stratus", version, about = "Stratus: an IaaS cloud built from the hypervisor up")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
