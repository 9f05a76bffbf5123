//! The participants of the reference workflow, order fulfilment, built on the `choreo` crate: order, payment
//! and inventory.
//!
//! - [`order`], [`payment`], [`inventory`]: the three services, each a [`choreo::Service`] with its own
//!   database and migrations;
//! - [`gateway`]: the payment gateway port and its simulated adapter; [`http_gateway`]: the HTTP adapter.
//!
//! **Architecture invariant**: a service reads only through the connection it is handed (it keeps that
//! connection while it decides, a payment's gateway call included), and changes only its own database, only
//! through the [`choreo::Change`] it is handed, which commits with the inbox and outbox rows; the events it
//! returns reach the broker through the outbox relay, never directly.

pub mod gateway;
pub mod http_gateway;
pub mod inventory;
pub mod order;
pub mod payment;
