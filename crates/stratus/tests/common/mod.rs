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
    /// The same code as `guest`, wrapped in a bzImage.
    pub bzimage: PathBuf,
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
        Guests { guest: out.join("guest"), bzimage: out.join("guest.bzImage"), pvh: out.join("pvh") }
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

/// A `stratus` process driven like a person at its console: wait for text, type, wait again.
pub struct Interactive {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    output: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

fn pump(mut from: impl Read + Send + 'static, to: std::sync::Arc<std::sync::Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            to.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
}

impl Interactive {
    pub fn start(args: &[&str]) -> Self {
        Self::start_program(env!("CARGO_BIN_EXE_stratus"), args)
    }

    pub fn start_program(program: &str, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stratus");
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        pump(child.stdout.take().unwrap(), output.clone());
        pump(child.stderr.take().unwrap(), stderr.clone());
        let stdin = child.stdin.take();
        Self { child, stdin, output, stderr }
    }

    /// Waits until the console output holds `needle` after byte `from`; returns where it ends.
    pub fn expect(&mut self, needle: &str, from: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(pos) = self.output.lock().unwrap().get(from..).and_then(|s| s.find(needle)) {
                return from + pos + needle.len();
            }
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                panic!(
                    "no {needle:?} within {limit:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.output.lock().unwrap(),
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to `limit`) for the first "tick N" line the guest prints and returns N.
    pub fn first_tick(&mut self, limit: Duration) -> u64 {
        let end = self.expect("tick ", 0, limit);
        self.expect("\n", end, limit);
        self.output()[end..].lines().next().unwrap().trim().parse().unwrap()
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for the process to end; kills it after `limit`.
    pub fn finish(mut self, limit: Duration) -> Outcome {
        drop(self.stdin.take());
        let deadline = Instant::now() + limit;
        let code = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("stratus did not exit within {limit:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50)); // let the pumps drain
        Outcome { code, stdout: self.output(), stderr: self.stderr.lock().unwrap().clone() }
    }
}

// A test that fails midway must not leave its VM running (and eating the CPU of the tests
// after it).
impl Drop for Interactive {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Builds (or finds up to date) the default guest image once per test binary, through
/// `stratus image build` with its progress in the test log. `vm run` without `--kernel` boots it.
pub fn ensure_default_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO_BIN_EXE_stratus"))
            .args(["image", "build"])
            .status()
            .expect("running stratus image build");
        assert!(status.success(), "stratus image build failed");
    });
}

/// A test "host" network: a network namespace of our own with a tap device in it, up, with
/// `10.213.<n>.1/24` on the host side. All test traffic stays inside this namespace.
pub struct TestNet {
    pub netns: String,
    pub tap: String,
    pub host_ip: String,
    pub guest_ip: String,
}

impl TestNet {
    /// None (with a loud skip line) when this process cannot create namespaces and taps.
    pub fn create(n: u8, test: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
            println!("SKIPPED: {test} needs root and /dev/net/tun");
            return None;
        }
        let netns = format!("stratus-test-{}-{n}", std::process::id());
        let tap = format!("sttap{n}");
        let net = Self { netns, tap, host_ip: format!("10.213.{n}.1"), guest_ip: format!("10.213.{n}.2") };
        let run = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip");
            assert!(status.success(), "ip {args:?} failed");
        };
        run(&["netns", "add", &net.netns]);
        run(&["-n", &net.netns, "tuntap", "add", &net.tap, "mode", "tap"]);
        run(&["-n", &net.netns, "addr", "add", &format!("{}/24", net.host_ip), "dev", &net.tap]);
        run(&["-n", &net.netns, "link", "set", &net.tap, "up"]);
        run(&["-n", &net.netns, "link", "set", "lo", "up"]);
        Some(net)
    }

    /// Another tap in the namespace, up but with no address (for a second VM's card).
    pub fn add_tap(&self, name: &str) {
        for args in [
            vec!["-n", &self.netns, "tuntap", "add", name, "mode", "tap"],
            vec!["-n", &self.netns, "link", "set", name, "up"],
        ] {
            let status = Command::new("ip").args(&args).status().expect("ip");
            assert!(status.success(), "ip {args:?} failed");
        }
    }

    /// `stratus ARGS` inside the namespace (where the tap is).
    pub fn stratus_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["netns", "exec", &self.netns, env!("CARGO_BIN_EXE_stratus")];
        all.extend_from_slice(args);
        all
    }

    /// Starts `f` on a thread that has joined the namespace.
    pub fn spawn_within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

/// An `Interactive` stratus started through `ip netns exec`.
pub fn interactive_in(net: &TestNet, args: &[&str]) -> Interactive {
    Interactive::start_program("ip", &net.stratus_args(args))
}

/// Installs the Debian packages a test needs when they are missing (a fresh machine has
/// neither the C library headers nor the kernel's uapi headers guaranteed).
pub fn ensure_packages(packages: &[&str]) {
    // Tests of one binary run in parallel: one apt at a time (another process's apt is waited
    // for through dpkg's lock timeout).
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _apt = APT.lock().unwrap_or_else(|p| p.into_inner());
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    println!("installing {missing:?} for the tests");
    let _ = Command::new("apt-get").args(["update", "-q"]).status();
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .expect("apt-get");
    assert!(status.success(), "installing {missing:?} failed");
}

/// The highest "tick N" a test guest printed in `text`.
pub fn last_tick(text: &str) -> u64 {
    text.lines().filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok()).max().expect("a tick")
}

/// A `stratus vmm` process serving its API on a socket in a fresh directory; its console is
/// its stdout (and stdin), read like `Interactive`'s.
pub struct VmmProcess {
    pub console: Interactive,
    pub dir: PathBuf,
    pub sock: PathBuf,
}

impl VmmProcess {
    /// Starts `stratus vmm --api-sock DIR/api.sock EXTRA...` and waits for its socket.
    pub fn start(name: &str, extra: &[&str]) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(&dir, extra)
    }

    /// Like `start`, in an existing directory (a second VMM beside a first).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Self {
        Self::start_within(None, dir, extra)
    }

    /// Like `start_in`, inside `net`'s namespace when given (where its taps are).
    pub fn start_within(net: Option<&TestNet>, dir: &Path, extra: &[&str]) -> Self {
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let sock = dir.join(format!("api{n}.sock"));
        let mut args = vec!["vmm", "--api-sock", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let console = match net {
            Some(net) => interactive_in(net, &args),
            None => Interactive::start(&args),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "stratus vmm never served {}", sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { console, dir: dir.to_owned(), sock }
    }

    /// One API call: (status, JSON body or Null).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map(|b| b.to_string());
        let r = stratus_vmm::api::http::call(&self.sock, method, path, body.as_deref()).expect("API call");
        let value =
            if r.body.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&r.body).unwrap() };
        (r.status, value)
    }

    /// A call that must succeed; returns its body.
    pub fn ok(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let (status, value) = self.call(method, path, body);
        assert!((200..300).contains(&status), "{method} {path}: {status} {value}");
        value
    }

    /// A call that must fail with `status`; returns the error message.
    pub fn fails(&self, method: &str, path: &str, body: Option<serde_json::Value>, status: u16) -> String {
        let (got, value) = self.call(method, path, body);
        assert_eq!(got, status, "{method} {path}: {value}");
        value["error"].as_str().expect("an error message").to_owned()
    }

    pub fn state(&self) -> String {
        self.ok("GET", "/vm", None)["state"].as_str().unwrap().to_owned()
    }

    /// Configures the tiny guest with `cmdline`.
    pub fn configure_tiny(&self, cmdline: &str, memory_mib: u64) {
        self.ok("PUT", "/vm/machine", Some(serde_json::json!({ "vcpus": 1, "memory_mib": memory_mib })));
        self.ok(
            "PUT",
            "/vm/boot",
            Some(serde_json::json!({ "kernel": guests().guest, "cmdline": format!("console=ttyS0 {cmdline}") })),
        );
    }

    /// Sets the machine up to boot the default image's Linux (its kernel, initramfs and
    /// command line) with `vcpus` and `memory_mib`.
    pub fn configure_default_linux(&self, vcpus: u32, memory_mib: u64) {
        let image = Path::new("/var/cache/stratus/images/default");
        self.ok("PUT", "/vm/machine", Some(serde_json::json!({ "vcpus": vcpus, "memory_mib": memory_mib })));
        let cmdline = std::fs::read_to_string(image.join("cmdline")).unwrap();
        self.ok(
            "PUT",
            "/vm/boot",
            Some(serde_json::json!({
                "kernel": image.join("vmlinux"), "initrd": image.join("initramfs.cpio"), "cmdline": cmdline.trim()
            })),
        );
    }

    /// Waits until this VMM's migration has begun to send the guest's memory (first pass or
    /// dirty rounds, bytes out) and returns its progress then; `ended` says whether the call
    /// that runs the migration has returned (too early, then).
    pub fn wait_until_migration_sends(
        &self,
        limit: Duration,
        mut ended: impl FnMut() -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.ok("GET", "/migration", None);
            if (p["phase"] == "full pass" || p["phase"] == "dirty rounds")
                && p["bytes_sent"].as_u64() > Some(0)
            {
                return p;
            }
            assert!(!ended(), "the migration ended before it was seen sending: {p}");
            assert!(Instant::now() < deadline, "the migration never began to send: {p}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the VM is in `state`.
    pub fn wait_state(&self, state: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.state() != state {
            assert!(Instant::now() < deadline, "the VM did not become {state} within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pauses and snapshots into DIR/NAME.state and DIR/NAME.mem; returns their paths.
    pub fn snapshot(&self, name: &str, diff: bool) -> (PathBuf, PathBuf) {
        let (state, mem) = (self.dir.join(format!("{name}.state")), self.dir.join(format!("{name}.mem")));
        self.ok("POST", "/vm/pause", None);
        self.ok(
            "POST",
            "/vm/snapshot",
            Some(serde_json::json!({ "state_file": state, "memory_file": mem, "diff": diff })),
        );
        (state, mem)
    }

    /// Ends the VMM through the API and checks that it left cleanly.
    pub fn quit(self) -> Outcome {
        self.ok("POST", "/vmm/quit", None);
        let outcome = self.console.finish(Duration::from_secs(10));
        assert_eq!(outcome.code, Some(0), "{outcome:?}");
        assert!(!self.sock.exists(), "the API socket is removed");
        outcome
    }
}

/// An ext4 disk image holding the guest-side tools (tests/guest-tools/*.c: `vsock-tool`,
/// `fpu-check`), built static.
pub fn tools_disk() -> PathBuf {
    ensure_packages(&["libc6-dev", "linux-libc-dev", "e2fsprogs"]);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("guest-tools-{}", std::process::id()));
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    for tool in ["vsock-tool", "fpu-check"] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/guest-tools/{tool}.c"));
        let status = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(root.join(tool))
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success(), "building {tool}");
    }
    let image = dir.join("tools.ext4");
    let _ = std::fs::remove_file(&image);
    std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let status = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&image).status().unwrap();
    assert!(status.success(), "mkfs.ext4 -d");
    image
}
