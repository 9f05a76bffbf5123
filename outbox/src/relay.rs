//! [`OutboxRelay`]: publishes committed outbox rows and marks them only after the broker confirmed them.
//!
//! One cycle: begin; claim a batch with `FOR UPDATE SKIP LOCKED`; publish it pipelined with confirms; mark
//! the confirmed rows published and record the failures; commit. If the process dies between publish and
//! commit, the row locks vanish with the connection and the rows are published again (at least once);
//! consumers deduplicate on the message id. Several relays may run against one database: each claims rows
//! the others do not hold. Claiming never uses a cursor over ids, which would skip rows whose transactions
//! commit out of id order.
//!
//! The relay wakes at once when its own process commits rows ([`OutboxWaker`]) and sweeps every
//! `sweep_interval` for rows committed by other processes or left by crashed ones. LISTEN/NOTIFY is not used:
//! it takes a server-wide lock at commit and loses notifications while the listener is disconnected.

use std::sync::Arc;
use std::time::Duration;

use choreo_rabbitmq::ConfirmingPublisher;
use choreo_rabbitmq::publisher::Outgoing;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::OutboxRow;
use crate::{OutboxError, OutboxStore};

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Name of the worker this relay belongs to (metrics label).
    pub worker: String,
    /// Rows claimed and published per cycle.
    pub batch_size: i64,
    /// Longest wait between cycles when nothing wakes the relay.
    pub sweep_interval: Duration,
    /// First delay before a failed row is tried again (doubles per attempt, capped at a minute).
    pub failure_retry_after: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            worker: "unknown".to_owned(),
            batch_size: 256,
            sweep_interval: Duration::from_millis(500),
            failure_retry_after: Duration::from_millis(500),
        }
    }
}

/// Wakes the relay of this process after a commit that wrote outbox rows.
#[derive(Debug, Clone, Default)]
pub struct OutboxWaker(Arc<Notify>);

impl OutboxWaker {
    pub fn wake(&self) {
        // A permit is stored when the relay is busy, so no wake-up is lost.
        self.0.notify_one();
    }
}

/// What one cycle did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleReport {
    pub claimed: usize,
    pub published: usize,
    pub failed: usize,
}

pub struct OutboxRelay {
    db: PgPool,
    publisher: Arc<ConfirmingPublisher>,
    exchange: String,
    config: RelayConfig,
    waker: OutboxWaker,
}

impl OutboxRelay {
    pub fn new(db: PgPool, publisher: Arc<ConfirmingPublisher>, exchange: String, config: RelayConfig) -> Self {
        OutboxRelay { db, publisher, exchange, config, waker: OutboxWaker::default() }
    }

    pub fn waker(&self) -> OutboxWaker {
        self.waker.clone()
    }

    /// Publish until `shutdown` fires, then make a last pass so that rows committed by handlers that just
    /// drained are not left for the next start.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let report = self.cycle().await;
            let full = matches!(report, Ok(r) if r.claimed as i64 >= self.config.batch_size);
            match report {
                Ok(r) => {
                    failures = 0;
                    if r.claimed > 0 {
                        debug!(claimed = r.claimed, published = r.published, failed = r.failed, "relay cycle");
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    warn!(error = %e, consecutive_failures = failures, "relay cycle failed; retrying");
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if full {
                continue;
            }
            let pause = if failures > 0 {
                self.config.sweep_interval.saturating_mul(failures.min(10))
            } else {
                self.config.sweep_interval
            };
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = self.waker.0.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        self.drain().await;
    }

    async fn drain(&self) {
        for _ in 0..100 {
            match self.cycle().await {
                Ok(r) if r.claimed > 0 && r.failed == 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!(error = %e, "final relay pass failed; rows stay in the outbox for the next start");
                    break;
                }
            }
        }
        info!("outbox relay stopped");
    }

    /// One claim-publish-mark cycle in one transaction.
    pub async fn cycle(&self) -> Result<CycleReport, OutboxError> {
        // Marking rows published needs no flush to disk before we go on: if the server loses this commit,
        // the rows are published again and consumers deduplicate them. It saves a WAL flush per cycle, and
        // saying so with BEGIN costs no round trip.
        let mut tx = self
            .db
            .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
            .await
            .map_err(OutboxError::db("begin"))?;
        let rows = OutboxStore::claim_batch(&mut tx, self.config.batch_size).await?;
        if rows.is_empty() {
            tx.commit().await.map_err(OutboxError::db("commit"))?;
            return Ok(CycleReport::default());
        }
        let started = std::time::Instant::now();
        let results = self.publish(&rows).await;
        metrics::histogram!("choreo_relay_publish_duration_seconds", "worker" => self.config.worker.clone())
            .record(started.elapsed().as_secs_f64());
        let mut published = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        let mut failed_flags = Vec::with_capacity(rows.len());
        for (row, result) in rows.iter().zip(results) {
            failed_flags.push(result.is_err());
            match result {
                Ok(()) => published.push(row.id),
                Err(e) => {
                    warn!(outbox_id = row.id, message_id = %row.envelope.meta.message_id,
                        correlation_id = %row.envelope.meta.correlation_id, attempts = row.publish_attempts + 1,
                        error = %e, "publish failed; the row will be retried");
                    failed.push((row.id, e));
                }
            }
        }
        OutboxStore::mark_published(&mut tx, &published).await?;
        let retry_ms = i64::try_from(self.config.failure_retry_after.as_millis()).unwrap_or(i64::MAX);
        OutboxStore::record_failures(&mut tx, &failed, retry_ms).await?;
        tx.commit().await.map_err(OutboxError::db("commit"))?;
        for (row, result) in rows.iter().zip(&failed_flags) {
            let outcome = if *result { "failed" } else { "confirmed" };
            metrics::counter!("choreo_messages_published_total", "worker" => self.config.worker.clone(),
                "type" => choreo_messages::MessageType::label_for(&row.envelope.meta.message_type), "outcome" => outcome)
            .increment(1);
        }
        Ok(CycleReport { claimed: rows.len(), published: published.len(), failed: failed.len() })
    }

    /// Publish claimed rows with confirms; one result per row, in order. Marks nothing.
    pub async fn publish(&self, rows: &[OutboxRow]) -> Vec<Result<(), String>> {
        let outgoing: Vec<Outgoing<'_>> =
            rows.iter().map(|row| Outgoing::envelope(&self.exchange, &row.envelope)).collect();
        self.publisher
            .publish_batch(&outgoing)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }
}

