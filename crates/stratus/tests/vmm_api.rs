//! The VMM as a service, driven through its API socket as an agent would: configuration,
//! lifecycle, errors that leave the VM unharmed, metrics, and snapshot/restore into new
//! processes — with the tiny test guest, so each test takes well under a second of guest time.

mod common;

use std::time::{Duration, Instant};

use common::{guests, kvm_available, last_tick, VmmProcess};
use serde_json::json;

fn io_in(vmm: &VmmProcess) -> u64 {
    vmm.ok("GET", "/metrics", None)["vcpus"][0]["exits"]["io_in"].as_u64().unwrap()
}

#[test]
fn api_configures_runs_pauses_and_refuses_bad_requests_without_harm() {
    if !kvm_available("api_configures_runs_pauses_and_refuses_bad_requests_without_harm") {
        return;
    }
    let mut vmm = VmmProcess::start("lifecycle", &[]);
    assert_eq!(vmm.state(), "not_started");

    // Bad requests: each a 4xx with a message, none changing anything.
    assert!(vmm.fails("GET", "/nothing", None, 404).contains("no such resource"));
    assert!(vmm.fails("DELETE", "/vm/machine", None, 405).contains("not allowed"));
    let e = vmm.fails("PUT", "/vm/machine", Some(json!({"vcpus": 1, "memory_mib": 64, "turbo": true})), 400);
    assert!(e.contains("unknown field `turbo`"), "{e}");
    assert!(vmm
        .fails("PUT", "/vm/machine", Some(json!({"vcpus": 0, "memory_mib": 64})), 400)
        .contains("vCPUs"));
    assert!(vmm
        .fails("PUT", "/vm/machine", Some(json!({"vcpus": 1, "memory_mib": 1u64 << 40})), 400)
        .contains("more than"));
    assert!(vmm
        .fails("PUT", "/vm/boot", Some(json!({"kernel": "/no/such/kernel"})), 400)
        .contains("no such file"));
    assert!(vmm
        .fails("PUT", "/vm/drives/bad.id", Some(json!({"path": "/x"})), 400)
        .contains("not a valid id"));
    assert!(vmm.fails("PUT", "/vm/nets/eth0", Some(json!({"tap": "t", "mac": "zz"})), 400).contains("MAC"));
    assert!(vmm
        .fails("PUT", "/vm/vsock", Some(json!({"cid": 2, "socket": "/tmp/x"})), 400)
        .contains("reserved"));
    assert!(vmm.fails("POST", "/vm/pause", None, 409).contains("not started"));
    assert!(vmm.fails("POST", "/vm/start", None, 409).contains("no boot source"));
    let raw = stratus_vmm::api::http::call(&vmm.sock, "PUT", "/vm/machine", Some("{not json")).unwrap();
    assert_eq!(raw.status, 400, "{}", raw.body);
    let config = vmm.ok("GET", "/vm/config", None);
    assert_eq!(config["machine"], json!({"vcpus": 1, "memory_mib": 256}), "nothing changed: {config}");

    // The echo guest polls the UART's line status while it waits for input: a steady stream of
    // port reads, which pausing must stop and resuming must restart.
    vmm.configure_tiny("test=echo exit=poweroff", 64);
    assert_eq!(vmm.ok("GET", "/vm/config", None)["machine"]["memory_mib"], 64);
    vmm.ok("POST", "/vm/start", None);
    vmm.console.expect("ready", 0, Duration::from_secs(10));
    assert_eq!(vmm.state(), "running");
    assert!(vmm.fails("POST", "/vm/start", None, 409).contains("running"));
    assert!(vmm
        .fails("PUT", "/vm/machine", Some(json!({"vcpus": 2, "memory_mib": 64})), 409)
        .contains("running"));
    assert!(vmm
        .fails("POST", "/vm/snapshot", Some(json!({"state_file": "/tmp/s", "memory_file": "/tmp/m"})), 409)
        .contains("pause it first"));

    vmm.ok("POST", "/vm/pause", None);
    assert_eq!(vmm.state(), "paused");
    let frozen = io_in(&vmm);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(io_in(&vmm), frozen, "a paused guest ran");
    vmm.ok("POST", "/vm/resume", None);
    std::thread::sleep(Duration::from_millis(100));
    assert!(io_in(&vmm) > frozen, "a resumed guest does not run");

    let metrics = vmm.ok("GET", "/metrics", None);
    assert!(metrics["vcpus"][0]["exits"]["io_out"].as_u64().unwrap() >= 6, "the guest printed: {metrics}");
    assert!(metrics["uptime_ms"].as_u64().unwrap() > 0);

    // The guest still works after all that: it echoes and powers off.
    vmm.console.send("still here\n");
    vmm.console.expect("echo: still here", 0, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while vmm.state() != "stopped" {
        assert!(Instant::now() < deadline, "the guest did not power off");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vmm.ok("GET", "/vm", None)["exit_reason"], "guest powered off");
    assert!(vmm.fails("POST", "/vm/resume", None, 409).contains("stopped"));
    vmm.quit();
}

#[test]
fn hard_stop_ends_a_guest_that_ignores_everything() {
    if !kvm_available("hard_stop_ends_a_guest_that_ignores_everything") {
        return;
    }
    let vmm = VmmProcess::start("stop", &[]);
    vmm.configure_tiny("test=boot exit=hang", 32);
    vmm.ok("POST", "/vm/start", None);
    // The tiny guest has no ACPI interpreter: the power button goes unanswered.
    vmm.ok("POST", "/vm/shutdown", None);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vmm.state(), "running");
    vmm.ok("POST", "/vm/stop", None);
    let info = vmm.ok("GET", "/vm", None);
    assert_eq!(info["state"], "stopped");
    assert_eq!(info["exit_reason"], "stopped through the API");
    vmm.quit();
}

/// Restores `state`/`mem` into a new VMM whose console is on stdout.
fn restore(dir: &std::path::Path, state: &std::path::Path, mems: &[&std::path::Path]) -> VmmProcess {
    let mut args = vec!["--restore", state.to_str().unwrap()];
    for m in mems {
        args.extend_from_slice(&["--memory-file", m.to_str().unwrap()]);
    }
    VmmProcess::start_in(dir, &args)
}

#[test]
fn a_snapshot_comes_back_to_life_in_other_processes_twice_at_once() {
    if !kvm_available("a_snapshot_comes_back_to_life_in_other_processes_twice_at_once") {
        return;
    }
    let mut vmm = VmmProcess::start("snapshot", &[]);
    vmm.configure_tiny("test=echo exit=poweroff", 64);
    vmm.ok("POST", "/vm/start", None);
    vmm.console.expect("ready", 0, Duration::from_secs(10));
    let (state, mem) = vmm.snapshot("echo", false);
    let dir = vmm.dir.clone();
    vmm.quit();

    // Two clones of one snapshot at once: each carries on from "ready" on its own.
    let mut a = restore(&dir, &state, &[&mem]);
    let mut b = restore(&dir, &state, &[&mem]);
    assert_eq!(a.state(), "running");
    a.console.send("from a\n");
    b.console.send("from b\n");
    a.console.expect("echo: from a", 0, Duration::from_secs(10));
    b.console.expect("echo: from b", 0, Duration::from_secs(10));
    assert!(!a.console.output().contains("ready"), "a restored guest does not boot again");
    for vmm in [a, b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while vmm.state() != "stopped" {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(vmm.ok("GET", "/vm", None)["exit_reason"], "guest powered off");
        vmm.quit();
    }

    // A damaged state file is refused with the reason; the VMM stays usable.
    let damaged = dir.join("damaged.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&damaged, &bytes).unwrap();
    let vmm = VmmProcess::start_in(&dir, &[]);
    let e =
        vmm.fails("POST", "/vm/restore", Some(json!({"state_file": damaged, "memory_files": [mem]})), 400);
    assert!(e.contains("damaged"), "{e}");
    let e = vmm.fails("POST", "/vm/restore", Some(json!({"state_file": mem, "memory_files": [mem]})), 400);
    assert!(e.contains("not a Stratus snapshot"), "{e}");
    let e =
        vmm.fails("POST", "/vm/restore", Some(json!({"state_file": state, "memory_files": [state]})), 400);
    assert!(e.contains("not this snapshot's memory file"), "{e}");
    assert_eq!(vmm.state(), "not_started");
    vmm.quit();

    // From the command line: `stratus vmm --restore` with a file that is not a snapshot.
    let out = common::stratus(
        &[
            "vmm",
            "--api-sock",
            dir.join("x.sock").to_str().unwrap(),
            "--restore",
            mem.to_str().unwrap(),
            "--memory-file",
            mem.to_str().unwrap(),
        ],
        b"",
        Duration::from_secs(10),
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("not a Stratus snapshot state file"), "{}", out.stderr);
}

#[test]
fn vm_run_serves_the_api_and_the_cli_drives_it() {
    if !kvm_available("vm_run_serves_the_api_and_the_cli_drives_it") {
        return;
    }
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmrun-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let guest = guests().guest.to_str().unwrap().to_owned();
    let mut run = common::Interactive::start(&[
        "vm",
        "run",
        "--kernel",
        &guest,
        "--cmdline",
        "console=ttyS0 test=echo exit=poweroff",
        "--memory",
        "32M",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    run.expect("ready", 0, Duration::from_secs(10));
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--api-sock", sock.to_str().unwrap()]);
        common::stratus(&all, b"", Duration::from_secs(20))
    };
    let info = cli(&["vm", "info"]);
    assert_eq!(info.code, Some(0), "{info:?}");
    assert!(info.stdout.contains("\"state\": \"running\""), "{}", info.stdout);
    let paused = cli(&["vm", "pause"]);
    assert_eq!(paused.code, Some(0), "{paused:?}");
    assert!(cli(&["vm", "info"]).stdout.contains("\"paused\""));
    assert_eq!(cli(&["vm", "resume"]).code, Some(0));
    let trace = cli(&["vm", "trace", "--interval", "0.2", "--count", "1"]);
    assert_eq!(trace.code, Some(0), "{trace:?}");
    assert!(trace.stdout.contains("EXITS/s") && trace.stdout.contains("io_in"), "{}", trace.stdout);
    let bad = cli(&["vm", "snapshot", "--state", "/nonexistent/dir/s", "--memory", "/nonexistent/dir/m"]);
    assert_eq!(bad.code, Some(1));
    assert!(bad.stderr.contains("/nonexistent/dir"), "{}", bad.stderr);
    assert!(cli(&["vm", "info"]).stdout.contains("\"running\""), "a failed snapshot resumes the VM");
    run.send("bye\n");
    run.expect("echo: bye", 0, Duration::from_secs(10));
    let out = run.finish(Duration::from_secs(10));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!sock.exists(), "vm run removes its API socket");
}

#[test]
fn a_snapshot_of_format_version_1_still_restores() {
    if !kvm_available("a_snapshot_of_format_version_1_still_restores") {
        return;
    }
    // tests/snapshots/v1: the echo guest saved (16 MiB, waiting for a line) by the first
    // format version, on a PVM host. Its vCPU state carries PVM's MSRs, which hardware KVM
    // does not have, so the restore half runs on PVM hosts only (decoding is a unit test).
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        println!("SKIPPED: the kept version-1 snapshot was saved on a PVM host; this host is not PVM");
        return;
    }
    let kept = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/snapshots/v1");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("v1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem = dir.join("echo.mem");
    let gunzip = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc '{}' > '{}'", kept.join("echo.mem.gz").display(), mem.display()))
        .status()
        .unwrap();
    assert!(gunzip.success());
    let mut vmm = restore(&dir, &kept.join("echo.state"), &[&mem]);
    vmm.console.send("old snapshot, new build\n");
    vmm.console.expect("echo: old snapshot, new build", 0, Duration::from_secs(10));
    vmm.quit();
}

/// Requests and bytes of the first device, per second, over `window`.
fn device_rates(vmm: &VmmProcess, window: Duration) -> (f64, f64) {
    let read = || {
        let m = vmm.ok("GET", "/metrics", None);
        (m["devices"][0]["requests"].as_f64().unwrap(), m["devices"][0]["bytes"].as_f64().unwrap())
    };
    let (r0, b0) = read();
    let t = Instant::now();
    std::thread::sleep(window);
    let (r1, b1) = read();
    let s = t.elapsed().as_secs_f64();
    ((r1 - r0) / s, (b1 - b0) / s)
}

#[test]
fn disk_rate_limits_hold_and_change_while_the_guest_runs() {
    if !kvm_available("disk_rate_limits_hold_and_change_while_the_guest_runs") {
        return;
    }
    let mut vmm = VmmProcess::start("ratelimit", &[]);
    let disk = vmm.dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    vmm.configure_tiny("test=blk-bench bench_mib=48 bench_ops=1000000 exit=poweroff", 64);
    // 4 MiB/s: the guest's 1 MiB sequential reads go at four a second.
    vmm.ok("PUT", "/vm/drives/vda", Some(json!({"path": disk, "rate_limit": {"bytes_per_sec": 4 << 20}})));
    assert!(vmm.fails("PATCH", "/vm/drives/vdb", Some(json!({"rate_limit": {}})), 404).contains("no drive"));
    assert!(vmm
        .fails("PATCH", "/vm/drives/vda", Some(json!({"rate_limit": {"ops_per_sec": 0}})), 400)
        .contains("0"));
    vmm.ok("POST", "/vm/start", None);
    vmm.console.expect("bench: start seq-read", 0, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500)); // past the first second's burst
    let (_, bytes) = device_rates(&vmm, Duration::from_secs(2));
    let mib = bytes / 1048576.0;
    assert!((2.5..=5.5).contains(&mib), "4 MiB/s limit: {mib:.1} MiB/s");

    // Changed while it runs: 100 operations a second, bandwidth free.
    vmm.ok("PATCH", "/vm/drives/vda", Some(json!({"rate_limit": {"ops_per_sec": 100}})));
    vmm.console.expect("bench: start rand-read", 0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1200));
    let (ops, _) = device_rates(&vmm, Duration::from_secs(2));
    assert!((70.0..=130.0).contains(&ops), "100 ops/s limit: {ops:.0} ops/s");
    assert_eq!(vmm.ok("GET", "/vm/config", None)["drives"][0]["rate_limit"]["ops_per_sec"], 100);

    // Lifted: the guest goes as fast as it can.
    vmm.ok("PATCH", "/vm/drives/vda", Some(json!({"rate_limit": {}})));
    let (ops, _) = device_rates(&vmm, Duration::from_secs(1));
    assert!(ops > 500.0, "unlimited: {ops:.0} ops/s");
    let metrics = vmm.ok("GET", "/metrics", None);
    assert_eq!(metrics["devices"][0]["id"], "vda");
    assert_eq!(metrics["devices"][0]["rejected"], 0);
    vmm.ok("POST", "/vm/stop", None);
    vmm.quit();
}

#[test]
fn diff_snapshots_layer_over_a_full_one() {
    if !kvm_available("diff_snapshots_layer_over_a_full_one") {
        return;
    }
    // The snapshot guest fills 4 MiB with a pattern, then counts ticks every 100 ms.
    let mut vmm = VmmProcess::start("diff", &[]);
    vmm.configure_tiny("test=snapshot fill_mib=4 exit=poweroff", 64);
    let none =
        json!({"state_file": vmm.dir.join("x.state"), "memory_file": vmm.dir.join("x.mem"), "diff": true});
    vmm.ok("POST", "/vm/start", None);
    vmm.console.expect("tick 2", 0, Duration::from_secs(30));
    vmm.ok("POST", "/vm/pause", None);
    assert!(vmm.fails("POST", "/vm/snapshot", Some(none), 409).contains("needs a full snapshot"));
    let (_, full) = vmm.snapshot("full", false);
    vmm.ok("POST", "/vm/resume", None);
    std::thread::sleep(Duration::from_millis(500));
    let (state, diff) = vmm.snapshot("diff", true);
    std::thread::sleep(Duration::from_millis(100));
    let at_diff = last_tick(&vmm.console.output());
    let allocated =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    assert!(
        allocated(&diff) < allocated(&full) / 2,
        "the diff holds only what changed: {} vs {}",
        allocated(&diff),
        allocated(&full)
    );
    let dir = vmm.dir.clone();
    vmm.quit();

    // The diff's state without its diff memory file is refused; with it, the guest goes on
    // from the diff, and its 4 MiB pattern is intact.
    let refused = VmmProcess::start_in(&dir, &[]);
    let e =
        refused.fails("POST", "/vm/restore", Some(json!({"state_file": state, "memory_files": [full]})), 400);
    assert!(e.contains("diff"), "{e}");
    refused.quit();
    let mut back = restore(&dir, &state, &[&full, &diff]);
    let first = back.console.first_tick(Duration::from_secs(10));
    assert!((at_diff + 1..=at_diff + 3).contains(&first), "diff at tick {at_diff}, restored at {first}");
    // Its 4 MiB pattern is checked after it migrates on: a restored VM migrates whole,
    // including the pages it has not touched since the restore (they live in the memory
    // file, not in zeros).
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = VmmProcess::start_in(&dir, &["--incoming", &to]);
    back.ok("POST", "/vm/migrate", Some(json!({"to": to})));
    dst.console.send("c");
    dst.console.expect("check ok", 0, Duration::from_secs(30));
    back.quit();
    dst.quit();
}

#[test]
fn network_rate_limits_hold_and_change_while_the_guest_runs() {
    if !kvm_available("network_rate_limits_hold_and_change_while_the_guest_runs") {
        return;
    }
    let Some(net) = common::TestNet::create(4, "network_rate_limits_hold_and_change_while_the_guest_runs")
    else {
        return;
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vmm-netlimit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut vmm = VmmProcess::start_within(Some(&net), &dir, &[]);
    // The guest sends 1514-byte frames as fast as its ring takes them.
    vmm.configure_tiny("test=net-bench bench_frames=100000000 exit=poweroff", 64);
    vmm.ok("PUT", "/vm/nets/eth0", Some(json!({"tap": net.tap, "rate_limit": {"ops_per_sec": 300}})));
    vmm.ok("POST", "/vm/start", None);
    vmm.console.expect("bench: start net-tx", 0, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500)); // past the first second's burst
    let (frames, _) = device_rates(&vmm, Duration::from_secs(2));
    assert!((200.0..=400.0).contains(&frames), "300 frames/s limit: {frames:.0} frames/s");

    // 1 MiB/s of bandwidth instead: about 690 frames of 1514 bytes a second.
    vmm.ok("PATCH", "/vm/nets/eth0", Some(json!({"rate_limit": {"bytes_per_sec": 1 << 20}})));
    std::thread::sleep(Duration::from_millis(1500));
    let (_, bytes) = device_rates(&vmm, Duration::from_secs(2));
    let mib = bytes / 1048576.0;
    assert!((0.6..=1.4).contains(&mib), "1 MiB/s limit: {mib:.2} MiB/s");

    vmm.ok("PATCH", "/vm/nets/eth0", Some(json!({"rate_limit": {}})));
    let (frames, _) = device_rates(&vmm, Duration::from_secs(1));
    assert!(frames > 2000.0, "unlimited: {frames:.0} frames/s");
    vmm.ok("POST", "/vm/stop", None);
    vmm.quit();
}

#[test]
fn a_destination_with_a_secret_takes_only_the_migration_that_has_it() {
    if !kvm_available("a_destination_with_a_secret_takes_only_the_migration_that_has_it") {
        return;
    }
    let src = running_source("secret", "test=dirty rate_mib=1 dirty_mib=16 exit=poweroff");
    let dir = src.dir.clone();
    let secret_file = dir.join("migration.secret");
    std::fs::write(&secret_file, "0123456789abcdef-the-secret\n").unwrap();
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = VmmProcess::start_in(
        &dir,
        &["--incoming", &to, "--migration-secret-file", secret_file.to_str().unwrap()],
    );

    // Anyone reaching the port: a stranger writing garbage, a source without the secret, one
    // with another. Each is refused, the guest stays at its source, and the destination waits on.
    {
        use std::io::Write;
        let mut stranger = std::net::TcpStream::connect(to.strip_prefix("tcp:").unwrap()).unwrap();
        let _ = stranger.write_all(b"GET / HTTP/1.1\r\n\r\n");
    }
    let e = src.fails("POST", "/vm/migrate", Some(json!({"to": to})), 500);
    assert!(e.contains("only with its secret (none given)") && e.contains("runs here still"), "{e}");
    let e =
        src.fails("POST", "/vm/migrate", Some(json!({"to": to, "secret": "0123456789abcdef-a-guess"})), 500);
    assert!(e.contains("only with its secret (a wrong one)"), "{e}");
    assert_eq!(src.state(), "running");
    assert_eq!(dst.state(), "not_started");

    // The source that has it, from the command line.
    let out = common::stratus(
        &[
            "vm",
            "migrate",
            "--api-sock",
            src.sock.to_str().unwrap(),
            "--to",
            &to,
            "--secret-file",
            secret_file.to_str().unwrap(),
        ],
        b"",
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(dst.state(), "running");
    dst.console.send("c");
    dst.console.expect("check ok", 0, Duration::from_secs(30));
    src.quit();
    dst.quit();
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A source VMM running the tiny guest (128 MiB) with `cmdline`, and a destination waiting
/// for it at the address returned.
fn running_pair(name: &str, cmdline: &str) -> (VmmProcess, VmmProcess, String) {
    let src = running_source(name, cmdline);
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let dst = VmmProcess::start_in(&src.dir.clone(), &["--incoming", &to]);
    (src, dst, to)
}

/// A VMM running the tiny guest (128 MiB) with `cmdline`, once it ticks.
fn running_source(name: &str, cmdline: &str) -> VmmProcess {
    let mut src = VmmProcess::start(name, &[]);
    src.configure_tiny(cmdline, 128);
    src.ok("POST", "/vm/start", None);
    src.console.expect("tick 1", 0, Duration::from_secs(30));
    src
}

/// A destination that takes the Hello, answers with `answer`, reads `then_read` bytes and
/// hangs up: a VMM that dies, or lies, mid-stream.
fn failing_destination(answer: Vec<u8>, then_read: usize) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("tcp:{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut payload = Vec::new();
        stratus_vmm::migration::stream::read_frame(&mut s, &mut payload).unwrap();
        s.write_all(&answer).unwrap();
        let mut sink = vec![0u8; then_read];
        let _ = s.read_exact(&mut sink);
    });
    (to, handle)
}

#[test]
fn live_migration_moves_a_running_guest_and_a_failure_leaves_it_running_here() {
    if !kvm_available("live_migration_moves_a_running_guest_and_a_failure_leaves_it_running_here") {
        return;
    }
    use stratus_vmm::migration::stream::{write_frame, Kind};
    // The guest dirties 20 MiB/s over 32 MiB and keeps a generation per page to check.
    let mut src = VmmProcess::start("migrate", &[]);
    src.configure_tiny("test=dirty rate_mib=20 dirty_mib=32 exit=poweroff", 256);
    src.ok("POST", "/vm/start", None);
    src.console.expect("tick 1", 0, Duration::from_secs(30));

    // Failures before the destination says it runs: the guest stays, running, here.
    let mut accept = Vec::new();
    write_frame(&mut accept, Kind::Accept, &[]).unwrap();
    let mut refuse = Vec::new();
    write_frame(&mut refuse, Kind::Refuse, b"no room for you").unwrap();
    let mut corrupt = accept.clone();
    corrupt[0] = Kind::Running as u8; // a Running before any page: out of turn
    for (answer, read, expect) in [
        (accept.clone(), 1 << 20, "failed"),                   // dies after 1 MiB
        (refuse, 0, "no room for you"),                        // refuses the configuration
        (corrupt, 0, "instead of an answer"),                  // says something out of turn
        (vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0, "migration"), // garbage
    ] {
        let (to, dest) = failing_destination(answer, read);
        let e = src.fails("POST", "/vm/migrate", Some(json!({"to": to})), 500);
        assert!(e.contains(expect) && e.contains("runs here still"), "{e}");
        dest.join().unwrap();
        assert_eq!(src.state(), "running");
    }
    let e =
        src.fails("POST", "/vm/migrate", Some(json!({"to": format!("tcp:127.0.0.1:{}", free_port())})), 500);
    assert!(e.contains("connecting"), "{e}");
    let pos = src.console.output().len();
    src.console.send("c");
    src.console.expect("check ok", pos, Duration::from_secs(30));

    // A real destination that cannot give the VM what it needs refuses it, saying why,
    // before any page moves.
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let wrong = VmmProcess::start_in(&src.dir.clone(), &["--incoming", &to, "--net", "tap=stratus-nope0"]);
    let e = src.fails("POST", "/vm/migrate", Some(json!({"to": to})), 500);
    assert!(e.contains("refused") && e.contains("network cards") && e.contains("runs here still"), "{e}");
    let last = src.ok("GET", "/migration", None);
    assert_eq!(last["bytes_sent"], 0, "pages moved before the refusal: {last}");
    assert_eq!(src.state(), "running");
    drop(wrong);

    // The real thing: a second VMM waiting for it.
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = VmmProcess::start_in(&src.dir.clone(), &["--incoming", &to]);
    assert_eq!(dst.state(), "not_started");
    let report = src.ok("POST", "/vm/migrate", Some(json!({"to": to, "max_downtime_ms": 50})));
    println!("migration: {report}");
    assert!(report["pages_sent"].as_u64().unwrap() >= 32 * 256, "the dirtied 32 MiB went over: {report}");
    let info = src.ok("GET", "/vm", None);
    assert!(info["exit_reason"].as_str().unwrap().starts_with("migrated to"));
    goes_on_intact(&src, &mut dst);
    src.quit();
    dst.quit();
}

/// After a migration: the source stopped, the guest runs at the destination, its counter went
/// on from where it was, and every page's generation checks (none lost or stale).
fn goes_on_intact(src: &VmmProcess, dst: &mut VmmProcess) {
    let ticks_before = last_tick(&src.console.output());
    assert_eq!(src.ok("GET", "/vm", None)["state"], "stopped");
    assert_eq!(dst.state(), "running");
    let first = dst.console.first_tick(Duration::from_secs(10));
    assert!(
        (ticks_before..=ticks_before + 2).contains(&first),
        "ticked to {ticks_before} at the source, {first} first here"
    );
    dst.console.send("c");
    dst.console.expect("check ok", 0, Duration::from_secs(60));
}

#[test]
fn a_guest_that_dirties_faster_than_the_link_converges_by_throttling() {
    if !kvm_available("a_guest_that_dirties_faster_than_the_link_converges_by_throttling") {
        return;
    }
    // 100 MiB/s of writes over a 16 MiB set, through a 20 MiB/s link: every round finds the
    // whole set dirty again, until the vCPUs are held back.
    let (src, mut dst, to) = running_pair("converge", "test=dirty rate_mib=100 dirty_mib=16 exit=poweroff");
    let e = src.fails("POST", "/vm/migrate", Some(json!({"to": to, "bandwidth": 0})), 400);
    assert!(e.contains("bandwidth"), "{e}");
    // From the command line, which shows its progress while the migration runs.
    let out = common::stratus(
        &[
            "vm",
            "migrate",
            "--api-sock",
            src.sock.to_str().unwrap(),
            "--to",
            &to,
            "--max-downtime-ms",
            "50",
            "--bandwidth",
            "20M",
        ],
        b"",
        Duration::from_secs(120),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("dirty rounds") && out.stderr.contains("throttle"),
        "progress lines: {}",
        out.stderr
    );
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    println!("migration with throttling: {report}");
    let last = src.ok("GET", "/migration", None);
    assert_eq!(last["phase"], "completed");
    assert_eq!(last["report"]["rounds"], report["rounds"]);
    assert!(report["throttle_percent"].as_u64().unwrap() > 0, "it had to throttle: {report}");
    // Converged: the stop-and-copy phase had a fraction of the 16 MiB set (4096 pages) left;
    // without the throttle, the whole set is dirty again after every round. A quarter, not an
    // exact budget: how much the guest dirties between the last estimate and the pause depends
    // on how busy the host is.
    assert!(
        report["last_round_pages"].as_u64().unwrap() <= 1024,
        "too much left for the last phase: {report}"
    );
    assert_eq!(dst.state(), "running");
    dst.console.send("c");
    dst.console.expect("check ok", 0, Duration::from_secs(60));
    src.quit();
    dst.quit();
}

/// Waits until `src`'s migration, run by the `stratus vm migrate` child `migration`, has
/// begun to send the guest's memory; returns its progress then.
fn wait_until_sending(src: &VmmProcess, migration: &mut std::process::Child) -> serde_json::Value {
    src.wait_until_migration_sends(Duration::from_secs(30), || migration.try_wait().unwrap().is_some())
}

/// `stratus vm migrate` of `src` to `to` with `extra` arguments, in the background.
fn migrate_in_background(src: &VmmProcess, to: &str, extra: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_stratus"))
        .args(["vm", "migrate", "--api-sock", src.sock.to_str().unwrap(), "--to", to])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_migration_called_off_with_ctrl_c_leaves_the_guest_running_here() {
    if !kvm_available("a_migration_called_off_with_ctrl_c_leaves_the_guest_running_here") {
        return;
    }
    // A link of 2 MiB/s: the first pass over the guest's 16 MiB takes seconds.
    let (mut src, dst, to) = running_pair("cancel", "test=dirty rate_mib=1 dirty_mib=16 exit=poweroff");
    let mut migration = migrate_in_background(&src, &to, &["--bandwidth", "2M", "--no-auto-converge"]);
    let p = wait_until_sending(&src, &mut migration);
    // Meanwhile GET /vm answers with the migration's progress, the VMM's other requests are
    // refused at once, saying why; post-copy was not asked for, so it cannot be switched to.
    let info = src.ok("GET", "/vm", None);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["migration"]["to"], to.as_str(), "{info}");
    assert!(info["uptime_ms"].as_u64() > Some(0), "{info}");
    let e = src.fails("POST", "/vm/pause", None, 409);
    assert!(
        e.contains(&format!("a migration to {to} is under way")) && e.contains("DELETE /migration"),
        "{e}"
    );
    let e = src.fails("POST", "/migration/postcopy", None, 409);
    assert!(e.contains("without post-copy"), "{e}");
    // Ctrl-C calls it off.
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(migration.id() as i32, libc::SIGINT) };
    let out = migration.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("calling the migration off"), "{stderr}");
    assert!(
        stderr.contains("called off at the source") && stderr.contains("the VM runs here still"),
        "{stderr}"
    );
    let last = src.ok("GET", "/migration", None);
    assert_eq!(last["phase"], "failed", "{last}");
    assert!(last["bytes_sent"].as_u64() >= p["bytes_sent"].as_u64(), "{last}");
    let e = src.fails("DELETE", "/migration", None, 409);
    assert!(e.contains("no migration is under way"), "{e}");
    // The guest runs on here; the destination gave up, saying why.
    assert_eq!(src.state(), "running");
    let ticks = last_tick(&src.console.output());
    src.console.expect(&format!("tick {}", ticks + 1), 0, Duration::from_secs(10));
    let out = dst.console.finish(Duration::from_secs(10));
    assert!(out.stderr.contains("the source called the migration off"), "{}", out.stderr);
    // And it can still move, whole.
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = VmmProcess::start_in(&src.dir.clone(), &["--incoming", &to]);
    src.ok("POST", "/vm/migrate", Some(json!({"to": to})));
    goes_on_intact(&src, &mut dst);
    src.quit();
    dst.quit();
}

#[test]
fn a_migration_moves_by_post_copy_when_asked() {
    if !kvm_available("a_migration_moves_by_post_copy_when_asked") {
        return;
    }
    // A guest slow to dirty (1 MiB/s) on a 2 MiB/s link would converge by dirty rounds; asked
    // during the first pass, it moves at once and the rest follows it.
    let (src, mut dst, to) = running_pair("switch", "test=dirty rate_mib=1 dirty_mib=16 exit=poweroff");
    let e = src.fails("POST", "/migration/postcopy", None, 409);
    assert!(e.contains("no migration is under way"), "{e}");
    let mut migration = migrate_in_background(&src, &to, &["--bandwidth", "2M", "--postcopy"]);
    wait_until_sending(&src, &mut migration);
    let out = common::stratus(
        &["vm", "migrate-postcopy", "--api-sock", src.sock.to_str().unwrap()],
        b"",
        Duration::from_secs(10),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("the guest moves now"), "{}", out.stderr);
    let out = migration.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("migration switched to post-copy: {report}");
    assert_eq!(report["postcopy"], true, "{report}");
    assert!(report["postcopy_pages"].as_u64().unwrap() > 0, "{report}");
    goes_on_intact(&src, &mut dst);
    src.quit();
    let out = dst.quit();
    assert!(out.stderr.contains("post-copy complete"), "{}", out.stderr);
}

#[test]
fn a_guest_that_dirties_faster_than_the_link_moves_by_post_copy() {
    if !kvm_available("a_guest_that_dirties_faster_than_the_link_moves_by_post_copy") {
        return;
    }
    // As above, but instead of holding the vCPUs back the guest moves and its last dirty
    // pages follow it, those it touches first fetched on its faults.
    let (src, mut dst, to) = running_pair("postcopy", "test=dirty rate_mib=100 dirty_mib=16 exit=poweroff");
    let body = json!({"to": to, "max_downtime_ms": 50, "bandwidth": 20 << 20, "postcopy": true});
    let report = src.ok("POST", "/vm/migrate", Some(body));
    println!("migration by post-copy: {report}");
    assert_eq!(report["postcopy"], true, "{report}");
    assert_eq!(report["throttle_percent"], 0, "post-copy instead of throttling: {report}");
    assert!(report["postcopy_pages"].as_u64().unwrap() > 0, "{report}");
    goes_on_intact(&src, &mut dst);
    src.quit();
    let out = dst.quit();
    assert!(out.stderr.contains("post-copy complete"), "{}", out.stderr);
}

/// Starts a post-copy migration of a busy guest that takes a few seconds to finish, and
/// returns once the guest runs at the destination with pages still to come; `during` then
/// runs, and the migration's answer is returned.
fn during_post_copy(
    name: &str,
    during: impl FnOnce(&VmmProcess, &VmmProcess),
) -> (VmmProcess, VmmProcess, u16, serde_json::Value) {
    let (src, dst, to) = running_pair(name, "test=dirty rate_mib=100 dirty_mib=32 exit=poweroff");
    let (status, answer) = std::thread::scope(|scope| {
        let migration = scope.spawn(|| {
            let body = json!({"to": to, "bandwidth": 16 << 20, "postcopy": true}).to_string();
            match stratus_vmm::api::http::call(&src.sock, "POST", "/vm/migrate", Some(&body)) {
                Ok(r) => (r.status, serde_json::from_str(&r.body).unwrap_or_default()),
                // The source VMM itself went away (a test may kill it).
                Err(e) => (0, json!({ "error": e.to_string() })),
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let p = src.ok("GET", "/migration", None);
            if p["phase"] == "post-copy (running at the destination)" {
                assert!(p["remaining_bytes"].as_u64().unwrap() > 0, "{p}");
                break;
            }
            assert!(!migration.is_finished() && std::time::Instant::now() < deadline, "no post-copy: {p}");
            std::thread::sleep(Duration::from_millis(10));
        }
        during(&src, &dst);
        migration.join().unwrap()
    });
    (src, dst, status, answer)
}

fn kill(vmm: &VmmProcess) {
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(vmm.console.pid() as i32, libc::SIGKILL) };
}

#[test]
fn a_post_copy_cut_short_says_the_guest_is_lost_on_both_sides() {
    if !kvm_available("a_post_copy_cut_short_says_the_guest_is_lost_on_both_sides") {
        return;
    }
    // The destination dies while pages are still coming: the source cannot resume (the guest
    // ran there), keeps its paused copy and says how much never went.
    let (src, _dst, status, answer) = during_post_copy("postcopy-dst-dies", |_, dst| kill(dst));
    if status != 500 {
        panic!("{status} {answer}: {:?}", src.console.finish(Duration::from_secs(5)));
    }
    let e = answer["error"].as_str().unwrap();
    assert!(e.contains("post-copy failed after the guest moved") && e.contains("had not been sent"), "{e}");
    assert_eq!(src.state(), "paused");
    let p = src.ok("GET", "/migration", None);
    assert_eq!(p["phase"], "failed", "{p}");
    src.quit();

    // The source dies: the destination stops the guest rather than run it on missing memory.
    let (_src, dst, _, _) = during_post_copy("postcopy-src-dies", |src, _| kill(src));
    let out = dst.console.finish(Duration::from_secs(60));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("post-copy failed") && out.stderr.contains("never arrived"),
        "{}",
        out.stderr
    );
}

#[test]
fn local_disks_are_copied_while_the_guest_writes_them() {
    if !kvm_available("local_disks_are_copied_while_the_guest_writes_them") {
        return;
    }
    // The guest keeps stamping one sector in each of the first 256 64 KiB blocks of its 32 MiB
    // disk (sector number and a
    // generation it remembers in RAM) while its memory dirties too; 'c' checks both.
    let mut src = VmmProcess::start("with-disks", &[]);
    let dir = src.dir.clone();
    let disk = dir.join("source.img");
    std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    // One sector every 10 ms, one per block (the copy's unit), each rewritten only every 2.5 s:
    // a write the copy misses stays missed.
    src.configure_tiny(
        "test=dirty rate_mib=20 dirty_mib=16 disk_sectors=256 disk_stride=128 disk_ops=1 exit=poweroff",
        128,
    );
    src.ok("PUT", "/vm/drives/vda", Some(json!({ "path": disk })));
    src.ok("POST", "/vm/start", None);
    src.console.expect("tick 1", 0, Duration::from_secs(30));
    let migrate =
        |to: &str| json!({"to": to, "with_disks": true, "max_downtime_ms": 50, "bandwidth": 64 << 20});

    // A destination disk of another size is refused before anything moves.
    let small = dir.join("small.img");
    std::fs::File::create(&small).unwrap().set_len(16 << 20).unwrap();
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let wrong = VmmProcess::start_in(&dir, &["--incoming", &to, "--disk", small.to_str().unwrap()]);
    let e = src.fails("POST", "/vm/migrate", Some(migrate(&to)), 500);
    assert!(e.contains("same size") && e.contains("runs here still"), "{e}");
    assert_eq!(src.ok("GET", "/migration", None)["bytes_sent"], 0);
    drop(wrong);

    // A destination whose disk fills up refuses the VM, which runs on here.
    if unsafe { libc::geteuid() } == 0 {
        let full = dir.join("full");
        std::fs::create_dir_all(&full).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", full.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(mounted.success());
        // Unmounted however the test ends.
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let mount = Unmount(full.clone());
        let cramped = full.join("disk.img");
        std::fs::File::create(&cramped).unwrap().set_len(32 << 20).unwrap();
        let to = format!("tcp:127.0.0.1:{}", free_port());
        let dst = VmmProcess::start_in(&dir, &["--incoming", &to, "--disk", cramped.to_str().unwrap()]);
        let e = src.fails("POST", "/vm/migrate", Some(migrate(&to)), 500);
        drop(dst);
        drop(mount);
        assert!(e.contains("No space left on device") && e.contains("runs here still"), "{e}");
        assert_eq!(src.state(), "running");
        let pos = src.console.output().len();
        src.console.send("c");
        src.console.expect("check ok", pos, Duration::from_secs(60));
    } else {
        println!("SKIPPED: the full destination disk needs root (a small tmpfs)");
    }

    // The real thing, into a disk full of garbage: after it, the copy is the source's.
    let copy = dir.join("copy.img");
    std::fs::write(&copy, vec![0xAAu8; 32 << 20]).unwrap();
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = VmmProcess::start_in(&dir, &["--incoming", &to, "--disk", copy.to_str().unwrap()]);
    let report = src.ok("POST", "/vm/migrate", Some(migrate(&to)));
    println!("migration with its disk: {report}");
    assert!(report["disk_bytes_sent"].as_u64().unwrap() >= 256 << 9, "{report}");
    assert_eq!(dst.state(), "running");
    dst.console.send("c");
    dst.console.expect("check ok", 0, Duration::from_secs(60));
    let copied = std::fs::read(&copy).unwrap();
    assert!(copied[16 << 20..].iter().all(|&b| b == 0), "the source's unwritten part reads as zeros");
    src.quit();
    dst.quit();
}

#[test]
fn idle_connections_cannot_exhaust_the_api() {
    if !kvm_available("idle_connections_cannot_exhaust_the_api") {
        return;
    }
    let vmm = VmmProcess::start("idle-clients", &[]);
    // Connections that never send a request hold a request thread each, up to a cap; past it,
    // new ones wait to be accepted rather than costing a thread.
    let idle: Vec<_> = (0..40).map(|_| std::os::unix::net::UnixStream::connect(&vmm.sock).unwrap()).collect();
    let sock = vmm.sock.clone();
    let waiting =
        std::thread::spawn(move || stratus_vmm::api::http::call(&sock, "GET", "/vm", None).unwrap().status);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "served past the cap");
    let threads = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    let pid = vmm.console.pid();
    assert!(threads(pid) < 40, "{} threads for 40 idle clients", threads(pid));
    drop(idle);
    assert_eq!(waiting.join().unwrap(), 200, "the waiting client is served once the idle ones leave");
    vmm.quit();
}
