//! [`Migrations`]: a participant's own tables, as SQL it embeds, run beside the outbox's and the inbox's.

use std::borrow::Cow;

use sqlx::SqlStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// A participant's migrations: `(version, description, sql)`, applied in version order, each once, with
/// the outbox's and inbox's tables in one migration set per database. Versions are dates
/// (`20261208000001`), later than the outbox's (`20261123000001`…); never edit a migration once applied:
/// add one.
///
/// ```
/// static MIGRATIONS: choreo::Migrations = choreo::Migrations::new(&[
///     (20261208000001, "shipments", include_str!("../tests/data/example_migration.sql")),
/// ]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    steps: &'static [(i64, &'static str, &'static str)],
}

impl Migrations {
    /// Migrations from `(version, description, sql)` steps; `include_str!` keeps each in a file of its own.
    pub const fn new(steps: &'static [(i64, &'static str, &'static str)]) -> Self {
        Migrations { steps }
    }

    /// No tables of the participant's own (the outbox's and the inbox's are still created).
    pub const fn none() -> Self {
        Migrations { steps: &[] }
    }

    /// As sqlx migrations, for [`crate::prepare_database`].
    pub fn migrator(&self) -> Migrator {
        Migrator::with_migrations(
            self.steps
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        SqlStr::from_static(sql),
                        false,
                    )
                })
                .collect(),
        )
    }
}
