//! The outbox and inbox tables, and how a service combines them with its own.
//!
//! Several migration sets on one database would fight over `_sqlx_migrations`; each database therefore runs
//! exactly one set: these migrations followed by the service's (versions never overlap: ours are dated
//! `20261123000001`, services use later dates).

use sqlx::migrate::Migrator;

/// The outbox and inbox migrations alone.
pub static OUTBOX_MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// One migration set for a service database: the outbox's and the service's.
pub fn with_service_migrations(service: &Migrator) -> Migrator {
    let mut all: Vec<_> = OUTBOX_MIGRATOR.iter().cloned().collect();
    all.extend(service.iter().cloned());
    all.sort_by_key(|m| m.version);
    Migrator::with_migrations(all)
}
