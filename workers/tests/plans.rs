//! Query plans of the hot statements on a real PostgreSQL: a batch costs lookups for its own rows, never a
//! scan of everything else waiting.

use std::str::FromStr;

use choreo::prepare_database;
use choreo_testkit::{Infra, unique_namespace};
use choreo_workers::order::{MIGRATIONS, settle_orders_sql};
use serde_json::Value;
use sqlx::Executor;
use sqlx::postgres::PgConnectOptions;

/// A scan of a table in an `EXPLAIN (FORMAT JSON)` plan.
#[derive(Debug)]
struct Scan {
    node: String,
    index: Option<String>,
    index_cond: Option<String>,
}

/// Every scan of `table` in a plan.
fn scans_of(plan: &Value, table: &str, found: &mut Vec<Scan>) {
    let text = |key: &str| plan.get(key).and_then(Value::as_str).map(str::to_owned);
    if text("Relation Name").as_deref() == Some(table) && text("Node Type").as_deref() != Some("ModifyTable") {
        found.push(Scan {
            node: text("Node Type").unwrap_or_default(),
            index: text("Index Name"),
            index_cond: text("Index Cond"),
        });
    }
    for child in plan.get("Plans").and_then(Value::as_array).into_iter().flatten() {
        scans_of(child, table, found);
    }
}

/// The settle statement of a batch finds its orders by primary key even when the statistics lag behind a
/// burst: they were gathered when no order was PENDING, and now 20,000 are. With an index on status, the
/// planner read all 20,000 through it for every batch.
#[tokio::test]
async fn settling_a_batch_finds_its_orders_by_primary_key_however_many_are_pending() {
    let infra = Infra::from_env();
    let name = format!("{}_order", unique_namespace());
    let options = PgConnectOptions::from_str(&infra.database(&name)).expect("url");
    let pool = prepare_database(&options, 2, &MIGRATIONS).await.expect("migrated order database");
    pool.execute(
        "INSERT INTO orders (order_id, correlation_id, customer_id, currency, total_cents, lines, status, placed_at) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'c', 'EUR', 100, '[]', 'CONFIRMED', now() \
         FROM generate_series(1, 20000)",
    )
    .await
    .expect("orders");
    // No autovacuum: an ANALYZE between the update and the EXPLAIN would take away the stale statistics.
    pool.execute("ALTER TABLE orders SET (autovacuum_enabled = off)").await.expect("autovacuum off");
    pool.execute("ANALYZE orders").await.expect("analyze");
    pool.execute("UPDATE orders SET status = 'PENDING'").await.expect("a burst arrives");

    let batch: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT order_id FROM orders ORDER BY order_id LIMIT 8")
        .fetch_all(&pool)
        .await
        .expect("a batch");
    let ids = batch.iter().map(uuid::Uuid::to_string).collect::<Vec<_>>().join(",");
    let mut conn = pool.acquire().await.expect("connection");
    conn.execute(sqlx::AssertSqlSafe(format!("PREPARE settle AS {}", settle_orders_sql()))).await.expect("prepare");
    // Both plans the server may use for a prepared statement: one made for the values of each execution, and
    // the generic one it switches to after five executions when that costs no more.
    for mode in ["force_custom_plan", "force_generic_plan"] {
        conn.execute(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {mode}"))).await.expect("plan mode");
        let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE settle('{{{ids}}}'::uuid[], \
                 array_fill('CONFIRMED'::text, ARRAY[8]), array_fill(NULL::text, ARRAY[8]), \
                 array_fill(gen_random_uuid(), ARRAY[8]), array_fill('inventory.reserved'::text, ARRAY[8]))"
        )))
        .fetch_one(&mut *conn)
        .await
        .expect("explain");
        let mut scans = Vec::new();
        scans_of(&plan[0]["Plan"], "orders", &mut scans);
        assert!(!scans.is_empty(), "{mode}: the plan reads orders somewhere: {plan:#}");
        for scan in &scans {
            // A lookup per order of the batch: the primary key, searched for the batch's own ids (not a walk
            // over the whole index under a merge join).
            let by_batch_id = scan.index_cond.as_deref().is_some_and(|c| c.contains("order_id = t.order_id"));
            assert!(
                scan.node.starts_with("Index") && scan.index.as_deref() == Some("orders_pkey") && by_batch_id,
                "{mode}: orders are read by {scan:?}, not by primary-key lookups: {plan:#}"
            );
        }
    }
    drop(conn);
    pool.close().await;
    infra.drop_databases(&[name]).await;
}
