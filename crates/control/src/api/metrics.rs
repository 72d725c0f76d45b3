//! `GET /metrics`: the cloud's numbers in the Prometheus text format — instances by state, the
//! host's capacity and allocation, API requests and latency, reconciler errors.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use stratus_api::model::InstanceState;

use crate::api::{host_views, AppState};

/// Renders the metrics.
pub async fn prometheus(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut out = String::new();
    let instances = state.db.instances().unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP stratus_instances Instances by observed state.\n# TYPE stratus_instances gauge"
    );
    for s in [
        InstanceState::Pending,
        InstanceState::Starting,
        InstanceState::Running,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::Deleting,
        InstanceState::Error,
    ] {
        let n = instances.iter().filter(|i| i.status.state == s).count();
        let _ = writeln!(out, "stratus_instances{{state=\"{}\"}} {n}", s.as_str());
    }
    if let Ok(hosts) = host_views(&state) {
        type Gauge = fn(&stratus_api::model::Host) -> u64;
        let gauges: [(&str, &str, Gauge); 5] = [
            ("stratus_host_cpus", "CPU threads of the host.", |h| u64::from(h.cpus)),
            ("stratus_host_memory_bytes", "Physical memory of the host.", |h| h.memory_mib << 20),
            ("stratus_host_allocatable_memory_bytes", "Memory instances may use.", |h| {
                h.allocatable_mib << 20
            }),
            ("stratus_host_allocated_memory_bytes", "Memory given to instances.", |h| h.allocated_mib << 20),
            ("stratus_host_allocated_vcpus", "vCPUs given to instances.", |h| u64::from(h.allocated_cpus)),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for host in &hosts {
                let _ = writeln!(out, "{name}{{host=\"{}\"}} {}", host.name, value(host));
            }
        }
        let _ = writeln!(
            out,
            "# HELP stratus_host_online Whether the host's agent answers.\n# TYPE stratus_host_online gauge"
        );
        for host in &hosts {
            let _ = writeln!(
                out,
                "stratus_host_online{{host=\"{}\"}} {}",
                host.name,
                u8::from(host.state == "online")
            );
        }
    }
    let stats = &state.stats;
    let requests = stats.requests.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP stratus_api_requests_total API requests answered, by status class.\n# TYPE stratus_api_requests_total counter"
    );
    let client = stats.client_errors.load(Ordering::Relaxed);
    let server = stats.server_errors.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "stratus_api_requests_total{{class=\"ok\"}} {}",
        requests.saturating_sub(client + server)
    );
    let _ = writeln!(out, "stratus_api_requests_total{{class=\"4xx\"}} {client}");
    let _ = writeln!(out, "stratus_api_requests_total{{class=\"5xx\"}} {server}");
    let _ = writeln!(
        out,
        "# HELP stratus_api_request_seconds_sum Time spent answering API requests.\n# TYPE stratus_api_request_seconds_sum counter\nstratus_api_request_seconds_sum {:.6}",
        stats.latency_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP stratus_reconciler_errors_total Failed reconciliation steps.\n# TYPE stratus_reconciler_errors_total counter\nstratus_reconciler_errors_total {}",
        state.reconciler.errors.load(Ordering::Relaxed)
    );
    ([("content-type", "text/plain; version=0.0.4")], out)
}
