//! Images: installing a kernel, an optional initrd and a root filesystem under the data
//! directory (from a recipe's build or imported from files), and making an image's warm
//! snapshot. Recipes themselves (the default busybox image, Debian 12) are built by the
//! `stratus` binary, which hands `serve` an `ImageBuilder`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use stratus_agent::HostAgent;
use stratus_api::model::{now, Image, DEFAULT_PROJECT};

use crate::db::{image_key, Db, DbError};

/// The recipes `stratus` can build: the default busybox image and Debian 12.
pub const RECIPES: &[&str] = &["default", "debian"];

/// Builds the image of a recipe (`"default"`, `"debian"`), handing progress lines to the
/// callback; returns the built image's directory (vmlinux, rootfs.ext4, cmdline, manifest).
pub type ImageBuilder = Arc<dyn Fn(&str, &mut dyn FnMut(&str)) -> anyhow::Result<PathBuf> + Send + Sync>;

/// Errors of image work.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file could not be read or written.
    #[error("{what} {path}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        cause: std::io::Error,
    },
    /// Copying the root filesystem failed.
    #[error(transparent)]
    Disk(#[from] stratus_agent::disk::DiskError),
    /// The store failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Making a root filesystem from a tarball failed.
    #[error("tarball: {0}")]
    Tarball(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |cause| ImageError::Io { what, path: path.display().to_string(), cause }
}

/// The files an image is made of.
#[derive(Clone, Debug)]
pub struct ImageFiles {
    /// Kernel (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initial ramdisk, if any.
    pub initrd: Option<PathBuf>,
    /// Root filesystem (raw ext4).
    pub rootfs: PathBuf,
    /// Kernel command line (without root=, which launches add).
    pub cmdline: String,
    /// Where it came from: a build's input hash, or "import".
    pub source: String,
}

impl ImageFiles {
    /// The files of a recipe's build directory.
    pub fn of_build(dir: &Path) -> Result<ImageFiles, ImageError> {
        let manifest =
            std::fs::read_to_string(dir.join("manifest")).map_err(io("reading", &dir.join("manifest")))?;
        let source =
            manifest.lines().find_map(|l| l.strip_prefix("input_hash=")).unwrap_or("unknown").to_owned();
        let cmdline_path = dir.join("cmdline");
        let cmdline =
            std::fs::read_to_string(&cmdline_path).map_err(io("reading", &cmdline_path))?.trim().to_owned();
        Ok(ImageFiles {
            kernel: dir.join("vmlinux"),
            initrd: None,
            rootfs: dir.join("rootfs.ext4"),
            cmdline,
            source,
        })
    }
}

/// Copies `files` into the data directory as image `name` and records it, unless the same
/// build is installed already. An image of that name is replaced (its warm snapshot with it);
/// instances keep their own disks.
pub fn install(db: &Db, data: &Path, name: &str, files: &ImageFiles) -> Result<Image, ImageError> {
    if let Some(existing) = db.image(DEFAULT_PROJECT, name)? {
        if existing.source == files.source && files.source != "import" && Path::new(&existing.rootfs).exists()
        {
            return Ok(existing);
        }
    }
    let images = data.join("images");
    let tag = if files.source == "import" { stratus_api::model::new_id() } else { files.source.clone() };
    let dir = images.join(format!("{name}-{}", &tag[..tag.len().min(12)]));
    // Its own partial directory: two installs of one name at once do not mix their files.
    let partial = images.join(format!(".{name}-{}.partial", stratus_api::model::new_id()));
    let copied = (|| -> Result<u64, ImageError> {
        std::fs::create_dir_all(&partial).map_err(io("creating", &partial))?;
        std::fs::copy(&files.kernel, partial.join("vmlinux")).map_err(io("copying", &files.kernel))?;
        if let Some(initrd) = &files.initrd {
            std::fs::copy(initrd, partial.join("initrd")).map_err(io("copying", initrd))?;
        }
        let rootfs_bytes = std::fs::metadata(&files.rootfs).map_err(io("reading", &files.rootfs))?.len();
        stratus_agent::disk::clone_image(
            &files.rootfs,
            &partial.join("rootfs.ext4"),
            rootfs_bytes.div_ceil(1 << 20),
        )?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&partial, &dir).map_err(io("renaming", &partial))?;
        Ok(rootfs_bytes)
    })();
    let rootfs_bytes = copied.inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&partial);
    })?;
    let image = Image {
        name: name.into(),
        project: DEFAULT_PROJECT.into(),
        kernel: dir.join("vmlinux").display().to_string(),
        initrd: files.initrd.as_ref().map(|_| dir.join("initrd").display().to_string()),
        rootfs: dir.join("rootfs.ext4").display().to_string(),
        cmdline: files.cmdline.clone(),
        rootfs_bytes: rootfs_bytes.div_ceil(1 << 20) << 20,
        source: files.source.clone(),
        created_at: now(),
        warm: None,
    };
    let old = db.image(DEFAULT_PROJECT, name)?;
    db.put(&image_key(DEFAULT_PROJECT, name), &image)?;
    if let Some(old_dir) = old.as_ref().and_then(|o| Path::new(&o.rootfs).parent().map(Path::to_owned)) {
        // Running instances loaded their kernel already, and their disks are their own.
        if old_dir != dir {
            let _ = std::fs::remove_dir_all(old_dir);
        }
    }
    db.event(DEFAULT_PROJECT, "", "info", format!("image {name} installed ({})", dir.display()));
    Ok(image)
}

/// Makes the image's warm snapshot (booting it once on the default network) and records it;
/// progress and the outcome go to the event log.
pub fn warm(db: &Db, agent: &dyn HostAgent, image: &Image) -> Result<(), String> {
    let log = |level: &str, message: String| db.event(&image.project, "", level, message);
    let network = match db.network(DEFAULT_PROJECT, "default") {
        Ok(Some(network)) => network,
        _ => return Err("no default network".into()),
    };
    log("info", format!("image {}: making its warm snapshot", image.name));
    let mut progress = |message: String| log("info", message);
    let warm = agent.warm(image, &network, &mut progress).map_err(|e| {
        let message = format!("image {}: no warm snapshot: {e}", image.name);
        log("error", message.clone());
        message
    })?;
    let boot = warm.boot_ms as f64 / 1e3;
    db.update(&image_key(&image.project, &image.name), |i: &mut Image| {
        i.warm = Some(warm.clone());
        true
    })
    .map_err(|e| e.to_string())?;
    log(
        "info",
        format!("image {}: warm snapshot ready (the cold boot it saves took {boot:.1} s)", image.name),
    );
    Ok(())
}

/// Runs a host tool; its stderr is the error.
fn tool(args: &[&str]) -> Result<(), ImageError> {
    let output = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| ImageError::Tarball(format!("cannot run {}: {e}", args[0])))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(ImageError::Tarball(format!("{}: {}", args[..2].join(" "), stderr.trim())))
}

/// Makes an ext4 root filesystem in `work` from a rootfs tarball, bootable the way the default
/// image is: its init script (run by its static busybox, which the tarball need not have) as
/// `/sbin/init` and its guest agent, both taken out of `base`'s root filesystem with debugfs.
pub fn rootfs_from_tarball(tarball: &Path, base: &Image, work: &Path) -> Result<PathBuf, ImageError> {
    let _ = std::fs::remove_dir_all(work);
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree).map_err(io("creating", &tree))?;
    let (tarball_s, tree_s) = (tarball.display().to_string(), tree.display().to_string());
    tool(&["tar", "-xpf", &tarball_s, "-C", &tree_s, "--numeric-owner"])?;
    for dir in
        ["usr/lib/stratus", "usr/sbin", "sbin", "bin", "etc", "proc", "sys", "dev", "tmp", "root", "var/log"]
    {
        std::fs::create_dir_all(tree.join(dir)).map_err(io("creating", &tree.join(dir)))?;
    }
    let busybox = tree.join("usr/lib/stratus/busybox");
    let init = work.join("init");
    for (inside, outside) in [
        ("/bin/busybox", &busybox),
        ("/usr/sbin/stratus-guest-agent", &tree.join("usr/sbin/stratus-guest-agent")),
        ("/sbin/init", &init),
    ] {
        let _ = std::fs::remove_file(outside);
        tool(&["debugfs", "-R", &format!("dump -p {inside} {}", outside.display()), &base.rootfs])?;
        if !outside.exists() {
            return Err(ImageError::Tarball(format!("the default image has no {inside}")));
        }
    }
    // The tarball's own init (systemd, say) needs a kernel ours is not; ours runs under our
    // busybox, whose shell finds its applets without links.
    let script = std::fs::read_to_string(&init).map_err(io("reading", &init))?;
    let body = script.split_once('\n').map(|(_, rest)| rest).unwrap_or("");
    let sbin_init = tree.join("sbin/init");
    let _ = std::fs::remove_file(&sbin_init);
    std::fs::write(&sbin_init, format!("#!/usr/lib/stratus/busybox sh\n{body}"))
        .map_err(io("writing", &sbin_init))?;
    let bin_busybox = tree.join("bin/busybox");
    if std::fs::symlink_metadata(&bin_busybox).is_err() {
        std::os::unix::fs::symlink("/usr/lib/stratus/busybox", &bin_busybox)
            .map_err(io("linking", &bin_busybox))?;
    }
    for path in [&sbin_init, &busybox, &tree.join("usr/sbin/stratus-guest-agent")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod", path))?;
    }
    let fstab = tree.join("etc/fstab");
    if !fstab.exists() {
        let lines = "sysfs /sys sysfs defaults 0 0\ntmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0\ndevpts /dev/pts devpts gid=5,mode=620,ptmxmode=666 0 0\n";
        std::fs::write(&fstab, lines).map_err(io("writing", &fstab))?;
    }
    // Content plus a third, in whole 64 MiB steps, at least 256 MiB.
    let used = tree_bytes(&tree);
    let size = ((used + used / 3) / (64 << 20) + 1).max(4) * (64 << 20);
    let rootfs = work.join("rootfs.ext4");
    let file = std::fs::File::create(&rootfs).map_err(io("creating", &rootfs))?;
    file.set_len(size).map_err(io("sizing", &rootfs))?;
    drop(file);
    tool(&["mkfs.ext4", "-q", "-F", "-T", "default", "-d", &tree_s, &rootfs.display().to_string()])?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(rootfs)
}

/// Bytes of the regular files under `dir` (symlinks not followed).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}
