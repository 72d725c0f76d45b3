//! High availability: what happens to the instances of a host that failed.
//!
//! A host fails when its liveness lease expires ([`crate::cluster::LIVENESS_TTL`] after its
//! last heartbeat). By then its agent has stopped every VMM whose disk is on the shared pool:
//! they run only while the agent keeps renewing their fence, which it does after each
//! heartbeat the control plane took, for 70% of the lease ([`stratus_agent::fence`]). The
//! leader waits [`MARGIN`] more, then restarts each `ha` instance of the host on another host
//! that mounts the shared pool, from its disk there, and writes down that the failed host
//! still holds a copy to forget. Instances without `ha` are marked lost, with the cause; they
//! are found again when their host comes back. A host that comes back is told to forget the
//! copies of instances restarted elsewhere (their VMMs stopped themselves; their taps and
//! directories are left), so at no moment do two hosts run one instance.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stratus_api::model::{Desired, Instance, InstanceState, DEFAULT_PROJECT};

use crate::db::instance_key;
use crate::scheduler::{self, Policy};
use crate::state::{candidate, group_members, hosts_of, AppState};

/// How long after a host's lease expired the leader restarts its instances elsewhere: the
/// lease already outlasts the fence by 30%; this covers clocks read at different moments.
pub const MARGIN: Duration = Duration::from_secs(2);

/// How often the leader looks for failed hosts.
const PERIOD: Duration = Duration::from_millis(500);

/// A copy of an instance a failed host may still hold, to be forgotten when it is back.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Leftover {
    /// The instance as it was on the failed host (`status.host` names it).
    instance: Instance,
    /// Where it runs now.
    now_on: String,
}

fn leftover_key(host: &str, id: &str) -> String {
    format!("/leftovers/{host}/{id}")
}

/// Starts the HA watch: a thread that, while this replica leads, restarts the `ha`
/// instances of failed hosts elsewhere and has hosts that come back forget them.
pub fn spawn(state: Arc<AppState>) {
    let _ = std::thread::Builder::new().name("ha".into()).spawn(move || {
        let mut watch = Watch::default();
        loop {
            std::thread::sleep(PERIOD);
            if !state.leadership.is_leader() {
                // Another leader's failures are timed afresh: never sooner than a full margin
                // after this replica itself saw the host down.
                watch = Watch::default();
                continue;
            }
            watch.pass(&state);
        }
    });
}

#[derive(Default)]
struct Watch {
    /// Hosts seen offline, since when (as this leader saw it).
    down_since: HashMap<String, Instant>,
    /// (host, instance) pairs already reported, so that each failure is told once.
    told: HashSet<(String, String)>,
}

impl Watch {
    fn pass(&mut self, state: &AppState) {
        let Ok(instances) = state.db.instances() else { return };
        let Ok(hosts) = hosts_of(state, &instances) else { return };
        // Every host's notes in one read, not one read per host and pass.
        let notes = state.db.list::<Leftover>("/leftovers/").unwrap_or_default();
        let now = Instant::now();
        for host in &hosts {
            if host.state == "online" {
                if self.down_since.remove(&host.name).is_some() {
                    self.told.retain(|(h, _)| *h != host.name);
                    // Its lost instances are looked at now, not at the next periodic pass.
                    state.reconciler.wake();
                }
                let here: Vec<&Leftover> =
                    notes.iter().filter(|n| n.instance.status.host == host.name).collect();
                if !here.is_empty() {
                    forget_leftovers(state, &host.name, &here, &mut self.told);
                }
                continue;
            }
            // A host never heard from, or this machine's own, has nothing to fail over.
            if host.state != "offline" || state.hosts.is_local(&host.name) {
                continue;
            }
            let since = *self.down_since.entry(host.name.clone()).or_insert(now);
            if now.duration_since(since) < MARGIN {
                continue;
            }
            let down_for = host_silent_for(host.seen_at);
            for instance in instances.iter().filter(|i| {
                i.status.host == host.name && i.desired != Desired::Deleted && i.status.moving.is_empty()
            }) {
                if instance.spec.ha {
                    self.restart_elsewhere(state, instance, &host.name, &down_for);
                } else if instance.desired == Desired::Running {
                    self.mark_lost(state, instance, &host.name, &down_for);
                }
            }
        }
    }

    /// Restarts (or, stopped, re-homes) `ha` instance `instance` of failed host `failed` on
    /// the best other host that mounts the shared pool.
    fn restart_elsewhere(&mut self, state: &AppState, instance: &Instance, failed: &str, down_for: &str) {
        let choice = (|| -> Result<scheduler::Decision, String> {
            let instances = state.db.instances().map_err(|e| e.to_string())?;
            let hosts = hosts_of(state, &instances).map_err(|e| e.message().to_owned())?;
            let members = group_members(state, &instances, &instance.spec.anti_affinity, &instance.name);
            let candidates: Vec<_> = hosts
                .iter()
                .filter(|h| h.name != failed)
                .map(|h| candidate(h, &members, instance.spec.pool))
                .collect();
            scheduler::place(&candidates, instance.spec.memory_mib, Policy::Spread, None)
        })();
        let decision = match choice {
            Ok(decision) => decision,
            Err(why) => {
                if self.told.insert((failed.to_owned(), instance.name.clone())) {
                    state.db.event(
                        &instance.project,
                        &instance.name,
                        "error",
                        format!("host {failed} failed ({down_for}); no host can restart it yet: {why}"),
                    );
                }
                return;
            }
        };
        let to = decision.host.clone();
        // The failed host's copy is written down before the record leaves it: a leader that
        // dies between the two leaves a note to forget a copy, never a copy nobody forgets.
        let note = Leftover { instance: instance.clone(), now_on: to.clone() };
        if state.db.put(&leftover_key(failed, &instance.id), &note).is_err() {
            return;
        }
        let running = instance.desired == Desired::Running;
        let key = instance_key(&instance.project, &instance.name);
        let mut moved = false;
        let _ = state.db.update(&key, |i: &mut Instance| {
            // Only the record as this pass saw it: a user's change meanwhile wins.
            moved = i.status.host == failed && i.status.moving.is_empty() && i.desired != Desired::Deleted;
            if !moved {
                return false;
            }
            i.status.host = to.clone();
            i.status.pid = 0;
            i.status.failures = 0;
            i.status.retry_at = 0;
            i.status.state = if running { InstanceState::Pending } else { InstanceState::Stopped };
            i.status.message =
                format!("host {failed} failed; {} on {to}", if running { "restarted" } else { "now" });
            true
        });
        if !moved {
            let _ = state.db.delete(&leftover_key(failed, &instance.id));
            return;
        }
        let what = if running { "restarting it" } else { "it is kept stopped" };
        state.db.event(
            &instance.project,
            &instance.name,
            "error",
            format!(
                "host {failed} failed ({down_for}; its VMMs on the shared pool stopped themselves before its lease ran out): {what} on {to} from its disk on the shared pool; {}",
                decision.explanation
            ),
        );
        state.reconciler.wake();
    }

    /// Marks `instance` of failed host `failed` lost: nothing can start it elsewhere.
    fn mark_lost(&mut self, state: &AppState, instance: &Instance, failed: &str, down_for: &str) {
        if !self.told.insert((failed.to_owned(), instance.name.clone())) {
            return;
        }
        let why = format!(
            "host {failed} failed ({down_for}); not ha (its disk is on {failed}), so it waits for {failed} to come back"
        );
        let key = instance_key(&instance.project, &instance.name);
        let mut marked = false;
        let _ = state.db.update(&key, |i: &mut Instance| {
            marked = i.status.host == failed && i.status.state != InstanceState::Lost;
            if marked {
                i.status.state = InstanceState::Lost;
                i.status.message = why.clone();
            }
            marked
        });
        if marked {
            state.db.event(&instance.project, &instance.name, "error", format!("lost: {why}"));
        }
    }
}

/// "no heartbeat for 14 s", from the host's last heartbeat (Unix seconds).
fn host_silent_for(seen_at: u64) -> String {
    let now = stratus_api::model::now();
    if seen_at == 0 || seen_at > now {
        return "no heartbeat".into();
    }
    format!("no heartbeat for {} s", now - seen_at)
}

/// Has host `name`, online again, forget the copies of instances restarted elsewhere while
/// it was down.
fn forget_leftovers(state: &AppState, name: &str, notes: &[&Leftover], told: &mut HashSet<(String, String)>) {
    let Some(agent) = state.hosts.get(name) else { return };
    for note in notes {
        let mut copy = note.instance.clone();
        // Forgotten, not deleted: its disk on the shared pool is the instance's, elsewhere.
        copy.desired = Desired::Stopped;
        match agent.remove(&copy) {
            Ok(()) => {
                let _ = state.db.delete(&leftover_key(name, &copy.id));
                state.db.event(
                    DEFAULT_PROJECT,
                    &copy.name,
                    "info",
                    format!(
                        "host {name} is back and has forgotten its copy (it was restarted on {})",
                        note.now_on
                    ),
                );
            }
            Err(e) if told.insert((name.to_owned(), format!("forget {}", copy.id))) => {
                state.db.event(
                    DEFAULT_PROJECT,
                    &copy.name,
                    "error",
                    format!("host {name} is back but could not forget its copy yet (tried again): {e}"),
                );
            }
            Err(_) => {}
        }
    }
}
