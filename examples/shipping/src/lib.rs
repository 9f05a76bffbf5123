//! The shipping participant: it joins the order workflow's choreography without any change to the order,
//! payment and inventory workers. For every `order.confirmed` it schedules a shipment in its own database
//! and emits `shipment.scheduled`, which ends its part of the workflow.
//!
//! Built on the `choreo` crate alone, as a team outside this repository would build it; `docs/guide.md`
//! walks through it.

use choreo::schemars::JsonSchema;
use choreo::serde::{Deserialize, Serialize};
use choreo::sqlx::PgConnection;
use choreo::uuid::Uuid;
use choreo::{Envelope, Migrations, Payload, PlainHandler, ServiceError, contract};

/// Event `order.confirmed`, published by the order worker (its JSON Schema is
/// `messages/schema/order.confirmed.v1.schema.json`): an order paid for and reserved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(crate = "choreo::serde", deny_unknown_fields)]
#[schemars(crate = "choreo::schemars")]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: Uuid,
    /// What was charged, in minor units.
    pub total_cents: i64,
    /// ISO 4217 code of the charge.
    pub currency: String,
}

impl Payload for OrderConfirmed {
    const TYPE: &'static str = "order.confirmed";
}

/// Event `shipment.scheduled`: a confirmed order's shipment is booked with a carrier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(crate = "choreo::serde", deny_unknown_fields)]
#[schemars(crate = "choreo::schemars")]
pub struct ShipmentScheduled {
    /// The order shipped.
    pub order_id: Uuid,
    /// `standard`, or `express` for orders of 100.00 or more.
    pub carrier: String,
}

impl Payload for ShipmentScheduled {
    const TYPE: &'static str = "shipment.scheduled";
    fn validate(&self) -> Result<(), String> {
        if CARRIERS.contains(&self.carrier.as_str()) {
            Ok(())
        } else {
            Err(format!("unknown carrier `{}`", self.carrier))
        }
    }
}

/// The carriers a shipment can go with.
pub const CARRIERS: [&str; 2] = ["standard", "express"];

contract! {
    /// Everything the shipping worker reads or writes.
    pub enum Shipping {
        /// Consumed.
        OrderConfirmed(OrderConfirmed),
        /// Emitted.
        ShipmentScheduled(ShipmentScheduled),
    }
}

/// The shipping worker's own tables.
pub static MIGRATIONS: Migrations =
    Migrations::new(&[(20261208000001, "shipments", include_str!("../migrations/20261208000001_shipments.sql"))]);

/// Where the shipping worker serves `/metrics` and its health by default, beside the reference workers'.
pub const METRICS_PORT: u16 = 9467;

/// Schedules a shipment per confirmed order.
pub struct ShippingHandler;

impl ShippingHandler {
    /// The carrier for an order of `total_cents`.
    pub fn carrier(total_cents: i64) -> &'static str {
        if total_cents >= 10_000 { "express" } else { "standard" }
    }
}

impl PlainHandler for ShippingHandler {
    type Message = Shipping;
    const NAME: &'static str = "shipping";
    const CONSUMES: &'static [&'static str] = &[OrderConfirmed::TYPE];
    const OUTCOMES: &'static [&'static str] = &[ShipmentScheduled::TYPE];

    async fn handle(&self, tx: &mut PgConnection, message: &Envelope<Shipping>) -> Result<Vec<Shipping>, ServiceError> {
        let Shipping::OrderConfirmed(confirmed) = &message.message else {
            return Err(ServiceError::Permanent(format!("shipping does not consume `{}`", message.meta.message_type)));
        };
        let carrier = Self::carrier(confirmed.total_cents);
        choreo::sqlx::query("INSERT INTO shipments (order_id, carrier) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(confirmed.order_id)
            .bind(carrier)
            .execute(&mut *tx)
            .await?;
        Ok(vec![ShipmentScheduled { order_id: confirmed.order_id, carrier: carrier.to_owned() }.into()])
    }
}

#[cfg(test)]
mod tests {
    use choreo::Contract;

    use super::*;

    #[test]
    fn orders_of_100_or_more_go_express() {
        assert_eq!(ShippingHandler::carrier(9_999), "standard");
        assert_eq!(ShippingHandler::carrier(10_000), "express");
    }

    #[test]
    fn its_contract_decodes_strictly() {
        let body = br#"{"order_id":"0190f5a2-6d3c-7cc0-8000-000000000001","total_cents":500,"currency":"EUR"}"#;
        assert!(Shipping::decode("order.confirmed", 1, body).is_ok());
        let unknown_field =
            br#"{"order_id":"0190f5a2-6d3c-7cc0-8000-000000000001","total_cents":500,"currency":"EUR","x":1}"#;
        assert!(Shipping::decode("order.confirmed", 1, unknown_field).is_err());
        let odd_carrier = br#"{"order_id":"0190f5a2-6d3c-7cc0-8000-000000000001","carrier":"pigeon"}"#;
        assert!(Shipping::decode("shipment.scheduled", 1, odd_carrier).is_err());
        assert_eq!(Shipping::label_for("order.place"), "unknown");
    }
}
