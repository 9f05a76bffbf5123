//! Replaying thousands of dead letters survives the CLI being killed half way: run it again and every
//! message is replayed, none lost, none left behind, and no order is affected twice. A letter older than the
//! workers' inbox retention is replayed only when the operator says so.

mod common;

use std::time::Duration;

use choreo_messages::payloads::PlaceOrder;
use choreo_messages::{Envelope, Message};
use choreo_rabbitmq::codec::properties_for;
use choreo_rabbitmq::dead_letter::headers as dl;
use choreo_rabbitmq::lapin::types::{AMQPValue, LongString};
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{ConfirmingPublisher, connect_pool};
use choreo_testkit::wait_for;
use common::{Cluster, mixed_orders, order};
use uuid::Uuid;

const ORDERS: usize = 5_000;

#[tokio::test]
async fn a_replay_killed_half_way_and_run_again_replays_everything_exactly_once_in_effect() {
    let mut cluster = Cluster::start().await;
    // A payment gateway that is down, and no patience: every order.created ends in payment's dead-letter queue.
    cluster.kill("payment").await;
    cluster.spawn_with(
        "payment",
        &[
            ("CHOREO_GATEWAY_TRANSIENT_FAILURE_RATE", "1"),
            ("CHOREO_HANDLER_RETRIES", "0"),
            ("CHOREO_RETRY_DELAYS", "1ms"),
        ],
    );
    let ids = cluster.place(&mixed_orders(ORDERS)).await;
    let dlq = cluster.topology.dead_letter_queue("payment");
    wait_for("every order.created dead-lettered", Duration::from_secs(300), || async {
        let d = cluster.depth(&dlq).await;
        if d as usize == ORDERS { Ok(()) } else { Err(d) }
    })
    .await;

    // The gateway is back.
    cluster.kill("payment").await;
    cluster.spawn("payment");
    cluster.wait_consuming().await;

    // Replay, and kill the CLI while it is at it.
    let mut replay =
        cluster.choreoctl().args(["dlq", "replay", "payment", "--all", "--rate", "1000"]).spawn().expect("replay");
    let payment_db = cluster.db("payment").clone();
    wait_for("the replay under way", Duration::from_secs(120), || {
        let db = payment_db.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.map_err(|e| e.to_string())?;
            if n >= 200 { Ok(()) } else { Err(format!("{n} payments")) }
        }
    })
    .await;
    replay.kill().await.expect("kill the CLI");
    // What it had not acknowledged goes back to the dead-letter queue once the broker has noticed that the
    // CLI is gone, and the broker returns them some time after the consumer is gone. Every order.created is
    // then in the queue or paid (or declined) by the payment worker, or both (published again and not yet
    // acked when the CLI died): wait until they add up, with no consumer left.
    let left = wait_for("the killed replay's unacked dead letters back in the queue", Duration::from_secs(60), || {
        let db = payment_db.clone();
        let cluster = &cluster;
        let dlq = &dlq;
        async move {
            let (depth, consumers) = cluster.depth_and_consumers(dlq).await;
            let paid: i64 =
                sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.map_err(|e| e.to_string())?;
            if consumers == 0 && depth as usize + paid as usize >= ORDERS {
                Ok(depth)
            } else {
                Err(format!("{depth} dead letters, {consumers} consumers, {paid} payments"))
            }
        }
    })
    .await;
    assert!((left as usize) < ORDERS, "the first run replayed part of the queue ({left} left)");

    // Run it again until the queue is empty, as an operator would: copies the killed run had not acknowledged
    // can come back to the queue after a run has counted it.
    let replay_until_empty = || async {
        for run in 1..=5 {
            let (code, out, err) = cluster.run_choreoctl(&["dlq", "replay", "payment", "--all", "--json"]).await;
            assert_eq!(code, 0, "{out} {err}");
            let depth = cluster.depth(&dlq).await;
            if depth == 0 {
                return;
            }
            let (_, groups, _) = cluster.run_choreoctl(&["dlq", "list", "--group-by", "error-kind"]).await;
            assert!(run < 5, "{depth} dead letters still there after {run} replays (last: {out}):\n{groups}");
        }
    };
    replay_until_empty().await;
    cluster.wait_terminal(&ids, Duration::from_secs(600)).await;
    // A late copy of a message that was replayed and processed meanwhile has no effect when replayed.
    replay_until_empty().await;
    let (_, groups, _) = cluster.run_choreoctl(&["dlq", "list", "--group-by", "error-kind"]).await;
    assert_eq!(cluster.depth(&dlq).await, 0, "nothing failed again:\n{groups}");
    cluster.assert_invariants().await;
    let (payments, distinct): (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM payments")
        .fetch_one(cluster.db("payment"))
        .await
        .expect("payments");
    assert_eq!((payments as usize, distinct as usize), (ORDERS, ORDERS), "every order paid or declined once");
    cluster.shutdown().await;
}

/// Put in `queue` the dead letter of an `order.place` for `order` that was placed `age` ago and failed at once
/// in the order worker (say its database was down), never processed. Returns its message id.
async fn dead_letter_placed_ago(cluster: &Cluster, queue: &str, order: &PlaceOrder, age: chrono::Duration) -> String {
    let mut envelope = Envelope::new_command(Message::OrderPlace(order.clone()), "shop", Some(order.order_id));
    envelope.meta.occurred_at = chrono::Utc::now() - age;
    let encoded = envelope.encode();
    // The contract's properties (`timestamp` and `occurred-at` from the placing), and what the worker writes
    // when it dead-letters a message.
    let mut properties = properties_for(&encoded.meta);
    let mut headers = properties.headers().clone().unwrap_or_default();
    let failed_at =
        (encoded.meta.occurred_at + chrono::Duration::seconds(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert(dl::ERROR_KIND.into(), text("transient"));
    headers.insert(dl::ERROR.into(), text("database unavailable"));
    headers.insert(dl::WORKER.into(), text("order"));
    headers.insert(dl::FIRST_FAILURE_AT.into(), text(&failed_at));
    headers.insert(dl::LAST_FAILURE_AT.into(), text(&failed_at));
    properties = properties.with_headers(headers);
    let pool = connect_pool(&cluster.infra.amqp_url, "replay-test", 1).expect("broker pool");
    let message_id = encoded.meta.message_id.to_string();
    ConfirmingPublisher::new(pool, Duration::from_secs(15))
        .publish(Outgoing {
            exchange: "",
            routing_key: queue,
            properties,
            body: &encoded.body,
            message_id: message_id.clone(),
        })
        .await
        .expect("the dead-letter queue takes it");
    message_id
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

async fn order_exists(cluster: &Cluster, order_id: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orders WHERE order_id = $1)")
        .bind(order_id)
        .fetch_one(cluster.db("order"))
        .await
        .expect("orders")
}

#[tokio::test]
async fn a_letter_older_than_the_inbox_retention_stays_in_its_queue_unless_forced() {
    let cluster = Cluster::start().await;
    let dlq = cluster.topology.dead_letter_queue("order");
    let old = order("cust-1", &[("sku-001", 1, 100)]);
    let fresh = order("cust-2", &[("sku-002", 1, 100)]);
    let old_id = dead_letter_placed_ago(&cluster, &dlq, &old, chrono::Duration::days(40)).await;
    dead_letter_placed_ago(&cluster, &dlq, &fresh, chrono::Duration::minutes(5)).await;
    cluster.wait_depth(&dlq, 2).await;

    // A dry run says what a run would refuse, and its exit status says so too.
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "replay", "order", "--all", "--dry-run", "--json"]).await;
    let report = json(&out);
    assert_eq!((code, &report["selected"], &report["skipped_too_old"]), (6, &2.into(), &1.into()), "{out} {err}");
    // Workers that remember ids for longer make it young enough.
    let (code, out, err) = cluster
        .run_choreoctl(&["dlq", "replay", "order", "--all", "--dry-run", "--json", "--inbox-retention", "50d"])
        .await;
    assert_eq!((code, &json(&out)["skipped_too_old"]), (0, &0.into()), "{out} {err}");

    // Without --force: the fresh letter is replayed, the old one stays, and the operator is told why.
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "replay", "order", "--all"]).await;
    assert_eq!(code, 6, "{out} {err}");
    assert!(out.contains("replayed 1 of 2"), "{out}");
    assert!(
        err.contains(&old_id) && err.contains("older than the inbox retention") && err.contains("--force"),
        "{err}"
    );
    cluster.wait_terminal(&[fresh.order_id], Duration::from_secs(60)).await;
    cluster.wait_depth(&dlq, 1).await;
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "show", "order", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["shown"][0]["story"]["message_id"], old_id.as_str(), "the old letter is still there");
    assert!(!order_exists(&cluster, old.order_id).await, "the old order was not placed");

    // With --force it goes back to its worker.
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "replay", "order", "--all", "--force", "--json"]).await;
    let report = json(&out);
    assert_eq!((code, &report["done"], &report["skipped_too_old"]), (0, &1.into(), &0.into()), "{out} {err}");
    cluster.wait_terminal(&[old.order_id], Duration::from_secs(60)).await;
    cluster.wait_depth(&dlq, 0).await;
    cluster.shutdown().await;
}
