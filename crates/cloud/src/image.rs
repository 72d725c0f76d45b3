//! Images: installing a kernel, an optional initrd and a root filesystem under the data
//! directory (from a recipe's build or imported from files), and making an image's warm
//! snapshot. Recipes themselves (the default busybox image, Debian 12) are built by the
//! `stratus` binary, which hands `serve` an `ImageBuilder`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::HostAgent;
use crate::db::{image_key, Db, DbError};
use crate::model::{now, Image, DEFAULT_PROJECT, VMM_VERSION};

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
    Disk(#[from] crate::disk::DiskError),
    /// The store failed.
    #[error(transparent)]
    Db(#[from] DbError),
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
    let tag = if files.source == "import" { crate::api::new_id() } else { files.source.clone() };
    let dir = images.join(format!("{name}-{}", &tag[..tag.len().min(12)]));
    let partial = images.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(io("creating", &partial))?;
    std::fs::copy(&files.kernel, partial.join("vmlinux")).map_err(io("copying", &files.kernel))?;
    if let Some(initrd) = &files.initrd {
        std::fs::copy(initrd, partial.join("initrd")).map_err(io("copying", initrd))?;
    }
    let rootfs_bytes = std::fs::metadata(&files.rootfs).map_err(io("reading", &files.rootfs))?.len();
    crate::disk::clone_image(&files.rootfs, &partial.join("rootfs.ext4"), rootfs_bytes.div_ceil(1 << 20))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(io("renaming", &partial))?;
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

/// Whether the image's warm snapshot exists and was made by this VMM version.
pub fn warm_is_current(image: &Image) -> bool {
    image.warm.as_ref().is_some_and(|w| {
        w.vmm_version == VMM_VERSION && Path::new(&w.memory).exists() && Path::new(&w.disk).exists()
    })
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
