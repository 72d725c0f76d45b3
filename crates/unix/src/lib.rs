//! Unix domain sockets at paths of any length.
//!
//! A socket address holds at most 107 bytes of path, so a data directory a little deep
//! (`/home/ci/checkouts/…/instances/web1/api.sock`) makes `bind` and `connect` fail with
//! "path must be shorter than SUN_LEN". When the path is too long, these functions open its
//! directory and name the socket through `/proc/self/fd/N/NAME` instead: the kernel resolves
//! that short path to the same directory entry, so the socket file is where the caller asked
//! and any other process can reach it by its full path.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest path a socket address holds (108 bytes less the terminating NUL).
const MAX_PATH: usize = 107;

/// Binds a listening socket at `path`, whatever its length.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    at_short_path(path, |p| UnixListener::bind(p))
}

/// Connects to the socket at `path`, whatever its length.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    at_short_path(path, |p| UnixStream::connect(p))
}

/// Runs `op` with `path`, or with a short name for it when `path` does not fit a socket address.
fn at_short_path<T>(path: &Path, op: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= MAX_PATH {
        return op(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return op(path);
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let handle = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd())).join(name);
    let result = op(&short);
    drop(handle);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A directory whose socket paths are far longer than a socket address holds.
    fn deep_dir(test: &str) -> PathBuf {
        let mut dir = std::env::temp_dir().join(format!("stratus-unix-{test}-{}", std::process::id()));
        for _ in 0..6 {
            dir.push("a-directory-name-long-enough-to-matter");
        }
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_socket_at_a_long_path_is_where_it_was_asked_and_reachable() {
        let dir = deep_dir("long");
        let path = dir.join("api.sock");
        assert!(path.as_os_str().len() > 200);
        assert!(UnixListener::bind(&path).is_err(), "the plain bind should fail at this length");

        let listener = bind(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(
            &std::fs::symlink_metadata(&path).unwrap().file_type()
        ));
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"hello").unwrap();
        });
        let mut client = connect(&path).unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        server.join().unwrap();
        assert_eq!(got, "hello");

        assert_eq!(bind(&path).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("stratus-unix-long-{}", std::process::id())),
        )
        .unwrap();
    }

    #[test]
    fn a_missing_directory_is_named_in_the_error() {
        let path = deep_dir("missing").join("gone").join("x".repeat(40)).join("api.sock");
        let err = connect(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("gone"), "{err}");
        std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("stratus-unix-missing-{}", std::process::id())),
        )
        .unwrap();
    }

    #[test]
    fn short_paths_are_used_as_they_are() {
        let dir = std::env::temp_dir().join(format!("su-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _listener = bind(&path).unwrap();
        connect(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
