//! `/metrics`, `/health/live` and `/health/ready` on one small HTTP server per worker (see docs/metrics.md).
//!
//! Ready means: the consumer is registered with the broker (which needs a working connection and channel)
//! and the database answers within a second.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Buckets of every `_duration_seconds` histogram: milliseconds to tens of seconds.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Workflows can take longer (delayed retries): two more buckets.
pub const WORKFLOW_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Messages per batch transaction: up to the largest `CHOREO_BATCH_SIZE` worth having.
pub const BATCH_BUCKETS: [f64; 8] = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The label every series a worker serves carries, valued with its `CHOREO_NAMESPACE`, so that deployments
/// sharing one broker and one Prometheus stay apart. Not `namespace`: Kubernetes service discovery and the
/// Prometheus operator give every target a `namespace` label, which would rename ours `exported_namespace`.
pub const NAMESPACE_LABEL: &str = "choreo_namespace";

/// The process-wide recorder and the namespace its series are labelled with.
struct Recorder {
    namespace: String,
    handle: PrometheusHandle,
}

static RECORDER: OnceLock<Result<Recorder, String>> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use with `namespace` as the value of
/// [`NAMESPACE_LABEL`] on every series.
pub fn metrics_handle(namespace: &str) -> anyhow::Result<PrometheusHandle> {
    let recorder = RECORDER.get_or_init(|| install(namespace)).as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    if recorder.namespace != namespace {
        // Only tests run several workers in one process; the label is fixed when the recorder is installed.
        warn!(
            installed = %recorder.namespace,
            namespace,
            "this process already serves metrics labelled with another namespace; this worker's carry that one"
        );
    }
    Ok(recorder.handle.clone())
}

fn install(namespace: &str) -> Result<Recorder, String> {
    let recorder = PrometheusBuilder::new()
        .add_global_label(NAMESPACE_LABEL, namespace)
        .set_buckets_for_metric(Matcher::Full("choreo_workflow_duration_seconds".into()), &WORKFLOW_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), &LATENCY_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("choreo_batch_messages".into()), &BATCH_BUCKETS))
        .map_err(|e| format!("configuring the metrics recorder: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| "a foreign metrics recorder is installed".to_owned())?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(Recorder { namespace: namespace.to_owned(), handle })
}

#[derive(Clone)]
pub struct HealthState {
    pub worker: &'static str,
    pub consuming: Arc<AtomicBool>,
    pub db: PgPool,
    pub metrics: PrometheusHandle,
}

impl HealthState {
    /// What is not ready, or nothing.
    pub async fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.consuming.load(Ordering::SeqCst) {
            missing.push("broker consumer");
        }
        let db_ok = tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(&self.db))
            .await
            .is_ok_and(|r| r.is_ok());
        if !db_ok {
            missing.push("database");
        }
        metrics::gauge!("choreo_worker_ready", "worker" => self.worker).set(if missing.is_empty() { 1.0 } else { 0.0 });
        missing
    }
}

/// Bind the health server. Binding happens before the worker starts consuming, so a taken port fails fast.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e} (set CHOREO_METRICS_ADDR)"))?;
    info!(addr = %listener.local_addr().unwrap_or(addr), "serving /metrics, /health/live and /health/ready");
    Ok(listener)
}

pub async fn serve(listener: tokio::net::TcpListener, state: HealthState, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(ready))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await {
        warn!(error = %e, "health server stopped");
    }
}

async fn metrics(State(state): State<HealthState>) -> String {
    // Refresh the readiness gauge on every scrape.
    let _ = state.not_ready().await;
    state.metrics.render()
}

/// The body of `/health/ready`: `{"ready":true}`, or `{"ready":false,"not_ready":[...]}` naming what is missing.
#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_ready: Vec<&'static str>,
}

async fn ready(State(state): State<HealthState>) -> Response {
    let missing = state.not_ready().await;
    let status = if missing.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let readiness = Readiness { ready: missing.is_empty(), not_ready: missing };
    match serde_json::to_string(&readiness) {
        // A final newline for people reading it with curl.
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode readiness: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::Readiness;

    #[test]
    fn readiness_names_what_is_missing_only_when_something_is() {
        let ready = Readiness { ready: true, not_ready: Vec::new() };
        assert_eq!(serde_json::to_string(&ready).ok().as_deref(), Some(r#"{"ready":true}"#));
        let not_ready = Readiness { ready: false, not_ready: vec!["broker consumer", "database"] };
        assert_eq!(
            serde_json::to_string(&not_ready).ok().as_deref(),
            Some(r#"{"ready":false,"not_ready":["broker consumer","database"]}"#)
        );
    }
}
