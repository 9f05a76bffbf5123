//! The HTTP payment gateway adapter against a local HTTP server that fails on demand: timeouts, retries,
//! the circuit breaker, and payments that wait while the circuit is open and complete once it closes.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use choreo_workers::gateway::{Charge, ChargeResult, GatewayError, PaymentGateway};
use choreo_workers::http_gateway::{HttpGateway, HttpGatewayConfig};
use common::{Cluster, order};
use uuid::Uuid;

/// A payment provider whose health the test controls.
#[derive(Default)]
struct Provider {
    healthy: AtomicBool,
    slow: AtomicBool,
    reject: AtomicBool,
    /// Answers this many calls with 409: the same idempotency key is still being processed.
    in_progress: AtomicUsize,
    /// Statuses to answer the next calls with, first to last, before anything else.
    scripted: Mutex<std::collections::VecDeque<StatusCode>>,
    hits: AtomicUsize,
    failures: AtomicUsize,
    keys: Mutex<Vec<String>>,
    charges: Mutex<HashMap<String, Uuid>>,
}

async fn charges(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    p.hits.fetch_add(1, Ordering::SeqCst);
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    p.keys.lock().expect("lock").push(key.clone());
    if p.slow.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let scripted = p.scripted.lock().expect("lock").pop_front();
    if let Some(status) = scripted {
        return (status, Json(serde_json::json!({"error": "scripted"})));
    }
    if p.in_progress.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": "a request with this idempotency key is in progress"})),
        );
    }
    if p.reject.load(Ordering::SeqCst) {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({"error": "bad request"})));
    }
    if !p.healthy.load(Ordering::SeqCst) {
        p.failures.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "down"})));
    }
    if body["customer_id"].as_str().is_some_and(|c| c.starts_with("decline")) {
        return (StatusCode::OK, Json(serde_json::json!({"status": "declined", "reason": "card_declined"})));
    }
    let payment_id = *p.charges.lock().expect("lock").entry(key).or_insert_with(Uuid::new_v4);
    (StatusCode::OK, Json(serde_json::json!({"status": "charged", "payment_id": payment_id})))
}

async fn refunds() -> StatusCode {
    StatusCode::OK
}

async fn start_provider(healthy: bool) -> (Arc<Provider>, String) {
    let provider = Arc::new(Provider::default());
    provider.healthy.store(healthy, Ordering::SeqCst);
    let app = axum::Router::new()
        .route("/charges", post(charges))
        .route("/refunds", post(refunds))
        .with_state(Arc::clone(&provider));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (provider, url)
}

fn gateway(url: &str, retries: usize, breaker_failures: u32) -> HttpGateway {
    HttpGateway::new(HttpGatewayConfig {
        base_url: url.to_owned(),
        timeout: Duration::from_millis(300),
        retries,
        breaker_failures,
        breaker_open_for: Duration::from_millis(500),
    })
    .expect("gateway")
}

fn charge(order_id: Uuid, customer: &str) -> Charge<'_> {
    Charge { order_id, customer_id: customer, amount_cents: 100, currency: "EUR" }
}

#[tokio::test]
async fn charges_and_declines_map_to_the_port_with_the_order_as_idempotency_key() {
    let (provider, url) = start_provider(true).await;
    let g = gateway(&url, 0, 5);
    let order_id = Uuid::now_v7();
    let first = g.charge(charge(order_id, "c")).await.expect("charged");
    assert!(matches!(first, ChargeResult::Charged { .. }));
    assert_eq!(g.charge(charge(order_id, "c")).await.expect("again"), first, "same key, same payment");
    assert!(matches!(g.charge(charge(Uuid::now_v7(), "decline-1")).await, Ok(ChargeResult::Declined { .. })));
    assert_eq!(provider.keys.lock().expect("lock")[0], order_id.to_string());
}

#[tokio::test]
async fn transient_errors_are_retried_and_timeouts_and_rejections_are_classified() {
    let (provider, url) = start_provider(false).await;
    let g = gateway(&url, 2, 100);
    assert!(matches!(g.charge(charge(Uuid::now_v7(), "c")).await, Err(GatewayError::Unavailable(_))));
    assert_eq!(provider.hits.load(Ordering::SeqCst), 3, "one call and two retries");

    provider.healthy.store(true, Ordering::SeqCst);
    provider.slow.store(true, Ordering::SeqCst);
    let timed_out = g.charge(charge(Uuid::now_v7(), "c")).await;
    assert!(matches!(timed_out, Err(GatewayError::Unavailable(ref e)) if e.contains("charges")), "{timed_out:?}");

    provider.slow.store(false, Ordering::SeqCst);
    provider.reject.store(true, Ordering::SeqCst);
    let before = provider.hits.load(Ordering::SeqCst);
    assert!(matches!(g.charge(charge(Uuid::now_v7(), "c")).await, Err(GatewayError::Rejected(_))));
    assert_eq!(provider.hits.load(Ordering::SeqCst), before + 1, "a rejection is not retried");

    // 409: the provider is still working on an earlier call with the same key (ours timed out). Retried.
    provider.reject.store(false, Ordering::SeqCst);
    provider.in_progress.store(1, Ordering::SeqCst);
    let before = provider.hits.load(Ordering::SeqCst);
    let charged = g.charge(charge(Uuid::now_v7(), "c")).await;
    assert!(matches!(charged, Ok(ChargeResult::Charged { .. })), "{charged:?}");
    assert_eq!(provider.hits.load(Ordering::SeqCst), before + 2, "the conflict was retried");
}

/// Conflicts concern one request: however many, they do not open the circuit for every payment.
#[tokio::test]
async fn conflicts_do_not_open_the_circuit() {
    let (provider, url) = start_provider(true).await;
    let g = gateway(&url, 1, 2);
    provider.in_progress.store(100, Ordering::SeqCst);
    for _ in 0..3 {
        assert!(
            matches!(g.charge(charge(Uuid::now_v7(), "c")).await, Err(GatewayError::Unavailable(ref e)) if e.contains("409"))
        );
    }
    provider.in_progress.store(0, Ordering::SeqCst);
    let charged = g.charge(charge(Uuid::now_v7(), "c")).await;
    assert!(matches!(charged, Ok(ChargeResult::Charged { .. })), "the circuit stayed closed: {charged:?}");

    // A call that met a 503 before its last attempt's 409 did fail for the provider's sake: it counts.
    for _ in 0..2 {
        provider.scripted.lock().expect("lock").extend([StatusCode::SERVICE_UNAVAILABLE, StatusCode::CONFLICT]);
        assert!(
            matches!(g.charge(charge(Uuid::now_v7(), "c")).await, Err(GatewayError::Unavailable(ref e)) if e.contains("409"))
        );
    }
    let hits = provider.hits.load(Ordering::SeqCst);
    let refused = g.charge(charge(Uuid::now_v7(), "c")).await;
    assert!(matches!(refused, Err(GatewayError::Unavailable(ref e)) if e.contains("circuit open")), "{refused:?}");
    assert_eq!(provider.hits.load(Ordering::SeqCst), hits, "the open circuit spared the provider");
}

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_closes_after_a_good_trial() {
    let (provider, url) = start_provider(false).await;
    let g = gateway(&url, 0, 2);
    for _ in 0..2 {
        assert!(g.charge(charge(Uuid::now_v7(), "c")).await.is_err());
    }
    assert!(!g.circuit_closed(), "open after two consecutive failures");
    let hits = provider.hits.load(Ordering::SeqCst);
    let rejected = g.charge(charge(Uuid::now_v7(), "c")).await;
    assert!(matches!(rejected, Err(GatewayError::Unavailable(ref e)) if e.contains("circuit open")), "{rejected:?}");
    assert_eq!(provider.hits.load(Ordering::SeqCst), hits, "an open circuit does not call the provider");

    provider.healthy.store(true, Ordering::SeqCst);
    let closed = choreo_testkit::wait_for("the circuit to let a trial through", Duration::from_secs(10), || async {
        g.charge(charge(Uuid::now_v7(), "c")).await.map_err(|e| e.to_string())
    })
    .await;
    assert!(matches!(closed, ChargeResult::Charged { .. }));
    assert!(g.circuit_closed());
}

#[tokio::test]
async fn with_the_circuit_open_payments_wait_and_complete_once_the_gateway_is_back() {
    let (provider, url) = start_provider(false).await;
    let cluster = Cluster::start_with(
        [
            ("CHOREO_GATEWAY", "http"),
            ("CHOREO_GATEWAY_URL", url.as_str()),
            ("CHOREO_GATEWAY_TIMEOUT", "500ms"),
            ("CHOREO_GATEWAY_RETRIES", "0"),
            ("CHOREO_GATEWAY_BREAKER_FAILURES", "3"),
            ("CHOREO_GATEWAY_BREAKER_OPEN", "500ms"),
            ("CHOREO_HANDLER_RETRIES", "1"),
            ("CHOREO_RETRY_DELAYS", "500ms,1s,2s,4s,8s,16s"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect(),
    )
    .await;
    let orders: Vec<_> = (0..20).map(|i| order(&format!("cust-{i}"), &[("sku-001", 1, 100)])).collect();
    let ids = cluster.place(&orders).await;
    // The gateway is down long enough for the circuit to open and messages to reach the delay queues.
    choreo_testkit::wait_for("the gateway to refuse calls", Duration::from_secs(60), || async {
        let n = provider.failures.load(Ordering::SeqCst);
        if n >= 3 { Ok(()) } else { Err(n) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(cluster.db("order"))
        .await
        .expect("pending");
    assert_eq!(pending, 20, "nothing completes while the gateway is down");
    provider.healthy.store(true, Ordering::SeqCst);

    cluster.wait_terminal(&ids, Duration::from_secs(90)).await;
    for id in &ids {
        assert_eq!(cluster.status(*id).await.0, "CONFIRMED");
    }
    assert_eq!(provider.charges.lock().expect("lock").len(), 20, "one charge per order");
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}
