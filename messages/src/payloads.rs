//! Bodies of the commands and events of the order workflow.
//!
//! Every struct rejects unknown fields: a producer that sends a field we do not know is talking to a contract
//! version we do not have, and silently dropping its data would be worse than refusing it.
//! Money is in integer minor units (cents) of an ISO 4217 currency.

use schemars::JsonSchema;

use crate::Payload;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: u32 = 10_000;
pub const MAX_UNIT_PRICE_CENTS: i64 = 100_000_000;
pub const MAX_ID_LEN: usize = 128;

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    /// Stock keeping unit, 1 to 128 bytes of UTF-8.
    pub sku: String,
    /// Units ordered, 1 to 10000.
    pub quantity: u32,
    /// Price of one unit in minor units, 0 to 100000000.
    pub unit_price_cents: i64,
}

/// Command `order.place`: a client asks for an order. Starts the workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// Chosen by the client; placing the same order id twice creates one order.
    pub order_id: Uuid,
    /// 1 to 128 bytes of UTF-8.
    pub customer_id: String,
    /// ISO 4217 code, three upper-case letters.
    pub currency: String,
    /// 1 to 100 lines.
    pub lines: Vec<OrderLine>,
}

/// Event `order.created`: the order exists, PENDING, and waits for payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCreated {
    pub order_id: Uuid,
    pub customer_id: String,
    pub currency: String,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
}

/// Event `payment.succeeded`: the customer was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentSucceeded {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    /// Carried so that inventory can reserve without asking anyone.
    pub lines: Vec<OrderLine>,
}

/// Why a charge was refused. Business outcomes, not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentFailureReason {
    CardDeclined,
    AmountOverLimit,
}

/// Event `payment.failed`: the charge was refused; nothing was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentFailed {
    pub order_id: Uuid,
    pub reason: PaymentFailureReason,
}

/// Event `inventory.reserved`: stock is held for every line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryReserved {
    pub order_id: Uuid,
    pub lines: Vec<OrderLine>,
}

/// Why stock could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InventoryFailureReason {
    OutOfStock,
    UnknownSku,
}

/// Event `inventory.failed`: nothing was reserved (all or nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryFailed {
    pub order_id: Uuid,
    pub reason: InventoryFailureReason,
    /// The first line that could not be served.
    pub sku: String,
}

/// Event `payment.refunded`: a charge was given back (compensation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentRefunded {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    pub reason: InventoryFailureReason,
}

/// Event `order.confirmed`: paid and reserved. Terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub total_cents: i64,
    pub currency: String,
}

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    CardDeclined,
    AmountOverLimit,
    OutOfStock,
    UnknownSku,
}

impl CancelReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            CancelReason::CardDeclined => "card_declined",
            CancelReason::AmountOverLimit => "amount_over_limit",
            CancelReason::OutOfStock => "out_of_stock",
            CancelReason::UnknownSku => "unknown_sku",
        }
    }
}

impl From<PaymentFailureReason> for CancelReason {
    fn from(r: PaymentFailureReason) -> Self {
        match r {
            PaymentFailureReason::CardDeclined => CancelReason::CardDeclined,
            PaymentFailureReason::AmountOverLimit => CancelReason::AmountOverLimit,
        }
    }
}

impl From<InventoryFailureReason> for CancelReason {
    fn from(r: InventoryFailureReason) -> Self {
        match r {
            InventoryFailureReason::OutOfStock => CancelReason::OutOfStock,
            InventoryFailureReason::UnknownSku => CancelReason::UnknownSku,
        }
    }
}

/// Event `order.cancelled`: the order will not be fulfilled; any charge has been refunded. Terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub reason: CancelReason,
}

/// Rules a body must keep beyond its JSON shape.
impl Payload for PlaceOrder {
    const TYPE: &'static str = "order.place";
    fn validate(&self) -> Result<(), String> {
        validate_place_order(self)
    }
}

impl Payload for OrderCreated {
    const TYPE: &'static str = "order.created";
    fn validate(&self) -> Result<(), String> {
        validate_lines(&self.lines)
    }
}

impl Payload for PaymentSucceeded {
    const TYPE: &'static str = "payment.succeeded";
    fn validate(&self) -> Result<(), String> {
        validate_lines(&self.lines)
    }
}

impl Payload for PaymentFailed {
    const TYPE: &'static str = "payment.failed";
}

impl Payload for InventoryReserved {
    const TYPE: &'static str = "inventory.reserved";
}

impl Payload for InventoryFailed {
    const TYPE: &'static str = "inventory.failed";
}

impl Payload for PaymentRefunded {
    const TYPE: &'static str = "payment.refunded";
}

impl Payload for OrderConfirmed {
    const TYPE: &'static str = "order.confirmed";
}

impl Payload for OrderCancelled {
    const TYPE: &'static str = "order.cancelled";
}

pub(crate) fn validate_place_order(p: &PlaceOrder) -> Result<(), String> {
    validate_id("customer_id", &p.customer_id)?;
    validate_currency(&p.currency)?;
    validate_lines(&p.lines)?;
    order_total(&p.lines).map(|_| ())
}

pub(crate) fn validate_id(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(format!("{field} must be 1 to {MAX_ID_LEN} bytes long"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(())
}

pub(crate) fn validate_currency(currency: &str) -> Result<(), String> {
    if currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(format!("currency `{currency}` is not an ISO 4217 code (three upper-case letters)"))
    }
}

pub(crate) fn validate_lines(lines: &[OrderLine]) -> Result<(), String> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(format!("an order needs 1 to {MAX_LINES} lines, got {}", lines.len()));
    }
    for (i, line) in lines.iter().enumerate() {
        validate_id(&format!("lines[{i}].sku"), &line.sku)?;
        if line.quantity == 0 || line.quantity > MAX_QUANTITY {
            return Err(format!("lines[{i}].quantity must be 1 to {MAX_QUANTITY}, got {}", line.quantity));
        }
        if !(0..=MAX_UNIT_PRICE_CENTS).contains(&line.unit_price_cents) {
            return Err(format!(
                "lines[{i}].unit_price_cents must be 0 to {MAX_UNIT_PRICE_CENTS}, got {}",
                line.unit_price_cents
            ));
        }
    }
    Ok(())
}

/// Total of an order in minor units; the limits above keep it far from overflow, but check anyway.
pub fn order_total(lines: &[OrderLine]) -> Result<i64, String> {
    lines.iter().try_fold(0i64, |acc, l| {
        l.unit_price_cents
            .checked_mul(i64::from(l.quantity))
            .and_then(|line_total| acc.checked_add(line_total))
            .ok_or_else(|| "order total overflows".to_owned())
    })
}
