//! Shared by the integration tests: building the tiny test guests, running `stratus` as a user
//! would (a real process, a real KVM), and skipping loudly where the host lacks KVM.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// True when this host can run VMs; otherwise prints the loud skip line the CI log shows.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        println!("SKIPPED: no /dev/kvm ({test})");
        false
    }
}

/// Paths of the tiny test guests, built once per test binary from tests/guests.
pub struct Guests {
    /// 64-bit boot protocol guest; "test=NAME exit=HOW" on the command line.
    pub guest: PathBuf,
    /// 32-bit PVH entry guest.
    pub pvh: PathBuf,
}

pub fn guests() -> &'static Guests {
    static GUESTS: OnceLock<Guests> = OnceLock::new();
    GUESTS.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/guests/build.sh");
        let status =
            Command::new("bash").arg(&script).arg(&out).status().expect("running tests/guests/build.sh");
        assert!(status.success(), "building the test guests failed");
        Guests { guest: out.join("guest"), pvh: out.join("pvh") }
    })
}

/// What a finished `stratus` process left behind.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `stratus ARGS` with `input` on stdin; kills it after `limit`.
pub fn stratus(args: &[&str], input: &[u8], limit: Duration) -> Outcome {
    stratus_cmd(Command::new(env!("CARGO_BIN_EXE_stratus")).args(args), input, limit)
}

/// Runs a prepared command with `input` on stdin; kills it after `limit`.
pub fn stratus_cmd(cmd: &mut Command, input: &[u8], limit: Duration) -> Outcome {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stratus");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        // Keep stdin open a moment so an interactive guest is not cut off, then close it.
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let outcome = Outcome {
        code: status.and_then(|s| s.code()),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    assert!(status.is_some(), "stratus did not finish within {limit:?}: {outcome:#?}");
    outcome
}

/// Runs the tiny guest with `cmdline` and the given extra arguments.
pub fn run_guest(cmdline: &str, extra: &[&str]) -> Outcome {
    run_guest_with_input(cmdline, extra, b"")
}

pub fn run_guest_with_input(cmdline: &str, extra: &[&str], input: &[u8]) -> Outcome {
    let guest = guests().guest.to_str().unwrap().to_owned();
    let mut args = vec!["vm", "run", "--kernel", &guest, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    stratus(&args, input, Duration::from_secs(60))
}
