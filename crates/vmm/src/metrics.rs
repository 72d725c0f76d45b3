//! `GET /metrics`: what a VM is doing, as counters that only grow (rates come from two
//! readings). Per vCPU: the exits the VMM handled, by reason, and KVM's own counters (HLT,
//! interrupt windows, ...); per device: requests, bytes, rejected guest requests, backend
//! failures. `stratus vm trace` turns two readings a second apart into rates.

use std::sync::atomic::Ordering;

use serde_json::{json, Map, Value};
use stratus_devices::bus::lock;

use crate::service::Phase;
use crate::vm::Vm;

/// The name of a virtio device type.
pub fn device_kind(kind: u32) -> &'static str {
    match kind {
        stratus_virtio::device_type::NET => "net",
        stratus_virtio::device_type::BLOCK => "block",
        stratus_virtio::device_type::RNG => "rng",
        stratus_virtio::device_type::VSOCK => "vsock",
        stratus_virtio::device_type::BALLOON => "balloon",
        _ => "unknown",
    }
}

fn counters(pairs: impl IntoIterator<Item = (impl Into<String>, u64)>) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.into(), json!(v))).collect::<Map<_, _>>())
}

/// The VMM process: its id and resident memory (what the host really spends on this VM).
pub fn process() -> Value {
    let rss_kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    json!({ "pid": std::process::id(), "rss_bytes": rss_kib.map(|k| k * 1024) })
}

/// Every counter of `vm`; `name(type, index among devices of that type)` names a device
/// (a drive's or NIC's id).
pub fn collect(vm: &Vm, phase: Phase, name: impl Fn(u32, usize) -> Option<String>) -> Value {
    let vcpus: Vec<Value> = vm
        .exit_counters()
        .iter()
        .zip(vm.kvm_stats())
        .enumerate()
        .map(|(id, (exits, kvm))| {
            json!({
                "id": id,
                "exits": counters(exits.snapshot()),
                "kvm": kvm.as_ref().map(|k| counters(k.read())),
            })
        })
        .collect();
    let mut seen = std::collections::HashMap::<u32, usize>::new();
    let devices: Vec<Value> = vm
        .devices()
        .iter()
        .enumerate()
        .map(|(slot, transport)| {
            let t = lock(transport);
            let kind = t.device().device_type();
            let index = *seen.entry(kind).and_modify(|i| *i += 1).or_insert(0);
            let c = t.device().counters();
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            json!({
                "slot": slot,
                "type": device_kind(kind),
                "id": name(kind, index),
                "requests": get(&c.requests),
                "bytes": get(&c.bytes),
                "rejected": get(&c.rejected),
                "failed": get(&c.failed),
            })
        })
        .collect();
    json!({
        "state": phase,
        "uptime_ms": vm.uptime().as_millis() as u64,
        "process": process(),
        "vcpus": vcpus,
        "devices": devices,
        "pvm_completions": vm.pvm.as_ref().map(|p| counters(p.snapshot())),
    })
}
