//! [`Change`]: a handler's change to its own tables, written as the common table expressions of the one
//! statement that also records the handled messages in the inbox and writes their events to the outbox
//! ([`crate::InboxGuard::commit`]).
//!
//! One statement sent outside `BEGIN` is a transaction of its own: the change, the inbox rows and the
//! outbox rows commit together or not at all, in one round trip and one flush. A change that applies only
//! under a condition (the order is still PENDING, the payment not recorded yet) names the keys it applied
//! ([`Change::applied`]); an event written under such a key is written only if its key was applied, so that
//! the events always match the change that committed.

use sqlx::{Postgres, QueryBuilder};

/// The common table expressions of a handler's statement, with their bound values.
pub struct Change {
    sql: QueryBuilder<Postgres>,
    ctes: usize,
    applied: Vec<String>,
}

impl Default for Change {
    fn default() -> Self {
        Change::new()
    }
}

impl Change {
    pub fn new() -> Self {
        Change { sql: QueryBuilder::new("WITH "), ctes: 0, applied: Vec::new() }
    }

    /// Add `name AS (body)`. `body` pushes the expression's text and binds its values
    /// ([`QueryBuilder::push_bind`] writes the placeholder). Data-modifying expressions run to completion
    /// whether or not anything reads them; all of them see the same snapshot, so two must not change the
    /// same rows.
    pub fn cte(&mut self, name: &str, body: impl FnOnce(&mut QueryBuilder<Postgres>)) -> &mut Self {
        if self.ctes > 0 {
            self.sql.push(", ");
        }
        self.sql.push(name).push(" AS (");
        body(&mut self.sql);
        self.sql.push(")");
        self.ctes += 1;
        self
    }

    /// Declare that `select` (a query of one `uuid` column, usually over an expression's `RETURNING`) gives
    /// keys this change applied. Events written under a key are kept only if it is among them.
    pub fn applied(&mut self, select: &str) -> &mut Self {
        self.applied.push(select.to_owned());
        self
    }

    /// Whether the change names keys it applied ([`Change::applied`]).
    pub fn names_applied_keys(&self) -> bool {
        !self.applied.is_empty()
    }

    /// The builder with the change and an `applied(key)` expression, ready for the inbox and outbox
    /// expressions.
    pub(crate) fn into_builder(mut self) -> QueryBuilder<Postgres> {
        if self.ctes > 0 {
            self.sql.push(", ");
        }
        self.sql.push("applied(key) AS (");
        if self.applied.is_empty() {
            self.sql.push("SELECT NULL::uuid WHERE false");
        } else {
            self.sql.push(self.applied.join(" UNION ALL "));
        }
        self.sql.push(")");
        self.sql
    }

    /// The change as a complete statement returning the applied keys, without the inbox and outbox: for
    /// inspecting its plan (`EXPLAIN`), not for running.
    pub fn inspection_sql(self) -> String {
        let mut sql = self.into_builder();
        sql.push(" SELECT key FROM applied");
        sql.sql().as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_are_joined_and_numbered_in_order() {
        let mut change = Change::new();
        change
            .cte("a", |q| {
                q.push("UPDATE t SET x = ")
                    .push_bind(1_i64)
                    .push(" WHERE id = ")
                    .push_bind(2_i64)
                    .push(" RETURNING id");
            })
            .cte("b", |q| {
                q.push("INSERT INTO h SELECT id, ").push_bind("y").push(" FROM a");
            })
            .applied("SELECT id FROM a");
        assert_eq!(
            change.inspection_sql(),
            "WITH a AS (UPDATE t SET x = $1 WHERE id = $2 RETURNING id), b AS (INSERT INTO h SELECT id, $3 FROM a), \
             applied(key) AS (SELECT id FROM a) SELECT key FROM applied"
        );
    }

    #[test]
    fn a_change_with_nothing_applied_still_names_the_applied_keys() {
        assert_eq!(
            Change::new().inspection_sql(),
            "WITH applied(key) AS (SELECT NULL::uuid WHERE false) SELECT key FROM applied"
        );
    }
}
