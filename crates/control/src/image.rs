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

/// The longest a tool may work on an uploaded file (a tarball of a few GiB extracts in well
/// under a minute; what takes longer is hostile or broken).
const TOOL_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// The largest file a tool may write while working on an uploaded file: 64 GiB.
const TOOL_FILE_LIMIT: u64 = 64 << 30;

/// Runs a host tool on an uploaded file, bounded in time ([`TOOL_LIMIT`]), in the size of any
/// file it writes ([`TOOL_FILE_LIMIT`]) and in priority; its stderr is the error.
fn tool(args: &[&str]) -> Result<String, ImageError> {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(args[0]);
    command
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit and setpriority are async-signal-safe and touch only the child.
    unsafe {
        command.pre_exec(|| {
            let files = libc::rlimit { rlim_cur: TOOL_FILE_LIMIT, rlim_max: TOOL_FILE_LIMIT };
            libc::setrlimit(libc::RLIMIT_FSIZE, &files);
            let cpu = libc::rlimit { rlim_cur: TOOL_LIMIT.as_secs(), rlim_max: TOOL_LIMIT.as_secs() };
            libc::setrlimit(libc::RLIMIT_CPU, &cpu);
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| ImageError::Tarball(format!("cannot run {}: {e}", args[0])))?;
    let pid = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match waited.recv_timeout(TOOL_LIMIT) {
        Ok(output) => output.map_err(|e| ImageError::Tarball(format!("{}: {e}", args[0])))?,
        Err(_) => {
            // SAFETY: signalling the child this function started (not yet reaped: its waiter
            // is still waiting).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err(ImageError::Tarball(format!(
                "{} took more than {} s",
                args[0],
                TOOL_LIMIT.as_secs()
            )));
        }
    };
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The first line that says what went wrong (tar's notices and summary say nothing).
    let first = stderr
        .lines()
        .find(|l| {
            !l.trim().is_empty()
                && !l.contains("Removing leading")
                && !l.contains("Exiting with failure status")
        })
        .unwrap_or("failed");
    Err(ImageError::Tarball(format!("{}: {}", args[..2].join(" "), first.trim())))
}

/// What a root filesystem made from a tarball gets from the default image, and where:
/// (path in the default image, path in the new one, mode).
const FROM_BASE: [(&str, &str, u32); 3] = [
    ("/bin/busybox", "/usr/lib/stratus/busybox", 0o755),
    ("/usr/sbin/stratus-guest-agent", "/usr/sbin/stratus-guest-agent", 0o755),
    ("/sbin/init", "/sbin/init", 0o755),
];

/// Makes an ext4 root filesystem in `work` from a rootfs tarball, bootable the way the default
/// image is: its init script (run by its static busybox, which the tarball need not have) as
/// `/sbin/init` and its guest agent, both taken out of `base`'s root filesystem with debugfs.
///
/// The tarball is hostile until proven otherwise: nothing here opens a path inside the
/// extracted tree, where a symlink from the tarball (`sbin -> /sbin`) would lead to the host's
/// own files. `tar` extracts it (GNU tar defers symlinks that point outside the tree until
/// every file is in place, and strips `..`), `mkfs.ext4 -d` copies the tree without following
/// its symlinks, and what Stratus adds is written into the new filesystem itself with
/// `debugfs`, whose paths resolve inside the image; the result is checked by reading it back.
pub fn rootfs_from_tarball(tarball: &Path, base: &Image, work: &Path) -> Result<PathBuf, ImageError> {
    let _ = std::fs::remove_dir_all(work);
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree).map_err(io("creating", &tree))?;
    let (tarball_s, tree_s) = (tarball.display().to_string(), tree.display().to_string());
    tool(&["tar", "-xpf", &tarball_s, "-C", &tree_s, "--numeric-owner", "--no-overwrite-dir"])?;

    // Our files, made beside the tree (never in it).
    let ours = work.join("ours");
    std::fs::create_dir_all(&ours).map_err(io("creating", &ours))?;
    let mut added = 0;
    for (n, (inside, _, _)) in FROM_BASE.iter().enumerate() {
        let out = ours.join(n.to_string());
        tool(&["debugfs", "-R", &format!("dump -p {inside} {}", out.display()), &base.rootfs])?;
        let bytes = std::fs::metadata(&out)
            .map_err(|_| ImageError::Tarball(format!("the default image has no {inside}")))?;
        added += bytes.len();
    }
    // The tarball's own init (systemd, say) needs a kernel ours is not; ours runs under our
    // busybox, whose shell finds its applets without links.
    let init = ours.join((FROM_BASE.len() - 1).to_string());
    let script = std::fs::read_to_string(&init).map_err(io("reading", &init))?;
    let body = script.split_once('\n').map(|(_, rest)| rest).unwrap_or("");
    let init_script = format!("#!/usr/lib/stratus/busybox sh\n{body}");
    std::fs::write(&init, &init_script).map_err(io("writing", &init))?;
    let fstab = ours.join("fstab");
    std::fs::write(
        &fstab,
        "sysfs /sys sysfs defaults 0 0\ntmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0\ndevpts /dev/pts devpts gid=5,mode=620,ptmxmode=666 0 0\n",
    )
    .map_err(io("writing", &fstab))?;
    for (n, (_, _, mode)) in FROM_BASE.iter().enumerate() {
        use std::os::unix::fs::PermissionsExt;
        let path = ours.join(n.to_string());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(io("chmod", &path))?;
    }

    // Content plus a third, in whole 64 MiB steps, at least 256 MiB.
    let used = tree_bytes(&tree) + added;
    let size = ((used + used / 3) / (64 << 20) + 1).max(4) * (64 << 20);
    let rootfs = work.join("rootfs.ext4");
    let rootfs_s = rootfs.display().to_string();
    let file = std::fs::File::create(&rootfs).map_err(io("creating", &rootfs))?;
    file.set_len(size).map_err(io("sizing", &rootfs))?;
    drop(file);
    tool(&["mkfs.ext4", "-q", "-F", "-T", "default", "-d", &tree_s, &rootfs_s])?;
    // The tree goes (remove_dir_all does not follow symlinks) before anything else is done.
    std::fs::remove_dir_all(&tree).map_err(io("removing", &tree))?;

    // Into the image: the directories the init needs, our files (replacing the tarball's),
    // a /bin/busybox link and an fstab where the tarball has none. A directory of the tarball
    // that is a symlink is followed inside the image, never on the host.
    let mut commands = String::new();
    for dir in [
        "/usr",
        "/usr/lib",
        "/usr/lib/stratus",
        "/usr/sbin",
        "/sbin",
        "/bin",
        "/etc",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/root",
        "/var",
        "/var/log",
    ] {
        commands.push_str(&format!("mkdir {dir}\n"));
    }
    for (n, (_, to, _)) in FROM_BASE.iter().enumerate() {
        let (dir, name) = to.rsplit_once('/').unwrap_or(("", to));
        let dir = if dir.is_empty() { "/" } else { dir };
        commands
            .push_str(&format!("cd {dir}\nrm {name}\nwrite {} {name}\n", ours.join(n.to_string()).display()));
    }
    commands.push_str("cd /bin\nsymlink busybox /usr/lib/stratus/busybox\n");
    commands.push_str(&format!("cd /etc\nwrite {} fstab\n", fstab.display()));
    let script_path = ours.join("debugfs.commands");
    std::fs::write(&script_path, commands).map_err(io("writing", &script_path))?;
    tool(&["debugfs", "-w", "-f", &script_path.display().to_string(), &rootfs_s])?;

    // Read back: each of our files is where it must be, whole, and the init is ours.
    for (n, (_, to, _)) in FROM_BASE.iter().enumerate() {
        let expected = std::fs::metadata(ours.join(n.to_string())).map(|m| m.len()).unwrap_or(0);
        let stat = tool(&["debugfs", "-R", &format!("stat {to}"), &rootfs_s])?;
        let regular = stat.contains("Type: regular");
        let size =
            stat.split_whitespace().skip_while(|w| *w != "Size:").nth(1).and_then(|n| n.parse::<u64>().ok());
        if !regular || size != Some(expected) {
            return Err(ImageError::Tarball(format!(
                "{to} could not be put in place (the tarball has something there Stratus cannot replace: a directory, or a link out of the tree)"
            )));
        }
    }
    let written = tool(&["debugfs", "-R", "cat /sbin/init", &rootfs_s])?;
    if written != init_script {
        return Err(ImageError::Tarball("/sbin/init could not be put in place".into()));
    }
    let _ = std::fs::remove_dir_all(&ours);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn have_tools() -> bool {
        ["tar", "mkfs.ext4", "debugfs"].iter().all(|t| {
            Command::new(t).arg("-V").output().is_ok() || Command::new(t).arg("--version").output().is_ok()
        })
    }

    fn sh(line: &str) {
        let status = Command::new("sh").arg("-c").arg(line).status().unwrap();
        assert!(status.success(), "{line}");
    }

    /// A stand-in for the default image: an ext4 with a busybox, an agent and an init.
    fn base(dir: &Path) -> Image {
        let tree = dir.join("base-tree");
        for sub in ["bin", "usr/sbin", "sbin"] {
            std::fs::create_dir_all(tree.join(sub)).unwrap();
        }
        std::fs::write(tree.join("bin/busybox"), vec![7u8; 100_000]).unwrap();
        std::fs::write(tree.join("usr/sbin/stratus-guest-agent"), vec![9u8; 50_000]).unwrap();
        std::fs::write(tree.join("sbin/init"), "#!/bin/sh\necho stratus init\n").unwrap();
        let rootfs = dir.join("base.ext4");
        sh(&format!("truncate -s 64M {0} && mkfs.ext4 -q -F -d {1} {0}", rootfs.display(), tree.display()));
        Image {
            name: "default".into(),
            project: DEFAULT_PROJECT.into(),
            kernel: String::new(),
            initrd: None,
            rootfs: rootfs.display().to_string(),
            cmdline: String::new(),
            rootfs_bytes: 64 << 20,
            source: String::new(),
            created_at: 0,
            warm: None,
        }
    }

    fn read(rootfs: &Path, path: &str) -> String {
        tool(&["debugfs", "-R", &format!("cat {path}"), &rootfs.display().to_string()]).unwrap()
    }

    /// Every file under `dir` with its contents (symlinks as their targets).
    fn snapshot(dir: &Path) -> Vec<(String, String)> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                all.push((path.display().to_string(), "dir".into()));
                all.extend(snapshot(&path));
            } else if kind.is_symlink() {
                all.push((
                    path.display().to_string(),
                    format!("-> {:?}", std::fs::read_link(&path).unwrap()),
                ));
            } else {
                all.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap_or_default()));
            }
        }
        all.sort();
        all
    }

    #[test]
    fn a_tarball_becomes_a_bootable_root_filesystem_and_a_hostile_one_touches_nothing_outside() {
        if !have_tools() {
            println!("SKIPPED: tar, mkfs.ext4 or debugfs missing (a_tarball_becomes_a_bootable_root_filesystem...)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("stratus-tarball-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = base(&dir);

        // A plain one: its files are kept, and ours are added.
        let plain = dir.join("plain");
        std::fs::create_dir_all(plain.join("etc")).unwrap();
        std::fs::write(plain.join("etc/hello"), "from the tarball\n").unwrap();
        sh(&format!("tar -czf {}/plain.tar.gz -C {} .", dir.display(), plain.display()));
        let rootfs = rootfs_from_tarball(&dir.join("plain.tar.gz"), &base, &dir.join("work-plain")).unwrap();
        assert_eq!(read(&rootfs, "/etc/hello"), "from the tarball\n");
        assert_eq!(read(&rootfs, "/sbin/init"), "#!/usr/lib/stratus/busybox sh\necho stratus init\n");
        assert_eq!(read(&rootfs, "/usr/lib/stratus/busybox").len(), 100_000);
        assert!(read(&rootfs, "/etc/fstab").contains("devpts"));

        // A merged-/usr one, as Debian's and Ubuntu's are: /sbin and /bin are links into /usr,
        // and its init a link to systemd. Ours replaces it there.
        let merged = dir.join("merged");
        for sub in ["usr/sbin", "usr/bin", "usr/lib/systemd", "etc"] {
            std::fs::create_dir_all(merged.join(sub)).unwrap();
        }
        std::fs::write(merged.join("usr/lib/systemd/systemd"), "systemd\n").unwrap();
        sh(&format!(
            "cd {} && ln -s usr/sbin sbin && ln -s usr/bin bin && ln -s ../lib/systemd/systemd usr/sbin/init && tar -czf ../merged.tar.gz .",
            merged.display()
        ));
        let rootfs =
            rootfs_from_tarball(&dir.join("merged.tar.gz"), &base, &dir.join("work-merged")).unwrap();
        assert_eq!(read(&rootfs, "/usr/sbin/init"), "#!/usr/lib/stratus/busybox sh\necho stratus init\n");
        assert_eq!(read(&rootfs, "/usr/lib/systemd/systemd"), "systemd\n");

        // A hostile one: its top directories are links out of the tree (absolute, relative
        // and through `..`), then files under them, a `..` member, a hard link to a host file.
        let canary = dir.join("canary");
        for sub in ["sbin", "etc", "usr/sbin", "bin"] {
            std::fs::create_dir_all(canary.join(sub)).unwrap();
        }
        std::fs::write(canary.join("secret"), "host secret\n").unwrap();
        std::fs::write(canary.join("sbin/init"), "the host's own init\n").unwrap();
        let before = snapshot(&canary);
        let links = dir.join("links");
        std::fs::create_dir_all(&links).unwrap();
        let c = canary.display();
        sh(&format!(
            "cd {} && ln -s {c}/sbin sbin && ln -s {c}/etc etc && ln -s ../../../../../../../../{c}/usr usr && ln -s {c}/bin bin && ln {c}/secret hard",
            links.display()
        ));
        let under = dir.join("under");
        for sub in ["sbin", "etc", "usr/sbin", "bin"] {
            std::fs::create_dir_all(under.join(sub)).unwrap();
        }
        std::fs::write(under.join("sbin/init"), "evil init\n").unwrap();
        std::fs::write(under.join("etc/evil"), "evil\n").unwrap();
        std::fs::write(under.join("usr/sbin/stratus-guest-agent"), "evil agent\n").unwrap();
        std::fs::write(under.join("bin/busybox"), "evil busybox\n").unwrap();
        let hostile = dir.join("hostile.tar");
        sh(&format!(
            "tar -cf {0} -C {1} sbin etc usr bin hard && tar -rf {0} -C {2} sbin etc usr bin && tar -rf {0} -P {3}/secret",
            hostile.display(),
            links.display(),
            under.display(),
            c
        ));
        let outcome = rootfs_from_tarball(&hostile, &base, &dir.join("work-hostile"));
        println!("the hostile tarball's import: {outcome:?}");
        assert_eq!(snapshot(&canary), before, "the import wrote outside its tree: {outcome:?}");
        match outcome {
            Ok(rootfs) => {
                // Whatever the tarball had there, the init and agent are ours.
                assert_eq!(read(&rootfs, "/sbin/init"), "#!/usr/lib/stratus/busybox sh\necho stratus init\n");
                assert_eq!(read(&rootfs, "/usr/sbin/stratus-guest-agent").len(), 50_000);
            }
            Err(e) => assert_eq!(e.to_string().lines().count(), 1, "{e}"),
        }

        // Links alone extract fine (tar makes them last): what Stratus adds after must not go
        // through them, as it once did (the host's /sbin/init overwritten).
        let only_links = dir.join("links.tar");
        sh(&format!("tar -cf {} -C {} sbin etc usr bin", only_links.display(), links.display()));
        let outcome = rootfs_from_tarball(&only_links, &base, &dir.join("work-links"));
        println!("the tarball of links' import: {outcome:?}");
        assert_eq!(snapshot(&canary), before, "the import wrote through the tarball's links: {outcome:?}");
        match outcome {
            Ok(rootfs) => {
                assert_eq!(read(&rootfs, "/sbin/init"), "#!/usr/lib/stratus/busybox sh\necho stratus init\n")
            }
            Err(e) => assert_eq!(e.to_string().lines().count(), 1, "{e}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
