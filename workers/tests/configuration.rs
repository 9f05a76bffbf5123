//! `docs/configuration.md` is generated from the workers' own `--help`, so that the table of settings cannot
//! drift from the clap definitions: a setting added, renamed, re-defaulted or re-described there fails this
//! test until the page is regenerated with `CHOREO_UPDATE_DOCS=1 cargo test -p choreo-workers --test
//! configuration`. The settings that clap does not read (`RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT`) are
//! written by hand outside the generated part and checked to be there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

const START: &str = "<!-- generated from the workers' --help: edit their doc comments, not this table -->";
const END: &str = "<!-- end of the generated part -->";

/// The settings read outside clap, which the page must still document.
const READ_OUTSIDE_CLAP: [&str; 2] = ["RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT"];

const WORKERS: [(&str, &str); 3] = [
    ("order-worker", env!("CARGO_BIN_EXE_order-worker")),
    ("payment-worker", env!("CARGO_BIN_EXE_payment-worker")),
    ("inventory-worker", env!("CARGO_BIN_EXE_inventory-worker")),
];

/// One entry of `--help`.
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    flag: String,
    env: Option<String>,
    default: Option<String>,
    possible_values: Option<String>,
    /// A switch: present or absent, without a value.
    switch: bool,
    meaning: String,
}

/// The options of one `--help` output, in its order; `--help` and `--version` themselves left out.
fn parse_help(help: &str) -> Vec<Setting> {
    let mut entries: Vec<(String, bool, String)> = Vec::new();
    for line in help.lines().skip_while(|l| l.trim() != "Options:").skip(1) {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(flag_part) = trimmed.strip_prefix("--").or_else(|| trimmed.split_once(", --").map(|(_, f)| f)) {
            let mut words = flag_part.split_whitespace();
            let flag = words.next().unwrap_or_default();
            entries.push((format!("--{flag}"), words.next().is_none(), String::new()));
        } else if let Some((_, _, text)) = entries.last_mut() {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(trimmed);
        }
    }
    entries
        .into_iter()
        .filter(|(flag, _, _)| flag != "--help" && flag != "--version")
        .map(|(flag, switch, text)| {
            let (meaning, brackets) = split_brackets(&text);
            let env = brackets.get("env").map(|v| v.trim_end_matches('=').to_owned());
            Setting {
                flag,
                env,
                default: brackets.get("default").cloned(),
                possible_values: brackets.get("possible values").cloned(),
                switch,
                meaning,
            }
        })
        .collect()
}

/// Splits clap's trailing `[env: X=] [default: Y] [possible values: a, b]` from the text before them.
fn split_brackets(text: &str) -> (String, BTreeMap<String, String>) {
    let mut brackets = BTreeMap::new();
    let mut rest = text.trim_end();
    while rest.ends_with(']') {
        let Some(open) = rest.rfind(" [").or_else(|| rest.starts_with('[').then_some(0)) else { break };
        let inner = rest[open..].trim().trim_start_matches('[').trim_end_matches(']');
        let Some((key, value)) = inner.split_once(": ") else { break };
        if !["env", "default", "possible values"].contains(&key) {
            break;
        }
        brackets.insert(key.to_owned(), value.to_owned());
        rest = rest[..open].trim_end();
    }
    (rest.to_owned(), brackets)
}

fn help_of(binary: &str) -> String {
    // A clean environment: clap shows a set variable's value in `--help`.
    let output = Command::new(binary)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("running {binary} --help: {e}"));
    assert!(output.status.success(), "{binary} --help failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("--help is UTF-8")
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

fn row(s: &Setting) -> String {
    let env = s.env.as_deref().map(|e| format!("`{e}`")).unwrap_or_else(|| "—".to_owned());
    let default = match &s.default {
        Some(d) => format!("`{d}`"),
        None if s.switch => "off".to_owned(),
        None if s.meaning.contains("(default: ") => "in its meaning".to_owned(),
        None => "—".to_owned(),
    };
    let mut meaning = cell(&s.meaning);
    if !meaning.ends_with('.') {
        meaning.push('.');
    }
    if let Some(values) = &s.possible_values {
        meaning.push_str(&format!(" One of: {}.", cell(values)));
    }
    format!("| {env} | `{}` | {default} | {meaning} |", s.flag)
}

/// The generated part: the settings every worker shares, then each worker's own.
fn generated() -> String {
    let per_worker: Vec<(&str, Vec<Setting>)> =
        WORKERS.iter().map(|(name, binary)| (*name, parse_help(&help_of(binary)))).collect();
    let shared: Vec<Setting> = per_worker[0]
        .1
        .iter()
        .filter(|s| per_worker.iter().all(|(_, settings)| settings.contains(s)))
        .cloned()
        .collect();
    let header = "| Variable | Flag | Default | Meaning |\n|---|---|---|---|\n";
    let mut out = String::new();
    out.push_str(START);
    out.push_str("\n\n## Every worker\n\n");
    out.push_str(header);
    for s in &shared {
        out.push_str(&row(s));
        out.push('\n');
    }
    for (name, settings) in &per_worker {
        out.push_str(&format!("\n## `{name}` only\n\n"));
        out.push_str(header);
        for s in settings.iter().filter(|s| !shared.contains(s)) {
            out.push_str(&row(s));
            out.push('\n');
        }
    }
    out.push('\n');
    out.push_str(END);
    out
}

fn page_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md")
}

#[test]
fn the_configuration_page_is_the_workers_help() {
    let path = page_path();
    let page = std::fs::read_to_string(&path).expect("docs/configuration.md exists");
    let (Some(start), Some(end)) = (page.find(START), page.find(END)) else {
        panic!("docs/configuration.md lacks the markers of its generated part:\n{START}\n{END}");
    };
    let expected = generated();
    let current = &page[start..end + END.len()];
    if current == expected {
        return;
    }
    if std::env::var_os("CHOREO_UPDATE_DOCS").is_some() {
        let updated = format!("{}{}{}", &page[..start], expected, &page[end + END.len()..]);
        std::fs::write(&path, updated).expect("writing docs/configuration.md");
        return;
    }
    let diff: Vec<String> = expected
        .lines()
        .filter(|l| !current.lines().any(|c| c == *l))
        .map(|l| format!("  missing or changed: {l}"))
        .collect();
    panic!(
        "docs/configuration.md is out of step with the workers' --help; regenerate it with \
         CHOREO_UPDATE_DOCS=1 cargo test -p choreo-workers --test configuration\n{}",
        diff.join("\n")
    );
}

#[test]
fn settings_read_outside_clap_are_documented_by_hand() {
    let page = std::fs::read_to_string(page_path()).expect("docs/configuration.md exists");
    let by_hand = page.find(END).map(|end| format!("{}{}", &page[..page.find(START).unwrap_or(0)], &page[end..]));
    let by_hand = by_hand.expect("the generated part's end marker");
    for name in READ_OUTSIDE_CLAP {
        assert!(by_hand.contains(&format!("`{name}`")), "docs/configuration.md does not document `{name}`");
    }
}

#[test]
fn every_worker_option_has_an_environment_variable_and_a_meaning() {
    for (name, binary) in WORKERS {
        let settings = parse_help(&help_of(binary));
        assert!(settings.len() > 20, "{name}: only {} settings parsed from --help", settings.len());
        for s in settings {
            assert!(s.env.is_some(), "{name} {}: no environment variable", s.flag);
            assert!(!s.meaning.is_empty(), "{name} {}: no description", s.flag);
        }
    }
}

#[test]
fn help_entries_are_parsed_with_their_brackets() {
    let help = "Usage: x\n\nOptions:\n      --log-format <LOG_FORMAT>\n          `pretty` for people \
                [env: CHOREO_LOG_FORMAT=] [default: pretty] [possible values: pretty, json]\n      \
                --flag\n          A switch [env: CHOREO_FLAG=]\n  -h, --help\n          Print help\n";
    assert_eq!(
        parse_help(help),
        vec![
            Setting {
                flag: "--log-format".into(),
                env: Some("CHOREO_LOG_FORMAT".into()),
                default: Some("pretty".into()),
                possible_values: Some("pretty, json".into()),
                switch: false,
                meaning: "`pretty` for people".into(),
            },
            Setting {
                flag: "--flag".into(),
                env: Some("CHOREO_FLAG".into()),
                default: None,
                possible_values: None,
                switch: true,
                meaning: "A switch".into(),
            },
        ]
    );
}
