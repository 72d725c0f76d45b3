//! A Linux guest's SSE registers under load, with no snapshot or migration involved: the
//! reproducer of a fault seen on the development host (KVM in PVM mode), where a busy guest
//! now and then gets 16 bytes of a register back from an older state (zeros, or a broadcast
//! newline). It fails there, so it is ignored; run it with
//! `cargo test -p stratus --test guest_fpu -- --ignored --nocapture` (about 2 minutes).
//!
//! In the guest, `fpu-check` (tests/guest-tools/fpu-check.c) keeps four processes busy, each
//! checking its own registers across yields, faulting stores and signals (those have never
//! failed), while a loop runs busybox's md5sum over a fixed file and compares each result with
//! the first (that is where it shows: 16 bytes of the hash's text come out wrong).
//! `FPU_CMD` replaces that loop with a shell line of one's own (it must print `runs-2:`), to
//! try other loads in the same booted guest. The load need not make system calls: four
//! `sh -c "while :; do :; done"` made 9 of 14 md5sum runs wrong, four `yes > /dev/null` 2 of 14.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

const STEP: Duration = Duration::from_secs(180);

#[test]
#[ignore = "fails on PVM hosts: a busy guest loses SSE register contents (see the module's doc)"]
fn a_busy_guest_keeps_its_sse_registers() {
    if !kvm_available("a_busy_guest_keeps_its_sse_registers") {
        return;
    }
    ensure_default_image();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("guest-fpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tools = tools_disk();
    let mut vmm = VmmProcess::start_in(&dir, &[]);
    vmm.configure_default_linux(2, 128);
    vmm.ok("PUT", "/vm/drives/tools", Some(json!({"path": tools, "readonly": true})));
    vmm.ok("POST", "/vm/start", None);
    let pos = vmm.console.expect("stratus# ", 0, STEP);
    vmm.console.send(
        "mount -o ro /dev/vda /mnt; head -c 65536 /dev/urandom > /tmp/pattern; S=$(md5sum < /tmp/pattern); echo ready-$((1 + 1))\n",
    );
    let pos = vmm.console.expect("ready-2", pos, STEP);
    vmm.console.send(
        &std::env::var("FPU_CMD").unwrap_or_else(|_| "(n=0; while :; do n=$((n + 1)); echo $n > /tmp/runs; md5sum < /tmp/pattern > /tmp/o; [ \"$(cat /tmp/o)\" = \"$S\" ] || { echo \"differ$((1 + 1)): $(cat /tmp/o)\"; od -An -tx1 /tmp/o; }; done) & M=$!; /mnt/fpu-check 30 4; kill $M; echo \"runs-$((1 + 1)): $(cat /tmp/runs)\"\n".into()),
    );
    let at = vmm.console.expect("runs-2:", pos, STEP);
    vmm.console.expect("\n", at, STEP);
    let out = vmm.console.output()[pos..].to_owned();
    println!("{out}");
    assert!(out.contains("fpu-check: ok"), "a process saw its registers change:\n{out}");
    assert!(!out.contains("differ2:"), "md5sum's output changed under load:\n{out}");
}
