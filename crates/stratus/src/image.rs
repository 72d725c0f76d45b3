//! `stratus image build`: the default guest image (kernel, initramfs, ext4 root filesystem)
//! built from Debian packages by `guest/build-image.sh`, cached per machine.

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

/// Builds (or finds up to date) the image `name`, showing the build's progress.
pub fn build(name: &str) -> Result<Image> {
    if name != "default" {
        bail!("unknown image '{name}': only 'default' can be built so far");
    }
    let dir = images_dir().join(name);
    let script = guest_sources().join("build-image.sh");
    if !script.exists() {
        bail!("cannot find the guest build script at {} (set STRATUS_GUEST_DIR to the repository's guest/ folder)", script.display());
    }
    // Progress goes to stderr: when `vm run` builds the image first, stdout is the guest's console.
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("building image '{name}' failed ({status}); the lines above say where");
    }
    Ok(Image { dir })
}
