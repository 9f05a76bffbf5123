//! A service decides on what it read, and its change is written later, in the one statement that commits
//! it with the inbox and outbox rows. What another transaction commits in between must never make the
//! change and its events disagree with the database. Each test here commits such a change between a
//! service's decision and its write, through the real handler and a real PostgreSQL.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use choreo::{Effects, Service, ServiceError, TransactionalHandler};
use choreo_messages::payloads::{InventoryReserved, OrderCreated, OrderLine, PaymentSucceeded, PlaceOrder};
use choreo_messages::{Envelope, Message};
use choreo_outbox::Change;
use choreo_rabbitmq::{Handler, Outcome};
use choreo_testkit::Infra;
use choreo_workers::gateway::SimulatedGateway;
use choreo_workers::inventory::{self, InventoryService};
use choreo_workers::order::{self, OrderService};
use choreo_workers::payment::{self, PaymentService};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// `inner`, with `meanwhile` committed by another connection after its first decision and before that
/// decision is written: a concurrent transaction that wins the race.
struct Meanwhile<S> {
    inner: S,
    db: PgPool,
    meanwhile: String,
    decisions: AtomicU32,
}

impl<S: Service> Service for Meanwhile<S> {
    const NAME: &'static str = S::NAME;
    type Message = S::Message;
    const CONSUMES: &'static [&'static str] = S::CONSUMES;

    fn batchable(&self, envelope: &Envelope<S::Message>) -> bool {
        self.inner.batchable(envelope)
    }

    async fn decide(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope<S::Message>, tracing::Span)],
        change: &mut Change,
    ) -> Result<Vec<Effects<S::Message>>, ServiceError> {
        let effects = self.inner.decide(db, batch, change).await?;
        if self.decisions.fetch_add(1, Ordering::SeqCst) == 0 {
            sqlx::query(sqlx::AssertSqlSafe(self.meanwhile.clone()))
                .execute(&self.db)
                .await
                .expect("the concurrent change");
        }
        Ok(effects)
    }
}

fn meanwhile<S: Service>(inner: S, db: &PgPool, sql: String) -> TransactionalHandler<Meanwhile<S>> {
    let service = Meanwhile { inner, db: db.clone(), meanwhile: sql, decisions: AtomicU32::new(0) };
    TransactionalHandler::new(service, db.clone(), Default::default())
}

async fn database(infra: &Infra, worker: &str, migrations: &sqlx::migrate::Migrator) -> (String, PgPool) {
    common::migrated_database(infra, worker, 4, migrations).await
}

async fn outbox_types(db: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT message_type FROM outbox ORDER BY id").fetch_all(db).await.expect("outbox")
}

fn line(sku: &str, quantity: u32) -> OrderLine {
    OrderLine { sku: sku.into(), quantity, unit_price_cents: 700 }
}

/// Inventory decided to reserve the last units; another reservation took them before the write. The
/// change must not drive the stock negative: it fails as stale, the handler decides again on fresh stock
/// and refuses the order.
#[tokio::test]
async fn a_reservation_decided_on_stock_taken_meanwhile_is_decided_again() {
    let infra = Infra::from_env();
    let (name, db) = database(&infra, "inventory", &inventory::MIGRATIONS).await;
    inventory::seed_catalogue(&db, &[("sku-a".to_owned(), 5), ("sku-b".to_owned(), 5)]).await.expect("seed");
    let handler = meanwhile(
        InventoryService,
        &db,
        "UPDATE stock SET available = available - 4, reserved = reserved + 4 WHERE sku = 'sku-b'".into(),
    );
    let order_id = Uuid::now_v7();
    let paid = Envelope::new_command(
        Message::PaymentSucceeded(PaymentSucceeded {
            order_id,
            payment_id: Uuid::now_v7(),
            amount_cents: 2800,
            currency: "EUR".into(),
            lines: vec![line("sku-a", 2), line("sku-b", 2)],
        }),
        "payment",
        Some(order_id),
    );

    assert_eq!(handler.handle(&paid).await, Outcome::Done);
    let stock: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT sku, available, reserved FROM stock ORDER BY sku").fetch_all(&db).await.expect("stock");
    assert_eq!(
        stock,
        [("sku-a".to_owned(), 5, 0), ("sku-b".to_owned(), 1, 4)],
        "nothing reserved: sku-b had 1 unit left when the change was written, and no line is reserved alone"
    );
    let reservations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations").fetch_one(&db).await.expect("count");
    assert_eq!(reservations, 0);
    assert_eq!(outbox_types(&db).await, ["inventory.failed"], "decided again on the stock as it is: out of stock");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// Payment read no payment for the order and charged it; a copy of the message recorded the payment before
/// this one was written. The first payment stays, and this one writes no second event.
#[tokio::test]
async fn a_charge_whose_order_was_paid_meanwhile_writes_no_payment_and_no_event() {
    let infra = Infra::from_env();
    let (name, db) = database(&infra, "payment", &payment::MIGRATIONS).await;
    let order_id = Uuid::now_v7();
    let paid_meanwhile = format!(
        "INSERT INTO payments (order_id, payment_id, correlation_id, customer_id, amount_cents, currency, status) \
         VALUES ('{order_id}', gen_random_uuid(), '{order_id}', 'cust-1', 700, 'EUR', 'CHARGED')"
    );
    let handler = meanwhile(PaymentService::new(SimulatedGateway::new(1_000_000, 0.0)), &db, paid_meanwhile);
    let created = Envelope::new_command(
        Message::OrderCreated(OrderCreated {
            order_id,
            customer_id: "cust-1".into(),
            currency: "EUR".into(),
            lines: vec![line("sku-a", 1)],
            total_cents: 700,
        }),
        "order",
        Some(order_id),
    );

    assert_eq!(handler.handle(&created).await, Outcome::Done, "processed, with no effect of its own");
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.expect("count");
    assert_eq!(payments, 1);
    assert!(
        outbox_types(&db).await.is_empty(),
        "the payment written meanwhile had its own event; this one writes none"
    );
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = $1")
        .bind(created.meta.message_id)
        .fetch_one(&db)
        .await
        .expect("inbox");
    assert_eq!(recorded, 1, "the message is recorded as processed");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// The order service read a PENDING order and decided to confirm it; a cancellation committed before the
/// write. The order stays cancelled, and no `order.confirmed` contradicts it.
#[tokio::test]
async fn a_confirmation_of_an_order_cancelled_meanwhile_writes_nothing() {
    let infra = Infra::from_env();
    let (name, db) = database(&infra, "order", &order::MIGRATIONS).await;
    let order_id = Uuid::now_v7();
    let place = Envelope::new_command(
        Message::OrderPlace(PlaceOrder {
            order_id,
            customer_id: "cust-1".into(),
            currency: "EUR".into(),
            lines: vec![line("sku-a", 1)],
        }),
        "client",
        None,
    );
    let plain = TransactionalHandler::new(OrderService, db.clone(), Default::default());
    assert_eq!(plain.handle(&place).await, Outcome::Done);
    // Now the race: the handler reads the order PENDING, then the cancellation commits, then the write.
    let racing = meanwhile(
        OrderService,
        &db,
        format!("UPDATE orders SET status = 'CANCELLED', cancel_reason = 'out_of_stock' WHERE order_id = '{order_id}'"),
    );
    let reserved = Envelope::caused_by(
        &place.meta,
        Message::InventoryReserved(InventoryReserved { order_id, lines: vec![line("sku-a", 1)] }),
        "inventory",
    );
    assert_eq!(racing.handle(&reserved).await, Outcome::Done);
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&db)
        .await
        .expect("order");
    assert_eq!(status, "CANCELLED");
    assert_eq!(outbox_types(&db).await, ["order.created"], "no order.confirmed for a cancelled order");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// Many handlers reserve a scarce sku at once, in batches and one by one, as a busy inventory worker does.
/// Whatever the interleaving, every message ends with exactly one outcome, the stock is never oversold and
/// adds up, and each reservation has its event: the decisions made on reads that other handlers' writes
/// overtook were caught and made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_of_scarce_stock_never_oversell_and_each_message_has_one_outcome() {
    const STOCK: i64 = 60;
    const ORDERS: usize = 120;
    let infra = Infra::from_env();
    let (name, db) = database(&infra, "inventory", &inventory::MIGRATIONS).await;
    inventory::seed_catalogue(&db, &[("sku-hot".to_owned(), STOCK), ("sku-cold".to_owned(), 1_000)])
        .await
        .expect("seed");
    let handler = std::sync::Arc::new(TransactionalHandler::new(InventoryService, db.clone(), Default::default()));
    let paid: Vec<Envelope> = (0..ORDERS)
        .map(|i| {
            let order_id = Uuid::now_v7();
            Envelope::new_command(
                Message::PaymentSucceeded(PaymentSucceeded {
                    order_id,
                    payment_id: Uuid::now_v7(),
                    amount_cents: 1400,
                    currency: "EUR".into(),
                    // Every order wants one hot unit; every third a cold one too, so that orders lock two rows.
                    lines: if i % 3 == 0 {
                        vec![line("sku-hot", 1), line("sku-cold", 1)]
                    } else {
                        vec![line("sku-hot", 1)]
                    },
                }),
                "payment",
                Some(order_id),
            )
        })
        .collect();

    // Four "slots", each taking batches of up to 5 and retrying what asks to be retried, as the consumer does.
    let tasks: Vec<_> = paid
        .chunks(ORDERS / 4)
        .map(|share| {
            let (handler, share) = (std::sync::Arc::clone(&handler), share.to_vec());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for batch in share.chunks(5) {
                    if let Some(done) = handler.handle_batch(batch).await {
                        outcomes.extend(done);
                        continue;
                    }
                    for envelope in batch {
                        let mut tries = 0;
                        loop {
                            match handler.handle(envelope).await {
                                Outcome::Retry { reason } if tries < 20 => {
                                    tries += 1;
                                    tracing::debug!(%reason, "retrying");
                                }
                                outcome => {
                                    outcomes.push(outcome);
                                    break;
                                }
                            }
                        }
                    }
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.expect("slot"));
    }
    assert_eq!(outcomes.len(), ORDERS);
    assert!(outcomes.iter().all(|o| *o == Outcome::Done), "every message processed once: {outcomes:?}");

    let (hot_available, hot_reserved, cold_available, cold_reserved): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT h.available, h.reserved, c.available, c.reserved FROM stock h, stock c \
         WHERE h.sku = 'sku-hot' AND c.sku = 'sku-cold'",
    )
    .fetch_one(&db)
    .await
    .expect("stock");
    assert_eq!((hot_available, hot_reserved), (0, STOCK), "the hot sku sold out exactly, never over");
    let (reserved_events, failed_events, reserved_orders, hot_rows, cold_rows): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox WHERE message_type = 'inventory.reserved'), \
                (SELECT count(*) FROM outbox WHERE message_type = 'inventory.failed'), \
                (SELECT count(DISTINCT order_id) FROM reservations), \
                (SELECT count(*) FROM reservations WHERE sku = 'sku-hot'), \
                (SELECT count(*) FROM reservations WHERE sku = 'sku-cold')",
        )
        .fetch_one(&db)
        .await
        .expect("events");
    assert_eq!(reserved_events, STOCK, "one inventory.reserved per unit of the hot sku");
    assert_eq!(failed_events, ORDERS as i64 - STOCK, "the others are refused");
    assert_eq!((reserved_orders, hot_rows), (STOCK, STOCK), "each reservation event has its rows");
    assert_eq!(cold_reserved, cold_rows, "the cold sku's count matches its reservation rows");
    assert_eq!(cold_available + cold_reserved, 1_000, "and adds up");
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox").fetch_one(&db).await.expect("inbox");
    assert_eq!(inbox, ORDERS as i64);
    db.close().await;
    infra.drop_databases(&[name]).await;
}
