//! The measurements of `bench/scheduler`: the scheduler and the consolidation planner, run
//! unchanged on simulated hosts at sizes this machine cannot run guests at.
//!
//! For each size (instances; hosts are a tenth of them, 128 GiB and 64 CPUs each): places the
//! instances one after another with every filter and weigher on (online, maintenance, memory,
//! anti-affinity: one instance in ten is in a group of three, spread weigher), each placement
//! seeing the allocations of the ones before, then plans the consolidation of the result, and
//! a full rebalancing round of it (one host in five busy: its instances keep 5 CPUs each busy,
//! the others' 0.2; as many moves as the rebalancer finds, one per host).
//!
//! Usage: cargo run --release -p stratus-control --example scheduler -- [INSTANCES ...]

use std::collections::HashMap;
use std::time::Instant;

use stratus_api::model::RebalanceConfig;
use stratus_control::consolidate::{self, HostLoad, Resident};
use stratus_control::rebalance::{self, HostUse, InstanceUse};
use stratus_control::scheduler::{self, Candidate, Policy};

/// Memory sizes of the instances, in turn (MiB).
const SIZES: [u64; 4] = [512, 1024, 2048, 4096];

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1_000, 10_000, 100_000] } else { sizes };
    println!(
        "{:>9} {:>7}  {:>13} {:>9} {:>9}  {:>12} {:>8} {:>7}  {:>12} {:>8}",
        "instances",
        "hosts",
        "placements/s",
        "p50 µs",
        "p99 µs",
        "consolidate",
        "emptied",
        "moves",
        "rebalance",
        "moves"
    );
    for instances in sizes {
        let row = run(instances);
        println!(
            "{:>9} {:>7}  {:>13.0} {:>9.1} {:>9.1}  {:>9.0} ms {:>8} {:>7}  {:>9.0} ms {:>8}",
            instances,
            row.hosts,
            row.placements_per_s,
            row.p50_us,
            row.p99_us,
            row.plan_ms,
            row.emptied,
            row.moves,
            row.rebalance_ms,
            row.rebalance_moves
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
    rebalance_ms: f64,
    rebalance_moves: usize,
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
    let uses: Vec<HostUse> = loads
        .iter()
        .enumerate()
        .map(|(n, load)| HostUse {
            name: load.name.clone(),
            cpus: load.cpus,
            usable: true,
            settled: true,
            memory_mib: load.allocatable_mib,
            free_mib: load.allocatable_mib - load.instances.iter().map(|r| r.memory_mib).sum::<u64>(),
            shared_pool: false,
            instances: load
                .instances
                .iter()
                .map(|r| InstanceUse {
                    name: r.name.clone(),
                    cpus_busy: if n % 5 == 0 { 5.0 } else { 0.2 },
                    memory_mib: r.memory_mib,
                    memory_used_mib: r.memory_mib / 2,
                    group: r.group.clone(),
                    cooling: false,
                    shared: false,
                })
                .collect(),
        })
        .collect();
    let config = RebalanceConfig { max_moves: u32::MAX, ..RebalanceConfig::default() };
    let t = Instant::now();
    let rebalances = rebalance::decide(&uses, &config);
    let rebalance_ms = t.elapsed().as_secs_f64() * 1e3;
    Row {
        hosts,
        placements_per_s: instances as f64 / placing,
        p50_us: times[times.len() / 2],
        p99_us: times[times.len() * 99 / 100],
        plan_ms,
        emptied: plan.emptied.len(),
        moves: plan.moves.len(),
        rebalance_ms,
        rebalance_moves: rebalances.len(),
    }
}
