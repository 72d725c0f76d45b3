//! Fencing, in software: a VMM whose disk is on the shared pool runs only while its host's
//! agent keeps proving that the control plane still counts the host as alive.
//!
//! After each heartbeat the control plane took, the agent writes a deadline into the fence
//! file: the time the heartbeat was sent plus [`FENCE_SHARE`] of the lease the answer gave.
//! Each such VMM (`stratus vmm --fence FILE`) reads the file a few times a second and exits at
//! once when the deadline has passed or the file is gone. The control plane declares the host
//! failed only after the whole lease and a margin, so by then the VMMs have stopped, whether
//! the agent was killed, hung, or cut off from the control plane: two copies of an instance
//! never write its disk. This is what Proxmox does with a watchdog that resets the machine;
//! here the VMMs are the only thing that must stop, so they stop themselves.
//!
//! Deadlines are on the boot-time clock (`/proc/uptime`), which no clock setting moves.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The share of a lease after which a host's shared-pool VMMs stop themselves when no later
/// heartbeat went through (the rest covers the VMMs' polling and a slow kill).
pub const FENCE_SHARE: f64 = 0.7;

/// How often a VMM looks at its fence file.
const POLL: Duration = Duration::from_millis(200);

/// Time since boot, from `/proc/uptime` (the boot-time clock, 10 ms steps).
pub fn uptime() -> std::io::Result<Duration> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    let seconds: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("/proc/uptime reads {text:?}")))?;
    Ok(Duration::from_secs_f64(seconds))
}

/// Writes the deadline for a heartbeat sent at `sent` (uptime) that the control plane took
/// with a lease of `lease`: VMMs fenced by `path` run until `sent + FENCE_SHARE * lease`.
pub fn renew(path: &Path, sent: Duration, lease: Duration) -> std::io::Result<()> {
    let deadline = sent + lease.mul_f64(FENCE_SHARE);
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, deadline.as_millis().to_string())?;
    std::fs::rename(&temporary, path)
}

/// How long VMMs fenced by `path` may still run (zero: stop now). A missing or unreadable
/// file gives them nothing: it is the agent's proof, and without it they must not run.
pub fn remaining(path: &Path) -> Duration {
    let deadline = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    match (deadline, uptime()) {
        (Some(deadline), Ok(now)) => deadline.saturating_sub(now),
        _ => Duration::ZERO,
    }
}

/// Watches `path` on a thread of its own and ends this process (exit status 75) once its
/// deadline passes: for `stratus vmm --fence`.
pub fn watch(path: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new().name("fence".into()).spawn(move || loop {
        if remaining(&path).is_zero() {
            eprintln!(
                "stratus vmm: fenced: the host agent has not renewed {} in time (it lost the control plane, or stopped); stopping the guest now so that another host may start it",
                path.display()
            );
            std::process::exit(EXIT_FENCED);
        }
        std::thread::sleep(POLL);
    })?;
    Ok(())
}

/// The exit status of a VMM that fenced itself.
pub const EXIT_FENCED: i32 = 75;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_is_a_share_of_the_lease_from_the_heartbeat() {
        let dir = std::env::temp_dir().join(format!("stratus-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fence");
        // Nothing written yet: nothing may run.
        assert_eq!(remaining(&path), Duration::ZERO);
        let now = uptime().unwrap();
        renew(&path, now, Duration::from_secs(10)).unwrap();
        let left = remaining(&path);
        assert!(left > Duration::from_secs(6) && left <= Duration::from_secs(7), "{left:?}");
        // A heartbeat sent long ago gives nothing.
        renew(&path, now.saturating_sub(Duration::from_secs(60)), Duration::from_secs(10)).unwrap();
        assert_eq!(remaining(&path), Duration::ZERO);
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(remaining(&path), Duration::ZERO);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
