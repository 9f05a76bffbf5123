//! The workers of the reference workflow: order, payment and inventory.
//!
//! - [`service`]: the [`service::Service`] trait a worker implements, and [`service::TransactionalHandler`],
//!   which writes its change with the inbox and the outbox in one statement (one transaction);
//! - [`order`], [`payment`], [`inventory`]: the three services, each with its own database and migrations;
//! - [`gateway`]: the payment gateway port and its simulated adapter; [`http_gateway`]: the HTTP adapter;
//! - [`config`]: settings from the environment (and flags), with documented defaults;
//! - [`connections`]: the database connections a handler keeps from one message to the next;
//! - [`runtime`]: wiring: database, broker, consumer, relay, retention, signals;
//! - [`health`]: `/metrics`, `/health/live`, `/health/ready`;
//! - [`telemetry`]: logs and traces (OTLP when configured).
//!
//! **Architecture invariant**: a service reads only through the connection it is handed (it keeps that
//! connection while it decides, a payment's gateway call included), and changes only its own database, only
//! through the [`choreo_outbox::Change`] it is handed, which commits with the inbox and outbox rows; the
//! events it returns reach the broker through the outbox relay, never directly.

pub mod config;
pub mod connections;
pub mod gateway;
pub mod health;
pub mod http_gateway;
pub mod inventory;
pub mod order;
pub mod payment;
pub mod plain;
pub mod runtime;
pub mod service;
pub mod telemetry;
