//! `dlq replay` and `dlq purge`: the two commands that take messages off a dead-letter queue.
//!
//! Replay publishes each selected message with confirms and acknowledges it on the dead-letter queue only
//! after the broker confirmed the replay. If the CLI dies half way, the messages it had not acknowledged go
//! back to the dead-letter queue; running it again replays them, and the workers' inboxes absorb the ones
//! that had been replayed already. Replayed messages keep their message id and carry `choreo-replayed-at`.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use choreo_rabbitmq::ConfirmingPublisher;
use choreo_rabbitmq::codec::headers_to_republish;
use choreo_rabbitmq::dead_letter::headers as dl;
use choreo_rabbitmq::dead_letter::kept_properties;
use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::lapin::message::Delivery;
use choreo_rabbitmq::lapin::options::BasicAckOptions;
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString};
use choreo_rabbitmq::publisher::Outgoing;
use chrono::{SecondsFormat, Utc};
use serde::Serialize;

use super::age::{ReplayRisk, earliest_time, replay_risk};
use super::browse::browse;
use super::filter::Filter;
use super::letter::Story;
use crate::broker::BrokerArgs;
use crate::progress::bar;

/// Exit code when some selected messages could not be replayed or purged (they stay in the dead-letter queue),
/// or some lines of an import could not be published.
pub const EXIT_PARTIAL: u8 = 4;
/// Exit code when a purge was not confirmed.
pub const EXIT_NOT_CONFIRMED: u8 = 5;
/// Exit code when a replay left letters older than the inbox retention in the queue (and nothing failed).
pub const EXIT_TOO_OLD: u8 = 6;
/// Refused letters listed one by one in the text output; the rest are counted.
const LISTED_TOO_OLD: usize = 10;

#[derive(Debug, Serialize)]
struct Report {
    queue: String,
    selected: usize,
    done: usize,
    /// One line per selected message that was tried and stays in the queue.
    failed: Vec<String>,
    /// Selected messages left alone after the run stopped.
    not_attempted: usize,
    /// Why the run stopped before the end of the selection.
    stopped: Option<String>,
    dry_run: bool,
    /// Replay only: selected letters left in the queue because they are older than the inbox retention (or
    /// carry no time), one line each.
    #[serde(skip)]
    too_old: Vec<String>,
    /// Replay only: how many letters that is.
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped_too_old: Option<usize>,
    /// Replay only: the inbox retention the letters were measured against.
    #[serde(skip_serializing_if = "Option::is_none")]
    inbox_retention_seconds: Option<u64>,
}

impl Report {
    fn new(queue: &str, selected: usize, dry_run: bool) -> Report {
        Report {
            queue: queue.to_owned(),
            selected,
            done: 0,
            failed: Vec::new(),
            not_attempted: 0,
            stopped: None,
            dry_run,
            too_old: Vec::new(),
            skipped_too_old: None,
            inbox_retention_seconds: None,
        }
    }

    /// Selected messages that were not refused for their age.
    fn eligible(&self) -> usize {
        self.selected - self.too_old.len()
    }

    /// Every selected message stays where it was after this.
    fn stop(&mut self, why: String, not_attempted: usize) {
        self.stopped = Some(why);
        self.not_attempted = not_attempted;
    }

    /// A failure first: running again may fix it, whereas letters too old wait for someone's decision.
    fn exit_code(&self) -> u8 {
        if !self.failed.is_empty() || self.not_attempted > 0 || self.stopped.is_some() {
            EXIT_PARTIAL
        } else if !self.too_old.is_empty() {
            EXIT_TOO_OLD
        } else {
            0
        }
    }
}

/// Take a held message off the dead-letter queue. lapin answers `Ok(false)`, not an error, when the channel
/// holding the message is already closed (the broker then puts the message back): a failure all the same.
async fn take_off(delivery: &Delivery) -> anyhow::Result<()> {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => anyhow::bail!("the channel that held it is closed"),
        Err(e) => Err(anyhow::Error::new(e).context("basic.ack")),
    }
}

fn id_of(delivery: &Delivery) -> String {
    delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_else(|| "-".into())
}

/// Take off the dead-letter queue, in order, the messages whose replay the broker confirmed. The first
/// acknowledgement that fails stops the run (the channel is gone: nothing after it could be taken off), and
/// says so for every replayed message that stays. Returns whether to go on.
async fn settle_replays<E: std::fmt::Display>(published: Vec<(Result<(), E>, &Delivery)>, report: &mut Report) -> bool {
    let mut broken: Option<String> = None;
    for (result, d) in published {
        match (result, &broken) {
            (Err(e), _) => report.failed.push(format!("{}: replay not confirmed: {e}", id_of(d))),
            (Ok(()), None) => match take_off(d).await {
                // Off the dead-letter queue only now that the replay is confirmed.
                Ok(()) => report.done += 1,
                Err(e) => {
                    report.failed.push(format!(
                        "{}: replayed, but it could not be taken off {} ({e:#}); it stays there, and replaying it \
                         again is harmless (the worker's inbox ignores the second copy)",
                        id_of(d),
                        report.queue
                    ));
                    broken = Some(format!("{e:#}"));
                }
            },
            (Ok(()), Some(_)) => report.failed.push(format!(
                "{}: replayed, but not taken off {} after the failure above; it stays there (a second replay is harmless)",
                id_of(d),
                report.queue
            )),
        }
    }
    match broken {
        Some(e) => {
            let left = report.eligible() - report.done - report.failed.len();
            report.stop(format!("taking replayed messages off {} failed: {e}", report.queue), left);
            false
        }
        None => true,
    }
}

/// Delete the selected messages one by one; the first failure stops the run, the rest stays in the queue.
async fn delete_held(selected: &[&Delivery], report: &mut Report, bar: &indicatif::ProgressBar) {
    for (i, d) in selected.iter().enumerate() {
        if let Err(e) = take_off(d).await {
            report.failed.push(format!("{}: not deleted ({e:#})", id_of(d)));
            report.stop(format!("deleting from {} failed: {e:#}", report.queue), selected.len() - i - 1);
            return;
        }
        report.done += 1;
        bar.inc(1);
    }
}

/// The worker a dead-letter queue belongs to: `choreo.payment.dlq` -> `payment`.
fn worker_of(queue: &str, namespace: &str) -> Option<String> {
    queue.strip_prefix(&format!("{namespace}."))?.strip_suffix(".dlq").map(str::to_owned)
}

/// The replayed copy's properties: the original ones, marked as a replay, with the broker-retry round
/// count reset so that transient failures get every delay level again, and without the dead-letter queue's
/// delivery count, which would make the worker take the replay for a redelivery after a crash (handled
/// alone, counted against the crash limit).
fn replay_properties(delivery: &Delivery) -> BasicProperties {
    let mut inner = headers_to_republish(&delivery.properties).inner().clone();
    inner.remove(dl::RETRIES);
    let mut headers: FieldTable = inner.into();
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    headers.insert(dl::REPLAYED_AT.into(), AMQPValue::LongString(LongString::from(now)));
    kept_properties(&delivery.properties).with_headers(headers)
}

/// How `dlq replay` runs.
#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    pub dry_run: bool,
    pub via_original_exchange: bool,
    pub rate: Option<f64>,
    pub json: bool,
    /// How long the workers' inboxes remember processed ids: older letters are left alone...
    pub inbox_retention: Duration,
    /// ...unless this says to replay them all the same.
    pub force: bool,
}

/// An age as people say it: in days when it is days (humantime would say `1month 9days 13h 26m 25s`).
fn age_text(age: chrono::Duration) -> String {
    match age.num_days() {
        0 => humantime::format_duration(Duration::from_secs(age.num_seconds().max(0).unsigned_abs())).to_string(),
        1 => "1 day".to_owned(),
        days => format!("{days} days"),
    }
}

/// A retention as set, whole days in days.
fn retention_text(retention: Duration) -> String {
    let seconds = retention.as_secs();
    if seconds >= 86_400 && seconds.is_multiple_of(86_400) {
        age_text(chrono::Duration::days((seconds / 86_400) as i64))
    } else {
        humantime::format_duration(retention).to_string()
    }
}

/// The line that says why a letter is not replayed.
fn too_old_line(story: &Story, risk: ReplayRisk, retention: Duration) -> String {
    let id = story.message_id.as_deref().unwrap_or("-");
    let kind = story.message_type.as_deref().unwrap_or("-");
    match risk {
        ReplayRisk::TooOld { age } => {
            format!(
                "{id} ({kind}): {} old, older than the inbox retention ({})",
                age_text(age),
                retention_text(retention)
            )
        }
        ReplayRisk::AgeUnknown | ReplayRisk::None => {
            format!("{id} ({kind}): carries no time (no timestamp, no failure time), so its age is unknown")
        }
    }
}

pub async fn replay(
    broker: &BrokerArgs,
    queue: &str,
    filter: &Filter,
    options: ReplayOptions,
) -> anyhow::Result<ExitCode> {
    let ReplayOptions { dry_run, via_original_exchange, rate, json, inbox_retention, force } = options;
    filter.require_selection()?;
    let pool = broker.pool()?;
    let topology = broker.topology();
    let publisher = ConfirmingPublisher::new(pool.clone(), Duration::from_secs(15));
    let held = browse(&pool, queue, None).await?;
    let chosen = held.select(filter);
    let mut report = Report::new(queue, chosen.len(), dry_run);
    report.inbox_retention_seconds = Some(inbox_retention.as_secs());
    let now = Utc::now();
    let mut forced = 0usize;

    // Where each message goes back to. A letter too old stays where it is: held, it goes back to the queue in
    // its place with the others when the browse is released.
    let mut selected: Vec<&Delivery> = Vec::with_capacity(chosen.len());
    let mut targets = Vec::with_capacity(chosen.len());
    for (d, s) in chosen {
        let risk = replay_risk(earliest_time(&d.properties, &s), now, inbox_retention);
        if risk.refused() {
            if !force {
                report.too_old.push(too_old_line(&s, risk, inbox_retention));
                continue;
            }
            forced += 1;
        }
        selected.push(d);
        let target = if via_original_exchange {
            match (s.original_exchange.clone(), s.original_routing_key.clone()) {
                (Some(e), Some(k)) => Some((e, k)),
                _ => None,
            }
        } else {
            s.worker
                .clone()
                .or_else(|| worker_of(queue, topology.namespace()))
                .map(|w| (String::new(), topology.worker_queue(&w)))
        };
        targets.push((s, target));
    }
    report.skipped_too_old = Some(report.too_old.len());
    if forced > 0 && !json {
        eprintln!(
            "--force: {} all the same {forced} selected messages older than the inbox retention ({}) or of unknown \
             age",
            if dry_run { "would replay" } else { "replaying" },
            retention_text(inbox_retention)
        );
    }
    if dry_run {
        if !json {
            for line in &report.too_old {
                println!("would not replay {line}");
            }
            for (s, target) in &targets {
                let to = target
                    .as_ref()
                    .map(|(e, k)| format!("exchange `{e}` key `{k}`"))
                    .unwrap_or_else(|| "nowhere: origin unknown".into());
                println!(
                    "would replay {} ({}, {}) to {to}",
                    s.message_id.as_deref().unwrap_or("-"),
                    s.message_type.as_deref().unwrap_or("-"),
                    s.error_kind
                );
            }
        }
    } else {
        let bar = bar(selected.len() as u64, "replaying", json);
        let items: Vec<_> = selected.iter().zip(&targets).collect();
        let rate = rate.filter(|r| *r > 0.0);
        let chunk_size = rate.map(|r| ((r / 10.0).ceil() as usize).clamp(1, 100)).unwrap_or(100);
        let started = std::time::Instant::now();
        let mut sent = 0usize;
        for chunk in items.chunks(chunk_size) {
            if let Some(rate) = rate {
                tokio::time::sleep_until((started + Duration::from_secs_f64(sent as f64 / rate)).into()).await;
            }
            sent += chunk.len();
            let properties: Vec<BasicProperties> = chunk.iter().map(|(d, _)| replay_properties(d)).collect();
            let mut outgoing = Vec::new();
            let mut sendable = Vec::new();
            for ((d, (s, target)), props) in chunk.iter().zip(properties) {
                match target {
                    Some((exchange, key)) => {
                        outgoing.push(Outgoing {
                            exchange: exchange.as_str(),
                            routing_key: key.as_str(),
                            properties: props,
                            body: &d.data,
                            message_id: s.message_id.clone().unwrap_or_default(),
                        });
                        sendable.push(*d);
                    }
                    None => report.failed.push(format!(
                        "{}: original exchange and routing key unknown",
                        s.message_id.as_deref().unwrap_or("-")
                    )),
                }
            }
            let published =
                publisher.publish_batch(&outgoing).await.into_iter().zip(sendable).map(|(r, d)| (r, *d)).collect();
            let go_on = settle_replays(published, &mut report).await;
            bar.inc(chunk.len() as u64);
            if !go_on {
                break;
            }
        }
        bar.finish_and_clear();
    }
    held.release().await;
    finish(&report, if dry_run { "would replay" } else { "replayed" }, json)
}

pub async fn purge(
    broker: &BrokerArgs,
    queue: &str,
    filter: &Filter,
    yes: bool,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    filter.require_selection()?;
    let pool = broker.pool()?;
    let held = browse(&pool, queue, None).await?;
    let selected: Vec<&Delivery> = held.select(filter).into_iter().map(|(d, _)| d).collect();
    let mut report = Report::new(queue, selected.len(), dry_run);
    if dry_run || selected.is_empty() {
        drop(selected);
        held.release().await;
        return finish(&report, "would purge", json);
    }
    if !yes {
        let confirmed = confirm_purge(selected.len(), queue);
        if !matches!(confirmed, Ok(true)) {
            // Refused, or the question could not be asked: the messages go back untouched either way.
            drop(selected);
            held.release().await;
            return confirmed.map(|_| ExitCode::from(EXIT_NOT_CONFIRMED));
        }
    }
    let bar = bar(selected.len() as u64, "purging", json);
    delete_held(&selected, &mut report, &bar).await;
    bar.finish_and_clear();
    held.release().await;
    finish(&report, "purged", json)
}

/// Ask the person at the terminal to confirm deleting `count` messages by typing the number; false, and why
/// on stderr, when there is no terminal to ask or the answer is not the number.
fn confirm_purge(count: usize, queue: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "refusing to delete {count} messages from {queue} without confirmation: there is no terminal to ask. \
             Add --yes to purge from a script."
        );
        return Ok(false);
    }
    eprint!("Delete {count} messages from {queue} for good? Type the number to confirm: ");
    std::io::stderr().flush().context("asking for confirmation")?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).context("reading the confirmation")?;
    if answer.trim() != count.to_string() {
        eprintln!("not confirmed; nothing was deleted");
        return Ok(false);
    }
    Ok(true)
}

fn finish(report: &Report, verb: &str, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        let count = if report.dry_run { report.eligible() } else { report.done };
        println!("{verb} {count} of {} selected messages from {}", report.selected, report.queue);
        explain_too_old(report);
        for f in &report.failed {
            eprintln!("not done: {f}");
        }
        if let Some(why) = &report.stopped {
            eprintln!("stopped early: {why}; {} selected messages were not attempted", report.not_attempted);
        }
        let stay = report.failed.len() + report.not_attempted;
        if stay > 0 {
            eprintln!("{stay} selected messages stay in {}; fix the cause and run the command again", report.queue);
        }
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// Why letters were left in the queue for their age, and what to do about it.
fn explain_too_old(report: &Report) {
    let n = report.too_old.len();
    if n == 0 {
        return;
    }
    let retention = retention_text(Duration::from_secs(report.inbox_retention_seconds.unwrap_or(0)));
    let verb = if report.dry_run { "would not be replayed" } else { "not replayed" };
    eprintln!(
        "{verb}, left in {}: {n} selected message(s) older than the inbox retention ({retention}). Their worker \
         may have processed them and forgotten it since; a replay could apply them a second time.",
        report.queue
    );
    // A dry run has listed each of them already, beside the ones it would replay.
    if !report.dry_run {
        for line in report.too_old.iter().take(LISTED_TOO_OLD) {
            eprintln!("  {line}");
        }
        if n > LISTED_TOO_OLD {
            eprintln!("  and {} more", n - LISTED_TOO_OLD);
        }
    }
    eprintln!(
        "hint: if you know they were never processed, replay them with --force. Otherwise check first whether \
         their worker applied them (`choreoctl trace CORRELATION_ID`, the service's own tables). If the workers \
         remember ids longer, say so with --inbox-retention (their CHOREO_INBOX_RETENTION)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_too_old_stay_and_say_so_in_the_exit_code() {
        let mut report = Report::new("choreo.payment.dlq", 3, false);
        report.too_old.push("m1 (order.created): 40days old".into());
        report.skipped_too_old = Some(1);
        report.done = 2;
        assert_eq!(report.eligible(), 2);
        assert_eq!(report.exit_code(), EXIT_TOO_OLD);
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["skipped_too_old"], 1);
        // A failure says more: running again may fix it.
        report.failed.push("m2: replay not confirmed".into());
        assert_eq!(report.exit_code(), EXIT_PARTIAL);
        // A purge's report says nothing about ages.
        let purge = serde_json::to_value(Report::new("choreo.payment.dlq", 1, false)).expect("json");
        assert!(purge.get("skipped_too_old").is_none(), "{purge}");
    }

    #[test]
    fn ages_read_in_days() {
        assert_eq!(age_text(chrono::Duration::days(40) + chrono::Duration::hours(13)), "40 days");
        assert_eq!(age_text(chrono::Duration::hours(25)), "1 day");
        assert_eq!(age_text(chrono::Duration::minutes(90)), "1h 30m");
        assert_eq!(retention_text(Duration::from_secs(30 * 86_400)), "30 days");
        assert_eq!(retention_text(Duration::from_secs(36 * 3_600)), "1day 12h");
    }

    #[test]
    fn the_worker_is_read_from_the_queue_name() {
        assert_eq!(worker_of("choreo.payment.dlq", "choreo").as_deref(), Some("payment"));
        assert_eq!(worker_of("other.payment.dlq", "choreo"), None);
        assert_eq!(worker_of("choreo.payment", "choreo"), None);
    }

    /// A letter the broker dead-lettered keeps the client's `user_id` (and could carry an `expiration`): a
    /// replay under our own user must drop both, or the broker closes the channel or the copy expires.
    #[test]
    fn a_replay_drops_expiration_and_user_id_and_is_marked() {
        let mut d = Delivery::mock(1, "".into(), "choreo.payment.dlq".into(), false, b"{}".to_vec());
        d.properties = BasicProperties::default()
            .with_message_id("m1".into())
            .with_type("order.created".into())
            .with_user_id("shop-client".into())
            .with_expiration("60000".into());
        let p = replay_properties(&d);
        assert_eq!((p.user_id(), p.expiration()), (&None, &None));
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("m1"));
        assert!(p.headers().as_ref().is_some_and(|h| h.contains_key(dl::REPLAYED_AT)));
    }

    fn held(n: u64) -> Vec<Delivery> {
        (1..=n)
            .map(|tag| {
                let mut d = Delivery::mock(tag, "".into(), "choreo.payment.dlq".into(), true, b"{}".to_vec());
                d.properties = BasicProperties::default().with_message_id(format!("m{tag}").into());
                d
            })
            .collect()
    }

    /// A delivery whose acknowledgement can no longer be sent (lapin treats a closed channel the same way).
    async fn spoil(d: &Delivery) {
        assert!(d.acker.ack(BasicAckOptions::default()).await.expect("first ack"));
    }

    #[tokio::test]
    async fn a_purge_that_cannot_delete_stops_and_reports_what_it_did() {
        let held = held(4);
        spoil(&held[1]).await;
        let selected: Vec<&Delivery> = held.iter().collect();
        let mut report = Report::new("choreo.payment.dlq", selected.len(), false);
        delete_held(&selected, &mut report, &indicatif::ProgressBar::hidden()).await;
        assert_eq!(report.done, 1);
        assert_eq!(report.failed.len(), 1);
        assert!(
            report.failed[0].starts_with("m2: not deleted") && report.failed[0].contains("closed"),
            "{:?}",
            report.failed
        );
        assert_eq!(report.not_attempted, 2);
        assert!(report.stopped.as_deref().is_some_and(|s| s.contains("choreo.payment.dlq")));
        assert_eq!(report.exit_code(), EXIT_PARTIAL);
    }

    #[tokio::test]
    async fn a_replay_that_cannot_take_messages_off_stops_and_reports_what_it_did() {
        let held = held(4);
        spoil(&held[1]).await;
        let mut report = Report::new("choreo.payment.dlq", 6, false);
        let published: Vec<(Result<(), String>, &Delivery)> =
            vec![(Ok(()), &held[0]), (Ok(()), &held[1]), (Err("returned".into()), &held[2]), (Ok(()), &held[3])];
        assert!(!settle_replays(published, &mut report).await, "the run stops");
        assert_eq!(report.done, 1);
        assert_eq!(report.failed.len(), 3, "{:?}", report.failed);
        assert!(report.failed[0].starts_with("m2: replayed, but it could not be taken off"), "{:?}", report.failed);
        assert!(report.failed[1].starts_with("m3: replay not confirmed: returned"), "{:?}", report.failed);
        assert!(report.failed[2].starts_with("m4: replayed, but not taken off"), "{:?}", report.failed);
        assert_eq!(report.not_attempted, 2, "the next chunk was never tried");
        assert_eq!(report.exit_code(), EXIT_PARTIAL);

        let mut fine = Report::new("choreo.payment.dlq", 1, false);
        let held = self::held(1);
        assert!(settle_replays::<String>(vec![(Ok(()), &held[0])], &mut fine).await);
        assert_eq!((fine.done, fine.exit_code()), (1, 0));
    }

    #[test]
    fn a_replay_is_a_first_delivery_with_every_retry_level_again() {
        let mut delivery = Delivery::mock(7, "".into(), "choreo.payment.dlq".into(), true, b"{}".to_vec());
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        headers.insert(dl::RETRIES.into(), AMQPValue::LongLongInt(3));
        headers.insert(dl::ERROR_KIND.into(), AMQPValue::LongString("transient".into()));
        delivery.properties = BasicProperties::default().with_headers(headers);
        let replayed = replay_properties(&delivery).headers().clone().unwrap_or_default();
        assert!(!replayed.contains_key("x-delivery-count"), "reads of the dead-letter queue are not redeliveries");
        assert!(!replayed.contains_key(dl::RETRIES));
        assert!(replayed.contains_key(dl::REPLAYED_AT));
        assert!(replayed.contains_key(dl::ERROR_KIND), "the story stays");
    }
}
