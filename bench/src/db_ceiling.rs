//! The database's ceiling for one saga step: the transaction every handler runs (a state update, the inbox
//! insert and the outbox insert in one statement, which is its own transaction), on a pool set up as the
//! workers' is, at the workers' concurrency, with full durability.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use choreo_messages::payloads::OrderConfirmed;
use choreo_messages::{Envelope, Message};
use choreo_outbox::{Change, InboxGuard};
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Executor, PgPool};

#[derive(Debug, Clone, Serialize)]
pub struct DbCeiling {
    pub concurrency: usize,
    pub transactions: u64,
    pub seconds: f64,
    pub transactions_per_second: f64,
}

pub async fn measure(server_url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<DbCeiling> {
    let name = format!("bench_ceiling_{}", uuid::Uuid::new_v4().simple());
    let admin = PgPool::connect_with(PgConnectOptions::from_str(server_url)?).await?;
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).await?;
    let db = choreo_outbox::hot_path_pool_options()
        .max_connections(concurrency as u32)
        .connect_with(PgConnectOptions::from_str(server_url)?.database(&name))
        .await?;
    choreo_outbox::migrations::OUTBOX_MIGRATOR.run(&db).await?;
    db.execute("CREATE TABLE state (id INT PRIMARY KEY, version BIGINT NOT NULL)").await?;
    db.execute("INSERT INTO state SELECT g, 0 FROM generate_series(1, 10000) g").await?;

    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let db = db.clone();
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            let inbox = InboxGuard::new("bench");
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let order_id = uuid::Uuid::now_v7();
                let incoming = Envelope::new_command(
                    Message::OrderConfirmed(OrderConfirmed { order_id, total_cents: 100, currency: "EUR".into() }),
                    "bench",
                    None,
                );
                let outgoing = Envelope::caused_by(&incoming.meta, incoming.message.clone(), "bench").encode();
                let mut change = Change::new();
                change.cte("stepped", |q| {
                    q.push("UPDATE state SET version = version + 1 WHERE id = ")
                        .push_bind(((worker as u64 * 7919 + i * 104_729) % 10_000 + 1) as i32);
                });
                let mut conn = db.acquire().await?;
                inbox.commit(&mut conn, change, &[&incoming.meta], &[(outgoing, None)], Duration::ZERO).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let transactions = done.load(Ordering::Relaxed);
    db.close().await;
    admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))).await?;
    Ok(DbCeiling { concurrency, transactions, seconds, transactions_per_second: transactions as f64 / seconds })
}
