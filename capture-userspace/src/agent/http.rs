//! `/healthz`, `/readyz` and `/metrics` (Prometheus text format). Per-pod counters come from the kernel's
//! per-namespace counters at scrape time; the agent's own figures from its stats.

use std::sync::{Arc, atomic::AtomicU64};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Agent;
use crate::ebpf;

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, agent: Arc<Agent>) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(agent);
    axum::serve(listener, app).await.context("serve http")
}

async fn ready(State(agent): State<Arc<Agent>>) -> (StatusCode, &'static str) {
    if agent.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(agent): State<Arc<Agent>>) -> (StatusCode, String) {
    match tokio::task::spawn_blocking(move || render(&agent)).await {
        Ok(Ok(text)) => (StatusCode::OK, text),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

type Labels = Vec<(&'static str, String)>;

/// The metrics, read now.
fn render(agent: &Agent) -> Result<String> {
    let mut registry = Registry::with_prefix("capture");
    let pods = agent.pods();
    let events = Family::<Labels, Counter>::default();
    for ns in ebpf::registered(&agent.registry_settings().pin_dir)? {
        // Namespaces registered by someone else (`capture` as an init container) are not the agent's.
        let Some(pod) = pods.iter().find(|p| p.cookie == ns.netns) else {
            continue;
        };
        for (event, n) in ns.counters {
            events
                .get_or_create(&vec![("pod", pod.spec.id.clone()), ("event", event.to_owned())])
                .inc_by(n);
        }
    }
    registry.register(
        "pod_events",
        "Per pod: connections redirected and passed, original-destination lookups and misses, sockets accelerated",
        events,
    );
    let registered = Gauge::<i64>::default();
    registered.set(pods.len() as i64);
    registry.register("agent_pods", "Pods the agent captures", registered);
    let stats = agent.stats().clone();
    let seconds = |what: &str, d: std::time::Duration| {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(d.as_secs_f64());
        (what.to_owned(), g)
    };
    let (name, reconcile) = seconds("agent_reconcile_seconds", stats.reconcile);
    registry.register(
        name,
        "How long taking over the previous agent's pods took at start",
        reconcile,
    );
    let (name, registration) = seconds("agent_last_registration_seconds", stats.last_registration);
    registry.register(name, "How long the last pod registration took", registration);
    let errors = Counter::<u64>::default();
    errors.inc_by(stats.errors);
    registry.register("agent_errors", "Requests from pod sources that failed", errors);
    let failures = Family::<Labels, Counter>::default();
    for (pod, n) in &stats.failures {
        failures.get_or_create(&vec![("pod", pod.clone())]).inc_by(*n);
    }
    registry.register(
        "pod_registration_failures",
        "Per pod: registrations that failed (the Kubernetes source tries again with backoff)",
        failures,
    );
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}
