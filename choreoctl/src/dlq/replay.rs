//! `dlq replay` and `dlq purge`: the two commands that take messages off a dead-letter queue.
//!
//! Replay publishes each selected message with confirms and acknowledges it on the dead-letter queue only
//! after the broker confirmed the replay. If the CLI dies half way, the messages it had not acknowledged go
//! back to the dead-letter queue; running it again replays them, and the workers' inboxes absorb the ones
//! that had been replayed already. Replayed messages keep their message id and carry `choreo-replayed-at`.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use choreo_rabbitmq::ConfirmingPublisher;
use choreo_rabbitmq::dead_letter::headers as dl;
use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::lapin::message::Delivery;
use choreo_rabbitmq::lapin::options::BasicAckOptions;
use choreo_rabbitmq::codec::headers_to_republish;
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString};
use choreo_rabbitmq::publisher::Outgoing;
use serde::Serialize;

use super::browse::browse;
use super::filter::Filter;
use crate::broker::BrokerArgs;
use crate::progress::bar;

/// Exit code when some selected messages could not be replayed (they stay in the dead-letter queue).
pub const EXIT_PARTIAL: u8 = 4;
/// Exit code when a purge was not confirmed.
pub const EXIT_NOT_CONFIRMED: u8 = 5;

#[derive(Debug, Serialize)]
struct Report {
    queue: String,
    selected: usize,
    done: usize,
    failed: Vec<String>,
    dry_run: bool,
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
    delivery.properties.clone().with_headers(headers)
}

/// How `dlq replay` runs.
#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    pub dry_run: bool,
    pub via_original_exchange: bool,
    pub rate: Option<f64>,
    pub json: bool,
}

pub async fn replay(broker: &BrokerArgs, queue: &str, filter: &Filter, options: ReplayOptions) -> anyhow::Result<ExitCode> {
    let ReplayOptions { dry_run, via_original_exchange, rate, json } = options;
    filter.require_selection()?;
    let pool = broker.pool()?;
    let topology = broker.topology();
    let publisher = ConfirmingPublisher::new(pool.clone(), Duration::from_secs(15));
    let held = browse(&pool, queue, None).await?;
    let chosen = held.select(filter);
    let mut report = Report { queue: queue.to_owned(), selected: chosen.len(), done: 0, failed: Vec::new(), dry_run };

    // Where each message goes back to.
    let mut selected: Vec<&Delivery> = Vec::with_capacity(chosen.len());
    let mut targets = Vec::with_capacity(chosen.len());
    for (d, s) in chosen {
        selected.push(d);
        let target = if via_original_exchange {
            match (s.original_exchange.clone(), s.original_routing_key.clone()) {
                (Some(e), Some(k)) => Some((e, k)),
                _ => None,
            }
        } else {
            s.worker.clone().or_else(|| worker_of(queue, topology.namespace())).map(|w| (String::new(), topology.worker_queue(&w)))
        };
        targets.push((s, target));
    }
    if dry_run {
        if !json {
            for (s, target) in &targets {
                let to = target.as_ref().map(|(e, k)| format!("exchange `{e}` key `{k}`")).unwrap_or_else(|| "nowhere: origin unknown".into());
                println!("would replay {} ({}, {}) to {to}", s.message_id.as_deref().unwrap_or("-"), s.message_type.as_deref().unwrap_or("-"), s.error_kind);
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
            for (result, d) in publisher.publish_batch(&outgoing).await.into_iter().zip(sendable) {
                match result {
                    Ok(()) => {
                        // Off the dead-letter queue only now that the replay is confirmed.
                        d.acker.ack(BasicAckOptions::default()).await?;
                        report.done += 1;
                    }
                    Err(e) => report.failed.push(e.to_string()),
                }
            }
            bar.inc(chunk.len() as u64);
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
    let mut report = Report { queue: queue.to_owned(), selected: selected.len(), done: 0, failed: Vec::new(), dry_run };
    if dry_run || selected.is_empty() {
        drop(selected);
        held.release().await;
        return finish(&report, "would purge", json);
    }
    if !yes {
        let count = selected.len();
        if !std::io::stdin().is_terminal() {
            drop(selected);
            held.release().await;
            eprintln!(
                "refusing to delete {count} messages from {queue} without confirmation: there is no terminal to ask. \
                 Add --yes to purge from a script."
            );
            return Ok(ExitCode::from(EXIT_NOT_CONFIRMED));
        }
        eprint!("Delete {count} messages from {queue} for good? Type the number to confirm: ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if answer.trim() != count.to_string() {
            drop(selected);
            held.release().await;
            eprintln!("not confirmed; nothing was deleted");
            return Ok(ExitCode::from(EXIT_NOT_CONFIRMED));
        }
    }
    let bar = bar(selected.len() as u64, "purging", json);
    for d in selected {
        d.acker.ack(BasicAckOptions::default()).await?;
        report.done += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    held.release().await;
    finish(&report, "purged", json)
}

fn finish(report: &Report, verb: &str, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        let count = if report.dry_run { report.selected } else { report.done };
        println!("{verb} {count} of {} selected messages from {}", report.selected, report.queue);
        for f in &report.failed {
            eprintln!("not done: {f}");
        }
        if !report.failed.is_empty() {
            eprintln!("{} messages stay in {}; fix the cause and run the command again", report.failed.len(), report.queue);
        }
    }
    Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_PARTIAL) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_is_read_from_the_queue_name() {
        assert_eq!(worker_of("choreo.payment.dlq", "choreo").as_deref(), Some("payment"));
        assert_eq!(worker_of("other.payment.dlq", "choreo"), None);
        assert_eq!(worker_of("choreo.payment", "choreo"), None);
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
