//! Which dead letters a command applies to.

use std::time::Duration;

use chrono::Utc;

use super::letter::Story;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only the message with this message id (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Only messages with this error kind (`malformed_body`, `transient`, `crashed`, `delivery_limit`, ...).
    #[arg(long)]
    pub error_kind: Option<String>,
    /// Only messages of this type (`order.created`, ...).
    #[arg(long = "type")]
    pub message_type: Option<String>,
    /// Only messages whose last failure is older than this (`10m`, `2h`, `3d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Every message of the queue (required when no other filter is given, so that nothing is done by accident).
    #[arg(long)]
    pub all: bool,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.error_kind.is_none() && self.message_type.is_none() && self.older_than.is_none()
    }

    /// Refuse to act on a whole queue unless `--all` says so.
    pub fn require_selection(&self) -> anyhow::Result<()> {
        if self.is_empty() && !self.all {
            anyhow::bail!("say which messages: --id, --error-kind, --type, --older-than, or --all for every message");
        }
        Ok(())
    }

    pub fn matches(&self, story: &Story) -> bool {
        if !self.ids.is_empty() && !story.message_id.as_ref().is_some_and(|id| self.ids.contains(id)) {
            return false;
        }
        if self.error_kind.as_ref().is_some_and(|k| *k != story.error_kind) {
            return false;
        }
        if self.message_type.as_ref().is_some_and(|t| Some(t) != story.message_type.as_ref()) {
            return false;
        }
        if let Some(age) = self.older_than {
            let Some(at) = story.last_failure_at else { return false };
            let limit = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
            if Utc::now() - at < limit {
                return false;
            }
        }
        true
    }
}
