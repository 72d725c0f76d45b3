//! A Linux guest's SSE registers under load, with no snapshot or migration involved: the
//! reproducer of a fault seen on an earlier development host (KVM in PVM mode on AMD EPYC),
//! where a busy guest now and then got 16 bytes of a register back from an older state (zeros,
//! or a broadcast newline): busybox md5sum printed 16 zero bytes at offset 16 of its hash.
//!
//! In the guest, `fpu-check` (tests/guest-tools/fpu-check.c) keeps four processes busy, each
//! checking its own registers across yields, faulting stores and signals (those have never
//! failed), while a loop runs busybox's md5sum over a fixed file and compares each result with
//! the first (that is where it showed: 16 bytes of the hash's text came out wrong).
//! `FPU_CMD` replaces that load with a shell line of one's own (it must print `runs-2:`), to
//! try other loads in the same booted guest; `FPU_KERNEL` boots another vmlinux (a debug build
//! of the guest kernel) with the default image's initramfs and command line.
//! `a_busier_guest_keeps_its_sse_registers` (ignored, about 3 minutes) is the heavier load:
//! four shell busy loops and the md5sum loop for 120 s, then `fpu-check stale`.
//!
//! What was measured (each line: command, result, host load):
//! - AMD EPYC PVM host (2026-11-29, sessions 7-8; 6.18 host kernel in a Firecracker VM,
//!   `fxsr_opt`): this test failed every time it ran, 1 wrong md5sum in 3-6 runs (about 5 s per
//!   md5sum run); `FPU_CMD` with four `sh -c "while :; do :; done"`: 9 wrong of 14 in 100 s;
//!   four `yes > /dev/null`: 2 of 14. With the guest command line plus `noxsaves` or `noxsave`,
//!   one vCPU, the VMM painting its own XMM registers, host processes painting theirs: still
//!   failing, and never with the painted values. fpu-check's own checks never failed.
//! - Intel Xeon PVM host (2026-12-07, `GenuineIntel` family 6 model 167, the same 6.18 host
//!   kernel series, `kvm_pvm` with `pvm_native=Y`; guest kernel 6.1.192 with the same patches,
//!   very likely the same source as on the AMD host: Debian's 6.1.192-3 is of 26 Nov), with
//!   `cargo test -p stratus --test guest_fpu -- [--ignored] --nocapture`:
//!   - this test (the original load), 6 runs: 0 wrong of 128 md5sum runs (about 1.4 s each, 3-4
//!     times faster than on the AMD host; load average 0.6-2.1);
//!   - four shell busy loops for 120 s (`FPU_CMD` once, then `a_busier_...` 5 runs in a row):
//!     0 wrong of 78 + 287 (55, 41, 40, 72, 79); runs 2 and 3 beside a guest kernel build on
//!     the host (load average 3.0-4.5). At the AMD host's rate under that load (9 of 14) some
//!     230 were due, at a tenth of it over 20;
//!   - `fpu-check stale` (new values in all sixteen registers right before every kernel entry:
//!     an SSE store to a fresh page, to a copy-on-write page, getppid, a preempted spin) under
//!     four busy loops: 15,000 iterations in one process, 40 forked children x 400, 40 fresh
//!     processes x 400, then 2,000 + 20 children x 200 in each busier run: no register ever
//!     came back older (load average 1.7-4.5);
//!   - four busy loops for 60 s with `stratus vm trace --interval 10` on the VMM's socket: 0
//!     wrong of 47; KVM emulated 1.46 million guest instructions a second (both vCPUs), with
//!     3,100 exits, 1,100 host interrupts and about 1 VMM completion (fwait) a second;
//!   - a debug guest kernel (`FPU_KERNEL`; `CONFIG_X86_DEBUG_FPU` and `CONFIG_DEBUG_ENTRY`,
//!     built as guest/kernel/README.md says, console log level 8): this test's load (35
//!     md5sum runs) and four busy loops for 60 s (62 runs) plus `fpu-check stale`: nothing
//!     wrong, no kernel warning (`dmesg`), so the kernel's FPU ownership checks at every return
//!     to user mode held throughout.
//!
//! The splits the issue lists (one vCPU, preemption model, host idle or loaded) need a failure
//! to split; on this host there was none.
//!
//! So the lead's hypothesis (the guest kernel restoring a stale saved FPU state: the lazy
//! restore or TIF_NEED_FPU_LOAD mishandled on PVM) does not show on this host: the same guest
//! kernel, patches and VMM that lost registers on the AMD host keep them here, and the debug
//! kernel's checks hold. What differs is the host: its CPU (and whatever its `kvm_pvm` does per
//! vendor). See docs/pvm-sse-fault.md for what the AMD symptom matches (AMD erratum 1386: XSAVES
//! on Zen1/2 "may fail to save XMM registers", the registers coming back with older values),
//! what is not proven, and what to run on the next AMD host.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

const STEP: Duration = Duration::from_secs(300);

/// Runs busybox md5sum over /tmp/pattern in a loop in the background ($M), comparing each sum
/// with the first ($S): a wrong one prints `differ2:` and its bytes. /tmp/runs counts the runs.
const MD5_LOOP: &str = "(n=0; while :; do n=$((n + 1)); echo $n > /tmp/runs; md5sum < /tmp/pattern > /tmp/o; [ \"$(cat /tmp/o)\" = \"$S\" ] || { echo \"differ$((1 + 1)): $(cat /tmp/o)\"; od -An -tx1 /tmp/o; }; done) & M=$!";

/// Boots the default Linux image (2 vCPUs, 128 MiB) with the guest tools disk on /mnt, makes
/// /tmp/pattern and its sum $S, runs `load` (which must print `runs-2:` at its end) and
/// returns the console output from then on.
fn run_in_guest(test: &str, load: &str) -> Option<String> {
    if !kvm_available(test) {
        return None;
    }
    ensure_default_image();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tools = tools_disk();
    let mut vmm = VmmProcess::start_in(&dir, &[]);
    vmm.configure_default_linux(2, 128);
    if let Ok(kernel) = std::env::var("FPU_KERNEL") {
        let image = Path::new("/var/cache/stratus/images/default");
        let cmdline = std::fs::read_to_string(image.join("cmdline")).unwrap();
        vmm.ok(
            "PUT",
            "/vm/boot",
            Some(
                json!({"kernel": kernel, "initrd": image.join("initramfs.cpio"), "cmdline": cmdline.trim()}),
            ),
        );
    }
    vmm.ok("PUT", "/vm/drives/tools", Some(json!({"path": tools, "readonly": true})));
    vmm.ok("POST", "/vm/start", None);
    let start = vmm.console.expect("stratus# ", 0, STEP);
    println!("{test}: host {}", host_cpu());
    vmm.console.send(
        "uname -v; grep -m3 -E '^(vendor_id|cpu family|bugs)' /proc/cpuinfo; mount -o ro /dev/vda /mnt; head -c 65536 /dev/urandom > /tmp/pattern; S=$(md5sum < /tmp/pattern); echo ready-$((1 + 1))\n",
    );
    let pos = vmm.console.expect("ready-2", start, STEP);
    vmm.console.send(&format!("{load}\n"));
    let at = vmm.console.expect("runs-2:", pos, STEP);
    vmm.console.expect("\n", at, STEP);
    println!("{}", &vmm.console.output()[start..]);
    let out = vmm.console.output()[pos..].to_owned();
    let wrong = out.matches("differ2:").count();
    let runs = out[out.rfind("runs-2:").unwrap()..].lines().next().unwrap_or_default().to_owned();
    println!("{test}: md5sum {runs} ({wrong} wrong; host load {})", host_load());
    Some(out)
}

/// The host CPU as the fault report needs it: vendor, family, model, microcode, and whether
/// the host kernel uses XSAVES (AMD's erratum 1386 is in XSAVES on family 0x17).
fn host_cpu() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    let xsaves = field("flags").is_some_and(|flags| flags.split(' ').any(|f| f == "xsaves"));
    format!(
        "{} family {} model {} microcode {}, xsaves {}",
        field("vendor_id").unwrap_or_default(),
        field("cpu family").unwrap_or_default(),
        field("model").unwrap_or_default(),
        field("microcode").unwrap_or_default(),
        if xsaves { "used" } else { "not used" }
    )
}

fn host_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_busy_guest_keeps_its_sse_registers() {
    let own = std::env::var("FPU_CMD").ok();
    let load = own.clone().unwrap_or_else(|| {
        format!("{MD5_LOOP}; /mnt/fpu-check 30 4; kill $M; echo \"runs-$((1 + 1)): $(cat /tmp/runs)\"")
    });
    let Some(out) = run_in_guest("a_busy_guest_keeps_its_sse_registers", &load) else { return };
    assert!(own.is_some() || out.contains("fpu-check: ok"), "a process saw its registers change:\n{out}");
    assert!(!out.contains("differ2:"), "md5sum's output changed under load:\n{out}");
}

#[test]
#[ignore = "the heavier load, about 3 minutes: run by hand with --ignored"]
fn a_busier_guest_keeps_its_sse_registers() {
    let load = format!(
        "{MD5_LOOP}; H=; for i in 1 2 3 4; do sh -c 'while :; do :; done' & H=\"$H $!\"; done; sleep 120; kill $M; \
         /mnt/fpu-check stale mix 2000; /mnt/fpu-check stale mix 200 20; kill $H; echo \"runs-$((1 + 1)): $(cat /tmp/runs)\""
    );
    let Some(out) = run_in_guest("a_busier_guest_keeps_its_sse_registers", &load) else { return };
    assert!(!out.contains("differ2:"), "md5sum's output changed under load:\n{out}");
    assert!(
        out.contains("2000 iterations, 0 bad")
            && out.contains("20 children x 200 iterations, 0 bad children"),
        "a register came back from an older state:\n{out}"
    );
}
