//! [`InboxGuard`]: a message id processed once by a consumer is never processed again by it.

use std::collections::HashSet;
use std::time::Duration;

use choreo_messages::{EncodedEnvelope, Metadata};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::OutboxError;
#[cfg(doc)]
use crate::OutboxStore;
use crate::store::{OutboxColumns, outbox_insert};

/// Records processed messages per consumer, inside the consumer's transaction.
#[derive(Debug, Clone)]
pub struct InboxGuard {
    consumer: String,
}

impl InboxGuard {
    pub fn new(consumer: impl Into<String>) -> Self {
        InboxGuard { consumer: consumer.into() }
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Record the messages of `handled` as processed and write the `events` they caused to the outbox, held
    /// out of sweeps for `hold` (see [`OutboxStore::enqueue_held`]): one statement, the last of the caller's
    /// transaction before its commit. Returns the ids recorded now. An id missing from them was processed
    /// before, or by a concurrent delivery that committed first (this statement waits for it): the caller
    /// must roll back, so that its changes and events are undone, and acknowledge that message with no
    /// effect.
    ///
    /// Recording at the end rather than first saves the transaction a round trip; the price is that a
    /// duplicate is seen only after the service applied it, which the rollback undoes (the service's contract
    /// already asks it to call out only idempotently).
    pub async fn record_handled(
        &self,
        tx: &mut PgConnection,
        handled: &[&Metadata],
        events: &[EncodedEnvelope],
        hold: Duration,
    ) -> Result<HashSet<Uuid>, OutboxError> {
        // Sorted: transactions that record overlapping ids lock them in the same order.
        let mut sorted: Vec<&Metadata> = handled.to_vec();
        sorted.sort_by_key(|m| m.message_id);
        sorted.dedup_by_key(|m| m.message_id);
        let ids: Vec<Uuid> = sorted.iter().map(|m| m.message_id).collect();
        let types: Vec<&str> = sorted.iter().map(|m| m.message_type.as_str()).collect();
        let correlations: Vec<Uuid> = sorted.iter().map(|m| m.correlation_id).collect();
        let causations: Vec<Option<Uuid>> = sorted.iter().map(|m| m.causation_id).collect();
        let rows = OutboxColumns::of(events)
            .bind(sqlx::query(concat!(
                "WITH events AS (",
                outbox_insert!(),
                ") INSERT INTO inbox (consumer, message_id, message_type, correlation_id, causation_id) \
                 SELECT $11, * FROM UNNEST($12::uuid[], $13::text[], $14::uuid[], $15::uuid[]) \
                 ON CONFLICT (consumer, message_id) DO NOTHING RETURNING message_id",
            )))
            .bind(hold.as_secs_f64())
            .bind(&self.consumer)
            .bind(ids)
            .bind(types)
            .bind(correlations)
            .bind(causations)
            .fetch_all(&mut *tx)
            .await
            .map_err(OutboxError::db("inbox and outbox insert"))?;
        rows.iter().map(|row| row.try_get::<Uuid, _>(0).map_err(OutboxError::db("inbox row"))).collect()
    }

    /// Whether the message of `meta` was recorded as processed. A handler whose service rejected a message
    /// asks this before dead-lettering it: a message processed before is acknowledged with no effect,
    /// whatever the service made of it again. If a copy of the message is being handled at the same moment,
    /// this waits for that transaction to end (it tries the copy's insert and rolls back), so that a copy
    /// that fails because another is committing is not taken for a failure. Records nothing.
    pub async fn processed(&self, db: &sqlx::PgPool, meta: &Metadata) -> Result<bool, OutboxError> {
        let mut tx = db.begin().await.map_err(OutboxError::db("inbox lookup"))?;
        let inserted = sqlx::query(
            "INSERT INTO inbox (consumer, message_id, message_type, correlation_id, causation_id) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, message_id) DO NOTHING",
        )
        .bind(&self.consumer)
        .bind(meta.message_id)
        .bind(&meta.message_type)
        .bind(meta.correlation_id)
        .bind(meta.causation_id)
        .execute(&mut *tx)
        .await
        .map_err(OutboxError::db("inbox lookup"))?
        .rows_affected();
        tx.rollback().await.map_err(OutboxError::db("inbox lookup"))?;
        Ok(inserted == 0)
    }

    /// Record, durably and before handling begins, that this consumer starts handling a redelivered message
    /// again; returns how many times it has. Runs in its own committed transaction: the count must survive the
    /// crash it is there to detect.
    pub async fn record_restart(&self, db: &sqlx::PgPool, meta: &Metadata) -> Result<u32, OutboxError> {
        let restarts: i32 = sqlx::query_scalar(
            "INSERT INTO restarts (consumer, message_id, restarts) VALUES ($1, $2, 1) \
             ON CONFLICT (consumer, message_id) DO UPDATE SET restarts = restarts.restarts + 1, last_at = now() \
             RETURNING restarts",
        )
        .bind(&self.consumer)
        .bind(meta.message_id)
        .fetch_one(db)
        .await
        .map_err(OutboxError::db("restart count"))?;
        Ok(u32::try_from(restarts).unwrap_or(0))
    }
}
