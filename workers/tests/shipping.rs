//! A fourth participant joins a running choreography: the shipping example, built on the `choreo` crate
//! alone, starts beside the running order, payment and inventory workers, with no change to them, and ships
//! every order confirmed from then on; what breaks its contract goes to its own dead-letter queue; its
//! metrics carry its name. Real binaries, real broker, real database.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use choreo_testkit::wait_for;
use common::Cluster;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

#[tokio::test]
async fn the_shipping_participant_joins_a_running_choreography_and_ships_every_confirmed_order() {
    let mut cluster = Cluster::start().await;
    let before = cluster.place(&common::mixed_orders(10)).await;
    cluster.wait_terminal(&before, DEADLINE).await;

    cluster.join("shipping").await;
    let ids = cluster.place(&common::mixed_orders(30)).await;
    cluster.wait_terminal(&ids, DEADLINE).await;
    cluster.assert_invariants().await;

    let confirmed: BTreeSet<Uuid> =
        sqlx::query_scalar("SELECT order_id FROM orders WHERE status = 'CONFIRMED' AND order_id = ANY($1)")
            .bind(&ids)
            .fetch_all(cluster.db("order"))
            .await
            .expect("confirmed orders")
            .into_iter()
            .collect();
    assert!(confirmed.len() >= 20, "the mixed orders confirm most: {}", confirmed.len());
    let shipping = cluster.db("shipping");
    wait_for("a shipment for every order confirmed since shipping joined", DEADLINE, || async {
        let shipped: BTreeSet<Uuid> = sqlx::query_scalar("SELECT order_id FROM shipments")
            .fetch_all(shipping)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        if confirmed.is_subset(&shipped) { Ok(()) } else { Err(format!("{} of {}", shipped.len(), confirmed.len())) }
    })
    .await;
    // Each shipment's event was published, one per shipment, caused by the order's confirmation.
    wait_for("every shipment.scheduled published", DEADLINE, || async {
        let (events, unpublished): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE message_type = 'shipment.scheduled'), \
             count(*) FILTER (WHERE published_at IS NULL) FROM outbox",
        )
        .fetch_one(shipping)
        .await
        .map_err(|e| e.to_string())?;
        let shipments: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments")
            .fetch_one(shipping)
            .await
            .map_err(|e| e.to_string())?;
        if events == shipments && unpublished == 0 {
            Ok(())
        } else {
            Err(format!("{events} events, {shipments} shipments, {unpublished} unpublished"))
        }
    })
    .await;
    let producers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT producer FROM outbox").fetch_all(shipping).await.expect("producers");
    assert_eq!(producers, ["shipping"]);
    let odd_carriers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shipments WHERE carrier NOT IN ('standard', 'express')")
            .fetch_one(shipping)
            .await
            .expect("carriers");
    assert_eq!(odd_carriers, 0);

    // What breaks shipping's contract goes to shipping's dead-letter queue, and the worker goes on.
    let mut headers = FieldTable::default();
    headers.insert("schema-version".into(), AMQPValue::LongLongInt(1));
    let properties = BasicProperties::default()
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_type("order.confirmed".into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    cluster.publish_raw("order.confirmed", properties, b"{\"order_id\": \"not a uuid\"}").await;
    let dlq = cluster.topology.dead_letter_queue("shipping");
    cluster.wait_depth(&dlq, 1).await;
    let more = cluster.place(&[common::order("cust-after-poison", &[("sku-001", 1, 500)])]).await;
    cluster.wait_terminal(&more, DEADLINE).await;
    wait_for("the order placed after the poison message shipped", DEADLINE, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments WHERE order_id = $1")
            .bind(more[0])
            .fetch_one(shipping)
            .await
            .map_err(|e| e.to_string())?;
        if n == 1 { Ok(()) } else { Err(format!("{n} shipments")) }
    })
    .await;

    // Its metrics carry its name, as the reference workers' carry theirs.
    let url = format!("http://127.0.0.1:{}/metrics", cluster.metrics_port("shipping").await);
    let text = reqwest::get(&url).await.expect("metrics").text().await.expect("metrics text");
    for needle in [
        "choreo_messages_consumed_total{",
        "worker=\"shipping\",type=\"order.confirmed\",outcome=\"processed\"",
        "choreo_messages_published_total{",
        "worker=\"shipping\",type=\"shipment.scheduled\",outcome=\"confirmed\"",
        "choreo_dead_lettered_total{",
    ] {
        assert!(text.contains(needle), "shipping's /metrics lacks {needle}");
    }
    cluster.shutdown().await;
}
