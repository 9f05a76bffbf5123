//! [`OutboxRelay`]: publishes committed outbox rows and marks them only after the broker confirmed them.
//!
//! Rows reach the broker by one of two paths:
//!
//! - **Hand-off** (the fast path). A handler of this process writes its rows *held*: `available_at` lies
//!   [`RelayConfig::handoff_hold`] ahead, so no sweep claims them. Once its transaction committed, it hands
//!   the same rows to the relay in memory ([`OutboxHandoff`]). The relay publishes them with confirms, without
//!   reading them back, and marks the confirmed ones published. A hop costs one transaction and one confirmed
//!   publish, and nothing waits for a relay cycle.
//! - **Sweep** (the safety net). Every `sweep_interval` the relay claims rows whose time has come, with
//!   `FOR UPDATE SKIP LOCKED`, publishes them with confirms, marks the confirmed rows published and records
//!   the failures, in one transaction. It publishes what the hand-off could not: rows of a process that died
//!   before handing them off (once their hold ends), rows whose publish failed, rows written by other
//!   processes. If the relay dies between publish and commit, the row locks vanish with the connection and
//!   the rows are published again (at least once); consumers deduplicate on the message id.
//!
//! Either way a row is published at least once and marked only after its confirm. A hand-off slower than
//! the hold (a confirm timing out) can meet a sweep of the same row: the message is then published twice,
//! which consumers deduplicate. Several relays may run against one database: each claims rows the others do
//! not hold. Claiming never uses a cursor over ids, which would skip rows whose transactions commit out of
//! id order. LISTEN/NOTIFY is not used: it takes a server-wide lock at commit and loses notifications while
//! the listener is disconnected.
//!
//! Marking needs no flush to disk before going on: if the server loses a mark, the row is published again
//! and consumers deduplicate it. The relay's own connections therefore run with `synchronous_commit = off`.

use std::sync::Arc;
use std::time::Duration;

use choreo_messages::EncodedEnvelope;
use choreo_rabbitmq::ConfirmingPublisher;
use choreo_rabbitmq::publisher::Outgoing;
use sqlx::{Executor, PgPool};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::store::OutboxRow;
use crate::{OutboxError, OutboxStore};

/// Hand-offs taken together into one pipelined publish.
const HANDOFFS_PER_PUBLISH: usize = 64;
/// Confirmed hand-offs waiting to be marked before the relay waits for the marking task.
const MARKS_QUEUED: usize = 1024;
/// Longest a confirmed hand-off waits to be marked (at most a quarter of the hold).
const MARK_PAUSE: Duration = Duration::from_millis(20);
/// Connections of the relay's own pool: one for the sweep, one for marking hand-offs.
const RELAY_CONNECTIONS: u32 = 2;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Name of the worker this relay belongs to (metrics label).
    pub worker: String,
    /// Rows claimed and published per sweep.
    pub batch_size: i64,
    /// Longest wait between sweeps.
    pub sweep_interval: Duration,
    /// First delay before a failed row is tried again (doubles per attempt, capped at a minute).
    pub failure_retry_after: Duration,
    /// How long rows written for a hand-off stay out of sweeps: the longest a crash can delay them. Zero
    /// turns hand-offs off: a commit then wakes a sweep (one claim query more per hop).
    pub handoff_hold: Duration,
    /// Hand-offs waiting for the relay before handlers wait for it (backpressure).
    pub handoff_capacity: usize,
    /// How long a handler waits for room in a full hand-off queue before it leaves its rows to the sweep
    /// (zero: never waits). The wait holds the handler, so a relay that falls behind slows consumption down
    /// to its pace and the backlog stays in the broker; leaving rows to the sweep costs the database a
    /// statement per hand-off and a claim per sweep, which under an overload made the relay fall further
    /// behind. Bounded, so that a relay that cannot publish at all (a broker blocking publishers during a
    /// resource alarm) does not stop consumption. At most half the hold: older hand-offs are the sweep's.
    pub handoff_wait: Duration,
    /// The wire names of the types this worker emits, as metric labels; any other is labelled `unknown`, so
    /// that rows written by other code cannot multiply label values.
    pub message_types: &'static [&'static str],
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            worker: "unknown".to_owned(),
            message_types: &[],
            batch_size: 256,
            sweep_interval: Duration::from_millis(500),
            failure_retry_after: Duration::from_millis(500),
            handoff_hold: Duration::from_secs(5),
            handoff_capacity: 64,
            handoff_wait: Duration::from_millis(250),
        }
    }
}

/// Hands rows a handler just committed to the relay of its process. The rows must be written held for
/// [`OutboxHandoff::hold`]: a handler passes that hold to [`crate::InboxGuard::commit`], whose one statement
/// writes them held; code that writes in a transaction of its own uses [`OutboxStore::enqueue_held`] and
/// commits. Once the rows committed, call [`OutboxHandoff::committed`] with them.
///
/// The default hand-off has no relay behind it: its hold is zero, so rows are at once the sweep's, and
/// `committed` does nothing.
#[derive(Debug, Clone, Default)]
pub struct OutboxHandoff {
    relay: Option<Relay>,
    hold: Duration,
    wait: Duration,
}

/// What a hand-off reaches of its relay.
#[derive(Debug, Clone)]
struct Relay {
    handoffs: mpsc::Sender<HandOff>,
    sweep_now: Arc<Notify>,
    db: PgPool,
}

/// Rows one transaction committed, and when.
#[derive(Debug)]
struct HandOff {
    committed: Instant,
    rows: Vec<EncodedEnvelope>,
}

impl OutboxHandoff {
    /// How far ahead `available_at` of rows for this hand-off lies.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Give the relay rows whose transaction committed. If the relay is `handoff_capacity` hand-offs behind,
    /// waits up to `handoff_wait` for room; if there is none by then, or the relay has stopped, the rows'
    /// hold is lifted (one statement) and its sweep woken, so they take the sweep's path at once.
    pub async fn committed(&self, rows: Vec<EncodedEnvelope>) {
        let Some(relay) = &self.relay else { return };
        if rows.is_empty() {
            return;
        }
        if self.hold.is_zero() {
            // The rows are the sweep's already; a stored permit means no wake-up is lost.
            relay.sweep_now.notify_one();
            return;
        }
        let rows = match relay.handoffs.try_send(HandOff { committed: Instant::now(), rows }) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(h)) => h.rows,
            Err(mpsc::error::TrySendError::Full(h)) if self.wait.is_zero() => h.rows,
            Err(mpsc::error::TrySendError::Full(h)) => match relay.handoffs.send_timeout(h, self.wait).await {
                Ok(()) => return,
                Err(mpsc::error::SendTimeoutError::Timeout(h) | mpsc::error::SendTimeoutError::Closed(h)) => h.rows,
            },
        };
        let ids: Vec<Uuid> = rows.iter().map(|r| r.meta.message_id).collect();
        match OutboxStore::release_held(&relay.db, &ids).await {
            Ok(()) => debug!(rows = ids.len(), "relay busy or stopped; rows left to its sweep"),
            Err(e) => warn!(error = %e, rows = ids.len(),
                "relay busy or stopped, and the rows' hold could not be lifted; a sweep publishes them once it ends"),
        }
        relay.sweep_now.notify_one();
    }
}

/// What one sweep did.
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
    handoff: OutboxHandoff,
    handoffs: Mutex<Option<mpsc::Receiver<HandOff>>>,
    sweep_now: Arc<Notify>,
}

impl OutboxRelay {
    /// A relay for the outbox of `db`'s database. It opens (lazily) its own two connections to it, which do
    /// not wait for WAL flushes; [`OutboxRelay::close`] closes them.
    pub fn new(db: &PgPool, publisher: Arc<ConfirmingPublisher>, exchange: String, config: RelayConfig) -> Self {
        let db = crate::pool::hot_path_pool_options()
            .max_connections(RELAY_CONNECTIONS)
            .acquire_timeout(db.options().get_acquire_timeout())
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET synchronous_commit = off").await?;
                    Ok(())
                })
            })
            .connect_lazy_with((*db.connect_options()).clone());
        let (sender, receiver) = mpsc::channel(config.handoff_capacity.max(1));
        let sweep_now = Arc::new(Notify::new());
        let relay = Relay { handoffs: sender, sweep_now: Arc::clone(&sweep_now), db: db.clone() };
        // A hand-off older than three quarters of its hold is the sweep's: waiting longer than half of it for
        // room would only make the rows late.
        let wait = config.handoff_wait.min(config.handoff_hold / 2);
        let handoff = OutboxHandoff { relay: Some(relay), hold: config.handoff_hold, wait };
        OutboxRelay { db, publisher, exchange, config, handoff, handoffs: Mutex::new(Some(receiver)), sweep_now }
    }

    /// Close the relay's own connections (after [`OutboxRelay::run`] returned).
    pub async fn close(&self) {
        self.db.close().await;
    }

    /// The hand-off handlers of this process use.
    pub fn handoff(&self) -> OutboxHandoff {
        self.handoff.clone()
    }

    /// Publish hand-offs and sweep until `shutdown` fires, then publish what handlers handed off last and
    /// sweep until nothing is left, so that rows committed by handlers that just drained are not left for
    /// the next start.
    pub async fn run(&self, shutdown: CancellationToken) {
        let Some(mut handoffs) = self.handoffs.lock().await.take() else {
            warn!("this relay is already running");
            return;
        };
        let (marks, marked) = mpsc::channel::<Vec<Uuid>>(MARKS_QUEUED);
        let pause = MARK_PAUSE.min(self.config.handoff_hold / 4);
        let marker = tokio::spawn(mark_handed_off(self.db.clone(), marked, pause));
        // Present from the start, so that dashboards and alerts see a zero rather than no series.
        metrics::counter!("choreo_relay_swept_total", "worker" => self.config.worker.clone()).increment(0);
        let mut failures = 0u32;
        let mut next_sweep = Instant::now();
        let mut received = Vec::with_capacity(HANDOFFS_PER_PUBLISH);
        loop {
            // Unbiased: neither a steady stream of hand-offs nor back-to-back catch-up sweeps starve the other.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = async {
                    tokio::select! {
                        () = tokio::time::sleep_until(next_sweep) => {}
                        () = self.sweep_now.notified() => {}
                    }
                } => {
                    let full = self.sweep(&mut failures).await;
                    next_sweep = if full {
                        Instant::now()
                    } else {
                        Instant::now() + self.config.sweep_interval.saturating_mul(failures.clamp(1, 10))
                    };
                }
                n = handoffs.recv_many(&mut received, HANDOFFS_PER_PUBLISH) => {
                    if n == 0 {
                        break;
                    }
                    self.dispatch(&mut received, &marks).await;
                }
            }
        }
        handoffs.close();
        while handoffs.recv_many(&mut received, HANDOFFS_PER_PUBLISH).await > 0 {
            self.dispatch(&mut received, &marks).await;
        }
        drop(marks);
        if let Err(e) = marker.await {
            warn!(error = %e, "the marking task failed; unmarked rows are published again by a sweep");
        }
        self.drain().await;
    }

    /// One sweep; whether it claimed a full batch (more may be waiting).
    async fn sweep(&self, failures: &mut u32) -> bool {
        match self.cycle().await {
            Ok(r) => {
                *failures = 0;
                if r.claimed > 0 {
                    metrics::counter!("choreo_relay_swept_total", "worker" => self.config.worker.clone())
                        .increment(r.published as u64);
                    debug!(claimed = r.claimed, published = r.published, failed = r.failed, "relay sweep");
                }
                r.claimed as i64 >= self.config.batch_size
            }
            Err(e) => {
                *failures = failures.saturating_add(1);
                warn!(error = %e, consecutive_failures = *failures, "relay sweep failed; retrying");
                false
            }
        }
    }

    /// Publish handed-off rows and queue the confirmed ones for marking. A row that failed stays held; the
    /// sweep publishes it once its hold ends, and records its failures from then on. Rows handed off so long
    /// ago that their hold is (nearly) over are the sweep's: publishing them here too would send them twice.
    async fn dispatch(&self, received: &mut Vec<HandOff>, marks: &mpsc::Sender<Vec<Uuid>>) {
        let fresh_for = self.config.handoff_hold.mul_f64(0.75);
        let waited =
            metrics::histogram!("choreo_relay_handoff_wait_duration_seconds", "worker" => self.config.worker.clone());
        let mut rows = Vec::new();
        for handoff in received.drain(..) {
            let age = handoff.committed.elapsed();
            waited.record(age.as_secs_f64());
            if age < fresh_for {
                rows.extend(handoff.rows);
            } else {
                debug!(rows = handoff.rows.len(), "hand-off older than its hold allows; left to the sweep");
            }
        }
        if rows.is_empty() {
            return;
        }
        let results = self.publish_envelopes(rows.iter()).await;
        let mut confirmed = Vec::with_capacity(rows.len());
        for (row, result) in rows.iter().zip(&results) {
            let meta = &row.meta;
            match result {
                Ok(()) => confirmed.push(meta.message_id),
                Err(e) => warn!(message_id = %meta.message_id, correlation_id = %meta.correlation_id, error = %e,
                    hold_ms = self.config.handoff_hold.as_millis(),
                    "publish of a handed-off row failed; a sweep retries it once its hold ends"),
            }
        }
        self.count_published(rows.iter().zip(results.iter().map(Result::is_err)));
        if !confirmed.is_empty() && marks.send(confirmed).await.is_err() {
            warn!("the marking task has stopped; confirmed rows are published again by a sweep");
        }
    }

    fn type_label(&self, message_type: &str) -> &'static str {
        self.config.message_types.iter().copied().find(|t| *t == message_type).unwrap_or("unknown")
    }

    fn count_published<'a>(&self, outcomes: impl Iterator<Item = (&'a EncodedEnvelope, bool)>) {
        for (row, failed) in outcomes {
            let outcome = if failed { "failed" } else { "confirmed" };
            metrics::counter!("choreo_messages_published_total", "worker" => self.config.worker.clone(),
                "type" => self.type_label(&row.meta.message_type), "outcome" => outcome)
            .increment(1);
        }
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

    /// One sweep: claim, publish, mark, in one transaction.
    pub async fn cycle(&self) -> Result<CycleReport, OutboxError> {
        let mut tx = self.db.begin().await.map_err(OutboxError::db("begin"))?;
        let rows = OutboxStore::claim_batch(&mut tx, self.config.batch_size).await?;
        if rows.is_empty() {
            tx.commit().await.map_err(OutboxError::db("commit"))?;
            return Ok(CycleReport::default());
        }
        let results = self.publish(&rows).await;
        let mut published = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        for (row, result) in rows.iter().zip(&results) {
            match result {
                Ok(()) => published.push(row.id),
                Err(e) => {
                    warn!(outbox_id = row.id, message_id = %row.envelope.meta.message_id,
                        correlation_id = %row.envelope.meta.correlation_id, attempts = row.publish_attempts + 1,
                        error = %e, "publish failed; the row will be retried");
                    failed.push((row.id, e.clone()));
                }
            }
        }
        OutboxStore::mark_published(&mut tx, &published).await?;
        let retry_ms = i64::try_from(self.config.failure_retry_after.as_millis()).unwrap_or(i64::MAX);
        OutboxStore::record_failures(&mut tx, &failed, retry_ms).await?;
        tx.commit().await.map_err(OutboxError::db("commit"))?;
        self.count_published(rows.iter().map(|r| &r.envelope).zip(results.iter().map(Result::is_err)));
        Ok(CycleReport { claimed: rows.len(), published: published.len(), failed: failed.len() })
    }

    /// Publish claimed rows with confirms; one result per row, in order. Marks nothing.
    pub async fn publish(&self, rows: &[OutboxRow]) -> Vec<Result<(), String>> {
        self.publish_envelopes(rows.iter().map(|row| &row.envelope)).await
    }

    async fn publish_envelopes<'a>(
        &self,
        envelopes: impl Iterator<Item = &'a EncodedEnvelope>,
    ) -> Vec<Result<(), String>> {
        let outgoing: Vec<Outgoing<'_>> = envelopes.map(|e| Outgoing::envelope(&self.exchange, e)).collect();
        let started = std::time::Instant::now();
        let results = self.publisher.publish_batch(&outgoing).await;
        metrics::histogram!("choreo_relay_publish_duration_seconds", "worker" => self.config.worker.clone())
            .record(started.elapsed().as_secs_f64());
        results.into_iter().map(|r| r.map_err(|e| e.to_string())).collect()
    }
}

/// Mark confirmed hand-offs published until the relay stops sending. Marks are gathered for `pause` and
/// written in one statement: the rows stay held meanwhile, so no sweep publishes them again, and under load
/// this is one statement for many publishes. A lost mark costs a second publish after the hold, which
/// consumers deduplicate.
async fn mark_handed_off(db: PgPool, mut marks: mpsc::Receiver<Vec<Uuid>>, pause: Duration) {
    let mut received = Vec::with_capacity(MARKS_QUEUED);
    while marks.recv_many(&mut received, MARKS_QUEUED).await > 0 {
        tokio::time::sleep(pause).await;
        while let Ok(more) = marks.try_recv() {
            received.push(more);
        }
        let ids: Vec<Uuid> = received.drain(..).flatten().collect();
        if let Err(e) = OutboxStore::mark_published_by_message_id(&db, &ids).await {
            warn!(error = %e, rows = ids.len(),
                "cannot mark confirmed rows published; a sweep publishes them again once their hold ends");
        }
    }
}
