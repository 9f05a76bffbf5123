//! Query plans of the hot statements on a real PostgreSQL: a batch costs lookups for its own rows, never a
//! scan of everything else waiting.

use std::str::FromStr;

use choreo_testkit::{Infra, unique_namespace};
use choreo_workers::order::{MIGRATIONS, SETTLE_ORDERS_SQL};
use choreo_workers::runtime::prepare_database;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::Executor;

/// Every scan of `table` in an `EXPLAIN (FORMAT JSON)` plan, as (node type, index name).
fn scans_of(plan: &Value, table: &str, found: &mut Vec<(String, Option<String>)>) {
    if plan.get("Relation Name").and_then(Value::as_str) == Some(table) && plan.get("Node Type").and_then(Value::as_str) != Some("ModifyTable") {
        let node = plan["Node Type"].as_str().unwrap_or_default().to_owned();
        found.push((node, plan.get("Index Name").and_then(Value::as_str).map(str::to_owned)));
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
    pool.execute("ANALYZE orders").await.expect("analyze");
    pool.execute("UPDATE orders SET status = 'PENDING'").await.expect("a burst arrives");

    let batch: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT order_id FROM orders ORDER BY order_id LIMIT 8")
        .fetch_all(&pool)
        .await
        .expect("a batch");
    let ids = batch.iter().map(uuid::Uuid::to_string).collect::<Vec<_>>().join(",");
    let mut conn = pool.acquire().await.expect("connection");
    conn.execute(sqlx::AssertSqlSafe(format!("PREPARE settle AS {SETTLE_ORDERS_SQL}"))).await.expect("prepare");
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
        for (node, index) in &scans {
            assert!(
                node.starts_with("Index") && index.as_deref() == Some("orders_pkey"),
                "{mode}: orders are read by {node} {index:?}, not by primary key: {plan:#}"
            );
        }
    }
    drop(conn);
    pool.close().await;
    infra.drop_databases(&[name]).await;
}
