//! [`InboxGuard`]: a message id processed once by a consumer is never processed again by it.

use choreo_messages::Metadata;
use sqlx::PgConnection;

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
}
