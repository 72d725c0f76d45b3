//! Load balancing by live migration, on by default. The leader samples every instance's CPU
//! use from the hosts' agents (their VMMs' CPU time, a counter), and once each host has been
//! measured over a whole window ([`RebalanceConfig::window_s`]), compares the busiest host with
//! the idlest: when their CPU use differs by more than the threshold, it moves the instance
//! that narrows the gap most to the idle host, live.
//!
//! What keeps it from thrashing: a decision needs a window of measurements, not one sample; a
//! move must narrow the gap by at least `min_gain_percent` points (else its cost, a migration,
//! outweighs it) and may not open a gap the other way wide enough to call for a move back; an
//! instance moved stays put for `cooldown_s`; the two hosts of a move are measured afresh for a
//! whole window before either moves anything again; at most `max_moves` a round, each between
//! hosts no other move of the round touches. Every move is an event that says why ("h1 CPU 94%
//! over 5 min, h3 31%: moved web4 (using 80% of a CPU) to h3; the gap goes from 63 to 23
//! points").
//!
//! Memory is measured too (each VMM's resident memory, averaged over the window): a host whose
//! guests use more than `memory_percent` of its memory for instances moves one off first, to
//! the host using the least, choosing the smallest that brings it back under (else the
//! largest), where the destination stays under the mark too. An instance goes only where its
//! memory is allocated free as well, as any placement.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_api::model::{ClusterConfig, Desired, Instance, InstanceState, RebalanceConfig, DEFAULT_PROJECT};

use crate::state::{hosts_of, placed_on, AppState};

/// Where the settings live in the store.
pub const CONFIG_KEY: &str = "/config/cluster";

/// A host as the rebalancer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostUse {
    /// Host name.
    pub name: String,
    /// Its CPUs.
    pub cpus: u32,
    /// Online and not in maintenance.
    pub usable: bool,
    /// Measured over a whole window, and not part of a move within it.
    pub settled: bool,
    /// Memory for instances, MiB (the host's allocatable memory).
    pub memory_mib: u64,
    /// Memory not allocated to instances, MiB.
    pub free_mib: u64,
    /// It mounts the shared storage pool (it may take shared-pool instances).
    pub shared_pool: bool,
    /// The running instances there.
    pub instances: Vec<InstanceUse>,
}

/// A running instance's measured use.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceUse {
    /// Instance name.
    pub name: String,
    /// CPUs it kept busy, on average over the window.
    pub cpus_busy: f64,
    /// Its memory, MiB.
    pub memory_mib: u64,
    /// The memory it used, measured (the VMM's resident memory), on average over the window.
    pub memory_used_mib: u64,
    /// Its anti-affinity group ("" for none).
    pub group: String,
    /// Moved within its cooldown: it stays.
    pub cooling: bool,
    /// Its disk is on the shared pool: only hosts that mount it take it.
    pub shared: bool,
}

/// A move the rebalancer decided on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rebalance {
    /// The instance.
    pub instance: String,
    /// From the busy host.
    pub from: String,
    /// To the idle one.
    pub to: String,
    /// Why, for the event.
    pub reason: String,
}

impl HostUse {
    /// CPU use, in percent of the host's CPUs.
    fn load(&self) -> f64 {
        self.instances.iter().fold(0.0, |sum, i| sum + i.cpus_busy) / f64::from(self.cpus.max(1)) * 100.0
    }

    /// Memory use, in percent of the host's memory for instances.
    fn memory_load(&self) -> f64 {
        let used: u64 = self.instances.iter().map(|i| i.memory_used_mib).sum();
        used as f64 / self.memory_mib.max(1) as f64 * 100.0
    }

    /// Whether instance `i` may go to this host at all: its allocation fits, the storage it
    /// needs is here, and no other member of its anti-affinity group runs here.
    fn admits(&self, i: &InstanceUse) -> bool {
        !i.cooling
            && i.memory_mib <= self.free_mib
            && (!i.shared || self.shared_pool)
            && (i.group.is_empty() || self.instances.iter().all(|other| other.group != i.group))
    }
}

/// Moves off hosts whose guests use more memory than `config.memory_percent` allows, at most
/// `config.max_moves`; each host takes part in one, and goes into `taken`.
fn memory_moves(hosts: &[HostUse], config: &RebalanceConfig, taken: &mut HashSet<usize>) -> Vec<Rebalance> {
    let limit = f64::from(config.memory_percent);
    let eligible: Vec<usize> = (0..hosts.len()).filter(|&i| hosts[i].usable && hosts[i].settled).collect();
    let mut hot: Vec<usize> = eligible.iter().copied().filter(|&i| hosts[i].memory_load() > limit).collect();
    hot.sort_by(|&a, &b| hosts[b].memory_load().total_cmp(&hosts[a].memory_load()));
    let mut moves = Vec::new();
    for from in hot {
        if moves.len() >= config.max_moves as usize || taken.contains(&from) {
            continue;
        }
        let Some(to) = eligible
            .iter()
            .copied()
            .filter(|&i| i != from && !taken.contains(&i) && hosts[i].memory_load() <= limit)
            .min_by(|&a, &b| hosts[a].memory_load().total_cmp(&hosts[b].memory_load()))
        else {
            break;
        };
        let (source, destination) = (&hosts[from], &hosts[to]);
        let (hot_load, cool_load) = (source.memory_load(), destination.memory_load());
        let share = |i: &InstanceUse, host: &HostUse| {
            i.memory_used_mib as f64 / host.memory_mib.max(1) as f64 * 100.0
        };
        let fitting: Vec<&InstanceUse> = source
            .instances
            .iter()
            .filter(|i| i.memory_used_mib > 0 && destination.admits(i))
            // The destination stays under the mark, and below the source: no move back.
            .filter(|i| {
                let cool_after = cool_load + share(i, destination);
                cool_after <= limit && cool_after < hot_load - share(i, source)
            })
            .collect();
        let enough = fitting
            .iter()
            .filter(|i| hot_load - share(i, source) <= limit)
            .min_by_key(|i| (i.memory_used_mib, i.name.clone()));
        let Some(instance) =
            enough.or_else(|| fitting.iter().max_by_key(|i| (i.memory_used_mib, i.name.clone())))
        else {
            continue;
        };
        moves.push(Rebalance {
            instance: instance.name.clone(),
            from: source.name.clone(),
            to: destination.name.clone(),
            reason: format!(
                "{} memory {hot_load:.0}% used over {}, {} {cool_load:.0}%: moved {} (using {}) to {}",
                source.name,
                span(config.window_s),
                destination.name,
                instance.name,
                crate::scheduler::mib(instance.memory_used_mib),
                destination.name
            ),
        });
        taken.insert(from);
        taken.insert(to);
    }
    moves
}

/// The moves that even out the hosts' CPU use, at most `config.max_moves`.
pub fn decide(hosts: &[HostUse], config: &RebalanceConfig) -> Vec<Rebalance> {
    let threshold = f64::from(config.threshold_percent);
    let min_gain = f64::from(config.min_gain_percent);
    // Memory short first: a host out of memory is worse off than a busy one.
    let mut taken = HashSet::new();
    let mut moves = memory_moves(hosts, config, &mut taken);
    let mut loads: Vec<(usize, f64)> = hosts
        .iter()
        .enumerate()
        .filter(|(i, h)| h.usable && h.settled && !taken.contains(i))
        .map(|(i, h)| (i, h.load()))
        .collect();
    while moves.len() < config.max_moves as usize && loads.len() >= 2 {
        loads.sort_by(|a, b| b.1.total_cmp(&a.1).then(hosts[a.0].name.cmp(&hosts[b.0].name)));
        let (hot, hot_load) = loads[0];
        let (cool, cool_load) = loads[loads.len() - 1];
        let gap = hot_load - cool_load;
        if gap <= threshold {
            break;
        }
        let (from, to) = (&hosts[hot], &hosts[cool]);
        let best = from
            .instances
            .iter()
            .filter(|i| i.cpus_busy > 0.0 && to.admits(i))
            .filter_map(|i| {
                let hot_after = hot_load - i.cpus_busy / f64::from(from.cpus.max(1)) * 100.0;
                let cool_after = cool_load + i.cpus_busy / f64::from(to.cpus.max(1)) * 100.0;
                let gain = gap - (hot_after - cool_after).abs();
                // A move that turns the idle host into one busy enough to move back is no move.
                (gain >= min_gain && cool_after - hot_after <= threshold)
                    .then_some((i, gain, hot_after, cool_after))
            })
            .max_by(|a, b| {
                a.1.total_cmp(&b.1).then(b.0.memory_mib.cmp(&a.0.memory_mib)).then(b.0.name.cmp(&a.0.name))
            });
        let Some((instance, _, hot_after, cool_after)) = best else { break };
        moves.push(Rebalance {
            instance: instance.name.clone(),
            from: from.name.clone(),
            to: to.name.clone(),
            reason: format!(
                "{} CPU {hot_load:.0}% over {}, {} {cool_load:.0}%: moved {} (using {:.0}% of a CPU) to {}; the gap goes from {gap:.0} to {:.0} points",
                from.name,
                span(config.window_s),
                to.name,
                instance.name,
                instance.cpus_busy * 100.0,
                to.name,
                (hot_after - cool_after).abs()
            ),
        });
        // Each host takes part in one move a round: its next is decided on fresh measurements.
        loads.retain(|(i, _)| *i != hot && *i != cool);
    }
    moves
}

/// "5 min", "30 s".
fn span(seconds: u64) -> String {
    if seconds >= 60 && seconds.is_multiple_of(60) {
        format!("{} min", seconds / 60)
    } else {
        format!("{seconds} s")
    }
}

/// Starts the rebalancer: a thread that, while this replica leads and rebalancing is on,
/// measures and moves.
pub fn spawn(state: Arc<AppState>) {
    let _ = std::thread::Builder::new().name("rebalancer".into()).spawn(move || {
        let mut rebalancer = Rebalancer::default();
        loop {
            let config = settings(&state);
            let window = Duration::from_secs(config.rebalance.window_s);
            std::thread::sleep((window / 8).clamp(Duration::from_millis(250), Duration::from_secs(15)));
            if !config.rebalance.enabled || !state.leadership.is_leader() {
                // Measurements from before a pause (or another leader's time) are stale.
                rebalancer.samples.clear();
                state.cpu_use.lock().unwrap_or_else(|p| p.into_inner()).clear();
                continue;
            }
            rebalancer.round(&state, &config.rebalance);
        }
    });
}

/// The cluster's settings as stored (the defaults where none are).
pub fn settings(state: &AppState) -> ClusterConfig {
    state.db.get::<ClusterConfig>(CONFIG_KEY).ok().flatten().map(|(config, _)| config).unwrap_or_default()
}

#[derive(Default)]
struct Rebalancer {
    /// CPU seconds and resident memory (MiB) per instance id, as sampled, oldest first.
    samples: HashMap<String, VecDeque<(Instant, f64, u64)>>,
    /// Instances moved, until when they stay put.
    cooling: HashMap<String, Instant>,
    /// Hosts of a move, until when they are measured afresh.
    unsettled: HashMap<String, Instant>,
}

impl Rebalancer {
    fn round(&mut self, state: &Arc<AppState>, config: &RebalanceConfig) {
        let window = Duration::from_secs(config.window_s);
        let now = Instant::now();
        let Ok(instances) = state.db.instances() else { return };
        let Ok(hosts) = hosts_of(state, &instances) else { return };
        let running: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.desired == Desired::Running && i.status.state == InstanceState::Running)
            .collect();
        let mut seen = HashSet::new();
        let mut uses = Vec::new();
        for host in &hosts {
            let here: Vec<Instance> =
                running.iter().filter(|i| placed_on(state, i) == host.name).map(|i| (*i).clone()).collect();
            let online = host.state == "online";
            let usage = match state.hosts.get(&host.name) {
                Some(agent) if online => agent.usage(&here),
                _ => Vec::new(),
            };
            for u in &usage {
                seen.insert(u.id.clone());
                let samples = self.samples.entry(u.id.clone()).or_default();
                if samples.back().is_some_and(|(_, last, _)| u.cpu_seconds < *last) {
                    // A counter that went back: a new VMM. Its history starts again.
                    samples.clear();
                }
                samples.push_back((now, u.cpu_seconds, u.memory_bytes >> 20));
                while samples.len() > 2 && now.duration_since(samples[1].0) >= window {
                    samples.pop_front();
                }
            }
            let mut settled = online && self.unsettled.get(&host.name).is_none_or(|until| now >= *until);
            let mut instances = Vec::new();
            for instance in &here {
                let measured = self.samples.get(&instance.id).and_then(|s| {
                    let (first, last) = (s.front()?, s.back()?);
                    let span = last.0.duration_since(first.0);
                    let memory = s.iter().map(|sample| sample.2).sum::<u64>() / s.len() as u64;
                    (span >= window.mul_f64(0.9)).then(|| ((last.1 - first.1) / span.as_secs_f64(), memory))
                });
                let Some((cpus_busy, memory_used_mib)) = measured else {
                    // Not measured over a whole window yet: no decision on this host.
                    settled = false;
                    continue;
                };
                instances.push(InstanceUse {
                    name: instance.name.clone(),
                    cpus_busy,
                    memory_mib: instance.spec.memory_mib,
                    memory_used_mib,
                    group: instance.spec.anti_affinity.clone(),
                    cooling: self.cooling.get(&instance.name).is_some_and(|until| now < *until),
                    shared: instance.spec.pool == stratus_api::model::Pool::Shared,
                });
            }
            let measured = instances.len() == here.len();
            let view = HostUse {
                name: host.name.clone(),
                cpus: host.cpus,
                usable: online && !host.maintenance,
                settled,
                memory_mib: host.allocatable_mib,
                free_mib: host.allocatable_mib.saturating_sub(host.allocated_mib),
                shared_pool: host.shared_pool,
                instances,
            };
            // What `host list` shows: the use of a host measured over a whole window.
            let mut shown = state.cpu_use.lock().unwrap_or_else(|p| p.into_inner());
            if online && measured {
                shown.insert(host.name.clone(), view.load());
            } else {
                shown.remove(&host.name);
            }
            drop(shown);
            uses.push(view);
        }
        self.samples.retain(|id, _| seen.contains(id));
        for planned in decide(&uses, config) {
            let moved = crate::maintenance::move_one(state, &planned.instance, Some(&planned.to));
            let done = Instant::now();
            self.unsettled.insert(planned.from.clone(), done + window);
            self.unsettled.insert(planned.to.clone(), done + window);
            match moved {
                crate::maintenance::Outcome::Moved(_) => {
                    self.cooling
                        .insert(planned.instance.clone(), done + Duration::from_secs(config.cooldown_s));
                    state.db.event(
                        DEFAULT_PROJECT,
                        &planned.instance,
                        "info",
                        format!("rebalance: {}", planned.reason),
                    );
                }
                crate::maintenance::Outcome::Stayed(why) => {
                    state.db.event(
                        DEFAULT_PROJECT,
                        &planned.instance,
                        "error",
                        format!(
                            "rebalance: moving {} to {} failed, it stays on {}: {why}",
                            planned.instance, planned.to, planned.from
                        ),
                    );
                }
                crate::maintenance::Outcome::Kept => {}
            }
        }
        self.cooling.retain(|_, until| now < *until);
        self.unsettled.retain(|_, until| now < *until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, cpus_busy: f64) -> InstanceUse {
        InstanceUse {
            name: name.into(),
            cpus_busy,
            memory_mib: 256,
            memory_used_mib: 64,
            group: String::new(),
            cooling: false,
            shared: false,
        }
    }

    fn host(name: &str, instances: Vec<InstanceUse>) -> HostUse {
        HostUse {
            name: name.into(),
            cpus: 2,
            usable: true,
            settled: true,
            memory_mib: 4096,
            free_mib: 4096,
            shared_pool: false,
            instances,
        }
    }

    fn config() -> RebalanceConfig {
        RebalanceConfig { window_s: 300, ..RebalanceConfig::default() }
    }

    #[test]
    fn the_instance_that_evens_the_hosts_out_moves_and_says_why() {
        // h1 at 95% of 2 CPUs, h3 idle: moving b (0.8 CPU) leaves 55% and 40%; moving a (1.0)
        // 45% and 50%, the smaller gap.
        let hosts = [
            host("h1", vec![instance("a", 1.0), instance("b", 0.8), instance("c", 0.1)]),
            host("h2", vec![instance("d", 0.5)]),
            host("h3", vec![]),
        ];
        let moves = decide(&hosts, &config());
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!((moves[0].instance.as_str(), moves[0].to.as_str()), ("a", "h3"));
        assert_eq!(
            moves[0].reason,
            "h1 CPU 95% over 5 min, h3 0%: moved a (using 100% of a CPU) to h3; the gap goes from 95 to 5 points"
        );
    }

    #[test]
    fn no_move_below_the_threshold_or_without_enough_gain() {
        let even = [host("h1", vec![instance("a", 0.5)]), host("h2", vec![instance("b", 0.1)])];
        assert!(decide(&even, &config()).is_empty(), "a 20-point gap is under the threshold");
        // One big instance: moving it would only swap the hosts' roles.
        let lopsided = [host("h1", vec![instance("big", 1.8)]), host("h2", vec![])];
        assert!(decide(&lopsided, &config()).is_empty(), "a move back would follow");
        // Many tiny ones: each narrows the gap by under the 10 points a move must gain.
        let tiny: Vec<InstanceUse> = (0..30).map(|i| instance(&format!("t{i}"), 0.06)).collect();
        let dust = [host("h1", tiny), host("h2", vec![])];
        assert!(decide(&dust, &config()).is_empty(), "6-point gains are not worth a migration");
    }

    #[test]
    fn cooling_unsettled_unusable_and_full_hosts_are_left_alone() {
        let busy = || host("h1", vec![instance("a", 1.0), instance("b", 0.9)]);
        let mut cooling = busy();
        cooling.instances.iter_mut().for_each(|i| i.cooling = true);
        assert!(decide(&[cooling, host("h2", vec![])], &config()).is_empty());
        let mut fresh = host("h2", vec![]);
        fresh.settled = false;
        assert!(decide(&[busy(), fresh], &config()).is_empty(), "h2 not measured over a window");
        let mut drained = host("h2", vec![]);
        drained.usable = false;
        assert!(decide(&[busy(), drained], &config()).is_empty());
        let mut full = host("h2", vec![]);
        full.free_mib = 128;
        assert!(decide(&[busy(), full], &config()).is_empty(), "no memory free for a or b");
        let mut grouped = busy();
        grouped.instances.iter_mut().for_each(|i| i.group = "g".into());
        let member = InstanceUse { group: "g".into(), ..instance("g2", 0.0) };
        assert!(decide(&[grouped, host("h2", vec![member])], &config()).is_empty(), "anti-affinity");
        // Disks on the shared pool go only where the pool is.
        let mut shared = busy();
        shared.instances.iter_mut().for_each(|i| i.shared = true);
        assert!(decide(&[shared.clone(), host("h2", vec![])], &config()).is_empty(), "h2 lacks the pool");
        let pooled = HostUse { shared_pool: true, ..host("h2", vec![]) };
        assert_eq!(decide(&[shared, pooled], &config()).len(), 1);
    }

    #[test]
    fn a_host_short_of_memory_gives_the_smallest_instance_that_relieves_it() {
        let using = |name: &str, mib: u64| InstanceUse { memory_used_mib: mib, ..instance(name, 0.0) };
        let hosts = [
            host("h1", vec![using("m1", 2000), using("m2", 1000), using("m3", 800)]),
            host("h2", vec![using("x", 500)]),
            host("h3", vec![using("y", 1000)]),
        ];
        let moves = decide(&hosts, &config());
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].reason, "h1 memory 93% used over 5 min, h2 12%: moved m3 (using 800 MiB) to h2");
        // Nowhere under the mark to go: it stays.
        let full = [
            host("h1", vec![using("m1", 2000), using("m2", 1000), using("m3", 800)]),
            host("h2", vec![using("x", 3700)]),
        ];
        assert!(decide(&full, &config()).is_empty());
        // Under the mark, memory moves nothing.
        let calm = [host("h1", vec![using("m1", 3000)]), host("h2", vec![])];
        assert!(decide(&calm, &config()).is_empty());
    }

    #[test]
    fn one_move_per_host_a_round_up_to_the_cap() {
        let hosts = [
            host("h1", vec![instance("a", 1.0), instance("b", 0.9)]),
            host("h2", vec![instance("c", 1.0), instance("d", 0.9)]),
            host("h3", vec![]),
            host("h4", vec![]),
        ];
        let moves = decide(&hosts, &config());
        let pairs: Vec<(&str, &str)> = moves.iter().map(|m| (m.from.as_str(), m.to.as_str())).collect();
        assert_eq!(pairs, [("h1", "h4"), ("h2", "h3")]);
        let capped = decide(&hosts, &RebalanceConfig { max_moves: 1, ..config() });
        assert_eq!(capped.len(), 1);
    }
}
