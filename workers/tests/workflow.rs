//! The reference workflow end to end, on the real broker and database, with the real worker binaries.

mod common;

use std::time::Duration;

use common::{Cluster, mixed_orders, order};
use sqlx::Row;

const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn happy_path_confirms_charges_and_reserves() {
    let cluster = Cluster::start().await;
    let o = order("cust-1", &[("sku-001", 2, 1250), ("sku-002", 1, 99)]);
    let ids = cluster.place(std::slice::from_ref(&o)).await;
    cluster.wait_terminal(&ids, DEADLINE).await;

    assert_eq!(cluster.status(o.order_id).await, ("CONFIRMED".into(), None));
    let payment = sqlx::query("SELECT status, amount_cents FROM payments WHERE order_id = $1")
        .bind(o.order_id)
        .fetch_one(cluster.db("payment"))
        .await
        .expect("payment");
    assert_eq!(payment.get::<String, _>("status"), "CHARGED");
    assert_eq!(payment.get::<i64, _>("amount_cents"), 2 * 1250 + 99);
    let reserved: Vec<(String, i64)> =
        sqlx::query_as("SELECT sku, quantity FROM reservations WHERE order_id = $1 ORDER BY sku")
            .bind(o.order_id)
            .fetch_all(cluster.db("inventory"))
            .await
            .expect("reservations");
    assert_eq!(reserved, vec![("sku-001".into(), 2), ("sku-002".into(), 1)]);
    let history: Vec<String> = sqlx::query_scalar("SELECT status FROM order_history WHERE order_id = $1 ORDER BY id")
        .bind(o.order_id)
        .fetch_all(cluster.db("order"))
        .await
        .expect("history");
    assert_eq!(history, vec!["PENDING", "CONFIRMED"]);
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn declined_payment_cancels_without_charge_or_reservation() {
    let cluster = Cluster::start().await;
    let o = order("decline-42", &[("sku-001", 1, 500)]);
    cluster.place(std::slice::from_ref(&o)).await;
    cluster.wait_terminal(&[o.order_id], DEADLINE).await;

    assert_eq!(cluster.status(o.order_id).await, ("CANCELLED".into(), Some("card_declined".into())));
    let status: String = sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1")
        .bind(o.order_id)
        .fetch_one(cluster.db("payment"))
        .await
        .expect("payment row");
    assert_eq!(status, "DECLINED");
    let reserved: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(cluster.db("inventory"))
        .await
        .expect("reservations");
    assert_eq!(reserved, 0);
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn out_of_stock_refunds_the_charge_and_cancels() {
    let cluster = Cluster::start().await;
    let o = order("cust-9", &[("sku-003", 1, 700), ("sku-soldout", 1, 100)]);
    cluster.place(std::slice::from_ref(&o)).await;
    cluster.wait_terminal(&[o.order_id], DEADLINE).await;

    assert_eq!(cluster.status(o.order_id).await, ("CANCELLED".into(), Some("out_of_stock".into())));
    let row = sqlx::query("SELECT status, refunded_at IS NOT NULL AS refunded FROM payments WHERE order_id = $1")
        .bind(o.order_id)
        .fetch_one(cluster.db("payment"))
        .await
        .expect("payment");
    assert_eq!(row.get::<String, _>("status"), "REFUNDED");
    assert!(row.get::<bool, _>("refunded"));
    let (available, reserved): (i64, i64) =
        sqlx::query_as("SELECT available, reserved FROM stock WHERE sku = 'sku-003'")
            .fetch_one(cluster.db("inventory"))
            .await
            .expect("stock");
    assert_eq!((available, reserved), (1_000_000, 0), "all or nothing: no line was reserved");
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn invariants_hold_after_several_hundred_mixed_orders() {
    let cluster = Cluster::start().await;
    let orders = mixed_orders(400);
    let ids = cluster.place(&orders).await;
    cluster.wait_terminal(&ids, DEADLINE).await;
    cluster.assert_invariants().await;
    let (confirmed, cancelled): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status='CONFIRMED'), count(*) FILTER (WHERE status='CANCELLED') FROM orders",
    )
    .fetch_one(cluster.db("order"))
    .await
    .expect("counts");
    assert_eq!((confirmed, cancelled), (320, 80), "the mix decides the outcomes");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_worker_killed_mid_flight_loses_nothing_and_charges_nobody_twice() {
    let mut cluster = Cluster::start().await;
    let orders = mixed_orders(300);
    let ids = cluster.place(&orders).await;
    // Kill payment while messages are in flight: some charged, some not yet.
    let payment_db = cluster.db("payment").clone();
    choreo_testkit::wait_for("some payments", DEADLINE, || {
        let db = payment_db.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.map_err(|e| e.to_string())?;
            if n >= 20 { Ok(()) } else { Err(format!("{n} payments")) }
        }
    })
    .await;
    cluster.kill("payment").await;
    cluster.kill("inventory").await;
    cluster.spawn("payment");
    cluster.spawn("inventory");
    cluster.wait_terminal(&ids, DEADLINE).await;
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}

/// Settings that conflict are reported, all of them, before the worker touches the database or the broker
/// (both unreachable here: their errors must not hide the settings').
#[tokio::test]
async fn a_worker_with_conflicting_settings_names_them_all_and_does_not_start() {
    let closed = choreo_testkit::free_port();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-worker"))
        .env("AMQP_URL", format!("amqp://guest:guest@127.0.0.1:{closed}/%2f"))
        .env("DATABASE_URL", format!("postgres://choreo:choreo@127.0.0.1:{closed}/postgres"))
        .env("CHOREO_INBOX_RETENTION", "30s")
        .env("CHOREO_RELAY_SWEEP", "0s")
        .env("CHOREO_METRICS_ADDR", "127.0.0.1:0")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await.expect("exits at once").expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("invalid settings"), "{stderr}");
    assert!(stderr.contains("CHOREO_INBOX_RETENTION") && stderr.contains("CHOREO_RELAY_SWEEP"), "{stderr}");
    let prefetch = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-worker"))
        .env("CHOREO_PREFETCH", "0")
        .output()
        .await
        .expect("runs");
    let stderr = String::from_utf8_lossy(&prefetch.stderr);
    assert!(!prefetch.status.success() && stderr.contains("--prefetch"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let mut cluster = Cluster::start().await;
    let orders = mixed_orders(100);
    let ids = cluster.place(&orders).await;
    let status = cluster.terminate("order").await;
    assert!(status.success(), "order-worker exits 0 after SIGTERM, got {status}");
    cluster.spawn("order");
    cluster.wait_terminal(&ids, DEADLINE).await;
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}
