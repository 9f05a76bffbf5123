//! [`RetentionJob`]: deletes published outbox rows and old inbox rows, in batches so that no delete holds
//! locks or bloats WAL for long.
//!
//! The inbox must remember a message id for longer than any copy of that message can still arrive: the
//! longest broker retry delay plus the time a message may sit in a dead-letter queue before it is replayed.
//! The default (30 days) assumes dead letters are triaged within a few weeks; replaying a dead letter older
//! than the inbox retention could apply it twice (see runbooks/dead-letters.md).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::OutboxError;

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Published outbox rows older than this are deleted.
    pub outbox_retention: Duration,
    /// Inbox rows older than this are deleted.
    pub inbox_retention: Duration,
    /// Rows deleted per statement.
    pub batch_size: i64,
    /// Time between runs.
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            outbox_retention: Duration::from_secs(7 * 24 * 3600),
            inbox_retention: Duration::from_secs(30 * 24 * 3600),
            batch_size: 5_000,
            interval: Duration::from_secs(300),
        }
    }
}

/// Rows deleted by one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub outbox: u64,
    pub inbox: u64,
}

pub struct RetentionJob {
    db: PgPool,
    config: RetentionConfig,
}

impl RetentionJob {
    pub fn new(db: PgPool, config: RetentionConfig) -> Self {
        RetentionJob { db, config }
    }

    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            match self.run_once().await {
                Ok(d) if d.outbox + d.inbox > 0 => info!(outbox = d.outbox, inbox = d.inbox, "retention deleted rows"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "retention run failed; trying again next interval"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.interval) => {}
            }
        }
    }

    /// Delete everything past retention, batch by batch.
    pub async fn run_once(&self) -> Result<Deleted, OutboxError> {
        let mut deleted = Deleted::default();
        let outbox_secs = self.config.outbox_retention.as_secs_f64();
        loop {
            let n = sqlx::query(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                 WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1) \
                 ORDER BY published_at LIMIT $2)",
            )
            .bind(outbox_secs)
            .bind(self.config.batch_size)
            .execute(&self.db)
            .await
            .map_err(OutboxError::db("outbox retention"))?
            .rows_affected();
            deleted.outbox += n;
            if (n as i64) < self.config.batch_size {
                break;
            }
        }
        let inbox_secs = self.config.inbox_retention.as_secs_f64();
        loop {
            let n = sqlx::query(
                "DELETE FROM inbox WHERE (consumer, message_id) IN (SELECT consumer, message_id FROM inbox \
                 WHERE received_at < now() - make_interval(secs => $1) ORDER BY received_at LIMIT $2)",
            )
            .bind(inbox_secs)
            .bind(self.config.batch_size)
            .execute(&self.db)
            .await
            .map_err(OutboxError::db("inbox retention"))?
            .rows_affected();
            deleted.inbox += n;
            if (n as i64) < self.config.batch_size {
                break;
            }
        }
        // Restart counts matter while copies of the message may still arrive: as long as the inbox remembers.
        sqlx::query("DELETE FROM restarts WHERE last_at < now() - make_interval(secs => $1)")
            .bind(inbox_secs)
            .execute(&self.db)
            .await
            .map_err(OutboxError::db("restarts retention"))?;
        Ok(deleted)
    }
}
