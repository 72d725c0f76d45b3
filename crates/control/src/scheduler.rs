//! Placement: which host an instance runs on. Filters first (the host is online, not being
//! drained, has what the instance needs (the shared storage pool for a shared-pool disk) and
//! the memory, holds no other instance of its anti-affinity group), then a weigher ranks the hosts left: `spread`
//! prefers the host with the largest share of its memory free after the placement, `pack` the
//! smallest (fewer hosts busy, the others free for large instances or power-off). Every
//! decision is explained, the refused hosts with their reason, for the instance's events.

use serde::{Deserialize, Serialize};

/// How the weigher ranks hosts that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Most memory free (share of the host's) after the placement first.
    #[default]
    Spread,
    /// Least memory free after the placement first.
    Pack,
}

/// A host as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Host name.
    pub name: String,
    /// Whether its agent answers (its heartbeat lease is alive).
    pub online: bool,
    /// Whether it is being drained or kept free for maintenance.
    pub maintenance: bool,
    /// Memory instances may use, MiB.
    pub allocatable_mib: u64,
    /// Memory given to instances meant to run there, MiB.
    pub allocated_mib: u64,
    /// Instances there of the anti-affinity group of the one being placed: any keeps it out.
    pub group_members: Vec<String>,
    /// What the instance needs that the host lacks, whatever its load ("no shared storage
    /// pool"): it keeps the instance out.
    pub lacks: Option<&'static str>,
}

/// Where an instance goes, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The chosen host.
    pub host: String,
    /// "placed on h2: 3.1 GiB free, spread weight 0.72; h1 refused: 120 MiB free".
    pub explanation: String,
}

/// Hosts an explanation names one by one, ranked or refused; it counts the rest.
const NAMED: usize = 4;

/// Picks a host for an instance of `memory_mib` among `candidates` (`only`: that host or none).
/// `Err` explains why no host fits. An explanation names the first few hosts ranked lower or
/// refused, each with its reason, and counts the others by reason: a cluster of thousands of
/// hosts gets a line a person reads, at a cost that does not grow with its size.
pub fn place(
    candidates: &[Candidate],
    memory_mib: u64,
    policy: Policy,
    only: Option<&str>,
) -> Result<Decision, String> {
    let mut refused = Refusals::default();
    let mut fitting = Vec::new();
    for host in candidates {
        if only.is_some_and(|only| only != host.name) {
            continue;
        }
        let free = host.allocatable_mib.saturating_sub(host.allocated_mib);
        if !host.online {
            refused.add(host, "offline", || "offline".into());
        } else if let Some(lacks) = host.lacks {
            refused.add(host, lacks, || lacks.into());
        } else if host.maintenance {
            refused.add(host, "in maintenance", || "in maintenance".into());
        } else if !host.group_members.is_empty() {
            refused.add(host, "holding its anti-affinity group", || {
                format!("{} of the same anti-affinity group runs there", host.group_members.join(", "))
            });
        } else if free < memory_mib {
            refused.add(host, "short of memory", || format!("{} free", mib(free)));
        } else {
            let left = (free - memory_mib) as f64 / host.allocatable_mib.max(1) as f64;
            let weight = match policy {
                Policy::Spread => left,
                Policy::Pack => 1.0 - left,
            };
            fitting.push((host, free, weight));
        }
    }
    if let Some(only) = only {
        if !candidates.iter().any(|host| host.name == only) {
            return Err(format!("host '{only}' is not part of the cluster (see `stratus host list`)"));
        }
    }
    // Highest weight first; ties go to the name, so equal hosts fill in a stable order. Only
    // the hosts the explanation names are sorted.
    let order = |a: &(&Candidate, u64, f64), b: &(&Candidate, u64, f64)| {
        b.2.total_cmp(&a.2).then_with(|| a.0.name.cmp(&b.0.name))
    };
    let ranked = fitting.len();
    if ranked > NAMED {
        fitting.select_nth_unstable_by(NAMED - 1, order);
        fitting.truncate(NAMED);
    }
    fitting.sort_by(order);
    let Some((chosen, free, weight)) = fitting.first() else {
        return Err(format!("no host can take {} more: {}", mib(memory_mib), refused.describe()));
    };
    let policy = match policy {
        Policy::Spread => "spread",
        Policy::Pack => "pack",
    };
    let mut explanation =
        format!("placed on {}: {} free, {policy} weight {weight:.2}", chosen.name, mib(*free));
    for (other, free, weight) in &fitting[1..] {
        explanation.push_str(&format!(
            "; {} ranked lower: {} free, weight {weight:.2}",
            other.name,
            mib(*free)
        ));
    }
    if ranked > fitting.len() {
        explanation.push_str(&format!("; {} more ranked lower", ranked - fitting.len()));
    }
    if !refused.is_empty() {
        explanation.push_str("; ");
        explanation.push_str(&refused.describe());
    }
    Ok(Decision { host: chosen.name.clone(), explanation })
}

/// The hosts refused: the first [`NAMED`] by name with their reason, the others counted.
#[derive(Default)]
struct Refusals {
    named: Vec<String>,
    counted: std::collections::BTreeMap<&'static str, usize>,
}

impl Refusals {
    fn add(&mut self, host: &Candidate, kind: &'static str, reason: impl FnOnce() -> String) {
        if self.named.len() < NAMED {
            self.named.push(format!("{} refused: {}", host.name, reason()));
        } else {
            *self.counted.entry(kind).or_default() += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.named.is_empty()
    }

    fn describe(&self) -> String {
        let mut text = self.named.join("; ");
        if !self.counted.is_empty() {
            let total: usize = self.counted.values().sum();
            let kinds: Vec<String> = self.counted.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
            text.push_str(&format!("; {total} more refused ({})", kinds.join(", ")));
        }
        text
    }
}

/// MiB for people: "120 MiB", "3.1 GiB".
pub(crate) fn mib(value: u64) -> String {
    if value >= 1024 {
        format!("{:.1} GiB", value as f64 / 1024.0)
    } else {
        format!("{value} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, allocatable_mib: u64, allocated_mib: u64) -> Candidate {
        Candidate {
            name: name.into(),
            online: true,
            maintenance: false,
            allocatable_mib,
            allocated_mib,
            group_members: Vec::new(),
            lacks: None,
        }
    }

    #[test]
    fn spread_takes_the_emptiest_and_pack_the_fullest() {
        let hosts = [host("h1", 4096, 3000), host("h2", 4096, 0), host("h3", 8192, 4096)];
        assert_eq!(place(&hosts, 512, Policy::Spread, None).unwrap().host, "h2");
        assert_eq!(place(&hosts, 512, Policy::Pack, None).unwrap().host, "h1");
        // h1 has 1096 MiB free: not enough for 2 GiB, so pack goes to the next fullest.
        assert_eq!(place(&hosts, 2048, Policy::Pack, None).unwrap().host, "h3");
    }

    #[test]
    fn decisions_and_refusals_say_why() {
        let mut offline = host("h3", 4096, 0);
        offline.online = false;
        let hosts = [host("h1", 4096, 3976), host("h2", 4096, 1024), offline];
        let decision = place(&hosts, 256, Policy::Spread, None).unwrap();
        assert_eq!(decision.host, "h2");
        assert_eq!(
            decision.explanation,
            "placed on h2: 3.0 GiB free, spread weight 0.69; h1 refused: 120 MiB free; h3 refused: offline"
        );
        let refusal = place(&hosts, 4000, Policy::Spread, None).unwrap_err();
        assert_eq!(
            refusal,
            "no host can take 3.9 GiB more: h1 refused: 120 MiB free; h2 refused: 3.0 GiB free; h3 refused: offline"
        );
    }

    #[test]
    fn a_named_host_is_the_only_choice() {
        let hosts = [host("h1", 4096, 0), host("h2", 4096, 4000)];
        assert_eq!(place(&hosts, 64, Policy::Spread, Some("h2")).unwrap().host, "h2");
        assert!(place(&hosts, 512, Policy::Spread, Some("h2"))
            .unwrap_err()
            .contains("h2 refused: 96 MiB free"));
        assert!(place(&hosts, 64, Policy::Spread, Some("h9"))
            .unwrap_err()
            .contains("not part of the cluster"));
    }

    #[test]
    fn anti_affinity_keeps_group_members_apart_whatever_the_weights() {
        let mut h2 = host("h2", 8192, 0);
        h2.group_members = vec!["web1".into()];
        let hosts = [host("h1", 4096, 2048), h2];
        let decision = place(&hosts, 256, Policy::Spread, None).unwrap();
        assert_eq!(decision.host, "h1", "{}", decision.explanation);
        assert!(decision
            .explanation
            .ends_with("h2 refused: web1 of the same anti-affinity group runs there"));
        let refusal = place(&hosts, 256, Policy::Spread, Some("h2")).unwrap_err();
        assert!(refusal.contains("web1 of the same anti-affinity group"), "{refusal}");
    }

    #[test]
    fn a_large_cluster_is_explained_in_a_few_names_and_counts() {
        let mut hosts: Vec<Candidate> = (0..1000).map(|i| host(&format!("h{i:04}"), 4096, 1024)).collect();
        for h in &mut hosts[..10] {
            h.online = false;
        }
        for h in &mut hosts[10..300] {
            h.allocated_mib = 4000;
        }
        hosts[500].allocated_mib = 0;
        let decision = place(&hosts, 512, Policy::Spread, None).unwrap();
        assert_eq!(decision.host, "h0500");
        assert!(
            decision.explanation.starts_with(
                "placed on h0500: 4.0 GiB free, spread weight 0.88; h0300 ranked lower: 3.0 GiB free"
            ),
            "{}",
            decision.explanation
        );
        assert!(
            decision.explanation.contains("; 696 more ranked lower; h0000 refused: offline;"),
            "{}",
            decision.explanation
        );
        assert!(
            decision.explanation.ends_with("; 296 more refused (6 offline, 290 short of memory)"),
            "{}",
            decision.explanation
        );
        assert!(decision.explanation.len() < 600, "{}", decision.explanation);
    }

    #[test]
    fn maintenance_hosts_take_nothing() {
        let mut drained = host("h1", 4096, 0);
        drained.maintenance = true;
        let refusal = place(&[drained], 64, Policy::Spread, None).unwrap_err();
        assert!(refusal.contains("h1 refused: in maintenance"), "{refusal}");
    }
}
