//! Instance disks: copy-on-write clones of an image's root filesystem (a reflink where the
//! filesystem can, else a sparse copy that skips holes), grown to the size asked for, with the
//! ext4 filesystem inside grown to match.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// How a disk was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneKind {
    /// Shares the image's blocks until written (btrfs, xfs).
    Reflink,
    /// Copied, holes kept.
    Sparse,
}

/// Errors of disk preparation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// File system error, with the path.
    #[error("{what} {path}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        cause: io::Error,
    },
    /// The size asked for is below the image's.
    #[error("a {asked} MiB disk cannot hold the image's {needed} MiB root filesystem")]
    TooSmall {
        /// Asked, MiB.
        asked: u64,
        /// Needed, MiB.
        needed: u64,
    },
    /// resize2fs failed.
    #[error("growing the filesystem failed: {0}")]
    Resize(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |cause| DiskError::Io { what, path: path.display().to_string(), cause }
}

/// Clones `image` to `disk` (which must not exist), grows it to `size_mib` and its ext4
/// filesystem with it. Written beside and renamed, so `disk` is either absent or whole.
pub fn clone_image(image: &Path, disk: &Path, size_mib: u64) -> Result<CloneKind, DiskError> {
    let source = File::open(image).map_err(io_err("opening", image))?;
    let image_len = source.metadata().map_err(io_err("reading", image))?.len();
    let size = size_mib << 20;
    if size < image_len {
        return Err(DiskError::TooSmall { asked: size_mib, needed: image_len.div_ceil(1 << 20) });
    }
    let partial = disk.with_extension("partial");
    let target = File::create(&partial).map_err(io_err("creating", &partial))?;
    let result =
        copy_into(&source, &target, image_len).map_err(io_err("copying into", &partial)).and_then(|kind| {
            target.set_len(size).map_err(io_err("growing", &partial))?;
            target.sync_all().map_err(io_err("syncing", &partial))?;
            if size > image_len {
                grow_filesystem(&partial)?;
            }
            std::fs::rename(&partial, disk).map_err(io_err("renaming", disk))?;
            Ok(kind)
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn copy_into(source: &File, target: &File, len: u64) -> io::Result<CloneKind> {
    // SAFETY: FICLONE takes the source descriptor as its argument and reads no memory of ours.
    let rc = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if rc == 0 {
        return Ok(CloneKind::Reflink);
    }
    sparse_copy(source, target, len)?;
    Ok(CloneKind::Sparse)
}

/// Copies only the data extents of `source` (SEEK_DATA/SEEK_HOLE), leaving holes as holes.
fn sparse_copy(source: &File, target: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    for (start, length) in data_extents(source, len)? {
        let mut at = start;
        while at < start + length {
            let n = ((start + length - at) as usize).min(buf.len());
            source.read_exact_at(&mut buf[..n], at)?;
            target.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
    }
    target.set_len(len)
}

/// The `(offset, length)` of each range of the first `len` bytes of `file` that holds data
/// (SEEK_DATA/SEEK_HOLE; a filesystem without holes reports one range).
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut offset: i64 = 0;
    while (offset as u64) < len {
        // SAFETY: lseek on a descriptor the caller owns; no memory is passed.
        let data = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(err);
        }
        if data as u64 >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole.min(len as i64) };
        extents.push((data as u64, (end - data) as u64));
        offset = end;
    }
    Ok(extents)
}

/// A stopped instance's disk at `path`: its size and data ranges, for a cold move.
pub fn layout(path: &Path) -> io::Result<stratus_protocol::DiskLayout> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    Ok(stratus_protocol::DiskLayout { size, extents: data_extents(&file, size)? })
}

/// `length` bytes of the disk at `path` from `offset` (fewer at its end).
pub fn read_chunk(path: &Path, offset: u64, length: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut data = vec![0; length.min(size.saturating_sub(offset)) as usize];
    file.read_exact_at(&mut data, offset)?;
    Ok(data)
}

/// Writes `data` at `offset` into the disk at `path`, made `size` bytes long (sparse) if it
/// is not; a write past `size` is refused.
pub fn write_chunk(path: &Path, size: u64, offset: u64, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if offset.checked_add(data.len() as u64).is_none_or(|end| end > size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a write past the disk's {size} bytes"),
        ));
    }
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    if file.metadata()?.len() != size {
        file.set_len(size)?;
    }
    file.write_all_at(data, offset)
}

fn grow_filesystem(disk: &Path) -> Result<(), DiskError> {
    let output = std::process::Command::new("resize2fs")
        .arg(disk)
        .output()
        .map_err(|e| DiskError::Resize(format!("cannot run resize2fs: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(DiskError::Resize(String::from_utf8_lossy(&output.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("stratus-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("image");
        let f = File::create(&image).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 40 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let disk = dir.join("disk");
        let target = File::create(&disk).unwrap();
        sparse_copy(&File::open(&image).unwrap(), &target, 64 << 20).unwrap();
        assert_eq!(std::fs::read(&image).unwrap(), std::fs::read(&disk).unwrap());
        let allocated =
            std::fs::metadata(&disk).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
        assert!(allocated < 8 << 20, "the copy allocated {allocated} bytes for 14 bytes of data");
        let too_small = clone_image(&image, &dir.join("small"), 16).unwrap_err();
        assert!(too_small.to_string().contains("cannot hold"), "{too_small}");
        assert!(!dir.join("small").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A data directory on XFS (a loop-mounted file here): instance disks share the image's
    /// blocks, and grow with their ext4 filesystem all the same.
    #[test]
    fn clones_on_xfs_are_reflinks() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: not root (an XFS loop mount needs it)");
            return;
        }
        let have = |program: &str| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !have("mkfs.xfs") {
            let _ = std::process::Command::new("apt-get").args(["update", "-q"]).status();
            let installed = std::process::Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", "xfsprogs"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success());
            assert!(installed, "installing xfsprogs failed");
        }
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program).args(args).output().unwrap();
            assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let dir = std::env::temp_dir().join(format!("stratus-reflink-test-{}", std::process::id()));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let backing = dir.join("xfs.img");
        File::create(&backing).unwrap().set_len(512 << 20).unwrap();
        run("mkfs.xfs", &["-q", "-m", "reflink=1", backing.to_str().unwrap()]);
        run("mount", &["-o", "loop", backing.to_str().unwrap(), mnt.to_str().unwrap()]);
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let mounted = Unmount(&mnt);
        // An image: a small ext4 filesystem with a file in it.
        let image = mnt.join("rootfs.ext4");
        let content = dir.join("hello");
        std::fs::write(&content, "from the image\n").unwrap();
        File::create(&image).unwrap().set_len(16 << 20).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        run("debugfs", &["-w", "-R", &format!("write {} hello", content.display()), image.to_str().unwrap()]);
        let disk = mnt.join("disk.raw");
        assert_eq!(clone_image(&image, &disk, 64).unwrap(), CloneKind::Reflink);
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 << 20);
        // The image's extents are shared, not copied; the filesystem inside is grown and whole.
        let extents = run("filefrag", &["-v", disk.to_str().unwrap()]);
        assert!(extents.contains("shared"), "no shared extent in the clone:\n{extents}");
        let blocks = run("dumpe2fs", &["-h", disk.to_str().unwrap()]);
        let count: u64 = blocks
            .lines()
            .find_map(|l| l.strip_prefix("Block count:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let block_size: u64 = blocks
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        assert_eq!(count * block_size, 64 << 20, "{blocks}");
        run("e2fsck", &["-fn", disk.to_str().unwrap()]);
        assert_eq!(run("debugfs", &["-R", "cat hello", disk.to_str().unwrap()]), "from the image\n");
        drop(mounted);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
