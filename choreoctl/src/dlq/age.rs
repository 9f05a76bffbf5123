//! Whether replaying a dead letter could apply it twice.
//!
//! A worker's inbox remembers the ids of the messages it processed for its `CHOREO_INBOX_RETENTION`, counted
//! from when it processed them, and no message is processed before it exists. So while a letter is younger
//! than the retention, measured from the earliest time it carries, its id is still remembered if it was
//! ever processed, and a replay of an applied message is only counted as a duplicate. An older letter may
//! have been applied and forgotten: replayed, it would be applied again.

use std::time::Duration;

use choreo_messages::headers::OCCURRED_AT;
use choreo_rabbitmq::codec::header_string;
use choreo_rabbitmq::lapin::BasicProperties;
use chrono::{DateTime, Utc};

use super::letter::Story;

/// What a replay of a letter risks, against the inbox retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayRisk {
    /// Younger than the retention: if it was processed, the inbox still knows it.
    None,
    /// As old as the retention or older: the inbox may have forgotten that it processed it.
    TooOld { age: chrono::Duration },
    /// It carries no time at all, so nothing shows that the inbox would still know it.
    AgeUnknown,
}

impl ReplayRisk {
    pub fn refused(self) -> bool {
        self != ReplayRisk::None
    }
}

/// The earliest of the times a letter carries: when it was published (the contract's `occurred-at` header, or
/// the AMQP `timestamp` property that other clients set) and when it first failed (see [`Story`]).
pub fn earliest_time(properties: &BasicProperties, story: &Story) -> Option<DateTime<Utc>> {
    // 0 is what a client that sets no time sends: 1970 is no time of this letter.
    let published = properties
        .timestamp()
        .filter(|&seconds| seconds > 0)
        .and_then(|seconds| i64::try_from(seconds).ok())
        .and_then(|seconds| DateTime::from_timestamp(seconds, 0));
    let occurred = properties
        .headers()
        .as_ref()
        .and_then(|h| header_string(h, OCCURRED_AT))
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc));
    [published, occurred, story.first_failure_at].into_iter().flatten().min()
}

/// The risk of replaying, `now`, a letter whose earliest time is `earliest`, when inboxes remember ids for
/// `retention`. A letter exactly as old as the retention is refused: the inbox's cleanup may just have run.
pub fn replay_risk(earliest: Option<DateTime<Utc>>, now: DateTime<Utc>, retention: Duration) -> ReplayRisk {
    let Some(earliest) = earliest else { return ReplayRisk::AgeUnknown };
    let age = now - earliest;
    // A retention beyond chrono's range (centuries) is never reached.
    let Ok(retention) = chrono::Duration::from_std(retention) else { return ReplayRisk::None };
    if age >= retention { ReplayRisk::TooOld { age } } else { ReplayRisk::None }
}

#[cfg(test)]
mod tests {
    use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString};

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).expect("time")
    }

    fn story(first_failure_at: Option<DateTime<Utc>>) -> Story {
        Story {
            message_id: Some("m1".into()),
            message_type: Some("order.created".into()),
            correlation_id: None,
            worker: Some("payment".into()),
            error_kind: "transient".into(),
            error: None,
            attempts: None,
            original_exchange: None,
            original_routing_key: None,
            first_failure_at,
            last_failure_at: first_failure_at,
            replayed_at: None,
            body_bytes: 2,
        }
    }

    #[test]
    fn a_letter_is_as_old_as_the_earliest_time_it_carries() {
        const T: i64 = 1_790_000_000;
        let stamped = BasicProperties::default().with_timestamp(T as u64);
        assert_eq!(earliest_time(&stamped, &story(Some(at(T + 60)))), Some(at(T)), "published, then failed");
        assert_eq!(earliest_time(&stamped, &story(Some(at(T - 60)))), Some(at(T - 60)), "a clock behind");
        assert_eq!(earliest_time(&BasicProperties::default(), &story(Some(at(T)))), Some(at(T)), "no timestamp");
        assert_eq!(earliest_time(&stamped, &story(None)), Some(at(T)), "no failure time");
        let unset = BasicProperties::default().with_timestamp(0);
        assert_eq!(earliest_time(&unset, &story(None)), None, "0 is no time");

        let mut headers = FieldTable::default();
        headers.insert(OCCURRED_AT.into(), AMQPValue::LongString(LongString::from("2026-09-21T10:00:00.250000Z")));
        let occurred = BasicProperties::default().with_timestamp(T as u64).with_headers(headers);
        let expected = DateTime::parse_from_rfc3339("2026-09-21T10:00:00.250Z").expect("time").with_timezone(&Utc);
        assert!(expected < at(T));
        assert_eq!(earliest_time(&occurred, &story(None)), Some(expected));
    }

    #[test]
    fn only_letters_younger_than_the_inbox_retention_are_replayed_without_force() {
        let now = at(1_790_000_000);
        let days = |n: i64| chrono::Duration::days(n);
        assert_eq!(replay_risk(Some(now - days(29)), now, 30 * DAY), ReplayRisk::None);
        assert_eq!(replay_risk(Some(now - days(30)), now, 30 * DAY), ReplayRisk::TooOld { age: days(30) });
        assert_eq!(replay_risk(Some(now - days(45)), now, 30 * DAY), ReplayRisk::TooOld { age: days(45) });
        assert_eq!(replay_risk(Some(now - days(2)), now, DAY), ReplayRisk::TooOld { age: days(2) });
        assert_eq!(replay_risk(Some(now + days(1)), now, DAY), ReplayRisk::None, "a clock ahead of ours");
        assert_eq!(replay_risk(None, now, 30 * DAY), ReplayRisk::AgeUnknown);
        assert_eq!(replay_risk(Some(now - days(45)), now, Duration::MAX), ReplayRisk::None);
        assert!(ReplayRisk::AgeUnknown.refused() && ReplayRisk::TooOld { age: days(1) }.refused());
        assert!(!ReplayRisk::None.refused());
    }
}
