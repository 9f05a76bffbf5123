//! [`Story`]: one message of a dead-letter queue, with the story its headers tell.
//!
//! Two writers tell that story. A worker writes `choreo-*` headers whenever it gives up on a delivery:
//! at every delayed-retry round and when it dead-letters the message itself; replays keep them. The broker
//! adds an entry to `x-death` whenever it dead-letters the message: `expired` when a delay queue sends it
//! back to its worker, `delivery_limit` when the worker's quorum queue gives up on it (a poison message).
//! So a message can carry the worker's story of an earlier, harmless failure and still have been put here by
//! the broker afterwards: the story is whichever writer acted last.

use choreo_rabbitmq::codec::{header_i64, header_string};
use choreo_rabbitmq::dead_letter::headers as dl;
use choreo_rabbitmq::dead_letter::{Death, EXPIRED, broker_deaths, deaths};
use choreo_rabbitmq::lapin::message::Delivery;
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// What an operator needs to know about a dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Story {
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    pub worker: Option<String>,
    pub error_kind: String,
    pub error: Option<String>,
    pub attempts: Option<i64>,
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub replayed_at: Option<String>,
    pub body_bytes: usize,
}

/// The kind a broker dead-lettering gives a letter.
fn broker_kind(death: &Death<'_>) -> String {
    match death.reason.as_deref() {
        Some("delivery_limit") => "delivery_limit".into(),
        Some(r) => format!("broker_{r}"),
        None => "broker_unknown".into(),
    }
}

/// The story of a delivery from a dead-letter queue.
pub fn story(delivery: &Delivery) -> Story {
    let empty = FieldTable::default();
    let h = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let time = |key: &str| {
        header_string(h, key).and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&Utc))
    };
    let deaths = deaths(h);
    let latest = deaths.first();
    let worker_kind = header_string(h, dl::ERROR_KIND);
    let worker_error = header_string(h, dl::ERROR);
    let worker_last = time(dl::LAST_FAILURE_AT);
    let replayed_at = header_string(h, dl::REPLAYED_AT);
    let replayed =
        replayed_at.as_deref().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc));
    // Workers record what they saw of the broker's dead-letterings when they wrote their story: if `x-death`
    // tells anything else now, the broker acted since. Letters without that record, or whose record belongs
    // to another failure (copied by a worker that does not write it), fall back on times.
    let seen = header_string(h, dl::BROKER_DEATHS_SEEN).and_then(|v| {
        let (at, deaths) = v.split_once('|')?;
        (header_string(h, dl::LAST_FAILURE_AT).as_deref() == Some(at)).then(|| deaths.to_owned())
    });
    let by_broker = latest.filter(|_| match seen {
        Some(seen) if worker_kind.is_some() => broker_deaths(h) != seen,
        _ => broker_acted_last(&deaths, worker_kind.is_some(), worker_last, replayed),
    });
    let death_times = deaths.iter().filter_map(|d| d.time);
    let first_death = deaths.iter().filter(|d| d.reason.as_deref() != Some(EXPIRED)).filter_map(|d| d.time).min();
    let first_failure_at = match (time(dl::FIRST_FAILURE_AT), first_death) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let (error_kind, error, last_failure_at) = match by_broker {
        Some(death) => {
            let queue = death.queue.as_deref().unwrap_or("?");
            let error = match (&worker_kind, &worker_error) {
                (Some(kind), error) => format!(
                    "dead-lettered by the broker ({}) from `{queue}` after the last failure its worker recorded ({kind}: {})",
                    death.reason.as_deref().unwrap_or("no reason given"),
                    error.as_deref().unwrap_or("-")
                ),
                (None, _) => format!(
                    "dead-lettered by the broker ({}) from `{queue}`",
                    death.reason.as_deref().unwrap_or("no reason given")
                ),
            };
            // The broker keeps the time of the first event of a kind: the latest known time is a lower bound.
            let last = death_times.chain(worker_last).chain(replayed).max();
            (broker_kind(death), Some(error), last)
        }
        None => (worker_kind.unwrap_or_else(|| "unknown".into()), worker_error, worker_last.or(death_times.max())),
    };
    let latest_string = |key: &str| latest.and_then(|d| header_string(d.table, key));
    Story {
        message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
        message_type: delivery.properties.kind().as_ref().map(|m| m.to_string()),
        correlation_id: delivery.properties.correlation_id().as_ref().map(|m| m.to_string()),
        worker: header_string(h, dl::WORKER),
        error_kind,
        error,
        attempts: header_i64(h, dl::ATTEMPTS).or_else(|| latest.and_then(|d| header_i64(d.table, "count"))),
        original_exchange: header_string(h, dl::ORIGINAL_EXCHANGE).or_else(|| latest_string("exchange")),
        original_routing_key: header_string(h, dl::ORIGINAL_ROUTING_KEY)
            .or_else(|| latest.and_then(|d| first_routing_key(d.table))),
        first_failure_at,
        last_failure_at,
        replayed_at,
        body_bytes: delivery.data.len(),
    }
}

/// Whether the broker, not a worker, put the message where it is now, after the last failure the worker
/// recorded. The latest `x-death` entry is the broker's latest act; it counts only if it can put a message
/// in a dead-letter queue (an expiry sends it back to its worker, which then wrote the story itself), and if
/// it is not older than the worker's last failure. Its time can be too old (a repeated event keeps the first
/// time), so any later broker event, or a replay after the worker's last failure, also shows that the worker
/// did not write the last chapter. Times come from different clocks and `x-death` has whole seconds: a tie
/// goes to the broker, so that a poison message is never shown as a harmless failure.
fn broker_acted_last(
    deaths: &[Death<'_>],
    worker_wrote: bool,
    worker_last: Option<DateTime<Utc>>,
    replayed: Option<DateTime<Utc>>,
) -> bool {
    let Some(latest) = deaths.first() else { return false };
    if !worker_wrote {
        return true;
    }
    if latest.reason.as_deref() == Some(EXPIRED) {
        return false;
    }
    let Some(worker_last) = worker_last else { return true };
    let worker_second = DateTime::from_timestamp(worker_last.timestamp(), 0).unwrap_or(worker_last);
    deaths.iter().filter_map(|d| d.time).any(|t| t >= worker_second) || replayed.is_some_and(|r| r > worker_last)
}

fn first_routing_key(death: &FieldTable) -> Option<String> {
    match death.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => keys.as_slice().iter().find_map(|k| match k {
            AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }),
        _ => None,
    }
}

/// The body for people: pretty JSON when it is JSON, text when it is UTF-8, else a hex dump of the start.
pub fn render_body(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        return serde_json::to_string_pretty(&value).unwrap_or_default();
    }
    match std::str::from_utf8(body) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let hex: Vec<String> = body.iter().take(256).map(|b| format!("{b:02x}")).collect();
            format!("<{} bytes of binary> {}{}", body.len(), hex.join(" "), if body.len() > 256 { " ..." } else { "" })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use choreo_rabbitmq::lapin::BasicProperties;
    use choreo_rabbitmq::lapin::types::{FieldArray, LongString};

    const T: i64 = 1_790_000_000; // a whole second

    fn at(seconds: i64, millis: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, millis * 1_000_000).expect("time")
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn rfc3339(t: DateTime<Utc>) -> AMQPValue {
        text(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }

    /// An `x-death` entry as RabbitMQ writes it.
    fn death(queue: &str, reason: &str, seconds: i64) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), text(queue));
        t.insert("reason".into(), text(reason));
        t.insert("count".into(), AMQPValue::LongLongInt(1));
        t.insert("exchange".into(), text(""));
        t.insert("routing-keys".into(), AMQPValue::FieldArray(FieldArray::from(vec![text(queue)])));
        t.insert("time".into(), AMQPValue::Timestamp(seconds as u64));
        AMQPValue::FieldTable(t)
    }

    /// The headers a worker writes when it gives up on a delivery (a retry round or a dead letter).
    fn worker_failure(h: &mut FieldTable, kind: &str, error: &str, first: DateTime<Utc>, last: DateTime<Utc>) {
        h.insert(dl::ERROR_KIND.into(), text(kind));
        h.insert(dl::ERROR.into(), text(error));
        h.insert(dl::WORKER.into(), text("payment"));
        h.insert(dl::ATTEMPTS.into(), AMQPValue::LongLongInt(3));
        h.insert(dl::FIRST_FAILURE_AT.into(), rfc3339(first));
        h.insert(dl::LAST_FAILURE_AT.into(), rfc3339(last));
    }

    fn letter(mut h: FieldTable, deaths: Vec<AMQPValue>) -> Story {
        if !deaths.is_empty() {
            h.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(deaths)));
        }
        let mut delivery = Delivery::mock(1, "".into(), "choreo.payment.dlq".into(), false, b"{}".to_vec());
        delivery.properties = BasicProperties::default().with_headers(h);
        story(&delivery)
    }

    /// An `x-death` entry after `count` events, the first at `seconds`.
    fn deaths_of(queue: &str, reason: &str, seconds: i64, count: i64) -> AMQPValue {
        let AMQPValue::FieldTable(mut t) = death(queue, reason, seconds) else { unreachable!("a table") };
        t.insert("count".into(), AMQPValue::LongLongInt(count));
        AMQPValue::FieldTable(t)
    }

    /// What a worker writes in `choreo-broker-deaths-seen`, for its last failure at `last` and the entries it saw.
    fn seen(h: &mut FieldTable, last: DateTime<Utc>, entries: Vec<AMQPValue>) {
        let mut saw = FieldTable::default();
        saw.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(entries)));
        let at = last.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        h.insert(dl::BROKER_DEATHS_SEEN.into(), text(&choreo_rabbitmq::dead_letter::broker_deaths_seen(&at, &saw)));
    }

    #[test]
    fn before_rabbitmq_4_a_grown_count_shows_the_broker_acted_after_the_worker_whatever_the_times() {
        // Second cycle after a replay: the worker parked it at T+200, having seen one delivery-limit dead
        // letter; it came back through a delay queue it had used before, then crashed the worker until the
        // delivery limit dead-lettered it again. Every x-death time is that entry's first: all before T+200.
        let mut h = FieldTable::default();
        worker_failure(&mut h, "transient", "gateway timed out", at(T, 0), at(T + 200, 0));
        h.insert(dl::REPLAYED_AT.into(), rfc3339(at(T + 100, 0)));
        seen(&mut h, at(T + 200, 0), vec![deaths_of("choreo.payment", "delivery_limit", T + 60, 1)]);
        let now = vec![
            deaths_of("choreo.payment", "delivery_limit", T + 60, 2),
            deaths_of("choreo.payment.retry.1000ms", "expired", T + 1, 2),
        ];
        assert_eq!(letter(h.clone(), now.clone()).error_kind, "delivery_limit");
        // The same letter when the worker itself dead-lettered it last, having seen both.
        seen(&mut h, at(T + 200, 0), vec![deaths_of("choreo.payment", "delivery_limit", T + 60, 2)]);
        assert_eq!(letter(h, now).error_kind, "transient");
    }

    #[test]
    fn from_rabbitmq_4_new_entries_show_the_broker_acted_after_the_worker() {
        // RabbitMQ 4 ignores the x-death a client publishes: after the park at T+200, the expiry and the
        // delivery limit start new entries, with counts of 1 again.
        let mut h = FieldTable::default();
        worker_failure(&mut h, "transient", "gateway timed out", at(T, 0), at(T + 200, 0));
        seen(&mut h, at(T + 200, 0), vec![deaths_of("choreo.payment", "delivery_limit", T + 60, 1)]);
        let now = vec![
            deaths_of("choreo.payment", "delivery_limit", T + 300, 1),
            deaths_of("choreo.payment.retry.1000ms", "expired", T + 250, 1),
        ];
        assert_eq!(letter(h, now).error_kind, "delivery_limit");
    }

    #[test]
    fn a_record_copied_by_a_worker_that_does_not_write_it_is_not_trusted() {
        // An older worker failed it last at T+400 and copied the record of the failure at T+200: the times
        // decide (the broker's latest act, at T+60, is older than that failure).
        let mut h = FieldTable::default();
        worker_failure(&mut h, "transient", "gateway timed out", at(T, 0), at(T + 400, 0));
        seen(&mut h, at(T + 200, 0), vec![]);
        let now = vec![deaths_of("choreo.payment", "delivery_limit", T + 60, 1)];
        assert_eq!(letter(h, now).error_kind, "transient");
    }

    #[test]
    fn a_retry_round_then_the_delivery_limit_is_a_poison_message_not_a_transient_failure() {
        // Failed at T+0.5 (a retry round), back from the delay queue at T+1, then crashed the worker until the
        // quorum queue's delivery limit dead-lettered it at T+60.
        let mut h = FieldTable::default();
        worker_failure(&mut h, "transient", "gateway timed out", at(T, 500), at(T, 500));
        let s = letter(
            h,
            vec![
                death("choreo.payment", "delivery_limit", T + 60),
                death("choreo.payment.retry.1000ms", "expired", T + 1),
            ],
        );
        assert_eq!(s.error_kind, "delivery_limit");
        assert_eq!(s.last_failure_at, Some(at(T + 60, 0)));
        assert_eq!(s.first_failure_at, Some(at(T, 500)));
        let error = s.error.expect("error");
        assert!(
            error.contains("broker") && error.contains("delivery_limit") && error.contains("gateway timed out"),
            "{error}"
        );
    }

    #[test]
    fn the_delivery_limit_then_a_replay_then_a_worker_failure_is_the_workers_story() {
        // Dead-lettered by the broker at T, replayed at T+100, then failed in the worker at T+100.2.
        let mut h = FieldTable::default();
        worker_failure(&mut h, "malformed_body", "expected value at line 1", at(T + 100, 200), at(T + 100, 200));
        h.insert(dl::REPLAYED_AT.into(), rfc3339(at(T + 100, 0)));
        let s = letter(h, vec![death("choreo.payment", "delivery_limit", T)]);
        assert_eq!(s.error_kind, "malformed_body");
        assert_eq!(s.error.as_deref(), Some("expected value at line 1"));
        assert_eq!(s.last_failure_at, Some(at(T + 100, 200)));
        assert_eq!(s.first_failure_at, Some(at(T, 0)), "the broker's dead-lettering was the first failure");
    }

    #[test]
    fn retries_used_up_are_transient_even_though_the_last_broker_event_is_an_expiry() {
        // Rounds at T and T+2; back from the last delay queue at T+12; dead-lettered by the worker at T+12.3.
        // The expiry's second ties with the last failure's: an expiry never puts a message here.
        let mut h = FieldTable::default();
        worker_failure(&mut h, "transient", "database unavailable", at(T, 0), at(T + 12, 300));
        let s = letter(
            h,
            vec![
                death("choreo.payment.retry.10000ms", "expired", T + 12),
                death("choreo.payment.retry.1000ms", "expired", T + 1),
            ],
        );
        assert_eq!(s.error_kind, "transient");
        assert_eq!(s.error.as_deref(), Some("database unavailable"));
        assert_eq!(s.last_failure_at, Some(at(T + 12, 300)));
    }

    #[test]
    fn a_replayed_message_the_broker_dead_letters_again_is_the_brokers_even_with_a_stale_time() {
        // Delivery limit at T; replayed; failed in the worker at T+50 (dead-lettered); replayed at T+80; delivery
        // limit again: RabbitMQ counts it on the entry of T and moves it to the front, keeping the time T.
        let mut h = FieldTable::default();
        worker_failure(&mut h, "transient", "gateway timed out", at(T + 50, 0), at(T + 50, 0));
        h.insert(dl::REPLAYED_AT.into(), rfc3339(at(T + 80, 0)));
        let s = letter(h, vec![death("choreo.payment", "delivery_limit", T)]);
        assert_eq!(s.error_kind, "delivery_limit");
        assert_eq!(s.last_failure_at, Some(at(T + 80, 0)), "not before the replay");
    }

    #[test]
    fn a_stale_delivery_limit_after_a_fresh_retry_round_is_the_brokers() {
        // Delivery limit at T; replayed; a retry round at T+50; back at T+51; delivery limit again (time T kept).
        let mut h = FieldTable::default();
        worker_failure(&mut h, "transient", "gateway timed out", at(T + 50, 0), at(T + 50, 0));
        h.insert(dl::REPLAYED_AT.into(), rfc3339(at(T + 40, 0)));
        let s = letter(
            h,
            vec![death("choreo.payment", "delivery_limit", T), death("choreo.payment.retry.1000ms", "expired", T + 51)],
        );
        assert_eq!(s.error_kind, "delivery_limit");
        assert_eq!(s.last_failure_at, Some(at(T + 51, 0)));
    }

    #[test]
    fn only_the_brokers_story() {
        let s = letter(FieldTable::default(), vec![death("choreo.payment", "delivery_limit", T)]);
        assert_eq!(s.error_kind, "delivery_limit");
        assert_eq!(s.attempts, Some(1));
        assert_eq!(s.original_routing_key.as_deref(), Some("choreo.payment"));
        assert_eq!((s.first_failure_at, s.last_failure_at), (Some(at(T, 0)), Some(at(T, 0))));
        let s = letter(FieldTable::default(), vec![death("choreo.payment", "rejected", T)]);
        assert_eq!(s.error_kind, "broker_rejected");
    }

    #[test]
    fn only_the_workers_story() {
        let mut h = FieldTable::default();
        worker_failure(&mut h, "unknown_type", "no type order.teleport", at(T, 0), at(T, 0));
        let s = letter(h, vec![]);
        assert_eq!(s.error_kind, "unknown_type");
        assert_eq!(s.last_failure_at, Some(at(T, 0)));
        assert_eq!(letter(FieldTable::default(), vec![]).error_kind, "unknown");
    }
}
