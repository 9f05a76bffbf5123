//! The plain handler path: a handler does sqlx work in the transaction the runtime opened and returns its
//! events; the inbox row, its work and the outbox rows commit together. Proved against a duplicate delivery,
//! a redelivery after a crash between commit and ack, and a relay that publishes one event twice. Real
//! broker, real database, and a contract of the test's own, declared with `contract!`.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use choreo::LogFormat;
use choreo::Settings;
use choreo::{HandlerCounters, ServiceError};
use choreo::{PlainHandler, PlainRunner};
use choreo::{prepare_database, run_plain_worker};
use choreo_messages::{Contract, Envelope, Payload, contract};
use choreo_rabbitmq::lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use choreo_rabbitmq::lapin::types::FieldTable;
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{ConfirmingPublisher, Handler, Outcome, Topology, connect_pool};
use choreo_testkit::{Infra, unique_namespace, wait_for};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Command `ledger.note`: write a note.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Note {
    entry_id: Uuid,
    text: String,
}

impl Payload for Note {
    const TYPE: &'static str = "ledger.note";
    fn validate(&self) -> Result<(), String> {
        if self.text.is_empty() { Err("text is empty".into()) } else { Ok(()) }
    }
}

/// Event `ledger.noted`: a note was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Noted {
    entry_id: Uuid,
}

impl Payload for Noted {
    const TYPE: &'static str = "ledger.noted";
}

contract! {
    /// The test's contract.
    enum Ledger {
        Note(Note),
        Noted(Noted),
    }
}

/// Writes a row per note and emits `ledger.noted`; refuses notes whose text is `refuse` after writing, to show
/// that a failure rolls its work back.
struct LedgerHandler;

impl PlainHandler for LedgerHandler {
    type Message = Ledger;
    const NAME: &'static str = "ledger";
    const CONSUMES: &'static [&'static str] = &[Note::TYPE];

    async fn handle(&self, tx: &mut PgConnection, message: &Envelope<Ledger>) -> Result<Vec<Ledger>, ServiceError> {
        let Ledger::Note(note) = &message.message else {
            return Err(ServiceError::Permanent(format!("unexpected {}", message.message.type_name())));
        };
        sqlx::query("INSERT INTO ledger (entry_id, text) VALUES ($1, $2)")
            .bind(note.entry_id)
            .bind(&note.text)
            .execute(&mut *tx)
            .await?;
        if note.text == "refuse" {
            return Err(ServiceError::Permanent("refused after writing".into()));
        }
        Ok(vec![Noted { entry_id: note.entry_id }.into()])
    }
}

fn note(text: &str) -> Envelope<Ledger> {
    Envelope::new_command(Note { entry_id: Uuid::now_v7(), text: text.into() }.into(), "test", None)
}

async fn ledger_database(infra: &Infra, name: &str) -> sqlx::PgPool {
    let options = PgConnectOptions::from_str(&infra.database(name)).expect("url");
    let db = prepare_database(&options, 4, &Migrator::with_migrations(Vec::new())).await.expect("database");
    sqlx::query("CREATE TABLE IF NOT EXISTS ledger (entry_id UUID NOT NULL, text TEXT NOT NULL)")
        .execute(&db)
        .await
        .expect("ledger table");
    db
}

async fn count(db: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.expect("count")
}

#[tokio::test]
async fn a_plain_handler_applies_a_message_once_and_a_copy_has_no_effect() {
    let infra = Infra::from_env();
    let name = format!("{}_ledger", unique_namespace());
    let db = ledger_database(&infra, &name).await;
    let runner = PlainRunner::new(LedgerHandler, db.clone(), Default::default());
    let message = note("hello");

    assert_eq!(runner.handle(&message).await, Outcome::Done);
    assert_eq!(runner.handle(&message).await, Outcome::Duplicate);

    let counters = runner.counters();
    assert_eq!((counters.processed.load(Ordering::Relaxed), counters.duplicates.load(Ordering::Relaxed)), (1, 1));
    assert_eq!(count(&db, "SELECT count(*) FROM ledger").await, 1, "one effect");
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, 1);
    let emitted: (String, Uuid) = sqlx::query_as("SELECT message_type, causation_id FROM outbox")
        .fetch_one(&db)
        .await
        .expect("one event in the outbox");
    assert_eq!(emitted, ("ledger.noted".to_owned(), message.meta.message_id), "caused by the note");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

#[tokio::test]
async fn a_failed_plain_handler_leaves_nothing_behind_and_its_message_can_be_applied_later() {
    let infra = Infra::from_env();
    let name = format!("{}_ledger", unique_namespace());
    let db = ledger_database(&infra, &name).await;
    let runner = PlainRunner::new(LedgerHandler, db.clone(), Default::default());
    let refused = note("refuse");

    let outcome = runner.handle(&refused).await;
    assert!(matches!(outcome, Outcome::Reject { .. }), "{outcome:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM ledger").await, 0, "the handler's write was rolled back");
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, 0, "the message is not recorded as processed");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 0);

    let foreign = Envelope::<Ledger>::new_command(Noted { entry_id: Uuid::now_v7() }.into(), "test", None);
    let outcome = runner.handle(&foreign).await;
    assert!(matches!(outcome, Outcome::Reject { .. }), "a type the worker does not consume: {outcome:?}");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

fn args(infra: &Infra, namespace: &str) -> Settings {
    Settings {
        amqp_url: infra.amqp_url.clone(),
        server_database_url: infra.database_url.clone(),
        namespace: namespace.to_owned(),
        prefetch: 16,
        concurrency: 4,
        batch_size: 8,
        max_message_bytes: 262_144,
        delivery_limit: 10,
        crash_limit: 3,
        handler_retries: 2,
        retry_delays: vec![Duration::from_millis(200)],
        metrics_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        db_pool_size: 4,
        relay_batch: 64,
        relay_sweep: Duration::from_millis(100),
        relay_handoff_hold: Duration::from_secs(1),
        relay_handoff_wait: Duration::from_millis(250),
        outbox_retention: Duration::from_secs(3600),
        inbox_retention: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_secs(10),
        log_format: LogFormat::Pretty,
    }
}

/// A running plain worker on the real broker: a message committed before (a crash between its commit and
/// its ack) and a message published twice (a relay re-publish) each take effect once, and the worker's
/// events reach the broker through its relay.
#[tokio::test]
async fn a_plain_worker_absorbs_a_redelivery_after_a_crash_and_a_republished_copy() {
    let infra = Infra::from_env();
    let ns = unique_namespace();
    let name = format!("{ns}_ledger");
    let db = ledger_database(&infra, &name).await;
    let topology = Topology::new(ns.clone());
    let exchange = topology.events_exchange();

    // The first copy committed, and the process died before its ack: the broker delivers it again.
    let committed_before_crash = note("committed before the crash");
    let runner = PlainRunner::new(LedgerHandler, db.clone(), Default::default());
    assert_eq!(runner.handle(&committed_before_crash).await, Outcome::Done);

    let pool = connect_pool(&infra.amqp_url, "plain-test", 2).expect("pool");
    let channel = choreo_rabbitmq::connection::open_channel(&pool).await.expect("channel");
    topology.declare_exchanges(&channel).await.expect("exchanges");
    // Someone downstream listens to `ledger.noted`, so the relay's mandatory publishes are routed.
    let downstream = format!("{ns}.downstream");
    channel
        .queue_declare(downstream.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("downstream queue");
    channel
        .queue_bind(
            downstream.as_str().into(),
            exchange.as_str().into(),
            Noted::TYPE.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Arc<HandlerCounters>>();
    let worker = tokio::spawn({
        let args = args(&infra, &ns);
        let (db, shutdown) = (db.clone(), shutdown.clone());
        async move {
            run_plain_worker(LedgerHandler, db, &args, shutdown, |h| {
                let _ = started_tx.send(h.counters);
            })
            .await
        }
    });
    let counters = started_rx.await.expect("worker started");
    let worker_queue = topology.worker_queue("ledger");
    wait_for("the worker's queue", Duration::from_secs(30), || {
        let pool = pool.clone();
        let queue = worker_queue.clone();
        async move {
            // A passive declare of a queue not there yet closes its channel: a new channel each time.
            let channel = choreo_rabbitmq::connection::open_channel(&pool).await.map_err(|e| e.to_string())?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            match channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                Ok(q) if q.consumer_count() > 0 => Ok(()),
                Ok(q) => Err(format!("{} consumers", q.consumer_count())),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    let publisher = ConfirmingPublisher::new(pool.clone(), Duration::from_secs(10));
    let republished = note("published twice");
    let encoded = [committed_before_crash.encode(), republished.encode(), republished.encode()];
    let outgoing: Vec<Outgoing<'_>> = encoded.iter().map(|e| Outgoing::envelope(&exchange, e)).collect();
    for result in publisher.publish_batch(&outgoing).await {
        result.expect("published");
    }

    wait_for("one processed, two duplicates", Duration::from_secs(60), || {
        let c = Arc::clone(&counters);
        async move {
            let seen = (c.processed.load(Ordering::Relaxed), c.duplicates.load(Ordering::Relaxed));
            if seen == (1, 2) { Ok(()) } else { Err(seen) }
        }
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM ledger").await, 2, "each note took effect once");
    // Both notes' events reach downstream through the relays: the test's runner left its row to the sweep.
    let channel = choreo_rabbitmq::connection::open_channel(&pool).await.expect("channel");
    wait_for("two ledger.noted downstream", Duration::from_secs(30), || {
        let channel = channel.clone();
        let queue = downstream.clone();
        async move {
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let depth = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .map_err(|e| e.to_string())?
                .message_count();
            if depth == 2 { Ok(()) } else { Err(format!("{depth} messages")) }
        }
    })
    .await;
    let mut noted = Vec::new();
    for _ in 0..2 {
        let message = channel
            .basic_get(downstream.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        let body: Noted = serde_json::from_slice(&message.delivery.data).expect("a ledger.noted body");
        noted.push(body.entry_id);
    }
    let mut expected = [committed_before_crash.message, republished.message]
        .map(|m| match m {
            Ledger::Note(n) => n.entry_id,
            Ledger::Noted(n) => n.entry_id,
        })
        .to_vec();
    expected.sort();
    noted.sort();
    assert_eq!(noted, expected);

    shutdown.cancel();
    worker.await.expect("join").expect("worker stops cleanly");
    let mut queues = topology.queue_names("ledger", &[Duration::from_millis(200)]);
    queues.push(downstream);
    infra.delete_broker_objects(&queues, &topology.exchange_names()).await;
    pool.close();
    infra.drop_databases(&[name]).await;
}
