//! The hosts the control plane drives: the one it runs on (for `serve`), driven in-process,
//! and the ones that joined, driven through the agent protocol. Each instance's record names
//! its host; the reconciler asks this registry for that host's agent.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use stratus_agent::HostAgent;

/// Host name -> the agent that drives it.
#[derive(Default)]
pub struct Hosts {
    local: Option<String>,
    agents: RwLock<BTreeMap<String, Arc<dyn HostAgent>>>,
}

impl Hosts {
    /// A registry with no host yet (a control plane without a host of its own).
    pub fn new() -> Hosts {
        Hosts::default()
    }

    /// A registry holding this machine's own host, `name`.
    pub fn with_local(name: &str, agent: Arc<dyn HostAgent>) -> Hosts {
        let hosts = Hosts { local: Some(name.to_string()), agents: RwLock::default() };
        hosts.insert(name, agent);
        hosts
    }

    /// Adds (or replaces) host `name`.
    pub fn insert(&self, name: &str, agent: Arc<dyn HostAgent>) {
        self.agents.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), agent);
    }

    /// Forgets host `name`.
    pub fn remove(&self, name: &str) {
        self.agents.write().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// The host an instance record names: "" (records from before hosts were named) is this
    /// machine's own host.
    pub fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        match name {
            "" => self.local.as_deref().unwrap_or(""),
            name => name,
        }
    }

    /// The agent of host `name` (see [`Hosts::resolve`]).
    pub fn get(&self, name: &str) -> Option<Arc<dyn HostAgent>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner()).get(self.resolve(name)).cloned()
    }

    /// The name of the host this control plane runs on, if it is one.
    pub fn local_name(&self) -> Option<&str> {
        self.local.as_deref()
    }

    /// The agent of the host this control plane runs on, if it is one.
    pub fn local(&self) -> Option<Arc<dyn HostAgent>> {
        self.get(self.local.as_deref()?)
    }

    /// Whether `name` is this machine's own host.
    pub fn is_local(&self, name: &str) -> bool {
        self.local.is_some() && self.local.as_deref() == Some(self.resolve(name))
    }

    /// Every host with its agent, by name.
    pub fn all(&self) -> Vec<(String, Arc<dyn HostAgent>)> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, a)| (n.clone(), Arc::clone(a)))
            .collect()
    }
}
