//! A cluster of three hosts on this machine, end to end: `stratus lab up --hosts 3` (each host
//! a network namespace; h1 runs `stratus serve`, h2 and h3 `stratus agent` joined with tokens),
//! driven by the CLI as a user would, with real VMMs booting the default Linux image.
//!
//! One test, so the cluster and its guests (a Linux boot is some 30 s of emulated kernel on a
//! PVM host) serve every check: launches on named hosts (each host booting from its own copy
//! of the image), exec and the serial console through the control plane, ping
//! and a TCP stream between instances on different hosts (one VXLAN segment), a live move that
//! keeps the stream, the address and a memory pattern, a move whose destination's link goes
//! down (the guest stays on its source), an agent killed with SIGKILL and restarted (its guest
//! re-adopted, nothing duplicated), a host whose link goes down showing offline, a stopped
//! instance moved cold (its disk's contents kept), a host running three guests under load
//! evacuated and restored (their TCP streams and memory intact), the three hosts consolidated
//! onto one, CPU hogs rebalanced over two hosts (once, explained), an `--ha` guest restarted
//! elsewhere with its synced writes when its host loses power and when its host is cut off
//! (which fences itself first), and `lab down` leaving nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

struct Lab {
    dir: PathBuf,
    url: String,
    token: String,
}

impl Lab {
    fn up(dir: &Path) -> Lab {
        let out = common::stratus(
            &["lab", "up", "--hosts", "3", "--dir", &dir.display().to_string()],
            b"",
            Duration::from_secs(1200),
        );
        assert_eq!(out.code, Some(0), "lab up failed:\n{}\n{}", out.stdout, out.stderr);
        let export =
            out.stdout.lines().find(|l| l.contains("STRATUS_URL=")).expect("lab up says how to reach it");
        let value = |key: &str| {
            export
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
                .expect("url and token")
        };
        Lab { dir: dir.to_owned(), url: value("STRATUS_URL="), token: value("STRATUS_TOKEN=") }
    }

    fn cli(&self, args: &[&str]) -> common::Outcome {
        let mut all = vec!["--url", &self.url, "--token", &self.token];
        all.extend_from_slice(args);
        common::stratus(&all, b"", Duration::from_secs(600))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert_eq!(
            out.code,
            Some(0),
            "stratus {args:?} failed:\n{}\n{}\n{}",
            out.stdout,
            out.stderr,
            self.logs()
        );
        out.stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn instance(&self, name: &str) -> Value {
        self.json(&["show", name])
    }

    fn host_state(&self, host: &str) -> String {
        let hosts = self.json(&["host", "list"]);
        hosts.as_array().unwrap().iter().find(|h| h["name"] == host).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Runs a shell line in a guest; its standard output.
    fn sh(&self, instance: &str, line: &str) -> String {
        self.ok(&["exec", instance, "--", "sh", "-c", line])
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (host, file) in [("h1", "serve.log"), ("h2", "agent.log"), ("h3", "agent.log")] {
            let log = std::fs::read_to_string(self.dir.join(host).join(file)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            text.push_str(&format!(
                "--- {host} {file}:\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
            // Where its VXLAN floods to and what it has learnt: a missing peer shows here.
            let fdb = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &format!("stratus-lab-{host}"),
                    "bridge",
                    "fdb",
                    "show",
                    "dev",
                    "stratus0vx",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            text.push_str(&format!("--- {host} bridge fdb of stratus0vx:\n{fdb}"));
        }
        text
    }

    fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !check() {
            assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The pid of the agent of lab host `n`.
    fn agent_pid(&self, n: u32) -> Option<i32> {
        let out = Command::new("ip").args(["netns", "pids", &format!("stratus-lab-h{n}")]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"agent"))
        })
    }

    /// Starts lab host `n`'s agent (again), as `lab up` did, its output added to its log.
    fn start_agent(&self, n: u32) {
        let data = self.dir.join(format!("h{n}"));
        let log = std::fs::File::options().append(true).open(data.join("agent.log")).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &format!("stratus-lab-h{n}"), env!("CARGO_BIN_EXE_stratus"), "agent"])
            .args(["--control", "http://10.220.0.1:7440", "--name", &format!("h{n}")])
            .args(["--address", &format!("10.220.0.{n}")])
            .arg("--data-dir")
            .arg(&data)
            .arg("--shared-pool")
            .arg(self.dir.join("shared"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map(|mut agent| std::thread::spawn(move || agent.wait()))
            .unwrap();
    }

    /// Kills every process of lab host `n` (its agent and VMMs) with SIGKILL: the machine
    /// losing its power, as far as the cluster can tell.
    fn power_off(&self, n: u32) {
        let out = Command::new("ip").args(["netns", "pids", &format!("stratus-lab-h{n}")]).output().unwrap();
        for pid in
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: sending a signal reads no memory of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    fn link(&self, n: u32, up: bool) {
        let status = Command::new("ip")
            .args(["-n", &format!("stratus-lab-h{n}"), "link", "set", "eth0", if up { "up" } else { "down" }])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = common::stratus(
            &["lab", "down", "--dir", &self.dir.display().to_string()],
            b"",
            Duration::from_secs(120),
        );
    }
}

#[test]
fn a_three_host_lab_launches_moves_and_survives_faults() {
    if !common::kvm_available("a_three_host_lab_launches_moves_and_survives_faults") {
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: not root (a_three_host_lab_launches_moves_and_survives_faults)");
        return;
    }
    common::ensure_packages(&["iputils-ping", "nftables"]);
    common::ensure_default_image();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lab-{}", std::process::id()));
    let lab = Lab::up(&dir);

    // Three hosts, online, each with its address.
    let hosts = lab.ok(&["host", "list"]);
    for (host, address) in [("h1", "10.220.0.1"), ("h2", "10.220.0.2:7441"), ("h3", "10.220.0.3:7441")] {
        let line =
            hosts.lines().find(|l| l.starts_with(host)).unwrap_or_else(|| panic!("{host} missing:\n{hosts}"));
        assert!(line.contains(address) && line.contains("online"), "{hosts}");
    }

    // Launches on named hosts; exec goes through the control plane to each host's agent.
    let out = lab.ok(&["launch", "a1", "--host", "h2"]);
    assert!(out.contains("a1 is running"), "{out}");
    // h2 boots from its own copy of the image, taken from the control plane on first use.
    let shown = lab.ok(&["show", "a1"]);
    assert!(shown.contains("image default copied here"), "{shown}");
    let copies = std::fs::read_dir(dir.join("h2").join("images")).unwrap().flatten();
    assert_eq!(copies.filter(|e| e.path().join("rootfs.ext4").exists()).count(), 1);
    lab.ok(&["launch", "a2", "--host", "h3"]);
    let (a1, a2) = (lab.instance("a1"), lab.instance("a2"));
    assert_eq!((a1["status"]["host"].as_str(), a2["status"]["host"].as_str()), (Some("h2"), Some("h3")));
    let list = lab.ok(&["list"]);
    assert!(list.contains("HOST") && list.lines().any(|l| l.contains("a1") && l.contains("h2")), "{list}");
    assert!(lab.ok(&["exec", "a1", "--", "hostname"]).contains("a1"));
    // The console of another host's instance, through the control plane and h3's agent: a
    // command typed from a pipe is answered.
    let mut all = vec!["--url", lab.url.as_str(), "--token", lab.token.as_str()];
    all.extend_from_slice(&["console", "a2"]);
    let console = common::stratus(&all, b"echo console-$((3 + 4))\r", Duration::from_secs(120));
    assert!(console.code == Some(0) && console.stdout.contains("console-7"), "{console:?}");
    let ip1 = a1["status"]["ip"].as_str().unwrap().to_owned();
    let ip2 = a2["status"]["ip"].as_str().unwrap().to_owned();

    // One segment across hosts: ping and a TCP stream from h2's guest to h3's.
    let ping = lab.sh("a1", &format!("ping -c 3 -W 5 {ip2}"));
    assert!(ping.contains("3 packets received") || ping.contains(" 0% packet loss"), "{ping}");
    // busybox nc ends at its stdin's end: the receiver writes through a program of its own.
    lab.sh("a2", "nc -l -p 5000 -e sh -c 'cat > /tmp/stream' > /dev/null 2>&1 < /dev/null &");
    lab.sh(
        "a1",
        &format!(
            "(i=0; while :; do echo line-$i; i=$((i + 1)); sleep 0.2; done | nc {ip2} 5000) > /dev/null 2>&1 < /dev/null & head -c 1048576 /dev/urandom > /tmp/pattern"
        ),
    );
    let sum = |guest: &str| lab.sh(guest, "md5sum < /tmp/pattern | cut -c1-32");
    let before = sum("a1");
    let lines = |lab: &Lab| lab.sh("a2", "wc -l < /tmp/stream").trim().parse::<u64>().unwrap_or(0);
    lab.wait_for("the stream flowing", Duration::from_secs(60), || lines(&lab) > 5);

    // Live move from h2 to h1: host changes, address, memory and stream stay.
    let out = lab.ok(&["move", "a1", "--to", "h1"]);
    assert!(out.contains("a1 runs on h1"), "{out}");
    let moved = lab.instance("a1");
    assert_eq!(
        (moved["status"]["host"].as_str(), moved["status"]["ip"].as_str()),
        (Some("h1"), Some(ip1.as_str()))
    );
    assert_eq!(sum("a1"), before, "the memory pattern changed across the move");
    let at_move = lines(&lab);
    lab.wait_for("the stream going on after the move", Duration::from_secs(60), || {
        lines(&lab) > at_move + 10
    });
    let stream = lab.sh("a2", "cat /tmp/stream");
    for (n, line) in stream.lines().enumerate() {
        assert_eq!(line, format!("line-{n}"), "the TCP stream lost or repeated data across the move");
    }
    let events = lab.ok(&["events", "a1"]);
    assert!(events.contains("moved to h1 live"), "{events}");

    // A move whose destination's link goes down mid-way leaves the guest on its source.
    lab.link(3, false);
    let out = lab.cli(&["move", "a1", "--to", "h3"]);
    lab.link(3, true);
    assert_ne!(out.code, Some(0), "a move to an unreachable host succeeded:\n{}", out.stdout);
    let stayed = lab.instance("a1");
    assert_eq!(
        (stayed["status"]["host"].as_str(), stayed["status"]["state"].as_str()),
        (Some("h1"), Some("running"))
    );
    assert_eq!(sum("a1"), before, "the guest left behind lost its memory");

    // An agent killed with SIGKILL and started again re-adopts its guest: nothing duplicated.
    let pid = lab.agent_pid(3).expect("h3's agent runs");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let log = std::fs::File::options().append(true).open(dir.join("h3/agent.log")).unwrap();
    Command::new("ip")
        .args(["netns", "exec", "stratus-lab-h3", env!("CARGO_BIN_EXE_stratus"), "agent"])
        .args(["--control", "http://10.220.0.1:7440", "--name", "h3", "--address", "10.220.0.3"])
        .arg("--data-dir")
        .arg(dir.join("h3"))
        .arg("--shared-pool")
        .arg(dir.join("shared"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(|mut agent| std::thread::spawn(move || agent.wait()))
        .unwrap();
    lab.wait_for("h3 online again", Duration::from_secs(60), || lab.host_state("h3") == "online");
    // An agent slow to come back (its lease ran out) had its host's instances shown lost
    // meanwhile: they are found running again.
    lab.wait_for("a2 found running", Duration::from_secs(30), || {
        lab.instance("a2")["status"]["state"] == "running"
    });
    assert!(lab.ok(&["exec", "a2", "--", "hostname"]).contains("a2"), "a2 answers after its agent's restart");
    let vmms = Command::new("ip").args(["netns", "pids", "stratus-lab-h3"]).output().unwrap();
    let vmms = String::from_utf8_lossy(&vmms.stdout)
        .split_whitespace()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"vmm"))
        })
        .count();
    assert_eq!(vmms, 1, "one VMM for a2 on h3, not two");

    // A host whose link goes down is offline within the heartbeat timeout (10 s).
    lab.link(2, false);
    lab.wait_for("h2 offline", Duration::from_secs(30), || lab.host_state("h2") == "offline");
    lab.link(2, true);
    lab.wait_for("h2 online", Duration::from_secs(30), || lab.host_state("h2") == "online");

    // Stopped, an instance moves cold: its disk is copied, and it boots on the destination
    // with what it wrote; the source keeps nothing of it.
    lab.sh("a2", "echo kept-across-the-move > /root/marker && sync");
    lab.ok(&["stop", "a2"]);
    let out = lab.ok(&["move", "a2", "--to", "h2"]);
    assert!(out.contains("a2 is on h2, stopped"), "{out}");
    assert!(lab.ok(&["events", "a2"]).contains("moved to h2 stopped"));
    let id = lab.instance("a2")["id"].as_str().unwrap().to_owned();
    assert!(!dir.join("h3").join("instances").join(&id).exists(), "h3 kept a2's files");
    lab.ok(&["start", "a2"]);
    assert_eq!(lab.instance("a2")["status"]["host"].as_str(), Some("h2"));
    assert_eq!(lab.sh("a2", "cat /root/marker").trim(), "kept-across-the-move");

    // Maintenance under load: three guests on h2 (a2 and two more, one busy with a CPU hog),
    // each streaming lines over TCP to a1 on h1 and holding a memory pattern. Evacuating
    // h2 moves them off live and keeps new instances away; restoring brings them back; the
    // streams and patterns go on intact throughout.
    for guest in ["b1", "b2"] {
        lab.ok(&["launch", guest, "--host", "h2"]);
    }
    let guests = ["a2", "b1", "b2"];
    for (n, guest) in guests.iter().enumerate() {
        let port = 6000 + n;
        lab.sh(
            "a1",
            &format!("nc -l -p {port} -e sh -c 'cat > /tmp/from-{guest}' > /dev/null 2>&1 < /dev/null &"),
        );
        lab.sh(
            guest,
            &format!(
                "(i=0; while :; do echo line-$i; i=$((i + 1)); sleep 0.2; done | nc {ip1} {port}) > /dev/null 2>&1 < /dev/null & head -c 1048576 /dev/urandom > /tmp/pattern"
            ),
        );
    }
    // One CPU hog (two would take both of this machine's cores from everything else).
    lab.sh("b1", "setsid sh -c 'while :; do :; done' >/dev/null 2>&1 </dev/null &");
    let patterns: Vec<String> = guests.iter().map(|g| sum(g)).collect();
    let received =
        |guest: &str| lab.sh("a1", &format!("wc -l < /tmp/from-{guest}")).trim().parse::<u64>().unwrap_or(0);
    lab.wait_for("the three streams flowing", Duration::from_secs(60), || {
        guests.iter().all(|g| received(g) > 5)
    });
    let out = lab.ok(&["host", "evacuate", "h2"]);
    assert!(out.contains("evacuate done"), "{out}");
    for (guest, pattern) in guests.iter().zip(&patterns) {
        assert_ne!(lab.instance(guest)["status"]["host"].as_str(), Some("h2"), "{guest} stayed");
        assert_eq!(&sum(guest), pattern, "{guest} lost its memory in the evacuation");
    }
    assert!(lab.ok(&["host", "list"]).lines().any(|l| l.starts_with("h2") && l.contains("maintenance")));
    assert_eq!(lab.sh("a2", "cat /root/marker").trim(), "kept-across-the-move");
    let at_evacuation: Vec<u64> = guests.iter().map(|g| received(g)).collect();
    lab.wait_for("the streams going on after the evacuation", Duration::from_secs(60), || {
        guests.iter().zip(&at_evacuation).all(|(g, at)| received(g) > at + 5)
    });
    lab.ok(&["host", "restore", "h2"]);
    for (guest, pattern) in guests.iter().zip(&patterns) {
        assert_eq!(lab.instance(guest)["status"]["host"].as_str(), Some("h2"), "{guest} not back");
        assert_eq!(&sum(guest), pattern, "{guest} lost its memory coming back");
    }
    assert!(!lab.ok(&["host", "list"]).contains("maintenance"));
    let at_restore: Vec<u64> = guests.iter().map(|g| received(g)).collect();
    lab.wait_for("the streams going on after the restore", Duration::from_secs(60), || {
        guests.iter().zip(&at_restore).all(|(g, at)| received(g) > at + 5)
    });
    for guest in guests {
        let stream = lab.sh("a1", &format!("cat /tmp/from-{guest}"));
        for (n, line) in stream.lines().enumerate() {
            assert_eq!(line, format!("line-{n}"), "{guest}'s stream lost or repeated data across the moves");
        }
    }
    for guest in ["b1", "b2"] {
        lab.ok(&["delete", guest]);
    }

    // Consolidation: the plan packs a1 and a2 onto one host and names the hosts it empties;
    // carrying it out moves them live and leaves the emptied hosts in maintenance.
    let before = sum("a1");
    let plan = lab.json(&["host", "plan", "consolidate"]);
    let emptied: Vec<&str> = plan["emptied"].as_array().unwrap().iter().filter_map(|h| h.as_str()).collect();
    assert_eq!(emptied.len(), 2, "three lightly used hosts pack onto one: {plan}");
    let keeper = plan["kept"][0]["name"].as_str().unwrap().to_owned();
    assert!(lab.ok(&["host", "plan", "consolidate"]).contains("which may then be switched off"));
    let out = lab.ok(&["host", "consolidate"]);
    assert!(out.contains("consolidate done"), "{out}");
    for guest in ["a1", "a2"] {
        assert_eq!(lab.instance(guest)["status"]["host"].as_str(), Some(keeper.as_str()), "{guest}");
    }
    assert_eq!(sum("a1"), before, "a1 lost its memory in the consolidation");
    assert_eq!(lab.sh("a2", "cat /root/marker").trim(), "kept-across-the-move");
    let hosts = lab.ok(&["host", "list"]);
    for host in &emptied {
        assert!(hosts.lines().any(|l| l.starts_with(host) && l.contains("maintenance")), "{host}:\n{hosts}");
    }

    // Rebalancing: with one emptied host back, CPU hogs in both guests (user space, so they
    // run at full speed) make their host busy and the other idle; the rebalancer moves one of
    // them over, says why, and then leaves them be.
    let back = emptied[0].to_owned();
    lab.ok(&["host", "restore", &back]);
    lab.ok(&["config", "set", "rebalance.window_s=10", "rebalance.cooldown_s=600"]);
    for guest in ["a1", "a2"] {
        // In a session of its own: the exec's end takes its process group with it.
        lab.sh(guest, "setsid sh -c 'while :; do :; done' >/dev/null 2>&1 </dev/null &");
    }
    let on = |host: &str| {
        ["a1", "a2"].iter().filter(|g| lab.instance(g)["status"]["host"].as_str() == Some(host)).count()
    };
    // The rebalancer's event follows the move's end: wait for both.
    let said = || ["a1", "a2"].iter().any(|g| lab.ok(&["events", g]).contains("rebalance:"));
    lab.wait_for("a hog moved to the idle host", Duration::from_secs(120), || on(&back) == 1 && said());
    let moved =
        if lab.instance("a1")["status"]["host"].as_str() == Some(back.as_str()) { "a1" } else { "a2" };
    let why = lab.ok(&["events", moved]);
    assert!(
        why.contains(&format!("rebalance: {keeper} CPU")) && why.contains(&format!("moved {moved}")),
        "{why}"
    );
    std::thread::sleep(Duration::from_secs(25));
    assert_eq!((on(&keeper), on(&back)), (1, 1), "the hogs did not stay one per host");
    let rebalances = lab.ok(&["events", "a1"]).matches("rebalance:").count()
        + lab.ok(&["events", "a2"]).matches("rebalance:").count();
    assert_eq!(rebalances, 1, "ping-pong");
    assert_eq!(sum("a1"), before, "a1 lost its memory");

    high_availability(&lab, &dir);

    drop(lab);
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&left.stdout).contains("stratus-lab"), "lab down left namespaces");
    assert!(!Path::new("/sys/class/net/stratuslab0").exists(), "lab down left the bridge");
    assert!(!dir.exists(), "lab down left its directory");
}

/// Which lab hosts run a VMM for instance `id` now (from the processes' command lines: each
/// VMM serves `DIR/hN/instances/ID/api.sock`).
fn vmm_hosts(dir: &Path, id: &str) -> Vec<String> {
    let mut hosts = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.get(1).map(String::as_str) != Some("vmm") {
            continue;
        }
        for arg in &args {
            let Some(rest) = arg.strip_prefix(&format!("{}/", dir.display())) else { continue };
            if let Some((host, path)) = rest.split_once('/') {
                if path == format!("instances/{id}/api.sock") {
                    hosts.push(host.to_owned());
                }
            }
        }
    }
    hosts
}

/// HA: an `--ha` instance keeps its disk on the shared pool; when its host loses power, and
/// then when the next host is cut off from the network (its agent alive but unable to reach
/// the control plane), it is restarted on the other host with the writes it had acknowledged,
/// the cut-off host having fenced its VMM first; and no moment of the whole run sees it on two
/// hosts.
fn high_availability(lab: &Lab, dir: &Path) {
    // Room for it on h2 and h3, the hosts with the shared pool; nothing else moving.
    lab.ok(&["config", "set", "rebalance.enabled=false"]);
    lab.ok(&["delete", "a1"]);
    lab.ok(&["delete", "a2"]);
    for host in ["h2", "h3"] {
        lab.ok(&["host", "restore", host]);
    }
    let out = lab.ok(&["launch", "db", "--ha"]);
    assert!(out.contains("db is running"), "{out}");
    let db = lab.instance("db");
    let id = db["id"].as_str().unwrap().to_owned();
    assert_eq!(db["spec"]["pool"], "shared");
    assert!(dir.join("shared").join(format!("{id}.raw")).exists(), "db's disk is not on the shared pool");

    // A counter the guest writes, syncs and renames into place over and over; what it had
    // acknowledged before each failure must be there after.
    lab.sh(
        "db",
        "(i=0; while :; do i=$((i + 1)); echo $i > /root/counter.new && sync && mv /root/counter.new /root/counter && sync && echo $i > /tmp/acked.new && mv /tmp/acked.new /tmp/acked; done) > /dev/null 2>&1 < /dev/null &",
    );
    let acked =
        |lab: &Lab| lab.sh("db", "cat /tmp/acked 2>/dev/null; true").trim().parse::<u64>().unwrap_or(0);
    lab.wait_for("the counter going", Duration::from_secs(60), || acked(lab) > 2);
    // A live move of it sends its memory only: the disk stays on the pool, in use throughout.
    let first = lab.instance("db")["status"]["host"].as_str().unwrap().to_owned();
    let out = lab.ok(&["move", "db"]);
    let second = lab.instance("db")["status"]["host"].as_str().unwrap().to_owned();
    assert!(first != second && second != "h1", "{out}");
    let at_move = acked(lab);
    lab.wait_for("the counter going on after the move", Duration::from_secs(60), || acked(lab) > at_move);
    // From here on, watching the VMM processes (a live move has two for a moment, the one
    // waiting and the one sending): two hosts at once is the failure HA must never have.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (dir, id, watching) = (dir.to_owned(), id.clone(), std::sync::Arc::clone(&watching));
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let hosts = vmm_hosts(&dir, &id);
                assert!(hosts.len() <= 1, "db ran on {hosts:?} at once");
                samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };

    for failure in ["power", "link"] {
        let from = lab.instance("db")["status"]["host"].as_str().unwrap().to_owned();
        let n: u32 = from[1..].parse().unwrap();
        let before = acked(lab);
        let failed = Instant::now();
        match failure {
            "power" => lab.power_off(n),
            _ => lab.link(n, false),
        }
        lab.wait_for("db restarted on the other host", Duration::from_secs(180), || {
            let now = lab.instance("db");
            now["status"]["host"].as_str() != Some(from.as_str()) && now["status"]["state"] == "running"
        });
        println!(
            "HA ({failure} cut on {from}): db answered on another host {:.1} s later",
            failed.elapsed().as_secs_f64()
        );
        let counter: u64 = lab.sh("db", "cat /root/counter").trim().parse().expect("an intact counter");
        assert!(
            counter >= before,
            "db came back with {counter}, but {before} was acknowledged before the {failure} cut"
        );
        let events = lab.ok(&["events", "db"]);
        assert!(events.contains(&format!("host {from} failed")), "{events}");
        if failure == "link" {
            // Alive but cut off, its agent stopped the VMM itself before the lease ran out.
            let log =
                std::fs::read_to_string(dir.join(&from).join("instances").join(&id).join("vmm.log")).unwrap();
            assert!(log.contains("fenced"), "{log}");
            lab.link(n, true);
        } else {
            lab.start_agent(n);
        }
        // Back, the host forgets its copy.
        // (The event follows the removal: both are waited for.)
        lab.wait_for("the failed host back and its copy forgotten", Duration::from_secs(60), || {
            lab.host_state(&from) == "online"
                && !dir.join(&from).join("instances").join(&id).exists()
                && lab
                    .ok(&["events", "db"])
                    .contains(&format!("host {from} is back and has forgotten its copy"))
        });
        // The writer runs again in the restarted guest (the next failure checks it).
        lab.sh(
            "db",
            "(i=$(cat /root/counter); while :; do i=$((i + 1)); echo $i > /root/counter.new && sync && mv /root/counter.new /root/counter && sync && echo $i > /tmp/acked.new && mv /tmp/acked.new /tmp/acked; done) > /dev/null 2>&1 < /dev/null &",
        );
        lab.wait_for("the counter going again", Duration::from_secs(60), || acked(lab) > counter);
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let samples = watcher.join().expect("db never ran on two hosts at once");
    assert!(samples > 100, "the watch looked only {samples} times");
    lab.ok(&["delete", "db"]);
    assert!(!dir.join("shared").join(format!("{id}.raw")).exists(), "deleting db left its disk on the pool");
}
