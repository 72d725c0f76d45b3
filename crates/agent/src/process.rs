//! What a long-running Stratus process (`stratus serve`, `stratus control`, `stratus agent`)
//! needs of its machine: one process per data directory, files only their owner may read, and
//! a clean stop on Ctrl-C or SIGTERM.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Holds `DATA/serve.lock` for as long as the returned file is open: one server or agent per
/// data directory (a second would run every instance twice).
pub fn lock_data_dir(data: &Path) -> Result<std::fs::File> {
    let path = data.join("serve.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another `stratus serve` or `stratus agent` is using {}", data.display());
    }
    Ok(file)
}

/// Writes a file only its owner may read (it holds a token or credential), synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // A file that was there already keeps its mode through open: tighten it too.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    use std::io::Write;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (never, if the handlers cannot be installed).
pub async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
