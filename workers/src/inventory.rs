//! The inventory service: reserves stock for every line of a paid order, all or nothing.
//!
//! | consumes | effect | emits |
//! |---|---|---|
//! | `payment.succeeded` | reserve every line, or nothing | `inventory.reserved` or `inventory.failed` |
//!
//! A batch of orders reads its stock rows once and writes them once, in the statement that commits it, so a
//! hot sku's row lock is held for one statement instead of being handed from order to order. Stock rows are
//! locked in sku order, so concurrent reservations never deadlock.

use std::collections::{BTreeMap, HashMap};

use choreo::Change;
use choreo_messages::payloads::{InventoryFailed, InventoryFailureReason, InventoryReserved, PaymentSucceeded};
use choreo_messages::{Envelope, Message, MessageType};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use choreo::{Effects, Service, ServiceError};

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/inventory");

/// The catalogue seeded when the worker starts: `sku=units` pairs separated by commas.
pub const DEFAULT_CATALOGUE: &str = "sku-001=1000000,sku-002=1000000,sku-003=1000000,sku-004=1000000,\
sku-005=1000000,sku-006=1000000,sku-007=1000000,sku-008=1000000,sku-009=1000000,sku-010=1000000,sku-soldout=0";

/// Parse `sku=units,sku=units`.
pub fn parse_catalogue(text: &str) -> Result<Vec<(String, i64)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (sku, units) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not sku=units"))?;
            let units: i64 = units.trim().parse().map_err(|_| format!("`{pair}`: units must be a whole number"))?;
            if units < 0 {
                return Err(format!("`{pair}`: units must not be negative"));
            }
            Ok((sku.trim().to_owned(), units))
        })
        .collect()
}

/// Insert catalogue skus that do not exist yet. Existing stock is never overwritten.
pub async fn seed_catalogue(db: &PgPool, catalogue: &[(String, i64)]) -> Result<u64, sqlx::Error> {
    let skus: Vec<&str> = catalogue.iter().map(|(s, _)| s.as_str()).collect();
    let units: Vec<i64> = catalogue.iter().map(|(_, u)| *u).collect();
    Ok(sqlx::query(
        "INSERT INTO stock (sku, available) SELECT * FROM UNNEST($1::text[], $2::bigint[]) ON CONFLICT (sku) DO NOTHING",
    )
    .bind(skus)
    .bind(units)
    .execute(db)
    .await?
    .rows_affected())
}

#[derive(Debug, Clone, Default)]
pub struct InventoryService;

impl Service for InventoryService {
    const NAME: &'static str = "inventory";
    type Message = Message;
    const CONSUMES: &'static [&'static str] = &[MessageType::PaymentSucceeded.as_str()];

    /// The whole batch reads its stock rows once and writes them once.
    async fn decide(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
        change: &mut Change,
    ) -> Result<Vec<Effects>, ServiceError> {
        let orders = batch.iter().map(|(e, _)| paid_order(e)).collect::<Result<Vec<_>, _>>()?;
        reserve(db, &orders, change).await
    }
}

fn paid_order(envelope: &Envelope) -> Result<&PaymentSucceeded, ServiceError> {
    match &envelope.message {
        Message::PaymentSucceeded(paid) => Ok(paid),
        _ => Err(ServiceError::Permanent(format!("inventory does not handle {}", envelope.meta.message_type))),
    }
}

/// Reserve stock for paid orders in the given order, exactly as if one at a time: every line of an order or
/// none of them. One query reads the stock rows; the change locks them (in sku order), takes what the
/// reservations need and records them, and fails as stale if a row no longer holds enough: the handler
/// then decides again. An order refused for want of stock is refused on what was read, a state that did
/// exist: stock only grows back through an operator, who cannot be told apart from one who came later.
async fn reserve(
    db: &mut PgConnection,
    orders: &[&PaymentSucceeded],
    change: &mut Change,
) -> Result<Vec<Effects>, ServiceError> {
    let mut skus: Vec<&str> = orders.iter().flat_map(|p| p.lines.iter().map(|l| l.sku.as_str())).collect();
    skus.sort_unstable();
    skus.dedup();
    let rows =
        sqlx::query("SELECT sku, available FROM stock WHERE sku = ANY($1)").bind(&skus).fetch_all(&mut *db).await?;
    let mut available: HashMap<String, i64> = HashMap::with_capacity(rows.len());
    for row in rows {
        available.insert(row.try_get("sku")?, row.try_get("available")?);
    }
    let mut taken: BTreeMap<&str, i64> = BTreeMap::new();
    let mut reservations: (Vec<Uuid>, Vec<&str>, Vec<i64>) = Default::default();
    let mut effects = Vec::with_capacity(orders.len());
    for paid in orders {
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for line in &paid.lines {
            *wanted.entry(line.sku.as_str()).or_default() += i64::from(line.quantity);
        }
        let failure = wanted.iter().find_map(|(sku, quantity)| match available.get(*sku) {
            None => Some((InventoryFailureReason::UnknownSku, *sku)),
            Some(units) if units < quantity => Some((InventoryFailureReason::OutOfStock, *sku)),
            Some(_) => None,
        });
        if let Some((reason, sku)) = failure {
            effects.push(Effects::events(vec![Message::InventoryFailed(InventoryFailed {
                order_id: paid.order_id,
                reason,
                sku: sku.to_owned(),
            })]));
            continue;
        }
        for (sku, quantity) in wanted {
            if let Some(units) = available.get_mut(sku) {
                *units -= quantity;
            }
            *taken.entry(sku).or_default() += quantity;
            reservations.0.push(paid.order_id);
            reservations.1.push(sku);
            reservations.2.push(quantity);
        }
        effects.push(Effects::events(vec![Message::InventoryReserved(InventoryReserved {
            order_id: paid.order_id,
            lines: paid.lines.clone(),
        })]));
    }
    if !taken.is_empty() {
        let (skus, quantities): (Vec<&str>, Vec<i64>) = taken.into_iter().unzip();
        let rows = i64::try_from(skus.len()).unwrap_or(i64::MAX);
        change
            .cte("locked", |q| {
                // In sku order: concurrent changes lock the rows they share in the same order.
                q.push("SELECT sku FROM stock WHERE sku = ANY(")
                    .push_bind(&skus)
                    .push("::text[]) ORDER BY sku FOR UPDATE");
            })
            .cte("taken", |q| {
                q.push(
                    "UPDATE stock s SET available = s.available - w.q, reserved = s.reserved + w.q \
                     FROM locked JOIN UNNEST(",
                )
                .push_bind(skus)
                .push("::text[], ")
                .push_bind(quantities)
                .push(
                    "::bigint[]) AS w(sku, q) USING (sku) WHERE s.sku = w.sku AND s.available >= w.q RETURNING s.sku",
                );
            })
            .cte("reserved", |q| {
                q.push("INSERT INTO reservations (order_id, sku, quantity) SELECT * FROM UNNEST(")
                    .push_bind(reservations.0)
                    .push("::uuid[], ")
                    .push_bind(reservations.1)
                    .push("::text[], ")
                    .push_bind(reservations.2)
                    .push("::bigint[]) WHERE choreo_expect((SELECT count(*) FROM taken) = ")
                    .push_bind(rows)
                    .push(", 'a stock row no longer holds what was reserved from it')");
            });
    }
    Ok(effects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_catalogue_parses() {
        let c = parse_catalogue(DEFAULT_CATALOGUE).expect("default");
        assert!(c.iter().any(|(s, u)| s == "sku-soldout" && *u == 0));
        assert_eq!(c.len(), 11);
    }

    #[test]
    fn bad_catalogues_say_why() {
        assert!(parse_catalogue("a=1,b").expect_err("no units").contains("`b`"));
        assert!(parse_catalogue("a=-1").expect_err("negative").contains("negative"));
        assert!(parse_catalogue("a=x").expect_err("nan").contains("whole number"));
    }
}
