//! `stratus vm trace`: exit rates by reason and vCPU, and device activity, refreshed like
//! `kvm_stat` or `top`, from two readings of the VMM's counters a second apart. VM-exit
//! accounting is the cheapest profiler a hypervisor has: a guest that spins on a port, takes
//! an interrupt storm or halts and wakes constantly shows it here at once.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One reading: per-vCPU counters by name (the VMM's exits, then KVM's own, prefixed
/// `kvm.`), and per-device counters.
struct Reading {
    at: Instant,
    state: String,
    uptime_ms: u64,
    vcpus: Vec<BTreeMap<String, u64>>,
    devices: Vec<(String, String, BTreeMap<String, u64>)>,
}

fn numbers(value: &Value, prefix: &str, into: &mut BTreeMap<String, u64>) {
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            if let Some(n) = v.as_u64() {
                into.insert(format!("{prefix}{k}"), n);
            }
        }
    }
}

fn reading(metrics: &Value) -> Reading {
    let vcpus = metrics["vcpus"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|v| {
                    let mut counters = BTreeMap::new();
                    numbers(&v["exits"], "", &mut counters);
                    numbers(&v["kvm"], "kvm.", &mut counters);
                    counters
                })
                .collect()
        })
        .unwrap_or_default();
    let devices = metrics["devices"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|d| {
                    let mut counters = BTreeMap::new();
                    numbers(d, "", &mut counters);
                    counters.remove("slot");
                    let name =
                        d["id"].as_str().map(str::to_owned).unwrap_or_else(|| format!("slot{}", d["slot"]));
                    (name, d["type"].as_str().unwrap_or("?").to_owned(), counters)
                })
                .collect()
        })
        .unwrap_or_default();
    Reading {
        at: Instant::now(),
        state: metrics["state"].as_str().unwrap_or("?").to_owned(),
        uptime_ms: metrics["uptime_ms"].as_u64().unwrap_or(0),
        vcpus,
        devices,
    }
}

/// Counters that are not exits: shown with the devices' figures or not at all.
fn is_exit_counter(name: &str) -> bool {
    !name.starts_with("kvm.")
        || name.contains("exits")
        || name == "kvm.halt_wakeup"
        || name == "kvm.insn_emulation"
}

/// The screen for the interval between `before` and `now`.
fn render(before: &Reading, now: &Reading) -> String {
    let secs = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let mut out = format!(
        "stratus vm trace   state {}   uptime {:.1} s   interval {:.2} s\n\n",
        now.state,
        now.uptime_ms as f64 / 1e3,
        secs
    );
    // Exit reasons by vCPU, busiest first; reasons idle in this interval are left out.
    let mut rows: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (i, (b, n)) in before.vcpus.iter().zip(&now.vcpus).enumerate() {
        for (name, value) in n {
            if !is_exit_counter(name) {
                continue;
            }
            let r = rate(b.get(name).copied().unwrap_or(0), *value);
            let row = rows.entry(name.clone()).or_insert_with(|| vec![0.0; now.vcpus.len()]);
            row[i] = r;
        }
    }
    let mut rows: Vec<(String, Vec<f64>)> =
        rows.into_iter().filter(|(_, r)| r.iter().any(|&x| x > 0.0)).collect();
    rows.sort_by(|a, b| b.1.iter().sum::<f64>().total_cmp(&a.1.iter().sum::<f64>()));
    out += &format!("{:<28}", "EXITS/s");
    for i in 0..now.vcpus.len() {
        out += &format!("{:>12}", format!("vcpu{i}"));
    }
    out += &format!("{:>12}\n", "total");
    if rows.is_empty() {
        out += "  (no exits in this interval)\n";
    }
    for (name, values) in &rows {
        out += &format!("{name:<28}");
        for v in values {
            out += &format!("{v:>12.0}");
        }
        out += &format!("{:>12.0}\n", values.iter().sum::<f64>());
    }
    out += &format!(
        "\n{:<12}{:<8}{:>12}{:>12}{:>12}{:>12}\n",
        "DEVICE", "TYPE", "requests/s", "MiB/s", "rejected", "failed"
    );
    for ((_, _, b), (name, kind, n)) in before.devices.iter().zip(&now.devices) {
        let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        out += &format!(
            "{:<12}{:<8}{:>12.0}{:>12.2}{:>12}{:>12}\n",
            name,
            kind,
            rate(get(b, "requests"), get(n, "requests")),
            rate(get(b, "bytes"), get(n, "bytes")) / 1048576.0,
            get(n, "rejected"),
            get(n, "failed")
        );
    }
    out
}

/// Refreshes every `interval` seconds (`count` times, or until interrupted).
pub fn run(
    interval: f64,
    count: Option<u64>,
    mut fetch: impl FnMut() -> anyhow::Result<Value>,
) -> anyhow::Result<()> {
    if !(0.05..=3600.0).contains(&interval) {
        anyhow::bail!("--interval {interval}: use 0.05 to 3600 seconds");
    }
    let tty = std::io::stdout().is_terminal();
    let mut before = reading(&fetch()?);
    let mut shown = 0;
    while count.is_none_or(|c| shown < c) {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let now = reading(&fetch()?);
        let screen = render(&before, &now);
        let mut stdout = std::io::stdout().lock();
        if tty {
            write!(stdout, "\x1b[H\x1b[2J")?;
        }
        writeln!(stdout, "{screen}")?;
        stdout.flush()?;
        before = now;
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_difference_of_two_readings() {
        let first = serde_json::json!({
            "state": "running", "uptime_ms": 1000,
            "vcpus": [{"id": 0, "exits": {"io_out": 100, "mmio_read": 5}, "kvm": {"halt_exits": 10, "guest_mode": 1}}],
            "devices": [{"slot": 0, "type": "block", "id": "vda", "requests": 10, "bytes": 0, "rejected": 0, "failed": 0}],
        });
        let second = serde_json::json!({
            "state": "running", "uptime_ms": 2000,
            "vcpus": [{"id": 0, "exits": {"io_out": 300, "mmio_read": 5}, "kvm": {"halt_exits": 60, "guest_mode": 1}}],
            "devices": [{"slot": 0, "type": "block", "id": "vda", "requests": 30, "bytes": 2097152, "rejected": 1, "failed": 0}],
        });
        let mut a = reading(&first);
        let b = reading(&second);
        a.at = b.at - Duration::from_secs(2);
        let screen = render(&a, &b);
        let line = |name: &str| screen.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_owned();
        assert!(line("io_out").split_whitespace().any(|w| w == "100"), "{screen}");
        assert!(line("kvm.halt_exits").split_whitespace().any(|w| w == "25"), "{screen}");
        assert!(!screen.contains("mmio_read"), "idle reasons are left out: {screen}");
        assert!(!screen.contains("guest_mode"), "non-exit KVM counters are left out: {screen}");
        let vda = line("vda");
        assert!(vda.contains("10") && vda.contains("1.00"), "{screen}");
        // The busiest reason comes first.
        let io = screen.find("io_out").unwrap();
        let halt = screen.find("kvm.halt_exits").unwrap();
        assert!(io < halt, "{screen}");
    }
}
