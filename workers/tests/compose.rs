//! `compose.yaml`, checked without Docker: its keys against a typed schema, its references against each other
//! (dependencies, volumes, credentials) and against the repository (the workers' settings, the Dockerfile).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schema::{ComposeFile, Condition, Healthcheck, RestartPolicy, Service};

const COMPOSE_YAML: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../compose.yaml"));

/// The worker services; each is named after the binary it runs.
const WORKERS: [&str; 3] = ["order-worker", "payment-worker", "inventory-worker"];
const BROKER: &str = "rabbitmq";
const DATABASE: &str = "postgres";

/// The part of the Compose Specification that compose.yaml uses. Unknown keys are errors, so that a misspelt
/// key fails here rather than when someone runs Docker: add a field when compose.yaml needs a new key.
mod schema {
    #![allow(dead_code, reason = "some fields exist only so that their keys are accepted")]

    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ComposeFile {
        pub name: Option<String>,
        pub services: BTreeMap<String, Service>,
        /// Named volumes; a volume with default settings is declared with an empty value.
        #[serde(default)]
        pub volumes: BTreeMap<String, Option<Volume>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Service {
        pub image: Option<String>,
        pub build: Option<Build>,
        pub hostname: Option<String>,
        pub command: Option<Command>,
        /// Map form only (`NAME: value`), so that the checks can look variables up by name.
        #[serde(default)]
        pub environment: BTreeMap<String, String>,
        /// Short syntax: `[HOST_IP:]HOST_PORT:CONTAINER_PORT`.
        #[serde(default)]
        pub ports: Vec<String>,
        /// Ports reachable by other services but not published on the host (`"9464"`).
        #[serde(default)]
        pub expose: Vec<String>,
        /// Short syntax: `SOURCE:TARGET[:MODE]`.
        #[serde(default)]
        pub volumes: Vec<String>,
        /// Map form only, since every dependency must say what it waits for.
        #[serde(default)]
        pub depends_on: BTreeMap<String, Dependency>,
        pub healthcheck: Option<Healthcheck>,
        pub restart: Option<RestartPolicy>,
        pub stop_grace_period: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Build {
        /// Relative to the directory of compose.yaml.
        pub context: String,
        /// Relative to the context; `Dockerfile` when absent.
        pub dockerfile: Option<String>,
    }

    /// `["program", "arg"]` (exec form) or `"program arg"` (shell form).
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    pub enum Command {
        Exec(Vec<String>),
        Shell(String),
    }

    impl Command {
        pub fn program(&self) -> Option<&str> {
            match self {
                Command::Exec(words) => words.first().map(String::as_str),
                Command::Shell(line) => line.split_whitespace().next(),
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Dependency {
        pub condition: Condition,
        pub restart: Option<bool>,
        pub required: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "snake_case")]
    #[allow(clippy::enum_variant_names, reason = "the names are compose's own values")]
    pub enum Condition {
        ServiceStarted,
        ServiceHealthy,
        ServiceCompletedSuccessfully,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Healthcheck {
        pub test: Command,
        pub interval: Option<String>,
        pub timeout: Option<String>,
        pub retries: Option<u32>,
        pub start_period: Option<String>,
        pub start_interval: Option<String>,
        pub disable: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "kebab-case")]
    pub enum RestartPolicy {
        No,
        Always,
        OnFailure,
        UnlessStopped,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Volume {
        pub name: Option<String>,
        pub driver: Option<String>,
        pub external: Option<bool>,
    }
}

#[test]
fn compose_yaml_matches_the_schema() {
    let compose = load_compose();
    assert!(!compose.services.is_empty(), "compose.yaml defines no services");
}

#[test]
fn depends_on_targets_exist_and_are_waited_for_until_healthy() {
    let compose = load_compose();
    for (name, dependent) in &compose.services {
        for (target, dependency) in &dependent.depends_on {
            let target_service = compose
                .services
                .get(target)
                .unwrap_or_else(|| panic!("`{name}` depends on `{target}`, which is not a service"));
            assert_eq!(
                dependency.condition,
                Condition::ServiceHealthy,
                "`{name}` must wait for `{target}` to be healthy, not merely started"
            );
            let healthcheck = target_service.healthcheck.as_ref().unwrap_or_else(|| {
                panic!("`{name}` waits for `{target}` to be healthy, but `{target}` has no healthcheck")
            });
            assert!(
                healthcheck_enabled(healthcheck),
                "`{name}` waits for `{target}` to be healthy, but `{target}`'s healthcheck is disabled"
            );
        }
    }
}

#[test]
fn workers_wait_for_rabbitmq_and_postgres() {
    let compose = load_compose();
    for worker in WORKERS {
        for dependency in [BROKER, DATABASE] {
            assert!(
                service(&compose, worker).depends_on.contains_key(dependency),
                "`{worker}` does not list `{dependency}` under depends_on"
            );
        }
    }
}

#[test]
fn named_volumes_are_declared_at_top_level() {
    let compose = load_compose();
    for (name, definition) in &compose.services {
        for spec in &definition.volumes {
            let Some(source) = mount_source(spec) else { continue };
            if is_host_path(source) {
                continue;
            }
            assert!(
                compose.volumes.contains_key(source),
                "`{name}` mounts volume `{source}`, which is not declared under the top-level `volumes:`"
            );
        }
    }
}

#[test]
fn bind_mounted_repository_files_exist() {
    let compose = load_compose();
    for (name, definition) in &compose.services {
        for spec in &definition.volumes {
            let Some(source) = mount_source(spec) else { continue };
            if !source.starts_with('.') {
                continue; // a named volume, or a host path outside the repository
            }
            let path = repo_root().join(source);
            assert!(path.exists(), "`{name}` mounts `{source}`, but {} does not exist", path.display());
        }
    }
}

/// Prometheus and Grafana read their configuration from repository files mounted where the images look for
/// them; a renamed or misplaced file would leave them running without alerts or without dashboards.
#[test]
fn prometheus_and_grafana_mount_their_configuration_from_the_repository() {
    let compose = load_compose();
    let mounts = [
        ("prometheus", "./monitoring/prometheus/prometheus.compose.yml", "/etc/prometheus/prometheus.yml"),
        ("prometheus", "./monitoring/prometheus/alerts.yml", "/etc/prometheus/alerts.yml"),
        ("grafana", "./monitoring/grafana/provisioning", "/etc/grafana/provisioning"),
        ("grafana", "./monitoring/grafana/dashboards", "/var/lib/grafana/dashboards"),
    ];
    for (name, source, target) in mounts {
        let volumes = &service(&compose, name).volumes;
        assert!(
            volumes.iter().any(|spec| mount_source_and_target(spec) == Some((source, target))),
            "`{name}` does not mount `{source}` at `{target}` (its volumes: {volumes:?})"
        );
        let path = repo_root().join(source);
        assert!(path.exists(), "`{name}` mounts `{source}`, but {} does not exist", path.display());
    }
    // What Grafana finds inside the mounted directories, and the dashboard its provider loads.
    for file in [
        "monitoring/grafana/provisioning/datasources/prometheus.yml",
        "monitoring/grafana/provisioning/dashboards/choreo.yml",
        "monitoring/grafana/dashboards/choreo.json",
    ] {
        assert!(repo_root().join(file).is_file(), "grafana needs {file}, which does not exist");
    }
    // Prometheus resolves rule files next to its configuration, /etc/prometheus: each must be mounted there.
    let config = read_repo_file("monitoring/prometheus/prometheus.compose.yml");
    let config: PrometheusConfig = serde_yaml_ng::from_str(&config)
        .unwrap_or_else(|e| panic!("monitoring/prometheus/prometheus.compose.yml is not valid YAML: {e}"));
    assert!(!config.rule_files.is_empty(), "prometheus.compose.yml loads no rule files: no alerts would fire");
    let prometheus_volumes = &service(&compose, "prometheus").volumes;
    for rule_file in &config.rule_files {
        let target = format!("/etc/prometheus/{rule_file}");
        assert!(
            prometheus_volumes.iter().any(|spec| mount_source_and_target(spec).is_some_and(|(_, t)| t == target)),
            "prometheus.compose.yml loads `{rule_file}`, but `prometheus` mounts nothing at `{target}`"
        );
    }
}

/// The part of a Prometheus configuration the checks read; other keys are ignored.
#[derive(Debug, serde::Deserialize)]
struct PrometheusConfig {
    #[serde(default)]
    rule_files: Vec<String>,
}

#[test]
fn each_worker_runs_its_own_binary() {
    let compose = load_compose();
    for worker in WORKERS {
        assert_eq!(program(&compose, worker), worker, "service `{worker}` runs the wrong binary");
    }
}

#[test]
fn workers_share_one_image_built_from_the_repository() {
    let compose = load_compose();
    let images: Vec<Option<&str>> = WORKERS.iter().map(|w| service(&compose, w).image.as_deref()).collect();
    assert!(images.windows(2).all(|pair| pair[0] == pair[1]), "the workers use different images: {images:?}");
    for worker in WORKERS {
        assert!(service(&compose, worker).build.is_some(), "`{worker}` has no `build:` section");
    }
}

#[test]
fn workers_set_broker_database_and_namespace() {
    let compose = load_compose();
    for worker in WORKERS {
        for variable in ["AMQP_URL", "DATABASE_URL", "CHOREO_NAMESPACE"] {
            assert!(!env_var(&compose, worker, variable).is_empty(), "`{worker}` sets {variable} to an empty value");
        }
    }
    // Workers find each other's exchanges through the namespace: they must all share one.
    let namespaces: Vec<&str> = WORKERS.iter().map(|w| env_var(&compose, w, "CHOREO_NAMESPACE")).collect();
    assert!(
        namespaces.windows(2).all(|pair| pair[0] == pair[1]),
        "the workers use different namespaces: {namespaces:?}"
    );
}

#[test]
fn amqp_url_uses_the_rabbitmq_service_and_its_user() {
    let compose = load_compose();
    let user = env_var(&compose, BROKER, "RABBITMQ_DEFAULT_USER");
    let password = env_var(&compose, BROKER, "RABBITMQ_DEFAULT_PASS");
    for worker in WORKERS {
        let url = env_var(&compose, worker, "AMQP_URL");
        let parts = url_parts(url);
        assert_eq!(parts.scheme, "amqp", "`{worker}`: AMQP_URL `{url}` is not an amqp:// URL");
        assert_eq!(parts.host, BROKER, "`{worker}`: AMQP_URL `{url}` does not point at the `{BROKER}` service");
        assert_eq!(parts.user, user, "`{worker}`: AMQP_URL `{url}` does not use RABBITMQ_DEFAULT_USER");
        assert_eq!(parts.password, password, "`{worker}`: AMQP_URL `{url}` does not use RABBITMQ_DEFAULT_PASS");
        // The default user is given permissions on the default virtual host `/` only.
        assert_eq!(parts.path.to_ascii_lowercase(), "%2f", "`{worker}`: AMQP_URL `{url}` does not use vhost `/`");
    }
}

#[test]
fn database_url_uses_the_postgres_service_and_its_user() {
    let compose = load_compose();
    let user = env_var(&compose, DATABASE, "POSTGRES_USER");
    let password = env_var(&compose, DATABASE, "POSTGRES_PASSWORD");
    for worker in WORKERS {
        let url = env_var(&compose, worker, "DATABASE_URL");
        let parts = url_parts(url);
        assert!(
            parts.scheme == "postgres" || parts.scheme == "postgresql",
            "`{worker}`: DATABASE_URL `{url}` is not a postgres:// URL"
        );
        assert_eq!(parts.host, DATABASE, "`{worker}`: DATABASE_URL `{url}` does not point at the `{DATABASE}` service");
        assert_eq!(parts.user, user, "`{worker}`: DATABASE_URL `{url}` does not use POSTGRES_USER");
        assert_eq!(parts.password, password, "`{worker}`: DATABASE_URL `{url}` does not use POSTGRES_PASSWORD");
    }
}

/// Every `CHOREO_` variable of a worker service is read by its worker, or by `choreoctl`, which operators
/// run inside the worker containers (`docker compose exec order-worker choreoctl ...`).
#[test]
fn worker_choreo_variables_are_ones_the_worker_or_choreoctl_reads() {
    let compose = load_compose();
    let common_settings = read_repo_file("choreo/src/settings.rs");
    let choreoctl_settings = choreoctl_sources();
    for worker in WORKERS {
        let binary = program(&compose, worker);
        let binary_source = format!("workers/src/bin/{binary}.rs");
        let own_settings = read_repo_file(&binary_source);
        let names = service(&compose, worker).environment.keys().filter(|name| name.starts_with("CHOREO_"));
        for name in names {
            let declaration = format!("env = \"{name}\"");
            assert!(
                common_settings.contains(&declaration)
                    || own_settings.contains(&declaration)
                    || choreoctl_settings.contains(&declaration),
                "`{worker}` sets {name}, which neither choreo/src/settings.rs, {binary_source} nor choreoctl/src \
                 reads (no `{declaration}`): misspelt, or meant for another worker?"
            );
        }
    }
}

/// `choreoctl top` run in any worker's container (the README runs choreoctl in `order-worker`; the runbooks
/// let `CLI` pick another) reads every worker's /metrics: CHOREO_TOP_TARGETS names each worker service, by
/// the name choreoctl shows it under, at the port its CHOREO_METRICS_ADDR listens on and exposes to the others.
#[test]
fn choreoctl_top_in_a_worker_container_reaches_every_worker() {
    let compose = load_compose();
    let mut expected: Vec<String> = WORKERS
        .iter()
        .map(|worker| {
            let addr = env_var(&compose, worker, "CHOREO_METRICS_ADDR");
            let (_, port) = addr.rsplit_once(':').unwrap_or_else(|| panic!("`{worker}`: `{addr}` has no port"));
            assert!(
                service(&compose, worker).expose.iter().any(|p| p == port),
                "`{worker}` serves /metrics on port {port} but does not expose it to the other services"
            );
            let name = worker.strip_suffix("-worker").unwrap_or(worker);
            format!("{name}={worker}:{port}")
        })
        .collect();
    expected.sort();
    for worker in WORKERS {
        // choreoctl's form: `worker=host:port`, comma-separated.
        let mut targets: Vec<String> =
            env_var(&compose, worker, "CHOREO_TOP_TARGETS").split(',').map(|t| t.trim().to_owned()).collect();
        targets.sort();
        assert_eq!(targets, expected, "`{worker}`: CHOREO_TOP_TARGETS must name every worker service's /metrics");
    }
}

#[test]
fn workers_restart_and_have_time_to_drain_before_being_killed() {
    let compose = load_compose();
    for worker in WORKERS {
        let worker_service = service(&compose, worker);
        assert_eq!(
            worker_service.restart,
            Some(RestartPolicy::UnlessStopped),
            "`{worker}` should restart unless stopped"
        );
        let grace = worker_service.stop_grace_period.as_deref().unwrap_or_else(|| {
            panic!("`{worker}` has no stop_grace_period; Docker's default 10s cuts the drain short")
        });
        let drain = env_var(&compose, worker, "CHOREO_SHUTDOWN_TIMEOUT");
        assert!(
            duration(grace) > duration(drain) + choreo::CLOSE_ALLOWANCE,
            "`{worker}`: stop_grace_period {grace} must outlast CHOREO_SHUTDOWN_TIMEOUT {drain} and the time \
             connections get to close, or Docker kills the worker while it stops"
        );
    }
}

#[test]
fn dockerfile_installs_every_binary_the_services_run() {
    let compose = load_compose();
    for (name, definition) in &compose.services {
        // Services without `build:` run a published image, which brings its own programs.
        let Some(build) = &definition.build else { continue };
        let dockerfile = Path::new(&build.context).join(build.dockerfile.as_deref().unwrap_or("Dockerfile"));
        let text = read_repo_file(&dockerfile);
        let binary = program(&compose, name);
        assert!(
            installs_binary(&text, binary),
            "`{name}` runs `{binary}`, but {} has no `COPY --from=... .../{binary} /usr/local/bin/`",
            dockerfile.display()
        );
    }
}

fn load_compose() -> ComposeFile {
    serde_yaml_ng::from_str(COMPOSE_YAML)
        .expect("compose.yaml does not match the schema in workers/tests/compose.rs (a misspelt or new key?)")
}

fn service<'a>(compose: &'a ComposeFile, name: &str) -> &'a Service {
    compose.services.get(name).unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"))
}

fn env_var<'a>(compose: &'a ComposeFile, service_name: &str, variable: &str) -> &'a str {
    service(compose, service_name)
        .environment
        .get(variable)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("service `{service_name}` does not set {variable}"))
}

/// The program a service's `command:` starts.
fn program<'a>(compose: &'a ComposeFile, service_name: &str) -> &'a str {
    service(compose, service_name)
        .command
        .as_ref()
        .unwrap_or_else(|| panic!("service `{service_name}` has no `command:`"))
        .program()
        .unwrap_or_else(|| panic!("service `{service_name}` has an empty `command:`"))
}

fn healthcheck_enabled(healthcheck: &Healthcheck) -> bool {
    healthcheck.disable != Some(true) && healthcheck.test.program() != Some("NONE")
}

/// The source of a short-syntax mount `SOURCE:TARGET[:MODE]`; `None` for an anonymous volume (`TARGET` alone).
fn mount_source(spec: &str) -> Option<&str> {
    spec.split_once(':').map(|(source, _)| source)
}

/// The source and target of a short-syntax mount `SOURCE:TARGET[:MODE]`; `None` for an anonymous volume.
fn mount_source_and_target(spec: &str) -> Option<(&str, &str)> {
    let (source, rest) = spec.split_once(':')?;
    let target = rest.split_once(':').map_or(rest, |(target, _mode)| target);
    Some((source, target))
}

fn is_host_path(source: &str) -> bool {
    source.starts_with('.') || source.starts_with('/') || source.starts_with('~')
}

/// The parts of `scheme://user:password@host[:port][/path]` that the checks compare.
#[derive(Debug)]
struct UrlParts<'a> {
    scheme: &'a str,
    user: &'a str,
    password: &'a str,
    host: &'a str,
    path: &'a str,
}

fn url_parts(url: &str) -> UrlParts<'_> {
    let (scheme, rest) = url.split_once("://").unwrap_or_else(|| panic!("`{url}` has no scheme"));
    let (credentials, rest) = rest.split_once('@').unwrap_or_else(|| panic!("`{url}` has no user and password"));
    let (user, password) = credentials.split_once(':').unwrap_or_else(|| panic!("`{url}` has no password"));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.split_once(':').map_or(authority, |(host, _port)| host);
    UrlParts { scheme, user, password, host, path }
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("`{text}` is not a duration: {e}"))
}

/// Whether a `COPY --from=...` instruction copies `binary` into /usr/local/bin, which is on the image's PATH.
fn installs_binary(dockerfile: &str, binary: &str) -> bool {
    let source_suffix = format!("/{binary}");
    instructions(dockerfile).iter().any(|instruction| {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        let Some((destination, rest)) = words.split_last() else { return false };
        rest.first() == Some(&"COPY")
            && rest.iter().any(|word| word.starts_with("--from="))
            && destination.trim_end_matches('/') == "/usr/local/bin"
            && rest.iter().any(|word| word.ends_with(&source_suffix))
    })
}

/// Dockerfile instructions, one string each, with `\` line continuations joined and comments left out.
fn instructions(dockerfile: &str) -> Vec<String> {
    dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The text of every source file of choreoctl.
fn choreoctl_sources() -> String {
    fn collect(dir: &Path, text: &mut String) {
        let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())).path();
            if path.is_dir() {
                collect(&path, text);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(
                    &fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())),
                );
            }
        }
    }
    let mut text = String::new();
    collect(&repo_root().join("choreoctl/src"), &mut text);
    text
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_repo_file(relative: impl AsRef<Path>) -> String {
    let path = repo_root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
