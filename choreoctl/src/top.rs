//! `choreoctl top`: the figures of the dashboard, live in the terminal, read straight from the workers'
//! `/metrics` endpoints (no Prometheus needed).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};
use serde::Serialize;

use crate::table;

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Metrics endpoints as `worker=host:port`, comma-separated.
    #[arg(
        long,
        env = "CHOREO_TOP_TARGETS",
        value_delimiter = ',',
        default_value = "order=127.0.0.1:9464,payment=127.0.0.1:9465,inventory=127.0.0.1:9466"
    )]
    targets: Vec<String>,
    /// Time between refreshes (rates are computed over it).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Print one snapshot (two scrapes, one interval apart) and exit.
    #[arg(long)]
    once: bool,
    /// Machine-readable output (implies --once).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct WorkerRow {
    pub worker: String,
    pub up: bool,
    pub ready: bool,
    pub consumed_per_second: f64,
    pub in_flight: f64,
    pub retries_total: f64,
    pub dead_lettered_total: f64,
    pub duplicates_total: f64,
    pub outbox_backlog: f64,
    pub outbox_oldest_age_seconds: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct WorkflowFigures {
    pub confirmed_total: f64,
    pub cancelled_total: f64,
    pub cancelled_by_reason: BTreeMap<String, f64>,
    pub completed_per_second: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub workers: Vec<WorkerRow>,
    pub workflows: WorkflowFigures,
}

pub async fn run(args: TopArgs) -> anyhow::Result<ExitCode> {
    let targets: Vec<(String, String)> = args
        .targets
        .iter()
        .map(|t| {
            t.split_once('=')
                .map(|(w, a)| (w.trim().to_owned(), a.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--targets entry `{t}` must be worker=host:port"))
        })
        .collect::<anyhow::Result<_>>()?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let once = args.once || args.json;
    let mut previous = scrape_all(&client, &targets).await;
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(args.interval).await;
        let current = scrape_all(&client, &targets).await;
        let elapsed = last.elapsed().as_secs_f64();
        last = Instant::now();
        let snapshot = summarise(&targets, &previous, &current, elapsed);
        let reachable = snapshot.workers.iter().any(|w| w.up);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&snapshot)?);
        } else {
            render(&snapshot, args.interval, !once && std::io::stdout().is_terminal());
        }
        if once {
            if !reachable {
                eprintln!(
                    "no worker answered on {:?}: are they running, and where do they serve /metrics? (their \
                     CHOREO_METRICS_ADDR; --targets or CHOREO_TOP_TARGETS here)",
                    args.targets
                );
                return Ok(ExitCode::from(1));
            }
            return Ok(ExitCode::SUCCESS);
        }
        previous = current;
    }
}

async fn scrape_all(client: &reqwest::Client, targets: &[(String, String)]) -> Vec<Option<Scrape>> {
    let mut scrapes = Vec::with_capacity(targets.len());
    for (_, addr) in targets {
        let text = match client.get(format!("http://{addr}/metrics")).send().await {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        scrapes.push(text.and_then(|t| Scrape::parse(t.lines().map(|l| Ok(l.to_owned()))).ok()));
    }
    scrapes
}

/// Sum of a counter or gauge over the samples whose labels match `filter`.
fn total(scrape: &Scrape, metric: &str, filter: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && filter.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            _ => 0.0,
        })
        // Not `sum()`: a float sum of no samples is -0.0, which prints as "-0".
        .fold(0.0, |sum, v| sum + v)
}

/// Cumulative bucket counts of a histogram, summed over all its series: (upper bound, count).
fn buckets(scrape: &Scrape, metric: &str) -> BTreeMap<u64, (f64, f64)> {
    let mut out: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in scrape.samples.iter().filter(|s| s.metric == metric) {
        if let Value::Histogram(hs) = &s.value {
            for h in hs {
                let e = out.entry(h.less_than.to_bits()).or_insert((h.less_than, 0.0));
                e.1 += h.count;
            }
        }
    }
    out
}

/// `histogram_quantile` over the increase between two scrapes, in the same way Prometheus computes it.
pub fn quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let mut delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, count)| {
            let old = before.iter().find(|(l, _)| l == le).map(|(_, c)| *c).unwrap_or(0.0);
            (*le, (count - old).max(0.0))
        })
        .collect();
    delta.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (le, count) in delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower_bound);
            }
            let in_bucket = count - lower_count;
            let fraction = if in_bucket > 0.0 { (rank - lower_count) / in_bucket } else { 1.0 };
            return Some(lower_bound + (le - lower_bound) * fraction);
        }
        lower_bound = le;
        lower_count = count;
    }
    None
}

pub fn summarise(
    targets: &[(String, String)],
    before: &[Option<Scrape>],
    after: &[Option<Scrape>],
    seconds: f64,
) -> Snapshot {
    let mut workers = Vec::new();
    let mut workflows = WorkflowFigures {
        confirmed_total: 0.0,
        cancelled_total: 0.0,
        cancelled_by_reason: BTreeMap::new(),
        completed_per_second: 0.0,
        latency_p50_ms: None,
        latency_p99_ms: None,
    };
    for ((worker, _), (old, new)) in targets.iter().zip(before.iter().zip(after)) {
        let Some(new) = new else {
            workers.push(WorkerRow {
                worker: worker.clone(),
                up: false,
                ready: false,
                consumed_per_second: 0.0,
                in_flight: 0.0,
                retries_total: 0.0,
                dead_lettered_total: 0.0,
                duplicates_total: 0.0,
                outbox_backlog: 0.0,
                outbox_oldest_age_seconds: 0.0,
            });
            continue;
        };
        let rate = |metric: &str| {
            let now = total(new, metric, &[]);
            let then = old.as_ref().map(|o| total(o, metric, &[])).unwrap_or(now);
            if seconds > 0.0 { ((now - then) / seconds).max(0.0) } else { 0.0 }
        };
        workers.push(WorkerRow {
            worker: worker.clone(),
            up: true,
            ready: total(new, "choreo_worker_ready", &[]) >= 1.0,
            consumed_per_second: rate("choreo_messages_consumed_total"),
            in_flight: total(new, "choreo_messages_in_flight", &[]),
            retries_total: total(new, "choreo_retries_total", &[]),
            dead_lettered_total: total(new, "choreo_dead_lettered_total", &[]),
            duplicates_total: total(new, "choreo_duplicates_skipped_total", &[]),
            outbox_backlog: total(new, "choreo_outbox_backlog", &[]),
            outbox_oldest_age_seconds: total(new, "choreo_outbox_oldest_age_seconds", &[]),
        });
        let confirmed = total(new, "choreo_saga_outcomes_total", &[("outcome", "confirmed")]);
        let cancelled = total(new, "choreo_saga_outcomes_total", &[("outcome", "cancelled")]);
        workflows.confirmed_total += confirmed;
        workflows.cancelled_total += cancelled;
        for s in new.samples.iter().filter(|s| s.metric == "choreo_saga_outcomes_total") {
            if s.labels.get("outcome") == Some("cancelled")
                && let (Some(reason), Value::Counter(v)) = (s.labels.get("reason"), &s.value)
            {
                *workflows.cancelled_by_reason.entry(reason.to_owned()).or_default() += v;
            }
        }
        workflows.completed_per_second += rate("choreo_saga_outcomes_total");
        let after_buckets: Vec<(f64, f64)> = buckets(new, "choreo_workflow_duration_seconds").into_values().collect();
        if !after_buckets.is_empty() {
            let before_buckets: Vec<(f64, f64)> = old
                .as_ref()
                .map(|o| buckets(o, "choreo_workflow_duration_seconds").into_values().collect())
                .unwrap_or_default();
            workflows.latency_p50_ms = quantile(0.5, &before_buckets, &after_buckets).map(|s| s * 1000.0);
            workflows.latency_p99_ms = quantile(0.99, &before_buckets, &after_buckets).map(|s| s * 1000.0);
        }
    }
    Snapshot { workers, workflows }
}

fn render(s: &Snapshot, interval: Duration, clear: bool) {
    if clear {
        print!("\x1b[2J\x1b[H");
    }
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into());
    let w = &s.workflows;
    println!(
        "workflows  {:.1}/s   confirmed {}  cancelled {}  ({})   end-to-end p50 {}  p99 {}   (over {})",
        w.completed_per_second,
        w.confirmed_total,
        w.cancelled_total,
        w.cancelled_by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", "),
        ms(w.latency_p50_ms),
        ms(w.latency_p99_ms),
        humantime::format_duration(interval)
    );
    println!("{}", worker_table(&s.workers));
}

/// One line per worker; figures on the right.
fn worker_table(workers: &[WorkerRow]) -> String {
    let mut t = table::new(&[
        "WORKER",
        "STATE",
        "MSG/S",
        "IN-FLIGHT",
        "RETRIES",
        "DEAD-LETTERS",
        "DUPLICATES",
        "OUTBOX",
        "OLDEST",
    ]);
    for r in workers {
        let state = if !r.up {
            "DOWN"
        } else if r.ready {
            "ready"
        } else {
            "NOT READY"
        };
        t.add_row(table::row([
            r.worker.clone(),
            state.to_owned(),
            format!("{:.1}", r.consumed_per_second),
            r.in_flight.to_string(),
            r.retries_total.to_string(),
            r.dead_lettered_total.to_string(),
            r.duplicates_total.to_string(),
            r.outbox_backlog.to_string(),
            format!("{:.1}s", r.outbox_oldest_age_seconds),
        ]));
    }
    table::render(&mut t, &[2, 3, 4, 5, 6, 7, 8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let before = [(0.01, 0.0), (0.1, 0.0), (f64::INFINITY, 0.0)];
        let after = [(0.01, 50.0), (0.1, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &before, &after), Some(0.01));
        let p99 = quantile(0.99, &before, &after).expect("p99");
        assert!((p99 - (0.01 + 0.09 * 49.0 / 50.0)).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &after, &after), None, "no new observations, no quantile");
    }

    fn worker(name: &str, up: bool, ready: bool) -> WorkerRow {
        WorkerRow {
            worker: name.into(),
            up,
            ready,
            consumed_per_second: 1234.56,
            in_flight: 3.0,
            retries_total: 0.0,
            dead_lettered_total: 12.0,
            duplicates_total: 0.0,
            outbox_backlog: 7.0,
            outbox_oldest_age_seconds: 0.25,
        }
    }

    #[test]
    fn the_worker_table_keeps_its_columns_whatever_the_state() {
        let rows = [worker("order", true, true), worker("payment", true, false), worker("inventory", false, false)];
        assert_eq!(
            worker_table(&rows),
            "WORKER     STATE       MSG/S  IN-FLIGHT  RETRIES  DEAD-LETTERS  DUPLICATES  OUTBOX  OLDEST\n\
             order      ready      1234.6          3        0            12           0       7    0.2s\n\
             payment    NOT READY  1234.6          3        0            12           0       7    0.2s\n\
             inventory  DOWN       1234.6          3        0            12           0       7    0.2s"
        );
    }

    #[test]
    fn figures_come_from_the_scrapes() {
        let text = |n: u32| {
            format!(
                "# TYPE choreo_messages_consumed_total counter\nchoreo_messages_consumed_total{{worker=\"order\",type=\"order.place\",outcome=\"processed\"}} {n}\n\
                 # TYPE choreo_worker_ready gauge\nchoreo_worker_ready{{worker=\"order\"}} 1\n\
                 # TYPE choreo_saga_outcomes_total counter\nchoreo_saga_outcomes_total{{outcome=\"cancelled\",reason=\"out_of_stock\"}} 3\n"
            )
        };
        let parse = |t: String| Scrape::parse(t.lines().map(|l| Ok(l.to_owned()))).ok();
        let targets = vec![("order".to_owned(), "x".to_owned()), ("payment".to_owned(), "y".to_owned())];
        let s = summarise(&targets, &[parse(text(10)), None], &[parse(text(30)), None], 2.0);
        assert_eq!(s.workers[0].consumed_per_second, 10.0);
        assert!(s.workers[0].ready);
        assert!(!s.workers[1].up);
        assert_eq!(s.workflows.cancelled_by_reason.get("out_of_stock"), Some(&3.0));
        // A counter the worker has not exported yet (no duplicate seen) is a plain zero, not "-0".
        assert_eq!(format!("{}", s.workers[0].duplicates_total), "0");
    }
}
