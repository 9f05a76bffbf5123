//! Recoverability on the real broker and database: bad input of every kind, transient failures that clear
//! and that never clear, and a message that kills its worker on every delivery.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use choreo_rabbitmq::codec::{header_i64, header_string};
use choreo_rabbitmq::dead_letter::headers as dl;
use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{ConfirmingPublisher, connect_pool};
use choreo_testkit::wait_for;
use common::{Cluster, order};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn contract_properties(message_type: &str, version: i64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("schema-version".into(), AMQPValue::LongLongInt(version));
    BasicProperties::default()
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_type(message_type.into())
        .with_content_type("application/json".into())
        .with_headers(headers)
}

const VALID_BODY: &str = r#"{"order_id":"0190b8a0-0000-7000-8000-0000000000ff","customer_id":"c","currency":"EUR","lines":[{"sku":"sku-001","quantity":1,"unit_price_cents":5}]}"#;

#[tokio::test]
async fn every_kind_of_bad_input_is_dead_lettered_and_good_messages_around_it_complete() {
    let cluster = Cluster::start_with(env(&[("CHOREO_MAX_MESSAGE_BYTES", "4096")])).await;
    let pool = connect_pool(&cluster.infra.amqp_url, "test", 1).expect("pool");
    let publisher = ConfirmingPublisher::new(pool, Duration::from_secs(10));
    let exchange = cluster.topology.events_exchange();

    let oversized = format!(r#"{{"padding":"{}"}}"#, "x".repeat(10_000));
    let cases: Vec<(&str, BasicProperties, Vec<u8>)> = vec![
        ("malformed_body", contract_properties("order.place", 1), b"{\"order_id\": oops".to_vec()),
        ("malformed_body", contract_properties("order.place", 1), vec![0xff, 0x00, 0xfe, 0x13, 0x37, 0x80]),
        (
            "wrong_content_type",
            contract_properties("order.place", 1).with_content_type("text/plain".into()),
            b"wct".to_vec(),
        ),
        ("unknown_type", contract_properties("order.teleport", 1), b"{\"unknown\":1}".to_vec()),
        ("unsupported_schema_version", contract_properties("order.place", 99), b"{\"v\":99}".to_vec()),
        (
            "validation_failed",
            contract_properties("order.place", 1),
            VALID_BODY.replace("\"quantity\":1", "\"quantity\":0").into_bytes(),
        ),
        ("oversized", contract_properties("order.place", 1), oversized.into_bytes()),
        ("wrong_content_type", BasicProperties::default(), b"no properties at all".to_vec()),
    ];
    let mut good = Vec::new();
    for (i, (_, properties, body)) in cases.iter().enumerate() {
        publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: "order.place",
                properties: properties.clone(),
                body,
                message_id: format!("case-{i}"),
            })
            .await
            .expect("the broker accepts it");
        let o = order(&format!("cust-{i}"), &[("sku-001", 1, 100)]);
        cluster.place(std::slice::from_ref(&o)).await;
        good.push(o.order_id);
    }
    cluster.wait_terminal(&good, DEADLINE).await;

    let dlq = cluster.topology.dead_letter_queue("order");
    let mut seen: HashMap<Vec<u8>, String> = HashMap::new();
    while seen.len() < cases.len() {
        let letter = wait_for("the next dead letter", DEADLINE, || async {
            cluster.get(&dlq).await.ok_or_else(|| format!("{} of {} dead letters", seen.len(), cases.len()))
        })
        .await;
        let headers = letter.delivery.properties.headers().clone().unwrap_or_default();
        let kind = header_string(&headers, dl::ERROR_KIND).expect("error kind header");
        assert!(header_string(&headers, dl::ERROR).is_some_and(|e| !e.is_empty()), "a reason is given");
        assert_eq!(header_string(&headers, dl::WORKER).as_deref(), Some("order"));
        seen.insert(letter.delivery.data.clone(), kind);
    }
    for (expected, _, body) in &cases {
        assert_eq!(
            seen.get(body).map(String::as_str),
            Some(*expected),
            "body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
    }
    for id in &good {
        assert_eq!(cluster.status(*id).await.0, "CONFIRMED");
    }
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_transient_failure_that_clears_completes_with_exactly_one_effect() {
    // One in-process retry, then a delay queue: the third attempt, after a broker round trip, succeeds.
    let cluster =
        Cluster::start_with(env(&[("CHOREO_HANDLER_RETRIES", "1"), ("CHOREO_RETRY_DELAYS", "200ms,400ms")])).await;
    let o = order("flaky-2-customer", &[("sku-001", 1, 100)]);
    cluster.place(std::slice::from_ref(&o)).await;
    cluster.wait_terminal(&[o.order_id], DEADLINE).await;
    assert_eq!(cluster.status(o.order_id).await.0, "CONFIRMED");
    let charges: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE order_id = $1")
        .bind(o.order_id)
        .fetch_one(cluster.db("payment"))
        .await
        .expect("payments");
    assert_eq!(charges, 1, "exactly one effect");
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_failure_that_never_clears_is_dead_lettered_with_its_attempts_and_failure_times() {
    let cluster =
        Cluster::start_with(env(&[("CHOREO_HANDLER_RETRIES", "1"), ("CHOREO_RETRY_DELAYS", "200ms,400ms")])).await;
    let o = order("unavailable-customer", &[("sku-001", 1, 100)]);
    cluster.place(std::slice::from_ref(&o)).await;
    let dlq = cluster.topology.dead_letter_queue("payment");
    let letter =
        wait_for("the payment dead letter", DEADLINE, || async { cluster.get(&dlq).await.ok_or("empty") }).await;
    let headers = letter.delivery.properties.headers().clone().unwrap_or_default();
    assert_eq!(header_string(&headers, dl::ERROR_KIND).as_deref(), Some("transient"));
    // Two attempts per round (1 + 1 in-process retry), three rounds (first + two delay levels).
    assert_eq!(header_i64(&headers, dl::ATTEMPTS), Some(6));
    assert_eq!(header_i64(&headers, dl::RETRIES), Some(2));
    assert_eq!(header_string(&headers, dl::ORIGINAL_ROUTING_KEY).as_deref(), Some("order.created"));
    let time = |key| {
        chrono::DateTime::parse_from_rfc3339(&header_string(&headers, key).expect("failure time")).expect("rfc3339")
    };
    assert!(time(dl::FIRST_FAILURE_AT) < time(dl::LAST_FAILURE_AT), "first and last failure both recorded");
    let payments: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(cluster.db("payment")).await.expect("n");
    assert_eq!(payments, 0);
    assert_eq!(cluster.status(o.order_id).await.0, "PENDING", "waiting for an operator, not lost");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_message_that_kills_its_worker_every_time_ends_in_the_dead_letter_queue() {
    let mut cluster =
        Cluster::start_with(env(&[("CHOREO_GATEWAY_CRASHES", "true"), ("CHOREO_DELIVERY_LIMIT", "2")])).await;
    let poison = order("crash-customer", &[("sku-001", 1, 100)]);
    cluster.place(std::slice::from_ref(&poison)).await;
    let letter = cluster.respawn_until_dead_letter("payment", DEADLINE).await;
    assert_eq!(letter.delivery.properties.kind().as_ref().map(|t| t.to_string()).as_deref(), Some("order.created"));
    let headers = letter.delivery.properties.headers().clone().unwrap_or_default();
    assert!(headers.inner().contains_key("x-death"), "dead-lettered by the broker's delivery limit");

    // The restarted worker goes on with the rest.
    let good = order("cust-after", &[("sku-001", 1, 100)]);
    cluster.place(std::slice::from_ref(&good)).await;
    cluster.wait_terminal(&[good.order_id], DEADLINE).await;
    assert_eq!(cluster.status(good.order_id).await.0, "CONFIRMED");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_message_that_crashes_its_worker_is_dead_lettered_and_the_messages_waiting_behind_it_are_not() {
    // Each crash returns every unacked delivery and the broker counts it, started or not: with the broker's
    // limit alone, the 30 orders waiting behind the poison message would pass it too. The worker counts only
    // what it started again, and dead-letters the poison message after CHOREO_CRASH_LIMIT restarts.
    let mut cluster = Cluster::start_with(env(&[
        ("CHOREO_GATEWAY_CRASHES", "true"),
        ("CHOREO_CRASH_LIMIT", "2"),
        ("CHOREO_DELIVERY_LIMIT", "6"),
        ("CHOREO_CONCURRENCY", "2"),
    ]))
    .await;
    cluster.kill("payment").await;
    let mut orders: Vec<_> = (0..30).map(|i| order(&format!("cust-behind-{i}"), &[("sku-001", 1, 100)])).collect();
    let poison = order("crash-every-time", &[("sku-001", 1, 100)]);
    orders.insert(5, poison.clone());
    cluster.place(&orders).await;
    let t = cluster.topology.clone();
    cluster.wait_depth(&t.worker_queue("payment"), 31).await;

    let dlq = t.dead_letter_queue("payment");
    cluster.spawn("payment");
    let letter = cluster.respawn_until_dead_letter("payment", DEADLINE).await;
    let body: serde_json::Value = serde_json::from_slice(&letter.delivery.data).expect("json body");
    assert_eq!(
        body["order_id"].as_str(),
        Some(poison.order_id.to_string().as_str()),
        "the poison message is the one dead-lettered"
    );
    let headers = letter.delivery.properties.headers().clone().unwrap_or_default();
    assert_eq!(header_string(&headers, dl::ERROR_KIND).as_deref(), Some("crashed"));
    assert!(
        header_string(&headers, dl::ERROR).is_some_and(|e| e.contains("stopped while handling this message 3 times"))
    );

    let behind: Vec<Uuid> = orders.iter().filter(|o| o.order_id != poison.order_id).map(|o| o.order_id).collect();
    cluster.wait_terminal(&behind, DEADLINE).await;
    for id in &behind {
        assert_eq!(cluster.status(*id).await.0, "CONFIRMED");
    }
    assert_eq!(cluster.depth(&dlq).await, 0, "nothing else was dead-lettered");
    cluster.shutdown().await;
}
