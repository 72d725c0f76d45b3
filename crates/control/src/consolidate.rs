//! Consolidation: packing the cluster's instances onto as few hosts as they fit, so that the
//! hosts left empty can be switched off. [`plan`] is the planner — a pure function of the
//! hosts' loads, run as is by the API, the tests and `bench/scheduler` — and the plan says
//! every move it would make and why, and why each host it keeps could not be emptied.
//!
//! The least loaded hosts are emptied first (their instances are the cheapest to move), each
//! only if all of its instances fit elsewhere: memory first (a host never takes more than its
//! allocatable memory), then CPU headroom (a host's vCPUs stay within [`VCPUS_PER_CPU`] per
//! CPU), and anti-affinity (no host ends with two members of one group). Among the hosts an
//! instance fits on, the fullest takes it, so the others stay free for the next. A host that
//! takes instances is kept: nothing moves twice. At least one host is always kept.

use std::collections::{BTreeMap, BTreeSet};

use stratus_api::model::{ConsolidationPlan as Plan, KeptHost, PlannedMove};

use crate::scheduler::mib;

/// The vCPUs a host may carry per CPU once consolidated: a guest's vCPU is mostly idle, but a
/// host packed beyond this leaves its guests no CPU to burst into.
pub const VCPUS_PER_CPU: u32 = 4;

/// A host as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLoad {
    /// Host name.
    pub name: String,
    /// Online and not in maintenance: it may give and take instances.
    pub usable: bool,
    /// Its CPUs.
    pub cpus: u32,
    /// Memory instances may use, MiB.
    pub allocatable_mib: u64,
    /// It mounts the shared storage pool (it may take shared-pool instances).
    pub shared_pool: bool,
    /// The instances placed there.
    pub instances: Vec<Resident>,
}

/// An instance on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resident {
    /// Instance name.
    pub name: String,
    /// Memory it holds, MiB (0 for a stopped instance: it holds none until it starts).
    pub memory_mib: u64,
    /// vCPUs it holds (0 when stopped).
    pub cpus: u32,
    /// Its anti-affinity group ("" for none).
    pub group: String,
    /// Its disk is on the shared pool: only hosts that mount it take it.
    pub shared: bool,
}

/// A host's load while planning.
struct Load {
    name: String,
    allocatable_mib: u64,
    allocated_mib: u64,
    cpus: u32,
    vcpus: u32,
    groups: BTreeMap<String, u32>,
    shared_pool: bool,
    /// It takes instances in this plan: it is not emptied.
    receives: Vec<String>,
    /// Why it could not be emptied, if that was tried.
    stays: Option<String>,
}

impl Load {
    fn free(&self) -> u64 {
        self.allocatable_mib.saturating_sub(self.allocated_mib)
    }

    /// Whether `r` fits here by storage, CPU headroom and anti-affinity (memory is the
    /// index's).
    fn admits(&self, r: &Resident) -> bool {
        (!r.shared || self.shared_pool)
            && self.vcpus + r.cpus <= self.cpus.max(1) * VCPUS_PER_CPU
            && (r.group.is_empty() || !self.groups.contains_key(&r.group))
    }

    fn add(&mut self, r: &Resident) {
        self.allocated_mib += r.memory_mib;
        self.vcpus += r.cpus;
        if !r.group.is_empty() {
            *self.groups.entry(r.group.clone()).or_default() += 1;
        }
    }

    fn remove(&mut self, r: &Resident) {
        self.allocated_mib -= r.memory_mib;
        self.vcpus -= r.cpus;
        if let Some(n) = self.groups.get_mut(&r.group) {
            *n -= 1;
            if *n == 0 {
                self.groups.remove(&r.group);
            }
        }
    }
}

/// The hosts that may take instances, by free memory: the fullest host an instance fits on
/// is the first at or above its size that admits it.
struct Planner {
    loads: Vec<Load>,
    by_free: BTreeSet<(u64, usize)>,
}

impl Planner {
    fn place(&mut self, r: &Resident) -> Option<usize> {
        let to =
            self.by_free.range((r.memory_mib, 0)..).map(|&(_, i)| i).find(|&i| self.loads[i].admits(r))?;
        self.change(to, |load| load.add(r));
        Some(to)
    }

    fn unplace(&mut self, to: usize, r: &Resident) {
        self.change(to, |load| load.remove(r));
    }

    fn change(&mut self, i: usize, f: impl FnOnce(&mut Load)) {
        self.by_free.remove(&(self.loads[i].free(), i));
        f(&mut self.loads[i]);
        self.by_free.insert((self.loads[i].free(), i));
    }
}

/// Plans the consolidation of `hosts`.
pub fn plan(hosts: &[HostLoad]) -> Plan {
    let mut plan = Plan::default();
    let mut usable: Vec<&HostLoad> = Vec::new();
    for host in hosts {
        if host.usable {
            usable.push(host);
        } else {
            plan.skipped.push(format!("{}: offline or in maintenance", host.name));
        }
    }
    usable.sort_by(|a, b| a.name.cmp(&b.name));
    let loads = usable
        .iter()
        .map(|host| {
            let mut load = Load {
                name: host.name.clone(),
                allocatable_mib: host.allocatable_mib,
                allocated_mib: 0,
                cpus: host.cpus,
                vcpus: 0,
                groups: BTreeMap::new(),
                shared_pool: host.shared_pool,
                receives: Vec::new(),
                stays: None,
            };
            for r in &host.instances {
                load.add(r);
            }
            load
        })
        .collect::<Vec<_>>();
    let by_free = loads.iter().enumerate().map(|(i, l)| (l.free(), i)).collect();
    let mut planner = Planner { loads, by_free };
    // The least loaded first: their instances are the fewest bytes to move.
    let mut order: Vec<usize> = (0..usable.len()).collect();
    order.sort_by_key(|&i| (planner.loads[i].allocated_mib, usable[i].instances.len(), i));
    let mut emptied = vec![false; usable.len()];
    let mut kept = usable.len();
    for source in order {
        if kept <= 1 {
            break;
        }
        if !planner.loads[source].receives.is_empty() {
            continue;
        }
        // It gives; it does not take.
        planner.by_free.remove(&(planner.loads[source].free(), source));
        let mut residents: Vec<&Resident> = usable[source].instances.iter().collect();
        residents.sort_by(|a, b| {
            b.memory_mib.cmp(&a.memory_mib).then(b.cpus.cmp(&a.cpus)).then(a.name.cmp(&b.name))
        });
        let mut placed: Vec<(&Resident, usize, u64)> = Vec::new();
        let mut misfit = None;
        for r in residents {
            match planner.place(r) {
                Some(to) => placed.push((r, to, planner.loads[to].free())),
                None => {
                    misfit = Some(r);
                    break;
                }
            }
        }
        if let Some(r) = misfit {
            for (r, to, _) in placed.into_iter().rev() {
                planner.unplace(to, r);
            }
            planner.loads[source].stays =
                Some(format!("{} ({}, {} vCPUs) fits on no other host", r.name, mib(r.memory_mib), r.cpus));
            planner.by_free.insert((planner.loads[source].free(), source));
            continue;
        }
        for (r, to, free_after) in placed {
            let target = &mut planner.loads[to];
            target.receives.push(r.name.clone());
            plan.moves.push(PlannedMove {
                instance: r.name.clone(),
                from: usable[source].name.clone(),
                to: target.name.clone(),
                reason: format!(
                    "{} to {}, the fullest host it fits on ({} free after)",
                    mib(r.memory_mib),
                    target.name,
                    mib(free_after)
                ),
            });
        }
        emptied[source] = true;
        kept -= 1;
        plan.emptied.push(usable[source].name.clone());
    }
    for (i, load) in planner.loads.into_iter().enumerate() {
        if emptied[i] {
            continue;
        }
        let why = if !load.receives.is_empty() {
            format!("takes {}", load.receives.join(", "))
        } else if let Some(stays) = load.stays {
            stays
        } else {
            "the last host left".to_string()
        };
        plan.kept.push(KeptHost {
            name: load.name,
            allocated_mib: load.allocated_mib,
            allocatable_mib: load.allocatable_mib,
            vcpus: load.vcpus,
            why,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, allocatable_mib: u64, instances: &[(&str, u64)]) -> HostLoad {
        HostLoad {
            name: name.into(),
            usable: true,
            cpus: 2,
            allocatable_mib,
            shared_pool: false,
            instances: instances
                .iter()
                .map(|(n, m)| Resident {
                    name: n.to_string(),
                    memory_mib: *m,
                    cpus: 1,
                    group: String::new(),
                    shared: false,
                })
                .collect(),
        }
    }

    #[test]
    fn a_lightly_used_cluster_packs_onto_one_host() {
        let hosts = [
            host("h1", 4096, &[("a", 512)]),
            host("h2", 4096, &[("b", 256), ("c", 256)]),
            host("h3", 4096, &[("d", 1024)]),
        ];
        let plan = plan(&hosts);
        // h1 and h2 hold as much memory; h1 has the fewer instances to move.
        assert_eq!(plan.emptied, ["h1", "h2"]);
        assert_eq!(plan.kept.len(), 1);
        assert_eq!(plan.kept[0].name, "h3");
        assert_eq!(plan.kept[0].allocated_mib, 2048);
        assert_eq!(plan.kept[0].why, "takes a, b, c");
        let moved: Vec<_> = plan.moves.iter().map(|m| (m.instance.as_str(), m.to.as_str())).collect();
        // a goes to the fullest host it fits on, h3 rather than h2; then h2 empties onto h3.
        assert_eq!(moved, [("a", "h3"), ("b", "h3"), ("c", "h3")]);
        assert!(plan.moves[0].reason.contains("the fullest host it fits on"), "{}", plan.moves[0].reason);
    }

    #[test]
    fn a_host_whose_instances_do_not_fit_elsewhere_is_kept_and_says_why() {
        let hosts = [host("h1", 4096, &[("big", 3072)]), host("h2", 4096, &[("small", 2048)])];
        let plan = plan(&hosts);
        assert!(plan.emptied.is_empty(), "{plan:?}");
        assert!(plan.moves.is_empty());
        let why: Vec<_> = plan.kept.iter().map(|k| format!("{}: {}", k.name, k.why)).collect();
        assert_eq!(
            why,
            [
                "h1: big (3.0 GiB, 1 vCPUs) fits on no other host",
                "h2: small (2.0 GiB, 1 vCPUs) fits on no other host"
            ]
        );
    }

    #[test]
    fn cpu_headroom_and_anti_affinity_hold() {
        // h2 has room in memory for everything, but only 2 CPUs: 8 vCPUs at most.
        let mut busy = host("h1", 8192, &[]);
        busy.instances = (0..6)
            .map(|i| Resident {
                name: format!("w{i}"),
                memory_mib: 128,
                cpus: 1,
                group: String::new(),
                shared: false,
            })
            .collect();
        let plan_cpu = plan(&[busy.clone(), host("h2", 8192, &[("x", 2048), ("y", 2048)])]);
        // h1 (768 MiB) is the lighter, but 6 + 2 vCPUs fit h2 exactly: emptied.
        assert_eq!(plan_cpu.emptied, ["h1"]);
        busy.instances.push(Resident {
            name: "w6".into(),
            memory_mib: 128,
            cpus: 1,
            group: String::new(),
            shared: false,
        });
        let plan_cpu = plan(&[busy, host("h2", 8192, &[("x", 2048), ("y", 2048)])]);
        assert!(plan_cpu.emptied.is_empty(), "9 vCPUs on 2 CPUs: {plan_cpu:?}");

        let mut h1 = host("h1", 4096, &[("web1", 256)]);
        h1.instances[0].group = "web".into();
        let mut h2 = host("h2", 4096, &[("web2", 512)]);
        h2.instances[0].group = "web".into();
        let plan = plan(&[h1, h2, host("h3", 4096, &[("db", 1024)])]);
        assert_eq!(plan.emptied, ["h1"], "{plan:?}");
        assert_eq!(plan.moves[0].to, "h3", "web1 may not join web2 on h2");
        let h2 = plan.kept.iter().find(|k| k.name == "h2").unwrap();
        assert!(h2.why.contains("web2"), "{}", h2.why);
    }

    #[test]
    fn shared_pool_disks_go_only_where_the_pool_is() {
        let mut h1 = host("h1", 4096, &[("db", 256)]);
        h1.instances[0].shared = true;
        // The lightest host, but only h2 (the fuller) has the pool: db goes there.
        let plan1 = plan(&[
            h1.clone(),
            HostLoad { shared_pool: true, ..host("h2", 4096, &[("x", 2048)]) },
            host("h3", 4096, &[("y", 1024)]),
        ]);
        assert_eq!(
            plan1.moves.iter().find(|m| m.instance == "db").map(|m| m.to.as_str()),
            Some("h2"),
            "{plan1:?}"
        );
        let plan2 = plan(&[h1, host("h2", 4096, &[("x", 2048)])]);
        assert!(!plan2.emptied.contains(&"h1".to_string()), "db has nowhere to go: {plan2:?}");
    }

    #[test]
    fn unusable_hosts_neither_give_nor_take_and_one_host_always_stays() {
        let mut down = host("h3", 65536, &[("z", 64)]);
        down.usable = false;
        let plan = plan(&[host("h1", 4096, &[]), host("h2", 4096, &[]), down]);
        assert_eq!(plan.skipped, ["h3: offline or in maintenance"]);
        assert_eq!(plan.emptied, ["h1"]);
        assert_eq!(plan.kept.len(), 1);
        assert_eq!(plan.kept[0].why, "the last host left");
    }
}
