//! Observability on the real services: one workflow is one trace, spans reach an OTLP endpoint when one is
//! configured, readiness follows the broker, and /metrics carries the catalogue of docs/metrics.md.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use choreo_testkit::{Infra, TcpProxy, wait_for};
use common::{Cluster, order};
use tokio::process::Command;

fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or("")
}

fn span_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(2).unwrap_or("")
}

#[tokio::test]
async fn one_workflow_is_one_trace_across_every_worker() {
    let cluster = Cluster::start().await;
    let root = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let o = order("cust-trace", &[("sku-001", 1, 100)]);
    cluster.place_traced(std::slice::from_ref(&o), Some(root)).await;
    cluster.wait_terminal(&[o.order_id], Duration::from_secs(60)).await;

    let mut seen = Vec::new();
    for worker in common::WORKERS {
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT message_type, traceparent FROM outbox WHERE correlation_id = $1")
                .bind(o.order_id)
                .fetch_all(cluster.db(worker))
                .await
                .expect("outbox rows");
        for (message_type, traceparent) in rows {
            let traceparent = traceparent.unwrap_or_else(|| panic!("{message_type} has no traceparent"));
            assert_eq!(trace_id(&traceparent), trace_id(root), "{message_type} continues the publisher's trace");
            assert_ne!(span_id(&traceparent), span_id(root), "{message_type} has its handler's own span");
            seen.push(message_type);
        }
    }
    seen.sort();
    assert_eq!(seen, ["inventory.reserved", "order.confirmed", "order.created", "payment.succeeded"]);
    cluster.shutdown().await;
}

#[tokio::test]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_set() {
    let received = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post({
            let received = Arc::clone(&received);
            move |body: axum::body::Bytes| async move {
                if !body.is_empty() {
                    received.fetch_add(1, Ordering::SeqCst);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let cluster = Cluster::start_with(vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
    ])
    .await;
    let o = order("cust-otlp", &[("sku-001", 1, 100)]);
    cluster.place(std::slice::from_ref(&o)).await;
    cluster.wait_terminal(&[o.order_id], Duration::from_secs(60)).await;
    wait_for("spans at the OTLP endpoint", Duration::from_secs(30), || async {
        let n = received.load(Ordering::SeqCst);
        if n > 0 { Ok(n) } else { Err(n) }
    })
    .await;
    cluster.shutdown().await;
}

async fn get(url: &str) -> Result<(u16, String), String> {
    let response = reqwest::get(url).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.map_err(|e| e.to_string())?))
}

#[tokio::test]
async fn readiness_turns_false_when_the_broker_is_gone_and_true_when_it_returns() {
    let infra = Infra::from_env();
    let broker_addr = infra
        .amqp_url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in AMQP_URL")
        .to_owned();
    let proxy = TcpProxy::start(broker_addr.clone()).await;
    let proxied_url = infra.amqp_url.replace(&broker_addr, &format!("127.0.0.1:{}", proxy.port));
    let namespace = choreo_testkit::unique_namespace();
    let db_name = format!("{namespace}_order");
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-worker"));
    command
        .env("AMQP_URL", &proxied_url)
        .env("DATABASE_URL", &infra.database_url)
        .env("CHOREO_ORDER_DATABASE_URL", infra.database(&db_name))
        .env("CHOREO_NAMESPACE", &namespace)
        .kill_on_drop(true);
    let mut worker = common::followed_worker_env(&mut command).spawn().expect("order-worker");
    let ports = common::MetricsPorts::default();
    let _log = common::follow_log("order", &mut worker, ports.clone());
    let port = common::metrics_port_of(&ports, "order", worker.id().expect("pid")).await;
    let ready = format!("http://127.0.0.1:{port}/health/ready");
    let live = format!("http://127.0.0.1:{port}/health/live");
    let status = |want: u16| {
        let ready = ready.clone();
        move || {
            let ready = ready.clone();
            async move {
                let (code, body) = get(&ready).await?;
                if code == want { Ok(body) } else { Err(format!("{code} {body}")) }
            }
        }
    };
    wait_for("ready", Duration::from_secs(60), status(200)).await;
    proxy.cut();
    let body = wait_for("not ready while the broker is unreachable", Duration::from_secs(30), status(503)).await;
    assert!(body.contains("broker consumer"), "{body}");
    assert_eq!(get(&live).await.map(|(c, _)| c), Ok(200), "still live");
    let metrics = get(&format!("http://127.0.0.1:{port}/metrics")).await.expect("metrics").1;
    let unready = format!("choreo_worker_ready{{choreo_namespace=\"{namespace}\",worker=\"order\"}} 0");
    assert!(metrics.contains(&unready), "{metrics}");
    proxy.restore();
    wait_for("ready again after the broker returns", Duration::from_secs(60), status(200)).await;

    worker.kill().await.expect("kill");
    infra.drop_databases(&[db_name]).await;
    let t = choreo_rabbitmq::Topology::new(namespace);
    infra
        .delete_broker_objects(
            &[t.queue_names("order", &[1, 10, 60].map(Duration::from_secs)), vec![t.outcomes_queue()]].concat(),
            &t.exchange_names(),
        )
        .await;
}

/// `needle`, a sample of the exposition, with the namespace label every series carries put first, where the
/// exporter writes it.
fn in_namespace(namespace: &str, needle: &str) -> String {
    needle.replacen('{', &format!("{{choreo_namespace=\"{namespace}\","), 1)
}

#[tokio::test]
async fn metrics_carry_the_catalogue_after_a_workload() {
    let cluster = Cluster::start().await;
    let orders = common::mixed_orders(20);
    let ids = cluster.place(&orders).await;
    cluster.wait_terminal(&ids, Duration::from_secs(60)).await;
    let order_metrics =
        get(&format!("http://127.0.0.1:{}/metrics", cluster.metrics_port("order").await)).await.expect("metrics").1;
    for needle in [
        "choreo_messages_consumed_total{worker=\"order\",type=\"order.place\",outcome=\"processed\"} 20",
        "choreo_saga_outcomes_total{outcome=\"confirmed\",reason=\"none\"} 16",
        "choreo_saga_outcomes_total{outcome=\"cancelled\",reason=\"card_declined\"} 2",
        "choreo_saga_outcomes_total{outcome=\"cancelled\",reason=\"out_of_stock\"} 2",
        "choreo_workflow_duration_seconds_bucket{outcome=\"confirmed\",le=\"0.005\"}",
        "choreo_handler_duration_seconds_bucket{worker=\"order\",type=\"order.place\",le=\"0.001\"}",
        "choreo_outbox_backlog{worker=\"order\"}",
        "choreo_outbox_oldest_age_seconds{worker=\"order\"}",
        "choreo_relay_publish_duration_seconds_bucket{worker=\"order\"",
        "choreo_relay_handoff_wait_duration_seconds_bucket{worker=\"order\",le=\"0.005\"}",
        "choreo_messages_published_total{worker=\"order\",type=\"order.created\",outcome=\"confirmed\"} 20",
        "choreo_worker_ready{worker=\"order\"} 1",
    ] {
        let needle = in_namespace(&cluster.namespace, needle);
        assert!(order_metrics.contains(&needle), "missing `{needle}` in:\n{order_metrics}");
    }
    for worker in common::WORKERS {
        let metrics =
            get(&format!("http://127.0.0.1:{}/metrics", cluster.metrics_port(worker).await)).await.expect("metrics").1;
        // No worker crashed and no publish failed: every event went out by its handler's hand-off, none by a
        // sweep.
        let needle = in_namespace(&cluster.namespace, &format!("choreo_relay_swept_total{{worker=\"{worker}\"}} 0"));
        assert!(metrics.contains(&needle), "missing `{needle}` in:\n{metrics}");
        // Every series says which deployment it belongs to.
        let label = format!("{{choreo_namespace=\"{}\"", cluster.namespace);
        let samples: Vec<&str> = metrics.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        assert!(!samples.is_empty(), "{worker}: no samples");
        for sample in samples {
            assert!(sample.contains(&label), "{worker}: `{sample}` lacks {label}}}");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn choreoctl_top_shows_the_live_figures() {
    let cluster = Cluster::start().await;
    let ids = cluster.place(&common::mixed_orders(20)).await;
    cluster.wait_terminal(&ids, Duration::from_secs(60)).await;
    let mut targets = Vec::new();
    for w in common::WORKERS {
        targets.push(format!("{w}=127.0.0.1:{}", cluster.metrics_port(w).await));
    }
    let targets = targets.join(",");
    let output = Command::new(common::choreoctl())
        .args(["top", "--json", "--interval", "300ms", "--targets", &targets])
        .output()
        .await
        .expect("choreoctl top");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let snapshot: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON snapshot");
    assert_eq!(snapshot["workflows"]["confirmed_total"], 16.0);
    assert_eq!(snapshot["workflows"]["cancelled_by_reason"]["card_declined"], 2.0);
    let workers = snapshot["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 3);
    assert!(workers.iter().all(|w| w["up"] == true && w["ready"] == true), "{snapshot}");
    cluster.shutdown().await;

    // With nothing to read, it says so and fails.
    let output = Command::new(common::choreoctl())
        .args([
            "top",
            "--once",
            "--interval",
            "100ms",
            "--targets",
            &format!("order=127.0.0.1:{}", choreo_testkit::free_port()),
        ])
        .output()
        .await
        .expect("choreoctl top");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no worker answered"));
}

/// A worker restarted on its migrated database says where it serves /metrics. Its migrations then draw
/// "already exists, skipping" notices from the server, and a log bridge that loses the line after one of
/// those (tokio-rs/tracing#2519) once hid this line, and with it the address an operator looks for.
#[tokio::test]
async fn a_worker_restarted_on_its_database_logs_where_it_serves_metrics() {
    let mut cluster = Cluster::start().await;
    for worker in common::WORKERS {
        cluster.kill(worker).await;
        cluster.spawn(worker);
        let port = cluster.metrics_port(worker).await;
        let (code, body) = get(&format!("http://127.0.0.1:{port}/health/live")).await.expect("live");
        assert_eq!((code, body.trim()), (200, "live"), "{worker}");
    }
    cluster.shutdown().await;
}
