//! [`InboxGuard`]: a message id processed once by a consumer is never processed again by it.

use std::collections::HashSet;
use std::time::Duration;

use choreo_messages::{EncodedEnvelope, Metadata};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

#[cfg(doc)]
use crate::OutboxStore;
use crate::change::Change;
use crate::store::OutboxColumns;
use crate::{CommitError, OutboxError};

/// Records processed messages per consumer, in the statement that commits the consumer's change.
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

    /// Commit a handler's work in one statement sent outside any transaction: `change` (the service's
    /// change to its own tables), the ids of `handled` in the inbox and `events` in the outbox, held out of
    /// sweeps for `hold` (see [`OutboxStore::enqueue_held`]). An event with a key is written only if
    /// `change` applied that key (see [`Change::applied`]). Returns the keys applied.
    ///
    /// One statement is one transaction: everything commits, with one round trip and one flush, or nothing
    /// does. If an id of `handled` is in the inbox already (processed before, or by a concurrent copy that
    /// committed first: the insert waits for it), nothing is written and the error usually says
    /// [`CommitError::ProcessedBefore`]. PostgreSQL does not specify the order in which it runs the
    /// statement's parts, so a copy may fail on the change first instead ([`CommitError::Conflict`] on the
    /// first copy's rows, or [`CommitError::Stale`]); a caller that checks the inbox on a conflict and
    /// decides again when stale still ends with the duplicate.
    ///
    /// Events under a key need a change that names the keys it applied: without, they could never be
    /// written, and the error says [`CommitError::UnappliedKeys`] before anything is sent.
    pub async fn commit(
        &self,
        conn: &mut PgConnection,
        change: Change,
        handled: &[&Metadata],
        events: &[(EncodedEnvelope, Option<Uuid>)],
        hold: Duration,
    ) -> Result<HashSet<Uuid>, CommitError> {
        if !change.names_applied_keys() && events.iter().any(|(_, key)| key.is_some()) {
            return Err(CommitError::UnappliedKeys);
        }
        // Sorted: statements that record overlapping ids lock them in the same order.
        let mut sorted: Vec<&Metadata> = handled.to_vec();
        sorted.sort_by_key(|m| m.message_id);
        sorted.dedup_by_key(|m| m.message_id);
        let ids: Vec<Uuid> = sorted.iter().map(|m| m.message_id).collect();
        let types: Vec<&str> = sorted.iter().map(|m| m.message_type.as_str()).collect();
        let correlations: Vec<Uuid> = sorted.iter().map(|m| m.correlation_id).collect();
        let causations: Vec<Option<Uuid>> = sorted.iter().map(|m| m.causation_id).collect();
        let keys: Vec<Option<Uuid>> = events.iter().map(|(_, key)| *key).collect();

        let mut sql = change.into_builder();
        sql.push(", events AS (");
        OutboxColumns::of(events.iter().map(|(e, _)| e)).push_insert(&mut sql, hold, Some(keys));
        sql.push(
            " WHERE e.key IS NULL OR e.key IN (SELECT key FROM applied)), \
             handled AS (INSERT INTO inbox (consumer, message_id, message_type, correlation_id, causation_id) SELECT ",
        )
        .push_bind(&self.consumer)
        .push(", * FROM UNNEST(")
        .push_bind(ids)
        .push("::uuid[], ")
        .push_bind(types)
        .push("::text[], ")
        .push_bind(correlations)
        .push("::uuid[], ")
        .push_bind(causations)
        .push("::uuid[])) SELECT key FROM applied WHERE key IS NOT NULL");
        let rows = sql.build().fetch_all(&mut *conn).await.map_err(CommitError::of)?;
        rows.iter()
            .map(|row| row.try_get::<Uuid, _>(0).map_err(|e| CommitError::Database(OutboxError::db("applied key")(e))))
            .collect()
    }

    /// Record in the caller's transaction that this consumer processes the message of `meta`: `true` if it
    /// was not recorded before, `false` for a message processed before (a redelivery, a re-publish, a
    /// replay), whose transaction should then be rolled back. A copy being handled at the same moment holds
    /// the row: this waits for its transaction, then answers `false` if it committed.
    pub async fn record(&self, tx: &mut PgConnection, meta: &Metadata) -> Result<bool, OutboxError> {
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
        .map_err(OutboxError::db("inbox insert"))?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Whether the message of `meta` was recorded as processed. A handler whose service rejected a message
    /// asks this before dead-lettering it: a message processed before is acknowledged with no effect,
    /// whatever the service made of it again. If a copy of the message is being handled at the same moment,
    /// this waits for that transaction to end (it tries the copy's insert and rolls back), so that a copy
    /// that fails because another is committing is not taken for a failure. Records nothing.
    pub async fn processed(&self, db: &sqlx::PgPool, meta: &Metadata) -> Result<bool, OutboxError> {
        let mut tx = db.begin().await.map_err(OutboxError::db("inbox lookup"))?;
        let recorded = self.record(&mut tx, meta).await?;
        tx.rollback().await.map_err(OutboxError::db("inbox lookup"))?;
        Ok(!recorded)
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
