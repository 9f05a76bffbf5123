//! [`OutboxStore`]: the outbox table's operations. Handlers write their events with
//! [`crate::InboxGuard::commit`], in the one statement that commits their change; [`OutboxStore::enqueue`]
//! and [`OutboxStore::enqueue_held`] serve code that writes events in a transaction of its own. The rest
//! claims, marks and inspects rows for the relay and for `choreoctl`.

use std::time::Duration;

use choreo_messages::{EncodedEnvelope, Metadata};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::OutboxError;

/// A claimed, unpublished row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub envelope: EncodedEnvelope,
    pub publish_attempts: i32,
}

/// Unpublished rows and the age of the oldest, for dashboards and `choreoctl outbox status`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub unpublished: i64,
    pub oldest_age_seconds: f64,
}

pub struct OutboxStore;

impl OutboxStore {
    /// Write `envelopes` in the caller's transaction, in one round trip, for the next sweep of any relay. For
    /// code that writes events in a transaction of its own; handlers use [`crate::InboxGuard::commit`].
    pub async fn enqueue(tx: &mut PgConnection, envelopes: &[EncodedEnvelope]) -> Result<(), OutboxError> {
        Self::enqueue_held(tx, envelopes, Duration::ZERO).await
    }

    /// Write `envelopes` in the caller's transaction, in one round trip, out of sweeps for `hold`: the caller
    /// hands them to its relay once committed (see [`crate::OutboxHandoff`]). For code that writes events in
    /// a transaction of its own; [`crate::InboxGuard::commit`] writes a handler's events held the same way.
    pub async fn enqueue_held(
        tx: &mut PgConnection,
        envelopes: &[EncodedEnvelope],
        hold: Duration,
    ) -> Result<(), OutboxError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        let mut sql = QueryBuilder::new("");
        OutboxColumns::of(envelopes).push_insert(&mut sql, hold, None);
        sql.build().execute(&mut *tx).await.map_err(OutboxError::db("outbox insert"))?;
        Ok(())
    }

    /// Lock up to `limit` publishable rows, oldest first, skipping rows another relay holds. The locks last
    /// until the caller's transaction ends: if the caller dies, the rows are free again.
    pub async fn claim_batch(tx: &mut PgConnection, limit: i64) -> Result<Vec<OutboxRow>, OutboxError> {
        let rows = sqlx::query(
            "SELECT id, message_id, message_type, schema_version, correlation_id, causation_id, producer, \
                    occurred_at, traceparent, body, publish_attempts \
             FROM outbox \
             WHERE published_at IS NULL AND available_at <= clock_timestamp() \
             ORDER BY id \
             LIMIT $1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(OutboxError::db("outbox claim"))?;
        rows.into_iter()
            .map(|row| {
                let id: i64 = row.try_get("id").map_err(OutboxError::db("outbox row"))?;
                let version: i32 = row.try_get("schema_version").map_err(OutboxError::db("outbox row"))?;
                let meta = Metadata {
                    message_id: row.try_get("message_id").map_err(OutboxError::db("outbox row"))?,
                    message_type: row.try_get("message_type").map_err(OutboxError::db("outbox row"))?,
                    schema_version: u32::try_from(version)
                        .map_err(|_| OutboxError::CorruptRow { id, reason: format!("schema version {version}") })?,
                    correlation_id: row.try_get("correlation_id").map_err(OutboxError::db("outbox row"))?,
                    causation_id: row.try_get("causation_id").map_err(OutboxError::db("outbox row"))?,
                    producer: row.try_get("producer").map_err(OutboxError::db("outbox row"))?,
                    occurred_at: row.try_get("occurred_at").map_err(OutboxError::db("outbox row"))?,
                    traceparent: row.try_get("traceparent").map_err(OutboxError::db("outbox row"))?,
                };
                Ok(OutboxRow {
                    id,
                    envelope: EncodedEnvelope {
                        meta,
                        body: row.try_get("body").map_err(OutboxError::db("outbox row"))?,
                    },
                    publish_attempts: row.try_get("publish_attempts").map_err(OutboxError::db("outbox row"))?,
                })
            })
            .collect()
    }

    /// Mark rows published. Call only after the broker confirmed them.
    pub async fn mark_published(tx: &mut PgConnection, ids: &[i64]) -> Result<(), OutboxError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut *tx)
            .await
            .map_err(OutboxError::db("outbox mark published"))?;
        Ok(())
    }

    /// Mark rows published by message id, outside any transaction of the caller. Call only after the broker
    /// confirmed them.
    pub async fn mark_published_by_message_id(db: &PgPool, message_ids: &[Uuid]) -> Result<(), OutboxError> {
        if message_ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE outbox SET published_at = now() WHERE message_id = ANY($1) AND published_at IS NULL")
            .bind(message_ids)
            .execute(db)
            .await
            .map_err(OutboxError::db("outbox mark published"))?;
        Ok(())
    }

    /// Make held rows claimable by sweeps now (their hand-off could not be made).
    pub async fn release_held(db: &PgPool, message_ids: &[Uuid]) -> Result<(), OutboxError> {
        sqlx::query("UPDATE outbox SET available_at = now() WHERE message_id = ANY($1) AND published_at IS NULL")
            .bind(message_ids)
            .execute(db)
            .await
            .map_err(OutboxError::db("outbox release held"))?;
        Ok(())
    }

    /// Record failed publishes; each row waits `retry_after_ms` (doubling with attempts, at most a minute).
    /// The exponent is capped: 2^attempts overflows a float past about 1,000 attempts (a queue missing for a
    /// day), and the error would fail the sweep that also marks the rows the broker confirmed.
    pub async fn record_failures(
        tx: &mut PgConnection,
        failures: &[(i64, String)],
        retry_after_ms: i64,
    ) -> Result<(), OutboxError> {
        if failures.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = failures.iter().map(|(id, _)| *id).collect();
        let errors: Vec<String> = failures.iter().map(|(_, e)| e.chars().take(1000).collect()).collect();
        sqlx::query(
            "UPDATE outbox o SET publish_attempts = o.publish_attempts + 1, last_error = f.error, \
                 available_at = now() + make_interval(secs => LEAST(60.0, $3::float8 / 1000.0 * power(2, LEAST(o.publish_attempts, 16)))) \
             FROM UNNEST($1::bigint[], $2::text[]) AS f(id, error) WHERE o.id = f.id",
        )
        .bind(ids)
        .bind(errors)
        .bind(retry_after_ms as f64)
        .execute(&mut *tx)
        .await
        .map_err(OutboxError::db("outbox record failures"))?;
        Ok(())
    }

    /// How far behind publishing is.
    pub async fn backlog(pool: &PgPool) -> Result<Backlog, OutboxError> {
        // The age on the database's clock, which wrote `created_at`: a skew between this host's clock and the
        // database's must not show as a backlog.
        let row = sqlx::query(
            "SELECT count(*) AS n, \
                    COALESCE(GREATEST(0, extract(epoch FROM now() - min(created_at))), 0)::float8 AS oldest_age \
             FROM outbox WHERE published_at IS NULL",
        )
        .fetch_one(pool)
        .await
        .map_err(OutboxError::db("outbox backlog"))?;
        let unpublished: i64 = row.try_get("n").map_err(OutboxError::db("outbox backlog"))?;
        let oldest_age_seconds: f64 = row.try_get("oldest_age").map_err(OutboxError::db("outbox backlog"))?;
        Ok(Backlog { unpublished, oldest_age_seconds })
    }
}

/// The outbox columns of a set of envelopes, as arrays for one `UNNEST` insert.
/// Borrowed from the envelopes: nothing is copied.
pub(crate) struct OutboxColumns<'a> {
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    versions: Vec<i32>,
    correlations: Vec<Uuid>,
    causations: Vec<Option<Uuid>>,
    producers: Vec<&'a str>,
    occurred: Vec<DateTime<Utc>>,
    traceparents: Vec<Option<&'a str>>,
    bodies: Vec<&'a [u8]>,
}

impl<'a> OutboxColumns<'a> {
    pub(crate) fn of(envelopes: impl IntoIterator<Item = &'a EncodedEnvelope>) -> Self {
        let envelopes = envelopes.into_iter();
        let n = envelopes.size_hint().0;
        let mut c = OutboxColumns {
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            correlations: Vec::with_capacity(n),
            causations: Vec::with_capacity(n),
            producers: Vec::with_capacity(n),
            occurred: Vec::with_capacity(n),
            traceparents: Vec::with_capacity(n),
            bodies: Vec::with_capacity(n),
        };
        for e in envelopes {
            let m = &e.meta;
            c.ids.push(m.message_id);
            c.types.push(&m.message_type);
            c.versions.push(i32::try_from(m.schema_version).unwrap_or(i32::MAX));
            c.correlations.push(m.correlation_id);
            c.causations.push(m.causation_id);
            c.producers.push(&m.producer);
            c.occurred.push(m.occurred_at);
            c.traceparents.push(m.traceparent.as_deref());
            c.bodies.push(&e.body);
        }
        c
    }

    /// Push the insert of these envelopes into the outbox, held out of sweeps for `hold`, as
    /// `INSERT INTO outbox (…) SELECT … FROM UNNEST(…) AS e(…)`. With `keys` (one per envelope), the rows
    /// also carry `e.key`, for the caller to filter on with a `WHERE` it pushes next.
    pub(crate) fn push_insert(self, sql: &mut QueryBuilder<Postgres>, hold: Duration, keys: Option<Vec<Option<Uuid>>>) {
        const COLUMNS: &str = "message_id, message_type, schema_version, correlation_id, causation_id, producer, \
                               occurred_at, traceparent, body";
        sql.push(format_args!("INSERT INTO outbox ({COLUMNS}, available_at) SELECT {COLUMNS}, "))
            .push("clock_timestamp() + make_interval(secs => ")
            .push_bind(hold.as_secs_f64())
            .push(") FROM UNNEST(")
            .push_bind(self.ids)
            .push("::uuid[], ")
            .push_bind(self.types)
            .push("::text[], ")
            .push_bind(self.versions)
            .push("::int[], ")
            .push_bind(self.correlations)
            .push("::uuid[], ")
            .push_bind(self.causations)
            .push("::uuid[], ")
            .push_bind(self.producers)
            .push("::text[], ")
            .push_bind(self.occurred)
            .push("::timestamptz[], ")
            .push_bind(self.traceparents)
            .push("::text[], ")
            .push_bind(self.bodies)
            .push("::bytea[]");
        match keys {
            Some(keys) => sql.push(", ").push_bind(keys).push(format_args!("::uuid[]) AS e({COLUMNS}, key)")),
            None => sql.push(format_args!(") AS e({COLUMNS})")),
        };
    }
}
