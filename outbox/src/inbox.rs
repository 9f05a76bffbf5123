//! [`InboxGuard`]: a message id processed once by a consumer is never processed again by it.

use std::collections::HashSet;

use choreo_messages::Metadata;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::OutboxError;

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

    /// Record `meta` as processed in the caller's transaction. Returns `false` when the message was processed
    /// before: the caller must then change nothing and acknowledge. A concurrent delivery of the same id
    /// waits on the row lock and then sees `false`.
    pub async fn first_delivery(&self, tx: &mut PgConnection, meta: &Metadata) -> Result<bool, OutboxError> {
        let result = sqlx::query(
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
        .map_err(OutboxError::db("inbox insert"))?;
        Ok(result.rows_affected() == 1)
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

    /// [`InboxGuard::first_delivery`] for several messages in one statement: the ids recorded now, i.e. the
    /// messages never processed before. Rows are written in id order, so that two transactions holding the
    /// same ids cannot deadlock on them.
    pub async fn first_deliveries(&self, tx: &mut PgConnection, metas: &[&Metadata]) -> Result<HashSet<Uuid>, OutboxError> {
        let mut sorted: Vec<&Metadata> = metas.to_vec();
        sorted.sort_by_key(|m| m.message_id);
        sorted.dedup_by_key(|m| m.message_id);
        let ids: Vec<Uuid> = sorted.iter().map(|m| m.message_id).collect();
        let types: Vec<&str> = sorted.iter().map(|m| m.message_type.as_str()).collect();
        let correlations: Vec<Uuid> = sorted.iter().map(|m| m.correlation_id).collect();
        let causations: Vec<Option<Uuid>> = sorted.iter().map(|m| m.causation_id).collect();
        let fresh: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO inbox (consumer, message_id, message_type, correlation_id, causation_id) \
             SELECT $1, * FROM UNNEST($2::uuid[], $3::text[], $4::uuid[], $5::uuid[]) \
             ON CONFLICT (consumer, message_id) DO NOTHING RETURNING message_id",
        )
        .bind(&self.consumer)
        .bind(ids)
        .bind(types)
        .bind(correlations)
        .bind(causations)
        .fetch_all(&mut *tx)
        .await
        .map_err(OutboxError::db("inbox insert"))?;
        Ok(fresh.into_iter().collect())
    }
}
