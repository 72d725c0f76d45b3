//! `stratus image build`: the default guest image (kernel, initramfs, ext4 root filesystem)
//! built from Debian packages by `guest/build-image.sh`, cached per machine. The root
//! filesystem carries the guest agent, built here from the workspace.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where images live unless `STRATUS_IMAGE_DIR` says otherwise.
pub fn images_dir() -> PathBuf {
    std::env::var_os("STRATUS_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/stratus/images"))
}

/// The directory holding the guest build inputs (`build-image.sh`, kernel config, patches).
fn guest_sources() -> PathBuf {
    std::env::var_os("STRATUS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest"))
}

/// The default image's files.
pub struct Image {
    /// Its directory.
    pub dir: PathBuf,
}

impl Image {
    /// The kernel (ELF vmlinux with a PVH note).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    /// The busybox initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }
    /// The command line the image boots with, as its build recorded it.
    pub fn cmdline(&self) -> Result<String> {
        let path = self.dir.join("cmdline");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(text.trim().to_owned())
    }
}

/// The target the guest agent is built for: the guest is x86_64 Linux like the host.
const GUEST_AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The guest agent binary to install in the image: `STRATUS_GUEST_AGENT` if it names one,
/// else built here from the workspace as a static executable (the guest has no libc).
fn guest_agent() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("STRATUS_GUEST_AGENT") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "STRATUS_GUEST_AGENT={} is not a file (unset it to build the agent from source)",
                path.display()
            );
        }
        return Ok(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !workspace.join("Cargo.toml").exists() {
        bail!(
            "cannot find the Stratus workspace at {} to build the guest agent (set STRATUS_GUEST_AGENT to a prebuilt static stratus-guest-agent)",
            workspace.display()
        );
    }
    // A target directory of its own: the static flags would otherwise rebuild the host's
    // artifacts every time, and the explicit --target keeps them off build scripts and
    // proc-macros, which cannot be static.
    let target_dir = workspace.join("target/guest-agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the guest agent (static)...");
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "stratus-guest-agent",
            "--target",
            GUEST_AGENT_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(&workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Set by an enclosing cargo, it would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdout(std::io::stderr())
        .status()
        .with_context(|| {
            format!(
                "running {} to build the guest agent (or set STRATUS_GUEST_AGENT to a prebuilt binary)",
                Path::new(&cargo).display()
            )
        })?;
    if !status.success() {
        bail!(
            "building the guest agent failed ({status}); cargo's messages above say why (or set STRATUS_GUEST_AGENT to a prebuilt binary)"
        );
    }
    let binary = target_dir.join(GUEST_AGENT_TARGET).join("release/stratus-guest-agent");
    if !binary.is_file() {
        bail!("cargo built the guest agent but {} is missing", binary.display());
    }
    Ok(binary)
}

/// Builds (or finds up to date) the image `name`, showing the build's progress on stderr.
pub fn build(name: &str) -> Result<Image> {
    build_with_progress(name, &mut |line| eprintln!("{line}"))
}

/// Builds (or finds up to date) the image `name`, handing each progress line to `progress`.
pub fn build_with_progress(name: &str, progress: &mut dyn FnMut(&str)) -> Result<Image> {
    let (script, extra): (&str, Vec<(&str, PathBuf)>) = match name {
        "default" => ("build-image.sh", Vec::new()),
        // Debian's userland on the default image's kernel.
        "debian" => (
            "build-debian.sh",
            vec![("STRATUS_KERNEL_IMAGE_DIR", build_with_progress("default", progress)?.dir)],
        ),
        _ => bail!("unknown image recipe '{name}': known are {}", stratus_control::image::RECIPES.join(", ")),
    };
    let dir = images_dir().join(name);
    let script = guest_sources().join(script);
    if !script.exists() {
        bail!("cannot find the guest build script at {} (set STRATUS_GUEST_DIR to the repository's guest/ folder)", script.display());
    }
    let agent = guest_agent()?;
    let mut child = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .env("STRATUS_GUEST_AGENT", &agent)
        .envs(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", script.display()))?;
    // Both streams, line by line, in the order they come (stderr on a thread of its own).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        })
    })
    .collect();
    drop(tx);
    let mut last = String::new();
    for line in rx {
        progress(&line);
        last = line;
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building image '{name}' failed ({status}): {last}");
    }
    Ok(Image { dir })
}
