//! The reconciler: compares each instance's desired state with what is observed and drives the
//! host agent until they match. It runs on a thread of its own, wakes on every API change and
//! every two seconds (to notice VMMs that died), and hands each instance's work to a worker
//! thread so that one slow boot does not hold up the rest. Failed starts are retried with an
//! exponential backoff; each step is an event in the instance's history.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use stratus_agent::{AgentError, HostAgent, Probe};
use stratus_api::model::{now, Desired, Instance, InstanceState, Operation, OperationState, RestartPolicy};

use crate::bell::Bell;
use crate::db::{instance_key, operation_key, Db};
use crate::hosts::Hosts;
use crate::ipam;

/// Starts tried in a row before the reconciler gives up on an instance.
const MAX_ATTEMPTS: u32 = 3;

/// Starts that run at once: one per host CPU (at least 2, at most 16). A start is mostly guest
/// work (a boot, or a restored guest waking and taking its identity) competing for the same
/// CPUs: fifty at once make every one of them slow (on PVM hosts, slower than the guest agent's
/// patience), while in turns each finishes at its own speed.
fn start_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16)
}

/// A counting semaphore for starts.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// A held start slot, given back when dropped.
struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

impl Slots {
    /// Waits for a slot; None if `cancelled` turns true meanwhile. `waiting` is called once if
    /// the slot is not free at once.
    fn take(&self, cancelled: &dyn Fn() -> bool, waiting: impl FnOnce()) -> Option<Slot<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mut waiting = Some(waiting);
        while *free == 0 {
            if let Some(tell) = waiting.take() {
                tell();
            }
            free = self
                .freed
                .wait_timeout(free, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if *free == 0 && cancelled() {
                return None;
            }
        }
        *free -= 1;
        Some(Slot(self))
    }
}
/// How often to look at every instance without being woken.
const PERIOD: Duration = Duration::from_secs(2);

/// The reconciliation loop and its workers.
pub struct Reconciler {
    db: Db,
    hosts: Arc<Hosts>,
    /// Instances a worker is busy with.
    busy: Mutex<HashSet<String>>,
    starts: Slots,
    wake: Bell,
    /// Reconciliation errors since start (for /metrics).
    pub errors: std::sync::atomic::AtomicU64,
}

/// Work one instance needs.
enum Step {
    Start,
    Stop,
    Remove,
    Check,
}

impl Reconciler {
    /// A reconciler over `db`, acting on each instance through its host's agent in `hosts`.
    pub fn new(db: Db, hosts: Arc<Hosts>) -> Arc<Self> {
        Arc::new(Reconciler {
            db,
            hosts,
            busy: Mutex::default(),
            starts: Slots { free: Mutex::new(start_slots()), freed: Condvar::new() },
            wake: Bell::default(),
            errors: Default::default(),
        })
    }

    /// Runs the loop on its own thread, passing only while this replica leads.
    pub fn spawn(self: &Arc<Self>, leadership: Arc<crate::leader::Leadership>) {
        let this = Arc::clone(self);
        let _ = std::thread::Builder::new().name("reconciler".into()).spawn(move || loop {
            if leadership.is_leader() {
                this.pass();
            }
            this.wake.wait(PERIOD);
        });
    }

    /// Asks for a pass now (after the API changed something).
    pub fn wake(&self) {
        self.wake.ring();
    }

    fn pass(self: &Arc<Self>) {
        let instances = match self.db.instances() {
            Ok(list) => list,
            Err(e) => {
                self.count_error();
                eprintln!("stratus: reconciler: reading instances: {e}");
                return;
            }
        };
        for instance in instances {
            if let Some(step) = next_step(&instance) {
                self.dispatch(instance, step);
            }
        }
    }

    /// Hands `step` of `instance` to a worker of its own, unless one works on it already.
    fn dispatch(self: &Arc<Self>, instance: Instance, step: Step) {
        // A host that joined through another replica is registered here within a heartbeat;
        // until then its instances wait rather than fail for want of an agent.
        let host = self.hosts.resolve(&instance.status.host);
        if !host.is_empty() && self.hosts.get(host).is_none() {
            return;
        }
        if !self.busy.lock().unwrap_or_else(|p| p.into_inner()).insert(instance.id.clone()) {
            return;
        }
        let this = Arc::clone(self);
        let id = instance.id.clone();
        let id_for_failure = instance.id.clone();
        let spawned =
            std::thread::Builder::new().name(format!("instance-{}", instance.name)).spawn(move || {
                // A check that found nothing changes nothing: waking the next pass after
                // every one made the server check all running instances back to back
                // (a core busy with fifty of them). A check that finds a VMM gone wakes it.
                let check = matches!(step, Step::Check);
                this.work(instance, step);
                this.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if !check {
                    this.wake();
                }
            });
        if let Err(e) = spawned {
            self.count_error();
            eprintln!("stratus: reconciler: cannot start a worker: {e}");
            self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&id_for_failure);
        }
    }

    /// Watches the instances' records and starts the work a change asks for (a launch, stop,
    /// or delete taken by any replica) at once, rather than at the next pass; while this
    /// replica leads. Checks of running instances stay with the periodic pass, and the pass
    /// catches whatever a broken watch missed.
    pub fn spawn_watch(self: &Arc<Self>, leadership: Arc<crate::leader::Leadership>) {
        let this = Arc::clone(self);
        let _ = std::thread::Builder::new().name("reconciler-watch".into()).spawn(move || {
            let store = Arc::clone(this.db.store());
            let mut seen = None;
            loop {
                // From the last change seen (or now, the first time and when that history is
                // gone: the pass covers the gap).
                let watch = seen
                    .map(|after| store.watch_from("/instances/", after))
                    .filter(Result::is_ok)
                    .unwrap_or_else(|| store.revision().and_then(|now| store.watch_from("/instances/", now)));
                let Ok(watch) = watch else {
                    std::thread::sleep(PERIOD);
                    continue;
                };
                // A quiet minute, or an error, and the watch is made again (a stream that
                // ended looks like a quiet one); one that ends at once is made again later.
                let made = std::time::Instant::now();
                while let Some(Ok(event)) = watch.recv_timeout(Duration::from_secs(60)) {
                    seen = Some(event.revision());
                    let stratus_store::Event::Put(entry) = event else { continue };
                    if !leadership.is_leader() {
                        continue;
                    }
                    // The record as it is now, not as the event had it: a worker may have
                    // moved it on since.
                    let Ok(Some((instance, _))) = this.db.get::<Instance>(&entry.key) else { continue };
                    match next_step(&instance) {
                        None | Some(Step::Check) => {}
                        Some(step) => this.dispatch(instance, step),
                    }
                }
                if made.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(PERIOD);
                }
            }
        });
    }

    fn count_error(&self) {
        self.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn work(&self, instance: Instance, step: Step) {
        match step {
            Step::Start => self.start(instance),
            Step::Stop => self.stop(instance),
            Step::Remove => self.remove(instance),
            Step::Check => self.check(instance),
        }
    }

    /// The agent of the host `instance` is placed on.
    fn agent(&self, instance: &Instance) -> Result<Arc<dyn HostAgent>, AgentError> {
        self.hosts.get(&instance.status.host).ok_or_else(|| {
            AgentError::Io(format!("host '{}' is not part of the cluster", instance.status.host))
        })
    }

    fn event(&self, instance: &Instance, level: &str, message: impl Into<String>) {
        self.db.event(&instance.project, &instance.name, level, message);
    }

    /// Applies `change` to the stored instance (if it still exists).
    fn update(&self, instance: &Instance, change: impl FnMut(&mut Instance) -> bool) -> Option<Instance> {
        self.db.update(&instance_key(&instance.project, &instance.name), change).ok()
    }

    fn start(&self, instance: Instance) {
        let first = instance.status.state == InstanceState::Pending;
        let host = self.hosts.resolve(&instance.status.host).to_owned();
        let mut wanted = false;
        let Some(instance) = self.update(&instance, |i| {
            // A stop or delete that came after this work was handed out wins.
            wanted = i.desired == Desired::Running && !i.restart_pending;
            if !wanted {
                return false;
            }
            i.status.state = InstanceState::Starting;
            i.status.host = host.clone();
            i.status.message.clear();
            true
        }) else {
            return;
        };
        if !wanted {
            return;
        }
        if first {
            self.event(&instance, "info", format!("scheduled on host {host}"));
        }
        let result = (|| {
            let image = self
                .db
                .image(&instance.project, &instance.spec.image)
                .map_err(|e| AgentError::Io(e.to_string()))?
                .ok_or_else(|| AgentError::Io(format!("image '{}' no longer exists", instance.spec.image)))?;
            let network = self
                .db
                .network(&instance.project, &instance.spec.network)
                .map_err(|e| AgentError::Io(e.to_string()))?
                .ok_or_else(|| {
                    AgentError::Io(format!("network '{}' no longer exists", instance.spec.network))
                })?;
            let mut progress = |message: String| self.event(&instance, "info", message);
            let key = instance_key(&instance.project, &instance.name);
            let cancelled = || !matches!(self.db.get::<Instance>(&key), Ok(Some((i, _))) if i.desired == Desired::Running && !i.restart_pending);
            let waiting = || {
                self.event(
                    &instance,
                    "info",
                    format!("waiting for a start slot ({} start at once here)", start_slots()),
                )
            };
            let agent = self.agent(&instance)?;
            let Some(_slot) = self.starts.take(&cancelled, waiting) else {
                return Err(AgentError::Cancelled);
            };
            agent.start(&instance, &image, &network, &mut progress, &cancelled)
        })();
        match result {
            Err(AgentError::Cancelled) => {
                self.event(&instance, "info", "start called off");
                if let Some(i) = self.update(&instance, |i| {
                    i.status.state = InstanceState::Stopped;
                    i.status.pid = 0;
                    // A restart asked for during the boot is served by the next start.
                    i.restart_pending = false;
                    true
                }) {
                    self.settle(&i);
                }
            }
            Ok(started) => {
                let boot_ms = started.boot.as_millis() as u64;
                let how = if started.kind == "warm" {
                    "restored from the image's warm snapshot with a new identity"
                } else {
                    "booted"
                };
                let detail =
                    if started.detail.is_empty() { String::new() } else { format!(" ({})", started.detail) };
                self.event(&instance, "info", format!("{how}; guest agent ready after {boot_ms} ms{detail}"));
                if let Some(i) = self.update(&instance, |i| {
                    i.status.state = InstanceState::Running;
                    i.status.pid = started.pid;
                    i.status.started_at = now();
                    i.status.boot_ms = boot_ms;
                    i.status.boot = started.kind.to_owned();
                    i.status.failures = 0;
                    i.status.retry_at = 0;
                    i.status.message.clear();
                    true
                }) {
                    self.settle(&i);
                }
            }
            Err(error) => {
                let message = error.to_string();
                self.count_error();
                let failures = instance.status.failures + 1;
                let retry = if failures < MAX_ATTEMPTS {
                    let delay = 2u64.pow(failures).min(60);
                    format!("; retrying in {delay} s (attempt {}/{MAX_ATTEMPTS})", failures + 1)
                } else {
                    "; giving up".to_owned()
                };
                self.event(&instance, "error", format!("start failed: {message}{retry}"));
                if let Some(i) = self.update(&instance, |i| {
                    i.status.state = InstanceState::Error;
                    i.status.pid = 0;
                    i.status.message = message.clone();
                    i.status.failures = failures;
                    i.status.retry_at = now() + 2u64.pow(failures).min(60);
                    true
                }) {
                    self.fail_operation(&i, &message);
                }
            }
        }
    }

    fn stop(&self, instance: Instance) {
        let Some(instance) = self.update(&instance, |i| {
            i.status.state = InstanceState::Stopping;
            true
        }) else {
            return;
        };
        let result = self.agent(&instance).and_then(|agent| agent.stop(&instance));
        if let Err(e) = &result {
            self.count_error();
            self.event(&instance, "error", format!("stop failed: {e}"));
        } else {
            self.event(&instance, "info", "stopped");
        }
        if let Some(i) = self.update(&instance, |i| {
            i.status.state = if result.is_ok() { InstanceState::Stopped } else { InstanceState::Error };
            i.status.pid = 0;
            i.status.message = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            // A restart's stop is done: the next pass starts it.
            i.restart_pending = false;
            true
        }) {
            self.settle(&i);
        }
    }

    fn remove(&self, instance: Instance) {
        let Some(instance) = self.update(&instance, |i| {
            i.status.state = InstanceState::Deleting;
            true
        }) else {
            return;
        };
        if let Err(e) = self.agent(&instance).and_then(|agent| agent.remove(&instance)) {
            self.count_error();
            // A delete is never given up, but its retries back off: 2 s doubling to 5 minutes
            // (a new delete request retries at once).
            let failures = instance.status.failures.saturating_add(1);
            let delay = 2u64.saturating_pow(failures).min(300);
            self.event(&instance, "error", format!("delete failed: {e}; retrying in {delay} s"));
            self.update(&instance, |i| {
                i.status.message = e.to_string();
                i.status.failures = failures;
                i.status.retry_at = now() + delay;
                true
            });
            self.fail_operation(&instance, &e.to_string());
            return;
        }
        if let Err(e) = ipam::release(&self.db, &instance.spec.network, &instance.status.ip, &instance.id) {
            self.event(&instance, "error", format!("releasing address {}: {e}", instance.status.ip));
        }
        let _ = self.db.delete(&instance_key(&instance.project, &instance.name));
        self.event(&instance, "info", "deleted");
        if let Some(op) = &instance.operation {
            self.finish(op, None);
        }
    }

    fn check(&self, instance: Instance) {
        let Ok(agent) = self.agent(&instance) else { return };
        let probe = agent.probe(&instance);
        if instance.status.state == InstanceState::Lost {
            // Its host failed: only the host, back, can say how it is.
            if !crate::cluster::host_online(&self.db, &instance.status.host) {
                return;
            }
            if let Probe::Running = probe {
                let back = self.update(&instance, |i| {
                    let lost = i.status.state == InstanceState::Lost;
                    if lost {
                        i.status.state = InstanceState::Running;
                        i.status.message.clear();
                    }
                    lost
                });
                if back.is_some() {
                    self.event(
                        &instance,
                        "info",
                        format!("host {} is back, and it runs there", instance.status.host),
                    );
                }
                return;
            }
        }
        let Probe::Down { cause, clean } = probe else { return };
        let policy = instance.spec.restart;
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Never => false,
        };
        self.event(
            &instance,
            if clean { "info" } else { "error" },
            format!("{cause}{}", if restart { "; restarting it" } else { "" }),
        );
        // The VMM of a guest that stopped on its own is still there, serving its API.
        let _ = agent.stop(&instance);
        let updated = self.update(&instance, |i| {
            i.status.pid = 0;
            i.status.message = cause.clone();
            // The user may have asked for something else meanwhile (stop, delete, restart):
            // their wish wins over this policy.
            let untouched = i.desired == instance.desired && i.restart_pending == instance.restart_pending;
            if !untouched {
                i.status.state = if clean { InstanceState::Stopped } else { InstanceState::Error };
            } else if restart {
                i.status.state = InstanceState::Pending;
            } else {
                i.status.state = if clean { InstanceState::Stopped } else { InstanceState::Error };
                i.desired = Desired::Stopped;
            }
            true
        });
        if let Some(i) = updated {
            self.settle(&i);
        }
        self.wake();
    }

    /// Finishes the instance's operation if the instance reached what it asked for.
    fn settle(&self, instance: &Instance) {
        let reached = matches!(
            (instance.desired, instance.status.state),
            (Desired::Running, InstanceState::Running) | (Desired::Stopped, InstanceState::Stopped)
        ) && !instance.restart_pending;
        if !reached {
            return;
        }
        if let Some(op) = &instance.operation {
            self.finish(op, None);
            self.update(instance, |i| {
                let mine = i.operation.as_deref() == Some(op.as_str());
                if mine {
                    i.operation = None;
                }
                mine
            });
        }
    }

    fn fail_operation(&self, instance: &Instance, message: &str) {
        if let Some(op) = &instance.operation {
            self.finish(op, Some(message));
        }
    }

    fn finish(&self, op: &str, error: Option<&str>) {
        let _ = self.db.update(&operation_key(op), |o: &mut Operation| {
            if o.state != OperationState::Running {
                return false;
            }
            o.state = if error.is_some() { OperationState::Failed } else { OperationState::Succeeded };
            o.error = error.unwrap_or_default().to_owned();
            o.finished_at = now();
            true
        });
    }
}

/// What `instance` needs next, if anything.
fn next_step(instance: &Instance) -> Option<Step> {
    use InstanceState as S;
    if !instance.status.moving.is_empty() {
        // A move drives it until the destination runs it or the source is left running.
        return None;
    }
    let state = instance.status.state;
    match instance.desired {
        Desired::Deleted if instance.status.retry_at > now() => None,
        Desired::Deleted => Some(Step::Remove),
        Desired::Running
            if instance.restart_pending && matches!(state, S::Running | S::Starting | S::Stopping) =>
        {
            Some(Step::Stop)
        }
        Desired::Running => match state {
            S::Pending | S::Stopped | S::Starting | S::Stopping | S::Deleting => Some(Step::Start),
            S::Error if instance.status.failures < MAX_ATTEMPTS && instance.status.retry_at <= now() => {
                Some(Step::Start)
            }
            S::Error => None,
            S::Running | S::Lost => Some(Step::Check),
        },
        Desired::Stopped => match state {
            S::Running | S::Starting | S::Stopping => Some(Step::Stop),
            S::Error if instance.status.pid != 0 => Some(Step::Stop),
            _ => None,
        },
    }
}
