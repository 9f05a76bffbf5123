//! A real Prometheus, started from `monitoring/prometheus/prometheus.yml` (targets pointed at this test's
//! workers and broker), scrapes a running workload; every query of every dashboard panel returns data for
//! this test's namespace, and every runbook link of the alerts and the dashboard opens its runbook.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use choreo_testkit::{follow_log, wait_for};
use common::{Cluster, mixed_orders};
use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the shipped alerts and dashboard link the runbooks (docs/metrics.md#runbook-links): the Prometheus of
/// compose.yaml, serving runbooks/ at /user/.
const RUNBOOK_BASE: &str = "http://127.0.0.1:9090/user/";

/// The shipped configuration with its targets replaced by this test's, and its namespace.
async fn test_config(cluster: &Cluster, rabbit_port: &str, dir: &std::path::Path) -> String {
    let mut worker_ports = std::collections::HashMap::new();
    for worker in common::WORKERS {
        worker_ports.insert(worker, cluster.metrics_port(worker).await);
    }
    let shipped = std::fs::read_to_string(repo().join("monitoring/prometheus/prometheus.yml")).expect("prometheus.yml");
    let mut config: Value = serde_yaml_ng::from_str(&shipped).expect("prometheus.yml is YAML");
    config["global"]["scrape_interval"] = Value::from("1s");
    config["global"]["evaluation_interval"] = Value::from("1s");
    config["rule_files"] =
        Value::Sequence(vec![Value::from(repo().join("monitoring/prometheus/alerts.yml").display().to_string())]);
    let jobs = config["scrape_configs"].as_sequence_mut().expect("scrape_configs");
    for job in jobs.iter_mut() {
        let name = job["job_name"].as_str().unwrap_or_default().to_owned();
        for target_group in job["static_configs"].as_sequence_mut().expect("static_configs") {
            let target = match name.as_str() {
                "choreo-workers" => {
                    assert!(
                        target_group["labels"]["choreo_namespace"].is_string(),
                        "a worker target without namespace"
                    );
                    target_group["labels"]["choreo_namespace"] = Value::from(cluster.namespace.as_str());
                    let worker = target_group["labels"]["worker"].as_str().expect("worker label").to_owned();
                    let worker = common::WORKERS.into_iter().find(|w| *w == worker).expect("known worker");
                    format!("127.0.0.1:{}", worker_ports[worker])
                }
                "rabbitmq" => format!("127.0.0.1:{rabbit_port}"),
                other => panic!("unexpected job {other} in prometheus.yml"),
            };
            target_group["targets"] = Value::Sequence(vec![Value::from(target)]);
        }
    }
    let text = serde_yaml_ng::to_string(&config).expect("yaml");
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, &text).expect("write config");
    path.display().to_string()
}

/// The port in Prometheus's `msg="Listening on" address=127.0.0.1:PORT` log line, if `line` is that line.
fn listening_port(line: &str) -> Option<u16> {
    if !line.contains("msg=\"Listening on\"") {
        return None;
    }
    let addr = line.split_whitespace().find_map(|field| field.strip_prefix("address="))?;
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

#[test]
fn the_port_comes_from_prometheus_listening_line() {
    let listening = r#"ts=2026-11-24T07:00:41.980Z caller=tls_config.go:232 level=info component=web msg="Listening on" address=127.0.0.1:37741"#;
    assert_eq!(listening_port(listening), Some(37741));
    let configured = r#"ts=2026-11-24T07:00:41.979Z caller=web.go:503 level=info component=web msg="Start listening for connections" address=127.0.0.1:0"#;
    assert_eq!(listening_port(configured), None);
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo().join("monitoring/grafana/dashboards/choreo.json")).expect("dashboard");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// Every query of the dashboard, as Grafana sends it with `namespace` selected.
fn dashboard_queries(namespace: &str) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard()["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?").to_owned();
                let expr = expr.replace("$__rate_interval", "30s").replace("$__interval", "5s");
                queries.push((title, expr.replace("$namespace", namespace)));
            }
        }
    }
    assert!(!queries.is_empty());
    queries
}

/// Every runbook link, with the alert it is for (None for the dashboard's).
fn runbook_links() -> Vec<(Option<String>, String)> {
    let text = std::fs::read_to_string(repo().join("monitoring/prometheus/alerts.yml")).expect("alerts.yml");
    let alerts: Value = serde_yaml_ng::from_str(&text).expect("alerts.yml is YAML");
    let mut links = Vec::new();
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert name").to_owned();
            let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_else(|| panic!("{alert}: no runbook_url"));
            links.push((Some(alert), url.to_owned()));
        }
    }
    let dashboard = dashboard();
    let panel_links = dashboard["panels"].as_array().expect("panels").iter().flat_map(|p| p["links"].as_array());
    for link in dashboard["links"].as_array().into_iter().chain(panel_links).flatten() {
        if link["title"].as_str().is_some_and(|t| t.starts_with("Runbook")) {
            links.push((None, link["url"].as_str().expect("link url").to_owned()));
        }
    }
    links
}

async fn get_text(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let reply = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = reply.status();
    let body = reply.text().await.map_err(|e| e.to_string())?;
    if status.is_success() { Ok(body) } else { Err(format!("{status}: {body}")) }
}

#[tokio::test]
async fn prometheus_scrapes_the_workload_and_every_dashboard_query_returns_data() {
    let rabbit_port = std::env::var("CHOREO_RABBIT_PROMETHEUS_PORT")
        .expect("CHOREO_RABBIT_PROMETHEUS_PORT (RabbitMQ's Prometheus port) is not set: run through ./scripts/test");
    let prometheus_bin = std::env::var("CHOREO_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let cluster = Cluster::start().await;
    let dir = std::env::temp_dir().join(format!("choreo-prom-{}", cluster.namespace));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = test_config(&cluster, &rabbit_port, &dir).await;
    // On a port of its own choosing, which it logs: a port chosen here and bound later could be taken first
    // by another test running at the same time.
    let mut prometheus = tokio::process::Command::new(&prometheus_bin)
        .arg(format!("--config.file={config}"))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        // As compose.yaml's Prometheus does, so that the runbook links resolve (checked below).
        .arg(format!("--web.user-assets={}", repo().join("runbooks").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {prometheus_bin} (Debian package `prometheus`): {e}"));
    let port = follow_log(prometheus.stderr.take().expect("piped stderr"), "prometheus".into(), listening_port);
    let port = tokio::time::timeout(Duration::from_secs(60), port)
        .await
        .expect("Prometheus did not say where it listens within 60 s; its log is above")
        .expect("Prometheus exited before it listened; its log is above");

    let client = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let up_query = reqwest::Url::parse_with_params(&api, &[("query", "sum(up)")]).expect("url");
    wait_for("Prometheus scraping every target", Duration::from_secs(60), || {
        let client = client.clone();
        let url = up_query.clone();
        async move {
            let reply: serde_json::Value =
                client.get(url).send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
            if reply["data"]["result"][0]["value"][1] == "4" { Ok(()) } else { Err(reply.to_string()) }
        }
    })
    .await;
    let ids = cluster.place(&mixed_orders(60)).await;
    cluster.wait_terminal(&ids, Duration::from_secs(90)).await;
    // Keep traffic flowing while Prometheus collects a few samples, so rates have something to show.
    let more = cluster.place(&mixed_orders(30)).await;
    cluster.wait_terminal(&more, Duration::from_secs(90)).await;

    // The dashboard's namespace variable, `label_values(choreo_worker_ready, choreo_namespace)`, offers this
    // test's namespace.
    let values = reqwest::Url::parse_with_params(
        &format!("http://127.0.0.1:{port}/api/v1/label/choreo_namespace/values"),
        &[("match[]", "choreo_worker_ready")],
    )
    .expect("url");
    let values: serde_json::Value =
        client.get(values).send().await.expect("label values").json().await.expect("label values JSON");
    assert!(
        values["data"].as_array().is_some_and(|v| v.iter().any(|n| n == cluster.namespace.as_str())),
        "{} missing from the namespace label's values: {values}",
        cluster.namespace
    );

    for (title, query) in dashboard_queries(&cluster.namespace) {
        wait_for(&format!("data for panel `{title}`: {query}"), Duration::from_secs(60), || {
            let client = client.clone();
            let api = api.clone();
            let query = query.clone();
            async move {
                let reply: serde_json::Value = client
                    .get(
                        reqwest::Url::parse_with_params(&api, &[("query", query.as_str())])
                            .map_err(|e| e.to_string())?,
                    )
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                let results = reply["data"]["result"].as_array().map(Vec::len).unwrap_or(0);
                if reply["status"] == "success" && results > 0 { Ok(()) } else { Err(reply.to_string()) }
            }
        })
        .await;
    }
    // Every worker is scraped and up.
    let up: serde_json::Value = client
        .get(reqwest::Url::parse_with_params(&api, &[("query", "sum(up{job=\"choreo-workers\"})")]).expect("url"))
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    assert_eq!(up["data"]["result"][0]["value"][1], "3", "{up}");

    // Every runbook link opens its runbook on this Prometheus, which stands in for compose.yaml's at 9090.
    for (alert, url) in runbook_links() {
        let path = url.strip_prefix(RUNBOOK_BASE).unwrap_or_else(|| panic!("{url} is not under {RUNBOOK_BASE}"));
        let served = format!("http://127.0.0.1:{port}/user/{path}");
        let body = get_text(&client, &served).await.unwrap_or_else(|e| panic!("{url} (as {served}): {e}"));
        if let Some(alert) = alert {
            assert!(body.contains(&alert), "{url}, the runbook of {alert}, does not mention it");
        }
    }
    prometheus.kill().await.expect("stop prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    cluster.shutdown().await;
}
