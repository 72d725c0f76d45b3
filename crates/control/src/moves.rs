//! `stratus move`: a running instance moved live to another host, driven by the control plane
//! through the two hosts' agents. The destination readies a VMM waiting for the migration
//! (with an empty disk of the instance's size and its tap); the source's VMM sends memory,
//! disk and state in one session; the instance's host changes only once the destination runs
//! the guest. Its address, MAC and disk contents stay: the network is one segment across the
//! hosts, and the arriving VMM announces the MAC so switches learn its new port at once.
//!
//! Until the guest pauses for the move, any failure leaves it running on the source; the
//! destination's half-made VMM is removed and the operation says why. While a move runs the
//! instance is marked `moving` and the reconciler leaves it alone; a control plane that
//! stopped mid-move settles it at its next start ([`settle_interrupted`]).

use std::time::Duration;

use stratus_agent::HostAgent;
use stratus_api::model::{
    now, Desired, Instance, InstanceState, Operation, OperationState, Pool, DEFAULT_PROJECT,
};

use crate::db::{instance_key, operation_key, Db};
use crate::hosts::Hosts;
use crate::scheduler::{self, Candidate, Policy};
use crate::state::{
    candidate, find_instance, group_members, hosts_of, placed_on, ApiError, ApiResult, AppState,
};

/// How long the destination may take to run the guest once the source says it was sent.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(60);

/// Carries out the move of `instance` to host `to` and finishes operation `op`.
pub fn run(db: &Db, hosts: &Hosts, instance: Instance, to: &str, op: &str) {
    let result = attempt(db, hosts, &instance, to);
    let event = |level: &str, message: String| db.event(&instance.project, &instance.name, level, message);
    let key = instance_key(&instance.project, &instance.name);
    let error = match result {
        Ok((pid, moved)) => {
            let _ = db.update(&key, |i: &mut Instance| {
                i.status.host = to.to_string();
                i.status.pid = pid;
                i.status.moving.clear();
                i.status.state = InstanceState::Running;
                true
            });
            event(
                "info",
                format!(
                    "moved to {to} live in {:.0} ms (guest paused {:.1} ms, {} MiB sent); same address and disk",
                    moved.total_ms,
                    moved.downtime_ms,
                    moved.bytes >> 20
                ),
            );
            None
        }
        Err(Failure::SourceRuns(why)) => {
            let _ = db.update(&key, |i: &mut Instance| {
                i.status.moving.clear();
                true
            });
            event("error", format!("move to {to} failed: {why}; still running on {}", instance.status.host));
            Some(why)
        }
        Err(Failure::Lost(why)) => {
            let _ = db.update(&key, |i: &mut Instance| {
                i.status.moving.clear();
                i.status.host = to.to_string();
                i.status.state = InstanceState::Error;
                i.status.pid = 0;
                i.status.message = why.clone();
                true
            });
            event(
                "error",
                format!("move to {to} failed after the guest left {}: {why}", instance.status.host),
            );
            Some(why)
        }
    };
    finish(db, op, error);
}

/// Ends operation `op`: succeeded, or failed with `error`.
pub(crate) fn finish(db: &Db, op: &str, error: Option<String>) {
    let _ = db.update(&operation_key(op), |o: &mut Operation| {
        o.state = if error.is_some() { OperationState::Failed } else { OperationState::Succeeded };
        o.error = error.clone().unwrap_or_default();
        o.finished_at = now();
        true
    });
}

/// Moves stopped `instance` to host `to` (operation `op`): the destination holds it stopped,
/// the disk's data ranges are copied through the control plane, then the record names the
/// destination and the source's copy goes. A failure before the record changes removes the
/// destination's copy; the instance stays where it was.
pub fn run_cold(db: &Db, hosts: &Hosts, instance: Instance, to: &str, op: &str) {
    let event = |level: &str, message: String| db.event(&instance.project, &instance.name, level, message);
    let key = instance_key(&instance.project, &instance.name);
    let from = instance.status.host.clone();
    let mut arriving = instance.clone();
    arriving.status.host = to.to_string();
    arriving.status.pid = 0;
    let started = std::time::Instant::now();
    let copied = (|| -> Result<(u64, u64), String> {
        let agent =
            |name: &str| hosts.get(name).ok_or_else(|| format!("host '{name}' is not part of the cluster"));
        let (source, destination) = (agent(&from)?, agent(to)?);
        if instance.spec.pool == Pool::Shared {
            // Nothing to copy: the destination takes the disk where it is.
            destination.stop(&arriving).map_err(|e| format!("{to} could not hold it: {e}"))?;
            return Ok((0, 0));
        }
        let layout = source.disk_layout(&instance).map_err(|e| format!("{from}: {e}"))?;
        let data: u64 = layout.extents.iter().map(|(_, length)| length).sum();
        event(
            "info",
            format!("copying the disk to {to}: {} MiB of data in {} MiB", data >> 20, layout.size >> 20),
        );
        destination.stop(&arriving).map_err(|e| format!("{to} could not hold it: {e}"))?;
        let mut sent = 0;
        let result = (|| {
            for &(start, length) in &layout.extents {
                let mut at = start;
                while at < start + length {
                    let n = (start + length - at).min(stratus_protocol::DISK_CHUNK);
                    let chunk = source.read_disk(&instance, at, n).map_err(|e| format!("{from}: {e}"))?;
                    destination
                        .write_disk(&arriving, layout.size, at, &chunk)
                        .map_err(|e| format!("{to}: {e}"))?;
                    at += n;
                    sent += n;
                }
            }
            // A disk with no data at all is still made, at its size.
            if layout.extents.is_empty() {
                destination.write_disk(&arriving, layout.size, 0, &[]).map_err(|e| format!("{to}: {e}"))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = destination.remove(&arriving);
        }
        result.map(|()| (sent, layout.size))
    })();
    let error = match copied {
        Ok((sent, size)) => {
            let _ = db.update(&key, |i: &mut Instance| {
                i.status.host = to.to_string();
                i.status.moving.clear();
                true
            });
            if let Some(source) = hosts.get(&from) {
                if let Err(e) = source.remove(&instance) {
                    event("error", format!("removing the copy left on {from}: {e}"));
                }
            }
            let disk = if instance.spec.pool == Pool::Shared {
                "its disk stays on the shared pool".to_string()
            } else {
                format!("{} MiB of its {} MiB disk copied", sent >> 20, size >> 20)
            };
            event(
                "info",
                format!("moved to {to} stopped in {:.1} s ({disk})", started.elapsed().as_secs_f64()),
            );
            None
        }
        Err(why) => {
            let _ = db.update(&key, |i: &mut Instance| {
                i.status.moving.clear();
                true
            });
            event("error", format!("move to {to} failed: {why}; still on {from}"));
            Some(why)
        }
    };
    finish(db, op, error);
}

/// How a move failed.
enum Failure {
    /// Before the guest left: it runs on at the source.
    SourceRuns(String),
    /// After the source sent it: the destination did not run it.
    Lost(String),
}

fn attempt(
    db: &Db,
    hosts: &Hosts,
    instance: &Instance,
    to: &str,
) -> Result<(u32, stratus_agent::Moved), Failure> {
    let agent = |name: &str| -> Result<std::sync::Arc<dyn HostAgent>, Failure> {
        hosts
            .get(name)
            .ok_or_else(|| Failure::SourceRuns(format!("host '{name}' is not part of the cluster")))
    };
    let (source, destination) = (agent(&instance.status.host)?, agent(to)?);
    let image = db
        .image(&instance.project, &instance.spec.image)
        .map_err(|e| Failure::SourceRuns(e.to_string()))?
        .ok_or_else(|| Failure::SourceRuns(format!("image '{}' no longer exists", instance.spec.image)))?;
    let network = crate::netsync::networks_with_peers(db)
        .map_err(|e| Failure::SourceRuns(e.to_string()))?
        .into_iter()
        .find(|n| n.name == instance.spec.network)
        .ok_or_else(|| {
            Failure::SourceRuns(format!("network '{}' no longer exists", instance.spec.network))
        })?;
    let mut arriving = instance.clone();
    arriving.status.host = to.to_string();
    arriving.status.pid = 0;
    let incoming = destination
        .receive(&arriving, &image, &network)
        .map_err(|e| Failure::SourceRuns(format!("{to} could not get ready: {e}")))?;
    db.event(
        &instance.project,
        &instance.name,
        "info",
        format!("{to} waits for the migration on {}", incoming.to),
    );
    arriving.status.pid = incoming.pid;
    let moved = match source.send(instance, &incoming.to, &incoming.secret) {
        Ok(moved) => moved,
        Err(e) => {
            // The answer may be what was lost (a dropped connection to the source's agent)
            // while the migration went through: a guest the destination runs is not removed.
            if let Ok(pid) = destination.arrived(&arriving, Duration::from_secs(2)) {
                let note = format!("the source's answer was lost ({e}), but {to} runs the guest");
                db.event(&instance.project, &instance.name, "info", note);
                return Ok((pid, stratus_agent::Moved { total_ms: 0.0, downtime_ms: 0.0, bytes: 0 }));
            }
            // Its half-made copy goes; the guest never left.
            let _ = destination.remove(&arriving);
            return Err(Failure::SourceRuns(e.to_string()));
        }
    };
    let pid = destination.arrived(&arriving, ARRIVAL_LIMIT).map_err(|e| Failure::Lost(e.to_string()))?;
    Ok((pid, moved))
}

/// Settles moves a stopped control plane left marked: the instance is where a VMM runs it
/// (the destination if the guest arrived there, else the source).
pub fn settle_interrupted(db: &Db, hosts: &Hosts) {
    let Ok(instances) = db.instances() else { return };
    for instance in instances.into_iter().filter(|i| !i.status.moving.is_empty()) {
        let to = instance.status.moving.clone();
        let mut there = instance.clone();
        there.status.host = to.clone();
        there.status.pid = 0;
        let destination = hosts.get(&to);
        let arrived = destination.as_ref().is_some_and(|agent| agent.arrived(&there, Duration::ZERO).is_ok());
        if !arrived {
            // A VMM left waiting there for a migration that will not come.
            if let Some(agent) = &destination {
                let _ = agent.remove(&there);
            }
        }
        let _ = db.update(&instance_key(&instance.project, &instance.name), |i: &mut Instance| {
            if arrived {
                i.status.host = to.clone();
            }
            i.status.moving.clear();
            true
        });
        let place = if arrived { to } else { instance.status.host.clone() };
        db.event(
            DEFAULT_PROJECT,
            &instance.name,
            "info",
            format!("a move cut short by a restart: the instance is on {place}"),
        );
    }
}

/// A move checked and recorded: its operation, the instance marked `moving`, its destination
/// and whether it goes live (running) or cold (stopped).
pub struct PreparedMove {
    pub op: Operation,
    pub instance: Instance,
    pub to: String,
    pub live: bool,
}

impl PreparedMove {
    /// Carries the move out (on the caller's thread), ending its operation.
    pub fn drive(self, db: &Db, hosts: &Hosts) {
        match self.live {
            true => crate::moves::run(db, hosts, self.instance, &self.to, &self.op.id),
            false => crate::moves::run_cold(db, hosts, self.instance, &self.to, &self.op.id),
        }
    }
}

/// Checks that `name` can move (running: live; stopped: cold) to `to`, or where the scheduler
/// places it, and records the move (its operation, the instance marked `moving`, an event
/// with the placement's reasons), under the admission lock.
pub fn prepare_move(state: &AppState, name: &str, to: Option<&str>) -> ApiResult<PreparedMove> {
    let _admitted = state.admission.lock().unwrap_or_else(|p| p.into_inner());
    let instance = find_instance(state, name)?;
    let live = instance.status.state == InstanceState::Running && instance.desired == Desired::Running;
    let cold = instance.status.state == InstanceState::Stopped && instance.desired == Desired::Stopped;
    if !live && !cold {
        return Err(ApiError::conflict(format!(
            "instance '{name}' is {}: a running instance moves live, a stopped one cold",
            instance.status.state.as_str()
        )));
    }
    if !instance.status.moving.is_empty() {
        return Err(ApiError::conflict(format!(
            "instance '{name}' is moving to {} already",
            instance.status.moving
        )));
    }
    let source = placed_on(state, &instance).to_owned();
    if to == Some(source.as_str()) {
        return Err(ApiError::conflict(format!("instance '{name}' runs on {source} already")));
    }
    // The destination must have room, as for a launch; the source is no choice.
    let instances = state.db.instances()?;
    let hosts = hosts_of(state, &instances)?;
    let members = group_members(state, &instances, &instance.spec.anti_affinity, name);
    let candidates: Vec<Candidate> = hosts
        .iter()
        .filter(|h| h.name != source)
        .map(|h| candidate(h, &members, instance.spec.pool))
        .collect();
    if candidates.is_empty() {
        return Err(ApiError::conflict("there is no other host to move to (see `stratus host list`)"));
    }
    let decision = scheduler::place(&candidates, instance.spec.memory_mib, Policy::Spread, to)
        .map_err(ApiError::conflict)?;
    let op = Operation::started("move", name);
    state.db.put(&operation_key(&op.id), &op)?;
    let to = decision.host.clone();
    let instance = state.db.update(&instance_key(DEFAULT_PROJECT, name), |i: &mut Instance| {
        i.status.moving = to.clone();
        true
    })?;
    let how = if live { "live" } else { "stopped" };
    state.db.event(
        DEFAULT_PROJECT,
        name,
        "info",
        format!("moving {how} from {source} to {to}: {}", decision.explanation),
    );
    Ok(PreparedMove { op, instance, to, live })
}
