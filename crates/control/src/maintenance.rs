//! Host maintenance: `stratus host evacuate NAME` puts the host in maintenance (it takes no new
//! placements) and moves every instance off it, running ones live and stopped ones cold (or
//! leaves the stopped ones, when asked), [`PARALLEL`] at a time, each placed by the scheduler
//! as a launch would be; `stratus host restore NAME` ends the maintenance and brings back the
//! instances that left. Each instance's outcome (moved where, or stayed and why) is an event
//! and part of the operation's outcome. Both are safe to run twice: an evacuated host has
//! nothing left to move, a restored one nothing to bring back. Each move is an ordinary move
//! (its own operation, settled by a new leader if the control plane stops mid-way).
//!
//! The work is the leader's: a replica that stops leading takes no further instance, and the
//! next leader carries on every evacuation, restoration and consolidation it finds unfinished
//! in the store ([`resume`]), from what is left to move.

use std::sync::{Arc, Mutex};

use stratus_api::model::{
    ConsolidationPlan, Desired, Host, Instance, InstanceState, Operation, OperationState, DEFAULT_PROJECT,
};

use crate::db::{host_key, instance_key};
use crate::moves::prepare_move;
use crate::state::{placed_on, AppState};

/// Moves under way at once during an evacuation.
pub const PARALLEL: usize = 2;

/// Puts host `name` in maintenance (or takes it out), as the host record keeps it.
pub fn set_maintenance(state: &AppState, name: &str, on: bool) -> Result<(), crate::db::DbError> {
    state.db.update(&host_key(name), |host: &mut Host| {
        let changed = host.maintenance != on;
        host.maintenance = on;
        changed
    })?;
    Ok(())
}

/// Evacuates host `host` (in maintenance already) under operation `op`.
pub fn evacuate(state: &Arc<AppState>, host: &str, keep_stopped: bool, op: &str) {
    let on_host = |i: &Instance| placed_on(state, i) == host;
    run(state, op, &format!("host {host} evacuated"), on_host, |instance| {
        if keep_stopped && instance.status.state == InstanceState::Stopped {
            return Outcome::Kept;
        }
        let outcome = move_one(state, &instance.name, None);
        if let Outcome::Moved(_) = outcome {
            // Restore brings it back here.
            let _ = state.db.update(&instance_key(&instance.project, &instance.name), |i: &mut Instance| {
                i.status.home = host.to_string();
                true
            });
        }
        outcome
    });
}

/// Ends host `host`'s maintenance (done already) and brings back, under operation `op`, the
/// instances an evacuation moved off it.
pub fn restore(state: &Arc<AppState>, host: &str, op: &str) {
    run(
        state,
        op,
        &format!("host {host} restored"),
        |i| i.status.home == host,
        |instance| {
            let outcome = if placed_on(state, &instance) == host {
                Outcome::Moved(host.to_string())
            } else {
                move_one(state, &instance.name, Some(host))
            };
            if let Outcome::Moved(_) = outcome {
                let _ =
                    state.db.update(&instance_key(&instance.project, &instance.name), |i: &mut Instance| {
                        i.status.home.clear();
                        true
                    });
            }
            outcome
        },
    );
}

/// Carries out a consolidation plan under operation `op` (its hosts to empty are in
/// maintenance already): each instance moved to the host the plan chose for it, two at a
/// time. A move refused or failed leaves the instance where it was, and its host running.
pub fn consolidate(state: &Arc<AppState>, plan: &ConsolidationPlan, op: &str) {
    let by_name: std::collections::HashMap<&str, &str> =
        plan.moves.iter().map(|m| (m.instance.as_str(), m.to.as_str())).collect();
    let planned = |i: &Instance| by_name.contains_key(i.name.as_str());
    run(state, op, &consolidation(&plan.emptied), planned, |instance| {
        move_one(state, &instance.name, Some(by_name[instance.name.as_str()]))
    });
}

/// What a consolidation emptying `hosts` is called in its report.
fn consolidation(hosts: &[String]) -> String {
    if hosts.is_empty() {
        "consolidation".to_string()
    } else {
        format!("consolidation (emptying {}, which may then be switched off)", hosts.join(", "))
    }
}

/// Runs `work` on every instance (not being deleted) that `wanted` picks, [`PARALLEL`] at a
/// time, then reports the outcomes as `what` and ends operation `op` — unless this replica
/// stopped leading meanwhile, when the rest is the next leader's.
fn run(
    state: &AppState,
    op: &str,
    what: &str,
    wanted: impl Fn(&Instance) -> bool,
    work: impl Fn(Instance) -> Outcome + Sync,
) {
    let instances: Vec<Instance> = match state.db.instances() {
        Ok(all) => all.into_iter().filter(|i| i.desired != Desired::Deleted && wanted(i)).collect(),
        Err(e) => return finish(state, op, Err(format!("reading instances: {e}"))),
    };
    if let Some(outcomes) = each(state, instances, work) {
        report(state, op, what, outcomes);
    }
}

/// What became of one instance.
pub(crate) enum Outcome {
    /// It is on this host now.
    Moved(String),
    /// Stopped, and left where it was as asked.
    Kept,
    /// It stayed, for this reason.
    Stayed(String),
}

/// Moves `name` (to `to`, or where the scheduler places it) and waits for the move.
pub(crate) fn move_one(state: &AppState, name: &str, to: Option<&str>) -> Outcome {
    let prepared = match prepare_move(state, name, to) {
        Ok(prepared) => prepared,
        Err(refused) => return Outcome::Stayed(refused.message().to_string()),
    };
    let (id, to) = (prepared.op.id.clone(), prepared.to.clone());
    prepared.drive(&state.db, &state.hosts);
    match state.db.operation(&id) {
        Ok(Some(op)) if op.state == OperationState::Succeeded => Outcome::Moved(to),
        Ok(Some(op)) => Outcome::Stayed(op.error),
        _ => Outcome::Stayed("its move's outcome is unknown".into()),
    }
}

/// Runs `work` on every instance, [`PARALLEL`] at a time; the outcomes by instance name.
/// `None` if this replica stopped leading meanwhile: the rest is the next leader's.
fn each(
    state: &AppState,
    instances: Vec<Instance>,
    work: impl Fn(Instance) -> Outcome + Sync,
) -> Option<Vec<(String, Outcome)>> {
    let queue = Mutex::new(instances.into_iter());
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL {
            scope.spawn(|| loop {
                if !state.leadership.is_leader() {
                    return;
                }
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some(instance) = next else { return };
                let name = instance.name.clone();
                let outcome = work(instance);
                outcomes.lock().unwrap_or_else(|p| p.into_inner()).push((name, outcome));
            });
        }
    });
    if !state.leadership.is_leader() {
        return None;
    }
    let mut outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    Some(outcomes)
}

/// Carries on, each on a thread of its own, the host operations a leader before this one left
/// unfinished: an evacuation or restoration runs again (both are safe to run twice), and a
/// consolidation moves what is left on the hosts it was emptying, each placed by the
/// scheduler.
pub fn resume(state: &Arc<AppState>) {
    let Ok(operations) = state.db.list::<Operation>("/operations/") else { return };
    for op in operations {
        let host = op.hosts.first().cloned().unwrap_or_default();
        let kind = op.kind.as_str();
        if op.state != OperationState::Running || !matches!(kind, "evacuate" | "restore" | "consolidate") {
            continue;
        }
        let what = match kind {
            "evacuate" => format!("the evacuation of {host}"),
            "restore" => format!("the restoration of {host}"),
            _ => format!("the consolidation emptying {}", op.hosts.join(", ")),
        };
        state.db.event(
            DEFAULT_PROJECT,
            "",
            "info",
            format!("carrying on {what}, left unfinished by another leader"),
        );
        let working = Arc::clone(state);
        let _ = std::thread::Builder::new().name(format!("resume-{kind}")).spawn(move || {
            match op.kind.as_str() {
                "evacuate" => {
                    let keep_stopped = op.options.iter().any(|o| o == "keep-stopped");
                    evacuate(&working, &host, keep_stopped, &op.id)
                }
                "restore" => restore(&working, &host, &op.id),
                _ => finish_consolidation(&working, &op.hosts, &op.id),
            }
        });
    }
}

/// Moves what is left on `hosts` (in maintenance, being emptied) to where the scheduler
/// places it, and ends consolidation `op`.
fn finish_consolidation(state: &Arc<AppState>, hosts: &[String], op: &str) {
    let left = |i: &Instance| hosts.iter().any(|h| h == placed_on(state, i));
    run(state, op, &consolidation(hosts), left, |instance| move_one(state, &instance.name, None));
}

/// Writes the outcomes as one event and ends the operation: failed if any instance stayed.
fn report(state: &AppState, op: &str, what: &str, outcomes: Vec<(String, Outcome)>) {
    let mut lines = Vec::new();
    let mut stayed = Vec::new();
    for (name, outcome) in &outcomes {
        match outcome {
            Outcome::Moved(to) => lines.push(format!("{name} on {to}")),
            Outcome::Kept => lines.push(format!("{name} kept (stopped)")),
            Outcome::Stayed(why) => {
                lines.push(format!("{name} stayed: {why}"));
                stayed.push(format!("{name} stayed: {why}"));
            }
        }
    }
    let summary = if lines.is_empty() { "nothing to move".to_string() } else { lines.join("; ") };
    let level = if stayed.is_empty() { "info" } else { "error" };
    state.db.event(DEFAULT_PROJECT, "", level, format!("{what}: {summary}"));
    finish(state, op, if stayed.is_empty() { Ok(()) } else { Err(stayed.join("; ")) });
}

fn finish(state: &AppState, op: &str, result: Result<(), String>) {
    crate::moves::finish(&state.db, op, result.err());
}
