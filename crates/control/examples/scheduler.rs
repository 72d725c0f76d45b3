//! The measurements of `bench/scheduler`: the scheduler and the consolidation planner, run
//! unchanged on simulated hosts at sizes this machine cannot run guests at.
//!
//! For each size (instances; hosts are a tenth of them, 128 GiB and 64 CPUs each): places the
//! instances one after another with every filter and weigher on (online, maintenance, memory,
//! anti-affinity: one instance in ten is in a group of three, spread weigher), each placement
//! seeing the allocations of the ones before, then plans the consolidation of the result.
//!
//! Usage: cargo run --release -p stratus-control --example scheduler -- [INSTANCES ...]

use std::collections::HashMap;
use std::time::Instant;

use stratus_control::consolidate::{self, HostLoad, Resident};
use stratus_control::scheduler::{self, Candidate, Policy};

/// Memory sizes of the instances, in turn (MiB).
const SIZES: [u64; 4] = [512, 1024, 2048, 4096];

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1_000, 10_000, 100_000] } else { sizes };
    println!(
        "{:>9} {:>7}  {:>13} {:>9} {:>9}  {:>12} {:>8} {:>7}",
        "instances", "hosts", "placements/s", "p50 µs", "p99 µs", "consolidate", "emptied", "moves"
    );
    for instances in sizes {
        let row = run(instances);
        println!(
            "{:>9} {:>7}  {:>13.0} {:>9.1} {:>9.1}  {:>9.0} ms {:>8} {:>7}",
            instances,
            row.hosts,
            row.placements_per_s,
            row.p50_us,
            row.p99_us,
            row.plan_ms,
            row.emptied,
            row.moves
        );
    }
}

struct Row {
    hosts: usize,
    placements_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    plan_ms: f64,
    emptied: usize,
    moves: usize,
}

fn run(instances: usize) -> Row {
    let hosts = (instances / 10).max(3);
    let mut candidates: Vec<Candidate> = (0..hosts)
        .map(|i| Candidate {
            name: format!("h{i}"),
            online: true,
            maintenance: false,
            allocatable_mib: 128 << 10,
            allocated_mib: 0,
            group_members: Vec::new(),
            lacks: None,
        })
        .collect();
    let index: HashMap<String, usize> =
        candidates.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
    let mut residents: Vec<Vec<Resident>> = vec![Vec::new(); hosts];
    let mut groups: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    let mut times = Vec::with_capacity(instances);
    let started = Instant::now();
    for i in 0..instances {
        let memory_mib = SIZES[i % SIZES.len()];
        let name = format!("i{i}");
        let group = if i % 10 == 0 { format!("g{}", i / 30) } else { String::new() };
        let t = Instant::now();
        // What the API does for a member of a group: the group's members, by host.
        let members = groups.get(&group).cloned().unwrap_or_default();
        for (host, member) in &members {
            candidates[*host].group_members.push(member.clone());
        }
        let decision = scheduler::place(&candidates, memory_mib, Policy::Spread, None)
            .unwrap_or_else(|refusal| panic!("placing {name}: {refusal}"));
        for (host, _) in &members {
            candidates[*host].group_members.clear();
        }
        let host = index[&decision.host];
        candidates[host].allocated_mib += memory_mib;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if !group.is_empty() {
            groups.entry(group.clone()).or_default().push((host, name.clone()));
        }
        residents[host].push(Resident { name, memory_mib, cpus: 2, group, shared: false });
    }
    let placing = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let loads: Vec<HostLoad> = candidates
        .iter()
        .zip(residents)
        .map(|(c, instances)| HostLoad {
            name: c.name.clone(),
            usable: true,
            cpus: 64,
            allocatable_mib: c.allocatable_mib,
            shared_pool: false,
            instances,
        })
        .collect();
    let t = Instant::now();
    let plan = consolidate::plan(&loads);
    let plan_ms = t.elapsed().as_secs_f64() * 1e3;
    Row {
        hosts,
        placements_per_s: instances as f64 / placing,
        p50_us: times[times.len() / 2],
        p99_us: times[times.len() * 99 / 100],
        plan_ms,
        emptied: plan.emptied.len(),
        moves: plan.moves.len(),
    }
}
