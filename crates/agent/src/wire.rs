//! Conversions between the control plane's records ([`stratus_api::model`]) and the agent protocol's
//! wire types ([`stratus_protocol`]): what an order carries of an instance, its image and
//! network, and the records the host agent rebuilds from an order.

use stratus_protocol::{HostInfo, ImageFiles, InstanceOrder, NetworkConfig, Wanted, WarmFiles};

use stratus_api::model::{
    Desired, Host, Image, Instance, InstanceSpec, InstanceState, InstanceStatus, Network, Pool,
    RestartPolicy, WarmSnapshot, DEFAULT_PROJECT,
};

/// A network as hosts build it.
pub fn network_config(network: &Network) -> NetworkConfig {
    NetworkConfig {
        name: network.name.clone(),
        bridge: network.bridge.clone(),
        cidr: network.cidr.clone(),
        gateway: network.gateway.clone(),
        nat: network.nat,
        peers: network.peers.clone(),
    }
}

/// The network record a host agent works with.
pub fn network_record(config: &NetworkConfig) -> Network {
    Network {
        name: config.name.clone(),
        project: DEFAULT_PROJECT.into(),
        bridge: config.bridge.clone(),
        cidr: config.cidr.clone(),
        gateway: config.gateway.clone(),
        nat: config.nat,
        created_at: 0,
        peers: config.peers.clone(),
    }
}

/// An image's files for an order.
pub fn image_files(image: &Image) -> ImageFiles {
    ImageFiles {
        name: image.name.clone(),
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        rootfs: image.rootfs.clone(),
        cmdline: image.cmdline.clone(),
        rootfs_bytes: image.rootfs_bytes,
        warm: image.warm.as_ref().map(|w| WarmFiles {
            state: w.state.clone(),
            memory: w.memory.clone(),
            disk: w.disk.clone(),
            cpus: w.cpus,
            memory_mib: w.memory_mib,
            disk_mib: w.disk_mib,
            vmm_version: w.vmm_version.clone(),
            boot_ms: w.boot_ms,
            created_at: w.created_at,
        }),
    }
}

/// The image record a host agent works with.
pub fn image_record(files: &ImageFiles) -> Image {
    Image {
        name: files.name.clone(),
        project: DEFAULT_PROJECT.into(),
        kernel: files.kernel.clone(),
        initrd: files.initrd.clone(),
        rootfs: files.rootfs.clone(),
        cmdline: files.cmdline.clone(),
        rootfs_bytes: files.rootfs_bytes,
        source: String::new(),
        created_at: 0,
        warm: files.warm.as_ref().map(|w| WarmSnapshot {
            state: w.state.clone(),
            memory: w.memory.clone(),
            disk: w.disk.clone(),
            cpus: w.cpus,
            memory_mib: w.memory_mib,
            disk_mib: w.disk_mib,
            vmm_version: w.vmm_version.clone(),
            boot_ms: w.boot_ms,
            created_at: w.created_at,
        }),
    }
}

/// The order that makes `instance` (of `image`, on `network`) `wanted`, at `generation`.
pub fn order(
    instance: &Instance,
    image: &Image,
    network: &Network,
    wanted: Wanted,
    generation: u64,
) -> InstanceOrder {
    InstanceOrder {
        id: instance.id.clone(),
        name: instance.name.clone(),
        generation,
        wanted,
        cpus: instance.spec.cpus,
        memory_mib: instance.spec.memory_mib,
        disk_mib: instance.spec.disk_mib,
        image: image_files(image),
        network: network_config(network),
        ip: instance.status.ip.clone(),
        mac: instance.status.mac.clone(),
        cid: instance.status.cid,
        first_start: instance.status.started_at == 0,
        shared: instance.spec.pool == Pool::Shared,
        purge: wanted == Wanted::Absent && instance.desired == Desired::Deleted,
    }
}

/// The instance record a host agent works with: what the order says, with the VMM's `pid` and
/// when it last started (0: never, which lets a start begin from a fresh clone).
pub fn instance_record(order: &InstanceOrder, pid: u32, started_at: u64) -> Instance {
    Instance {
        id: order.id.clone(),
        name: order.name.clone(),
        project: DEFAULT_PROJECT.into(),
        spec: InstanceSpec {
            image: order.image.name.clone(),
            cpus: order.cpus,
            memory_mib: order.memory_mib,
            disk_mib: order.disk_mib,
            network: order.network.name.clone(),
            restart: RestartPolicy::Never,
            anti_affinity: String::new(),
            pool: if order.shared { Pool::Shared } else { Pool::Local },
            ha: false,
        },
        desired: match order.wanted {
            Wanted::Running => Desired::Running,
            Wanted::Stopped => Desired::Stopped,
            Wanted::Absent if order.purge => Desired::Deleted,
            // Removed from this host, not deleted: it lives on elsewhere.
            Wanted::Absent => Desired::Stopped,
        },
        status: InstanceStatus {
            state: InstanceState::Pending,
            message: String::new(),
            host: String::new(),
            ip: order.ip.clone(),
            mac: order.mac.clone(),
            cid: order.cid,
            pid,
            started_at: if order.first_start { started_at } else { started_at.max(1) },
            failures: 0,
            retry_at: 0,
            boot_ms: 0,
            boot: String::new(),
            moving: String::new(),
            home: String::new(),
        },
        created_at: 0,
        operation: None,
        restart_pending: false,
    }
}

/// What the protocol reports of a host, from the host record the local agent makes.
pub fn host_info(host: &Host, address: &str) -> HostInfo {
    HostInfo {
        name: host.name.clone(),
        address: address.to_string(),
        cpus: host.cpus,
        memory_mib: host.memory_mib,
        allocatable_mib: host.allocatable_mib,
        hypervisor: host.hypervisor.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        shared_pool: host.shared_pool,
    }
}

/// A host record from what its agent reports (allocation is the control plane's to fill in).
pub fn host_record(info: &HostInfo) -> Host {
    Host {
        name: info.name.clone(),
        cpus: info.cpus,
        memory_mib: info.memory_mib,
        allocatable_mib: info.allocatable_mib,
        allocated_mib: 0,
        allocated_cpus: 0,
        instances: 0,
        hypervisor: info.hypervisor.clone(),
        seen_at: stratus_api::model::now(),
        address: info.address.clone(),
        state: String::new(),
        maintenance: false,
        cpu_percent: None,
        shared_pool: info.shared_pool,
    }
}
