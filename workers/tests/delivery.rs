//! Delivery guarantees at the edges: duplicates, a relay that dies between publish and mark, bad input,
//! and a queue declared with other arguments. Real broker, real database.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use choreo::LogFormat;
use choreo::Settings;
use choreo::{Service, TransactionalHandler};
use choreo::{prepare_database, run_worker};
use choreo_messages::payloads::{InventoryFailed, InventoryFailureReason, OrderLine, PaymentSucceeded};
use choreo_messages::{Envelope, Message};
use choreo_outbox::{OutboxHandoff, OutboxRelay, OutboxStore, RelayConfig};
use choreo_rabbitmq::codec::header_string;
use choreo_rabbitmq::dead_letter::headers as dl;
use choreo_rabbitmq::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString};
use choreo_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{
    ConfirmingPublisher, ConsumerConfig, ConsumerRunner, Handler, Outcome, PublishError, Topology, TopologyError,
    WorkerQueue, connect_pool,
};
use choreo_testkit::{Infra, unique_namespace, wait_for};
use choreo_workers::gateway::SimulatedGateway;
use choreo_workers::inventory::{self, InventoryService};
use choreo_workers::payment::{self, PaymentService};
use common::{Cluster, order, order_created};
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

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
        retry_delays: vec![Duration::from_millis(200), Duration::from_millis(400)],
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

async fn database(infra: &Infra, name: &str, migrations: &sqlx::migrate::Migrator) -> sqlx::PgPool {
    let options = PgConnectOptions::from_str(&infra.database(name)).expect("url");
    prepare_database(&options, 4, migrations).await.expect("database")
}

#[tokio::test]
async fn the_same_message_id_twice_changes_nothing_the_second_time() {
    let infra = Infra::from_env();
    let name = format!("{}_payment", unique_namespace());
    let db = database(&infra, &name, &payment::MIGRATIONS).await;
    let handler = TransactionalHandler::new(
        PaymentService::new(SimulatedGateway::new(1_000_000, 0.0)),
        db.clone(),
        Default::default(),
    );
    let envelope = order_created();

    assert_eq!(handler.handle(&envelope).await, Outcome::Done);
    assert_eq!(handler.handle(&envelope).await, Outcome::Duplicate);

    let counters = handler.counters();
    assert_eq!(counters.processed.load(Ordering::Relaxed), 1);
    assert_eq!(counters.duplicates.load(Ordering::Relaxed), 1);
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.expect("count");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&db).await.expect("count");
    assert_eq!((payments, outbox), (1, 1), "one charge, one payment.succeeded");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// A message the service rejects for good is checked against the inbox before it is dead-lettered. That
/// lookup takes a connection of its own, so the handler must give its own back first: with a pool of one
/// connection, the lookup would otherwise wait for the pool until it timed out, and the message would be
/// retried instead of dead-lettered.
#[tokio::test]
async fn a_rejected_message_is_checked_against_the_inbox_even_with_a_pool_of_one_connection() {
    let infra = Infra::from_env();
    let name = format!("{}_payment", unique_namespace());
    let options = PgConnectOptions::from_str(&infra.database(&name)).expect("url");
    let db = prepare_database(&options, 1, &payment::MIGRATIONS).await.expect("database");
    let handler = TransactionalHandler::new(
        PaymentService::new(SimulatedGateway::new(1_000_000, 0.0)),
        db.clone(),
        Default::default(),
    );
    let order_id = Uuid::now_v7();
    let refund_of_nothing = Envelope::new_command(
        Message::InventoryFailed(InventoryFailed {
            order_id,
            reason: InventoryFailureReason::OutOfStock,
            sku: "sku-001".into(),
        }),
        "inventory",
        Some(order_id),
    );
    let started = std::time::Instant::now();
    let outcome = handler.handle(&refund_of_nothing).await;
    assert!(
        matches!(&outcome, Outcome::Reject { reason, .. } if reason.contains("no payment")),
        "rejected for good after {:?}: {outcome:?}",
        started.elapsed()
    );
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// Inventory does not look for an earlier reservation of the order: a copy of a processed `payment.succeeded`
/// collides with the first copy's reservation rows. That collision must end as a duplicate (acked, counted, no
/// second effect), not as a retry that ends in the dead-letter queue.
#[tokio::test]
async fn a_copy_that_collides_with_the_first_copys_rows_is_a_duplicate_not_a_retry() {
    let infra = Infra::from_env();
    let name = format!("{}_inventory", unique_namespace());
    let db = database(&infra, &name, &inventory::MIGRATIONS).await;
    inventory::seed_catalogue(&db, &[("sku-001".to_owned(), 10)]).await.expect("seed");
    let handler = TransactionalHandler::new(InventoryService, db.clone(), Default::default());
    let order_id = Uuid::now_v7();
    let paid = Envelope::new_command(
        Message::PaymentSucceeded(PaymentSucceeded {
            order_id,
            payment_id: Uuid::now_v7(),
            amount_cents: 1400,
            currency: "EUR".into(),
            lines: vec![OrderLine { sku: "sku-001".into(), quantity: 2, unit_price_cents: 700 }],
        }),
        "payment",
        Some(order_id),
    );

    assert_eq!(handler.handle(&paid).await, Outcome::Done);
    assert_eq!(handler.handle(&paid).await, Outcome::Duplicate, "a copy is acked with no effect, not retried");
    // The same in a batch (a relay's re-publish is not marked redelivered, so it can be batched).
    let outcomes = handler.handle_batch(std::slice::from_ref(&paid)).await;
    assert!(outcomes.is_none(), "the batch rolls back and its message goes one by one");
    assert_eq!(handler.handle(&paid).await, Outcome::Duplicate);

    let counters = handler.counters();
    assert_eq!((counters.processed.load(Ordering::Relaxed), counters.duplicates.load(Ordering::Relaxed)), (1, 2));
    let (available, reserved, reservations, outbox): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT available, reserved, (SELECT count(*) FROM reservations), (SELECT count(*) FROM outbox) \
         FROM stock WHERE sku = 'sku-001'",
    )
    .fetch_one(&db)
    .await
    .expect("stock");
    assert_eq!((available, reserved, reservations, outbox), (8, 2, 1, 1), "reserved once, one inventory.reserved");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// The inbox is written in the statement that writes the service's change: a copy of a message processed
/// before is found there, and whatever the service decided again is not written.
#[tokio::test]
async fn a_copy_of_a_processed_message_has_no_effect_even_when_the_service_would_act_or_fail_again() {
    let infra = Infra::from_env();
    let name = format!("{}_payment", unique_namespace());
    let db = database(&infra, &name, &payment::MIGRATIONS).await;
    let handler = TransactionalHandler::new(
        PaymentService::new(SimulatedGateway::new(1_000_000, 0.0)),
        db.clone(),
        Default::default(),
    );
    let created = order_created();
    let order_id = match &created.message {
        Message::OrderCreated(o) => o.order_id,
        _ => unreachable!("built as order.created"),
    };
    assert_eq!(handler.handle(&created).await, Outcome::Done);

    // The payment is gone (say, by hand): the service would charge again, but the copy is rolled back.
    sqlx::query("DELETE FROM payments").execute(&db).await.expect("delete");
    assert_eq!(handler.handle(&created).await, Outcome::Duplicate);
    let (payments, outbox): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM payments), (SELECT count(*) FROM outbox)")
            .fetch_one(&db)
            .await
            .expect("count");
    assert_eq!((payments, outbox), (0, 1), "no second payment, no second payment.succeeded");

    // A refund whose payment is gone fails for good; a copy of a refund made before is still a duplicate.
    let failed = Envelope::caused_by(
        &created.meta,
        Message::InventoryFailed(InventoryFailed {
            order_id,
            reason: InventoryFailureReason::OutOfStock,
            sku: "sku-001".into(),
        }),
        "inventory",
    );
    assert!(matches!(handler.handle(&failed).await, Outcome::Reject { .. }), "no payment to refund: rejected");
    let mut other = failed.clone();
    other.meta.message_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO inbox (consumer, message_id, message_type, correlation_id) VALUES ('payment', $1, 'inventory.failed', $2)",
    )
    .bind(other.meta.message_id)
    .bind(other.meta.correlation_id)
    .execute(&db)
    .await
    .expect("processed before");
    assert_eq!(
        handler.handle(&other).await,
        Outcome::Duplicate,
        "processed before: acked with no effect, not dead-lettered"
    );
    let counters = handler.counters();
    assert_eq!((counters.processed.load(Ordering::Relaxed), counters.duplicates.load(Ordering::Relaxed)), (1, 2));
    db.close().await;
    infra.drop_databases(&[name]).await;
}

#[tokio::test]
async fn a_relay_that_dies_after_publishing_republishes_and_the_consumer_ignores_the_duplicate() {
    let bench = RelayBench::start(RelayConfig::default()).await;
    let (infra, order_db, relay) = (&bench.infra, &bench.db, &bench.relay);
    let ns = bench.topology.namespace().to_owned();
    let payment_db_name = format!("{ns}_payment");
    let payment_db = database(infra, &payment_db_name, &payment::MIGRATIONS).await;

    let envelope = order_created();
    let mut tx = order_db.begin().await.expect("tx");
    OutboxStore::enqueue(&mut tx, &[envelope.encode()]).await.expect("enqueue");
    tx.commit().await.expect("commit");

    // The relay claims and publishes, then dies before marking: its transaction never commits.
    {
        let mut tx = order_db.begin().await.expect("tx");
        let rows = OutboxStore::claim_batch(&mut tx, 10).await.expect("claim");
        assert_eq!(rows.len(), 1);
        assert!(relay.publish(&rows).await.into_iter().all(|r| r.is_ok()), "first publish confirmed");
        drop(tx);
    }
    let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(order_db)
        .await
        .expect("count");
    assert_eq!(unpublished, 1, "the row is still unpublished after the crash");
    let report = relay.cycle().await.expect("cycle");
    assert_eq!((report.claimed, report.published), (1, 1), "the next relay publishes it again");
    assert_eq!(bench.queue_depth().await, 2, "the broker holds both copies");

    let shutdown = CancellationToken::new();
    let (tx_counters, rx_counters) = tokio::sync::oneshot::channel();
    let worker = tokio::spawn({
        let args = args(infra, &ns);
        let db = payment_db.clone();
        let shutdown = shutdown.clone();
        async move {
            run_worker(PaymentService::new(SimulatedGateway::new(1_000_000, 0.0)), db, &args, shutdown, |h| {
                let _ = tx_counters.send(h.counters);
            })
            .await
        }
    });
    let counters = rx_counters.await.expect("worker started");
    wait_for("one processed and one duplicate", Duration::from_secs(60), || {
        let c = Arc::clone(&counters);
        async move {
            let seen = (c.processed.load(Ordering::Relaxed), c.duplicates.load(Ordering::Relaxed));
            if seen == (1, 1) { Ok(()) } else { Err(seen) }
        }
    })
    .await;
    shutdown.cancel();
    worker.await.expect("join").expect("worker stops cleanly");
    // The worker closed its pool on shutdown; look with a fresh one.
    let payment_db = database(infra, &payment_db_name, &payment::MIGRATIONS).await;
    let payments: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&payment_db).await.expect("count");
    assert_eq!(payments, 1, "the duplicate had no second effect");

    payment_db.close().await;
    infra.drop_databases(&[payment_db_name]).await;
    bench.stop().await;
}

/// An order database, a payment queue for the relay to publish into, and a relay built with `config`.
struct RelayBench {
    infra: Infra,
    topology: Topology,
    db_name: String,
    db: sqlx::PgPool,
    channel: choreo_rabbitmq::lapin::Channel,
    relay: Arc<OutboxRelay>,
}

impl RelayBench {
    async fn start(config: RelayConfig) -> Self {
        let infra = Infra::from_env();
        let ns = unique_namespace();
        let topology = Topology::new(ns.clone());
        let db_name = format!("{ns}_order");
        let db = database(&infra, &db_name, &choreo_workers::order::MIGRATIONS).await;
        let broker = connect_pool(&infra.amqp_url, "test", 2).expect("pool");
        let channel = choreo_rabbitmq::connection::open_channel(&broker).await.expect("channel");
        let payment_queue = WorkerQueue {
            worker: "payment".into(),
            outcomes: Vec::new(),
            routing_keys: PaymentService::<SimulatedGateway>::CONSUMES.iter().map(|t| (*t).to_owned()).collect(),
            delivery_limit: 10,
            retry_delays: vec![],
        };
        topology.declare_worker(&channel, &payment_queue).await.expect("topology");
        let publisher = Arc::new(ConfirmingPublisher::new(broker, Duration::from_secs(10)));
        let relay = Arc::new(OutboxRelay::new(&db, publisher, topology.events_exchange(), config));
        RelayBench { infra, topology, db_name, db, channel, relay }
    }

    /// Write `envelope` as a handler does, held for the relay's hand-off, and commit.
    /// A relay that is not running, no sweep before an hour, room for one hand-off and that one taken:
    /// the next hand-off finds the queue full. Returns the bench, its hand-off and the queued row.
    async fn with_a_full_hand_off_queue(
        hold: Duration,
        wait: Duration,
    ) -> (Self, OutboxHandoff, choreo_messages::EncodedEnvelope) {
        let bench = RelayBench::start(RelayConfig {
            sweep_interval: Duration::from_secs(3600),
            handoff_hold: hold,
            handoff_capacity: 1,
            handoff_wait: wait,
            ..RelayConfig::default()
        })
        .await;
        let handoff = bench.relay.handoff();
        let queued = order_created().encode();
        bench.commit(&queued, hold).await;
        handoff.committed(vec![queued.clone()]).await;
        (bench, handoff, queued)
    }

    async fn commit(&self, envelope: &choreo_messages::EncodedEnvelope, hold: Duration) {
        let mut tx = self.db.begin().await.expect("tx");
        OutboxStore::enqueue_held(&mut tx, std::slice::from_ref(envelope), hold).await.expect("enqueue");
        tx.commit().await.expect("commit");
    }

    async fn queue_depth(&self) -> u32 {
        self.channel
            .queue_declare(
                self.topology.worker_queue("payment").as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
    }

    async fn published_at(&self, id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar("SELECT published_at FROM outbox WHERE message_id = $1")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .expect("outbox row")
    }

    /// Wait until the queue holds `depth` messages and the row of `id` is marked published.
    async fn wait_published(&self, what: &str, id: Uuid, depth: u32) {
        wait_for(what, Duration::from_secs(30), || async {
            match (self.queue_depth().await, self.published_at(id).await) {
                (d, Some(_)) if d == depth => Ok(()),
                seen => Err(seen),
            }
        })
        .await;
    }

    fn run(&self, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let relay = Arc::clone(&self.relay);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { relay.run(shutdown).await })
    }

    async fn stop(self) {
        self.db.close().await;
        self.infra.drop_databases(&[self.db_name]).await;
        self.infra
            .delete_broker_objects(
                &[self.topology.queue_names("payment", &[]), vec![self.topology.outcomes_queue()]].concat(),
                &self.topology.exchange_names(),
            )
            .await;
    }
}

/// The fast path and the safety net of the relay. A row handed off is published by the relay at once, with
/// no sweep able to claim it (its hold is an hour); a held row nobody handed off (its process died after the
/// commit) is out of every sweep until its hold ends, then the sweep publishes it.
#[tokio::test]
async fn handed_off_rows_are_published_at_once_and_rows_left_by_a_crash_wait_for_their_hold() {
    let hour = Duration::from_secs(3600);
    let bench = RelayBench::start(RelayConfig {
        sweep_interval: Duration::from_millis(50),
        handoff_hold: hour,
        ..RelayConfig::default()
    })
    .await;
    let handoff = bench.relay.handoff();
    assert_eq!(handoff.hold(), hour);

    // Left by a crash: written held, committed, never handed off.
    let orphan = order_created().encode();
    bench.commit(&orphan, hour).await;
    assert_eq!(bench.relay.cycle().await.expect("sweep").claimed, 0, "a held row is out of sweeps");

    let shutdown = CancellationToken::new();
    let running = bench.run(&shutdown);
    // Handed off: only the hand-off can publish it within the hour.
    let handed = order_created().encode();
    bench.commit(&handed, handoff.hold()).await;
    handoff.committed(vec![handed.clone()]).await;
    bench.wait_published("the handed-off row published and marked", handed.meta.message_id, 1).await;
    assert_eq!(bench.published_at(orphan.meta.message_id).await, None, "the orphan waits for its hold");

    // Its hold ends: the running relay's sweep publishes it.
    sqlx::query("UPDATE outbox SET available_at = now() WHERE message_id = $1")
        .bind(orphan.meta.message_id)
        .execute(&bench.db)
        .await
        .expect("end the hold");
    bench.wait_published("the orphan swept, published and marked", orphan.meta.message_id, 2).await;
    shutdown.cancel();
    running.await.expect("relay stops");
    bench.stop().await;
}

/// A relay that falls behind makes a handler wait no longer than `handoff_wait`, and never publishes a row
/// twice for it: a hand-off it still has no room for then is released to the sweep, and a hand-off it takes
/// up only after its hold is (nearly) over is left to the sweep, which by then has published it.
#[tokio::test]
async fn hand_offs_a_busy_relay_cannot_take_in_time_go_to_the_sweep_and_are_published_once() {
    let hold = Duration::from_secs(2);
    // The relay is not running yet: the first hand-off filled its queue, the second finds no room.
    let (bench, handoff, queued) = RelayBench::with_a_full_hand_off_queue(hold, Duration::from_millis(50)).await;
    let refused = order_created().encode();
    bench.commit(&refused, hold).await;
    let started = std::time::Instant::now();
    handoff.committed(vec![refused.clone()]).await;
    assert!(started.elapsed() >= Duration::from_millis(50), "the handler waited for room first, for handoff_wait");
    let report = bench.relay.cycle().await.expect("sweep");
    assert!(report.published >= 1, "the refused hand-off is the sweep's at once: {report:?}");
    bench.wait_published("the refused row swept", refused.meta.message_id, report.published as u32).await;

    // The queued hand-off waits past its hold; sweeps publish it then.
    wait_for("the queued row swept once its hold ended", Duration::from_secs(30), || async {
        bench.relay.cycle().await.expect("sweep");
        match bench.published_at(queued.meta.message_id).await {
            Some(_) => Ok(()),
            None => Err("held"),
        }
    })
    .await;
    // Now the relay runs and stops at once: it takes the stale hand-off from its queue and leaves it.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    bench.run(&shutdown).await.expect("relay stops");
    assert_eq!(bench.queue_depth().await, 2, "each row published once");
    bench.stop().await;
}

/// A relay that falls behind for less than `handoff_wait` holds the handler until it has room, and the rows
/// keep the fast path: published from the hand-off, never released to the sweep (their hold is still on
/// when they are published), each once.
#[tokio::test]
async fn a_handler_waits_for_room_in_a_full_hand_off_queue_and_its_rows_keep_the_fast_path() {
    let hold = Duration::from_secs(60);
    // The relay is not running yet: the first hand-off filled its queue.
    let (bench, handoff, queued) = RelayBench::with_a_full_hand_off_queue(hold, Duration::from_secs(30)).await;
    let waiting = order_created().encode();
    bench.commit(&waiting, hold).await;
    // The second finds the queue full and waits; only then (`join` polls in order) does the relay start.
    let shutdown = CancellationToken::new();
    let mut running = None;
    futures_util::future::join(handoff.committed(vec![waiting.clone()]), async {
        running = Some(bench.run(&shutdown))
    })
    .await;
    let running = running.expect("the relay started");
    bench.wait_published("the queued row handed off", queued.meta.message_id, 2).await;
    bench.wait_published("the waiting row handed off", waiting.meta.message_id, 2).await;
    let still_held: bool = sqlx::query_scalar("SELECT available_at > now() FROM outbox WHERE message_id = $1")
        .bind(waiting.meta.message_id)
        .fetch_one(&bench.db)
        .await
        .expect("outbox row");
    assert!(still_held, "the waiting row was published from its hand-off, not released to the sweep");
    shutdown.cancel();
    running.await.expect("relay stops");
    assert_eq!(bench.queue_depth().await, 2, "each row published once");
    bench.stop().await;
}

/// With hand-offs turned off (a zero hold), a commit wakes the relay's sweep: nothing waits for the next
/// sweep interval (an hour here).
#[tokio::test]
async fn with_hand_offs_off_a_commit_wakes_the_sweep() {
    let bench = RelayBench::start(RelayConfig {
        sweep_interval: Duration::from_secs(3600),
        handoff_hold: Duration::ZERO,
        ..RelayConfig::default()
    })
    .await;
    let handoff = bench.relay.handoff();
    let shutdown = CancellationToken::new();
    let running = bench.run(&shutdown);
    // The first row may be taken by the sweep every relay makes when it starts; once it is published, that
    // sweep is over, and the second row can only be published by a wake-up.
    for (n, row) in [order_created().encode(), order_created().encode()].into_iter().enumerate() {
        bench.commit(&row, handoff.hold()).await;
        handoff.committed(vec![row.clone()]).await;
        bench.wait_published("the row swept, published and marked", row.meta.message_id, n as u32 + 1).await;
    }
    shutdown.cancel();
    running.await.expect("relay stops");
    bench.stop().await;
}

#[tokio::test]
async fn bad_input_is_dead_lettered_with_its_reason_and_the_worker_goes_on() {
    let cluster = Cluster::start().await;
    let exchange = cluster.topology.events_exchange();
    let pool = connect_pool(&cluster.infra.amqp_url, "test", 1).expect("pool");
    let publisher = ConfirmingPublisher::new(pool, Duration::from_secs(10));
    let garbage_id = Uuid::now_v7().to_string();
    let props = BasicProperties::default()
        .with_message_id(garbage_id.as_str().into())
        .with_type("order.place".into())
        .with_content_type("application/json".into())
        .with_headers({
            let mut t = FieldTable::default();
            t.insert("schema-version".into(), AMQPValue::LongLongInt(1));
            t
        });
    let body: &[u8] = b"{not json at all";
    publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: "order.place",
            properties: props,
            body,
            message_id: garbage_id.clone(),
        })
        .await
        .expect("garbage accepted by the broker");
    // A valid `payment.failed` published under the routing key `order.place`: the order worker consumes both
    // types, but must not handle it as a payment failure that no one routed to it.
    let order_id = Uuid::now_v7();
    let misrouted = Envelope::new_command(
        Message::PaymentFailed(choreo_messages::payloads::PaymentFailed {
            order_id,
            reason: choreo_messages::payloads::PaymentFailureReason::CardDeclined,
        }),
        "payment",
        Some(order_id),
    )
    .encode();
    let mut outgoing = Outgoing::envelope(&exchange, &misrouted);
    outgoing.routing_key = "order.place";
    publisher.publish(outgoing).await.expect("misrouted accepted by the broker");
    let good = order("cust-1", &[("sku-001", 1, 100)]);
    cluster.place(std::slice::from_ref(&good)).await;
    cluster.wait_terminal(&[good.order_id], Duration::from_secs(60)).await;

    let conn = Connection::connect(&cluster.infra.amqp_url, ConnectionProperties::default()).await.expect("conn");
    let channel = conn.create_channel().await.expect("channel");
    let dlq = cluster.topology.dead_letter_queue("order");
    // Both dead letters, in whichever order the worker settled them.
    let mut letters = std::collections::HashMap::new();
    while letters.len() < 2 {
        let letter = wait_for("the dead letters", Duration::from_secs(30), || async {
            channel
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "empty".to_string())
        })
        .await;
        let id = letter.delivery.properties.message_id().as_ref().map(|m| m.to_string()).expect("message id");
        letters.insert(id, letter);
    }
    let letter = letters.remove(&garbage_id).expect("the garbage's dead letter");
    assert_eq!(letter.delivery.data, body, "the body is kept byte for byte");
    let headers = letter.delivery.properties.headers().clone().expect("headers");
    assert_eq!(header_string(&headers, dl::ERROR_KIND).as_deref(), Some("malformed_body"));
    assert_eq!(header_string(&headers, dl::WORKER).as_deref(), Some("order"));
    assert_eq!(header_string(&headers, dl::ORIGINAL_ROUTING_KEY).as_deref(), Some("order.place"));
    assert!(header_string(&headers, dl::ERROR).is_some_and(|e| e.contains("not valid JSON")));
    let letter = letters.remove(&misrouted.meta.message_id.to_string()).expect("the misrouted message's dead letter");
    let headers = letter.delivery.properties.headers().clone().expect("headers");
    assert_eq!(header_string(&headers, dl::ERROR_KIND).as_deref(), Some("unknown_type"));
    assert!(header_string(&headers, dl::ERROR).is_some_and(|e| e.contains("routing key")), "{headers:?}");
    let _ = conn.close(200, "ok".into()).await;
    cluster.shutdown().await;
}

/// Readiness asks whether the database answers, not whether the handlers' pool has a connection free: a
/// worker whose handlers hold every connection is busy, not unready.
#[tokio::test]
async fn a_worker_whose_handlers_hold_every_database_connection_is_still_ready() {
    let infra = Infra::from_env();
    let ns = unique_namespace();
    let name = format!("{ns}_payment");
    let db = database(&infra, &name, &payment::MIGRATIONS).await;
    let mut args = args(&infra, &ns);
    // Port 0: the worker takes a free port and says which, with no window for another process to take it.
    args.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let shutdown = CancellationToken::new();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let worker = tokio::spawn({
        let db = db.clone();
        let shutdown = shutdown.clone();
        async move {
            let started = move |handle: choreo::WorkerHandle| {
                let _ = addr_tx.send(handle.metrics_addr);
            };
            run_worker(PaymentService::new(SimulatedGateway::new(1_000_000, 0.0)), db, &args, shutdown, started).await
        }
    });
    let addr =
        tokio::time::timeout(Duration::from_secs(30), addr_rx).await.expect("worker started").expect("metrics address");
    let ready = format!("http://{addr}/health/ready");
    let client = reqwest::Client::new();
    wait_for("ready", Duration::from_secs(30), || async {
        let status = client.get(&ready).send().await.map_err(|e| e.to_string())?.status();
        if status == reqwest::StatusCode::OK { Ok(()) } else { Err(status.to_string()) }
    })
    .await;

    // Every connection of the pool the handlers use is taken (4: the size `database` gives it).
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(db.acquire().await.expect("a connection"));
    }
    let reply = client.get(&ready).send().await.expect("readiness answers");
    let status = reply.status();
    let body = reply.text().await.unwrap_or_default();
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");

    drop(held);
    shutdown.cancel();
    worker.await.expect("join").expect("worker stops");
    infra.drop_databases(&[name]).await;
}

/// A service whose handler never finishes (a lock never granted, a connection gone silent).
struct Stuck {
    started: Arc<std::sync::atomic::AtomicBool>,
}

impl Service for Stuck {
    const NAME: &'static str = "stuck";
    type Message = choreo_messages::Message;
    const CONSUMES: &'static [&'static str] = &[choreo_messages::MessageType::OrderCreated.as_str()];

    async fn decide(
        &self,
        _: &mut sqlx::PgConnection,
        _: &[(&Envelope, tracing::Span)],
        _: &mut choreo_outbox::Change,
    ) -> Result<Vec<choreo::Effects>, choreo::ServiceError> {
        self.started.store(true, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// SIGTERM drains for at most `CHOREO_SHUTDOWN_TIMEOUT`: a hung handler is given up, and its message, never
/// acked, goes back to the queue.
#[tokio::test]
async fn a_hung_handler_does_not_hold_shutdown_past_its_timeout_and_its_message_is_kept() {
    let infra = Infra::from_env();
    let ns = unique_namespace();
    let db_name = format!("{ns}_stuck");
    let db = database(&infra, &db_name, &payment::MIGRATIONS).await;
    let mut args = args(&infra, &ns);
    args.shutdown_timeout = Duration::from_secs(1);
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn({
        let service = Stuck { started: Arc::clone(&started) };
        let shutdown = shutdown.clone();
        async move { run_worker(service, db, &args, shutdown, |_| {}).await }
    });

    let topology = Topology::new(ns.clone());
    let publisher =
        ConfirmingPublisher::new(connect_pool(&infra.amqp_url, "test", 1).expect("pool"), Duration::from_secs(10));
    let message = order_created().encode();
    let exchange = topology.events_exchange();
    // Unroutable (and so not enqueued) until the worker has declared and bound its queue.
    wait_for("the message routed to the worker's queue", Duration::from_secs(30), || async {
        publisher.publish(Outgoing::envelope(&exchange, &message)).await.map_err(|e| e.to_string())
    })
    .await;
    wait_for("the handler started", Duration::from_secs(30), || async {
        if started.load(Ordering::SeqCst) { Ok(()) } else { Err("not yet") }
    })
    .await;

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), worker).await;
    let result = stopped.expect("the worker stopped although its handler hung").expect("join");
    result.expect("a bounded drain is a clean stop");

    let conn = Connection::connect(&infra.amqp_url, ConnectionProperties::default()).await.expect("conn");
    let channel = conn.create_channel().await.expect("channel");
    let queue = topology.worker_queue("stuck");
    let depth = wait_for("the message back in the queue", Duration::from_secs(30), || async {
        let q = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if q.message_count() == 1 { Ok(q.message_count()) } else { Err(format!("{} ready", q.message_count())) }
    })
    .await;
    assert_eq!(depth, 1);
    let _ = conn.close(200, "ok".into()).await;
    infra.drop_databases(&[db_name]).await;
}

/// A TCP proxy to the broker that can stop forwarding, as a half-dead connection or a stuck proxy does.
struct StallingProxy {
    port: u16,
    stalled: tokio::sync::watch::Sender<bool>,
}

impl StallingProxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stalled, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(Self::forward(client_read, server_write, watch.clone()));
                tokio::spawn(Self::forward(server_read, client_write, watch.clone()));
            }
        });
        StallingProxy { port, stalled }
    }

    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut stalled: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Bytes read while stalled are held until the stall ends (here: never).
            if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// When the broker stops answering, a batch fails after one confirm timeout, not one per message: the
/// publisher is shared by the relay (holding its rows' locks) and by handlers dead-lettering.
#[tokio::test]
async fn a_batch_to_a_broker_that_stopped_answering_fails_within_one_timeout() {
    let infra = Infra::from_env();
    let url = choreo_rabbitmq::lapin::uri::AMQPUri::from_str(&infra.amqp_url).expect("AMQP_URL parses");
    let proxy = StallingProxy::start(format!("{}:{}", url.authority.host, url.authority.port)).await;
    let proxied = infra.amqp_url.replacen(
        &format!("{}:{}", url.authority.host, url.authority.port),
        &format!("127.0.0.1:{}", proxy.port),
        1,
    );
    assert_ne!(proxied, infra.amqp_url, "the URL goes through the proxy");

    let direct = Connection::connect(&infra.amqp_url, ConnectionProperties::default()).await.expect("conn");
    let channel = direct.create_channel().await.expect("channel");
    let queue = format!("{}.stall", unique_namespace());
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("queue");

    let timeout = Duration::from_secs(1);
    let publisher = ConfirmingPublisher::new(connect_pool(&proxied, "test-stall", 1).expect("pool"), timeout);
    let bodies: Vec<Vec<u8>> = (0..20).map(|i| format!("{{\"n\":{i}}}").into_bytes()).collect();
    let outgoing: Vec<Outgoing<'_>> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| Outgoing {
            exchange: "",
            routing_key: &queue,
            properties: BasicProperties::default(),
            body,
            message_id: format!("m-{i}"),
        })
        .collect();
    assert!(publisher.publish_batch(&outgoing[..1]).await.iter().all(Result::is_ok), "published through the proxy");

    proxy.stalled.send_replace(true);
    // 20 messages, one timeout each before: 20 s. One deadline for the batch: about 1 s.
    let results = tokio::time::timeout(Duration::from_secs(10), publisher.publish_batch(&outgoing))
        .await
        .expect("the batch gave up within its timeout, not one timeout per message");
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(Result::is_err), "nothing confirmed: {results:?}");

    let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    let _ = direct.close(200, "ok".into()).await;
}

/// A batch's messages are all handed to lapin before any is waited for; they must still reach the queue in
/// the batch's order, and each result must be its own message's: one that no queue is bound for fails alone.
#[tokio::test]
async fn a_batch_arrives_in_order_and_only_its_unroutable_messages_fail() {
    let infra = Infra::from_env();
    let conn = Connection::connect(&infra.amqp_url, ConnectionProperties::default()).await.expect("conn");
    let channel = conn.create_channel().await.expect("channel");
    let queue = format!("{}.order", unique_namespace());
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("queue");
    let nowhere = format!("{queue}.nowhere");

    let publisher = ConfirmingPublisher::new(
        connect_pool(&infra.amqp_url, "test-order", 1).expect("pool"),
        Duration::from_secs(10),
    );
    let unroutable = [0usize, 17, 18, 99];
    let bodies: Vec<Vec<u8>> = (0..100).map(|i| format!("{i}").into_bytes()).collect();
    let outgoing: Vec<Outgoing<'_>> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| Outgoing {
            exchange: "",
            routing_key: if unroutable.contains(&i) { &nowhere } else { &queue },
            properties: BasicProperties::default().with_message_id(format!("m-{i}").into()),
            body,
            message_id: format!("m-{i}"),
        })
        .collect();
    // Twice: the second batch goes out on a channel that already has confirms behind it.
    for round in 0..2 {
        let results = publisher.publish_batch(&outgoing).await;
        assert_eq!(results.len(), outgoing.len());
        for (i, result) in results.iter().enumerate() {
            if unroutable.contains(&i) {
                assert!(
                    matches!(result, Err(PublishError::Unroutable { message_id, .. }) if *message_id == format!("m-{i}")),
                    "round {round}: message {i} has no queue and must fail as unroutable, got {result:?}"
                );
            } else {
                assert!(result.is_ok(), "round {round}: message {i} was routed and must be confirmed, got {result:?}");
            }
        }
    }

    let mut received = Vec::new();
    while let Some(message) =
        channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("basic.get")
    {
        received.push(String::from_utf8_lossy(&message.delivery.data).into_owned());
    }
    let sent: Vec<String> = (0..100).filter(|i| !unroutable.contains(i)).map(|i| i.to_string()).collect();
    assert_eq!(received, [sent.clone(), sent].concat(), "the queue holds both batches, each in its order");

    let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    let _ = conn.close(200, "ok".into()).await;
}

/// A `ConsumerRunner` for worker `order` with a handler of the test's, consuming in its own namespace.
struct RunningConsumer {
    infra: Infra,
    topology: Topology,
    publisher: Arc<ConfirmingPublisher>,
    retry_delays: Vec<Duration>,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<Result<(), TopologyError>>,
}

impl RunningConsumer {
    async fn start<H: Handler>(
        handler: Arc<H>,
        retry_delays: Vec<Duration>,
        configure: impl FnOnce(&mut ConsumerConfig),
    ) -> Self {
        let infra = Infra::from_env();
        let topology = Topology::new(unique_namespace());
        let broker = connect_pool(&infra.amqp_url, "test", 2).expect("pool");
        let queue = WorkerQueue {
            worker: "order".into(),
            outcomes: Vec::new(),
            routing_keys: vec!["order.created".into()],
            delivery_limit: 20,
            retry_delays: retry_delays.clone(),
        };
        let mut config = ConsumerConfig::new(queue);
        configure(&mut config);
        let publisher = Arc::new(ConfirmingPublisher::new(broker.clone(), Duration::from_secs(5)));
        let runner = ConsumerRunner::new(broker, Arc::clone(&publisher), topology.clone(), config, handler);
        let consuming = runner.consuming_flag();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { runner.run(shutdown).await }
        });
        wait_for("consuming", Duration::from_secs(30), || async {
            if consuming.load(Ordering::SeqCst) { Ok(()) } else { Err("not yet") }
        })
        .await;
        RunningConsumer { infra, topology, publisher, retry_delays, shutdown, running }
    }

    /// Stop consuming; the messages in the worker's dead-letter queue; remove the namespace's queues.
    async fn stop(self) -> u32 {
        self.shutdown.cancel();
        self.running.await.expect("join").expect("consumer stops");
        let conn = Connection::connect(&self.infra.amqp_url, ConnectionProperties::default()).await.expect("conn");
        let channel = conn.create_channel().await.expect("channel");
        let dlq = self.topology.dead_letter_queue("order");
        let letters = channel
            .queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("dead-letter queue")
            .message_count();
        let _ = conn.close(200, "ok".into()).await;
        let queues = self.topology.queue_names("order", &self.retry_delays);
        self.infra.delete_broker_objects(&queues, &self.topology.exchange_names()).await;
        letters
    }
}

/// Fails every time, as if a dependency were down; counts what the consumer asks of it.
#[derive(Default)]
struct AlwaysDown {
    handled: std::sync::atomic::AtomicUsize,
    restarts: std::sync::atomic::AtomicU32,
}

impl Handler for AlwaysDown {
    type Message = choreo_messages::Message;

    async fn handle(&self, _: &Envelope) -> Outcome {
        self.handled.fetch_add(1, Ordering::SeqCst);
        Outcome::Retry { reason: "dependency down".into() }
    }

    async fn record_restart(&self, _: &Envelope) -> Result<u32, String> {
        Ok(self.restarts.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

/// A message the worker could not park for a delayed retry (its delay queue is gone) is requeued by the
/// worker itself. Its redeliveries are not crashes: the crash limit must not dead-letter it as `crashed`.
#[tokio::test]
async fn a_message_the_worker_requeued_itself_is_not_counted_as_a_crash() {
    let delay = Duration::from_secs(1);
    let handler = Arc::new(AlwaysDown::default());
    let consumer = RunningConsumer::start(Arc::clone(&handler), vec![delay], |config| {
        config.handler_retries = 0;
        config.requeue_delay = Duration::from_millis(20);
        config.crash_limit = 1;
    })
    .await;
    // The delay queue disappears (deleted by hand, say): parking fails and the worker requeues.
    let conn = Connection::connect(&consumer.infra.amqp_url, ConnectionProperties::default()).await.expect("conn");
    let channel = conn.create_channel().await.expect("channel");
    let delay_queue = consumer.topology.retry_queue("order", delay);
    channel.queue_delete(delay_queue.as_str().into(), Default::default()).await.expect("delete delay queue");
    let _ = conn.close(200, "ok".into()).await;

    let message = order_created().encode();
    let exchange = consumer.topology.events_exchange();
    consumer.publisher.publish(Outgoing::envelope(&exchange, &message)).await.expect("published");
    wait_for("four attempts, three of them after a requeue", Duration::from_secs(30), || async {
        let handled = handler.handled.load(Ordering::SeqCst);
        if handled >= 4 { Ok(()) } else { Err(handled) }
    })
    .await;
    assert_eq!(handler.restarts.load(Ordering::SeqCst), 0, "the worker's own requeues are not restarts");
    assert_eq!(consumer.stop().await, 0, "not dead-lettered as crashed");
}

/// Fails the first time (a dependency blips), then succeeds.
#[derive(Default)]
struct FailsOnce {
    calls: std::sync::atomic::AtomicUsize,
}

impl Handler for FailsOnce {
    type Message = choreo_messages::Message;

    async fn handle(&self, _: &Envelope) -> Outcome {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Outcome::Retry { reason: "blip".into() }
        } else {
            Outcome::Done
        }
    }
}

/// A message published straight to a worker's queue (a replay of a letter only the broker wrote, an import)
/// has the queue's name as routing key. Parked for a delayed retry, it comes back with that origin recorded:
/// it must be handled, not dead-lettered because its routing key is not its type.
#[tokio::test]
async fn a_message_published_straight_to_the_queue_survives_a_delayed_retry() {
    let handler = Arc::new(FailsOnce::default());
    let consumer = RunningConsumer::start(Arc::clone(&handler), vec![Duration::from_millis(200)], |config| {
        config.handler_retries = 0;
    })
    .await;
    let message = order_created().encode();
    let worker_queue = consumer.topology.worker_queue("order");
    let mut straight = Outgoing::envelope("", &message);
    straight.routing_key = &worker_queue;
    consumer.publisher.publish(straight).await.expect("published to the queue");
    wait_for("handled after its delayed retry", Duration::from_secs(30), || async {
        let calls = handler.calls.load(Ordering::SeqCst);
        if calls >= 2 { Ok(()) } else { Err(calls) }
    })
    .await;
    assert_eq!(consumer.stop().await, 0, "not dead-lettered");
}

struct NeverCalled;

impl Handler for NeverCalled {
    type Message = choreo_messages::Message;

    async fn handle(&self, _: &Envelope) -> Outcome {
        Outcome::Done
    }
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_is_explained() {
    let infra = Infra::from_env();
    let ns = unique_namespace();
    let topology = Topology::new(ns.clone());
    let broker = connect_pool(&infra.amqp_url, "test", 2).expect("pool");
    let channel = choreo_rabbitmq::connection::open_channel(&broker).await.expect("channel");
    let mut classic = FieldTable::default();
    classic.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("classic")));
    channel
        .queue_declare(
            topology.worker_queue("order").as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            classic,
        )
        .await
        .expect("an old classic queue");
    let runner = ConsumerRunner::new(
        broker.clone(),
        Arc::new(ConfirmingPublisher::new(broker.clone(), Duration::from_secs(5))),
        topology.clone(),
        ConsumerConfig::new(WorkerQueue {
            worker: "order".into(),
            outcomes: Vec::new(),
            routing_keys: vec!["order.place".into()],
            delivery_limit: 10,
            retry_delays: vec![],
        }),
        Arc::new(NeverCalled),
    );
    let error = tokio::time::timeout(Duration::from_secs(30), runner.run(CancellationToken::new()))
        .await
        .expect("the runner gives up instead of looping")
        .expect_err("mismatch");
    assert!(matches!(error, TopologyError::Mismatch { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("argument `x-"), "names the differing argument: {text}");
    assert!(text.contains(&topology.worker_queue("order")), "{text}");
    assert!(text.contains("runbooks/topology-mismatch.md"), "{text}");
    infra
        .delete_broker_objects(
            &[topology.queue_names("order", &[]), vec![topology.outcomes_queue()]].concat(),
            &topology.exchange_names(),
        )
        .await;
}
