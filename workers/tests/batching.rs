//! Batches: deliveries that wait together are applied in one transaction, and nothing about any message's
//! fate changes. Real broker, real database, real worker binaries.

mod common;

use std::time::Duration;

use choreo_messages::payloads::{InventoryFailed, InventoryFailureReason};
use choreo_messages::{EncodedEnvelope, Envelope, Message};
use choreo_testkit::wait_for;
use common::{Cluster, order};

const DEADLINE: Duration = Duration::from_secs(90);

/// The value of one sample of `/metrics` (a line starting with `series`), 0 when absent.
/// The value of `series` (its labels as written, without the namespace every series carries first).
async fn metric(cluster: &Cluster, worker: &str, series: &str) -> f64 {
    let series = series.replacen('{', &format!("{{choreo_namespace=\"{}\",", cluster.namespace), 1);
    let series = series.as_str();
    let url = format!("http://127.0.0.1:{}/metrics", cluster.metrics_port(worker).await);
    let text = reqwest::get(&url).await.expect("metrics endpoint").text().await.expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn waiting_deliveries_are_applied_in_batches_with_exactly_the_effects_of_one_by_one() {
    let catalogue = format!("{},sku-lim=5", choreo_workers::inventory::DEFAULT_CATALOGUE);
    let mut cluster = Cluster::start_with(vec![
        ("CHOREO_INVENTORY_CATALOGUE".into(), catalogue),
        // Few slots, so that the waiting deliveries are taken many at a time.
        ("CHOREO_CONCURRENCY".into(), "2".into()),
    ])
    .await;
    for worker in common::WORKERS {
        cluster.kill(worker).await;
    }

    // 40 orders: 8 want the last 5 units of `sku-lim`, 10 have a card gateway that fails once per order
    // (so the payment batches holding them roll back and go one by one), the rest are plain.
    let orders: Vec<_> = (0..40)
        .map(|i| match i {
            0..8 => order(&format!("cust-lim-{i}"), &[("sku-lim", 1, 700)]),
            8..18 => order(&format!("flaky-1-batch-{i}"), &[("sku-002", 1, 300)]),
            _ => order(&format!("cust-batch-{i}"), &[("sku-001", 2, 150)]),
        })
        .collect();
    let envelopes: Vec<EncodedEnvelope> = orders
        .iter()
        .map(|o| Envelope::new_command(Message::OrderPlace(o.clone()), "test", Some(o.order_id)).encode())
        .collect();
    // The first 10 twice, with the same message ids: duplicates, some of them in the same batch. And three
    // orders placed again under new message ids (a client retrying): they must not be created twice.
    let mut published = envelopes.clone();
    published.extend(envelopes[..10].iter().cloned());
    published.extend(
        orders[20..23]
            .iter()
            .map(|o| Envelope::new_command(Message::OrderPlace(o.clone()), "test", Some(o.order_id)).encode()),
    );
    cluster.publish(&published).await;

    let t = cluster.topology.clone();
    cluster.wait_depth(&t.worker_queue("order"), 53).await;
    cluster.spawn("order");
    cluster.wait_depth(&t.worker_queue("payment"), 40).await;
    wait_for("the order worker's duplicate count", DEADLINE, || async {
        let n =
            metric(&cluster, "order", "choreo_duplicates_skipped_total{worker=\"order\",type=\"order.place\"}").await;
        if n == 10.0 { Ok(()) } else { Err(n) }
    })
    .await;
    let placed_batches = metric(&cluster, "order", "choreo_batch_messages_count{worker=\"order\"}").await;
    assert!(placed_batches >= 1.0, "the order worker placed orders in batches");
    // The terminal events wait for a fresh order worker, so that they too are settled in batches.
    assert!(cluster.terminate("order").await.success(), "the order worker drains and stops cleanly");
    cluster.spawn("payment");
    cluster.wait_depth(&t.worker_queue("inventory"), 40).await;
    cluster.spawn("inventory");
    cluster.wait_depth(&t.worker_queue("order"), 40).await;
    cluster.spawn("order");
    let ids: Vec<_> = orders.iter().map(|o| o.order_id).collect();
    cluster.wait_terminal(&ids, DEADLINE).await;

    // Exactly the outcomes of one-by-one processing.
    let (confirmed_lim, cancelled_lim): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'CONFIRMED'), \
                count(*) FILTER (WHERE status = 'CANCELLED' AND cancel_reason = 'out_of_stock') \
         FROM orders WHERE customer_id LIKE 'cust-lim-%'",
    )
    .fetch_one(cluster.db("order"))
    .await
    .expect("limited orders");
    assert_eq!((confirmed_lim, cancelled_lim), (5, 3), "5 units serve 5 orders; 3 are cancelled and refunded");
    let (available, reserved): (i64, i64) =
        sqlx::query_as("SELECT available, reserved FROM stock WHERE sku = 'sku-lim'")
            .fetch_one(cluster.db("inventory"))
            .await
            .expect("sku-lim");
    assert_eq!((available, reserved), (0, 5));
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE customer_id NOT LIKE 'cust-lim-%' AND status = 'CONFIRMED'",
    )
    .fetch_one(cluster.db("order"))
    .await
    .expect("other orders");
    assert_eq!(others, 32, "every other order, flaky gateway included, is confirmed");
    let history: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM order_history GROUP BY status ORDER BY status")
            .fetch_all(cluster.db("order"))
            .await
            .expect("history");
    assert_eq!(
        history,
        vec![("CANCELLED".to_owned(), 3), ("CONFIRMED".to_owned(), 37), ("PENDING".to_owned(), 40)],
        "each order was created once, although 13 placements were repeated, and settled once"
    );
    cluster.assert_invariants().await;

    // And they really went in batches, a rolled-back one included.
    // (Payment batches may all hold a failing charge and roll back: there, the fallbacks show the batches.)
    for worker in ["order", "inventory"] {
        let batches = metric(&cluster, worker, &format!("choreo_batch_messages_count{{worker=\"{worker}\"}}")).await;
        assert!(batches >= 1.0, "{worker} applied no batch");
    }
    let fallbacks = metric(&cluster, "payment", "choreo_batch_fallbacks_total{worker=\"payment\"}").await;
    assert!(fallbacks >= 1.0, "a payment batch holding a failing charge went one by one");
    cluster.shutdown().await;
}

/// A message a service cannot decide with others (payment: a refund) and every message about an order that
/// another waiting message is about too go alone; the other messages waiting with them still make one batch.
/// (Before, one refund among the waiting charges sent the whole batch one message at a time.)
#[tokio::test]
async fn messages_that_cannot_join_a_batch_go_alone_and_the_rest_still_make_one() {
    // One slot, so that the waiting deliveries are taken many at a time.
    let mut cluster = Cluster::start_with(vec![("CHOREO_CONCURRENCY".into(), "1".into())]).await;
    for worker in common::WORKERS {
        cluster.kill(worker).await;
    }
    let t = cluster.topology.clone();

    // Two orders charged first, so that they can be refunded later.
    let first: Vec<Envelope> = (0..2).map(|_| common::order_created()).collect();
    cluster.publish(&first.iter().map(Envelope::encode).collect::<Vec<_>>()).await;
    cluster.spawn("payment");
    cluster.wait_depth(&t.worker_queue("inventory"), 2).await;
    cluster.kill("payment").await;

    // Then waiting together: twelve new charges, with the two refunds among them, and one more order
    // charged twice under two message ids (a producer's retry), which must be charged once.
    let refund = |created: &Envelope| {
        let Message::OrderCreated(o) = &created.message else { unreachable!("built as order.created above") };
        Envelope::caused_by(
            &created.meta,
            Message::InventoryFailed(InventoryFailed {
                order_id: o.order_id,
                reason: InventoryFailureReason::OutOfStock,
                sku: "sku-001".into(),
            }),
            "inventory",
        )
    };
    let charges: Vec<Envelope> = (0..12).map(|_| common::order_created()).collect();
    let twice = common::order_created();
    let mut again = twice.clone();
    again.meta.message_id = uuid::Uuid::now_v7();
    let mut waiting: Vec<Envelope> = charges.clone();
    waiting.insert(3, refund(&first[0]));
    waiting.insert(9, refund(&first[1]));
    waiting.insert(6, twice.clone());
    waiting.push(again);
    cluster.publish(&waiting.iter().map(Envelope::encode).collect::<Vec<_>>()).await;
    cluster.wait_depth(&t.worker_queue("payment"), waiting.len() as u32).await;
    // Writes to `payments` wait behind this lock until every delivery has reached the worker (none is ready
    // in the queue any more), so the waiting charges are in its hands together whatever the pace at which
    // the broker delivers them: on a busy machine, one at a time, each could be done before the next came.
    let mut lock = cluster.db("payment").begin().await.expect("begin");
    sqlx::query("LOCK TABLE payments IN EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock payments");
    cluster.spawn("payment");
    cluster.wait_depth(&t.worker_queue("payment"), 0).await;
    lock.rollback().await.expect("unlock payments");

    wait_for("the charges and refunds", DEADLINE, || async {
        let counts: (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'CHARGED'), count(*) FILTER (WHERE status = 'REFUNDED') FROM payments",
        )
        .fetch_one(cluster.db("payment"))
        .await
        .expect("payments");
        if counts == (13, 2) { Ok(()) } else { Err(counts) }
    })
    .await;
    // Every message settled.
    cluster.wait_depth(&t.worker_queue("payment"), 0).await;

    let fallbacks = metric(&cluster, "payment", "choreo_batch_fallbacks_total{worker=\"payment\"}").await;
    assert_eq!(fallbacks, 0.0, "no batch went one by one: the refunds and the twice-charged order were left out of it");
    let batched = metric(&cluster, "payment", "choreo_batch_messages_sum{worker=\"payment\"}").await;
    assert!(batched >= 2.0, "charges waiting together were applied together ({batched} in batches)");
    cluster.shutdown().await;
}
