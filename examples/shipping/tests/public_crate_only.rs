//! The shipping participant is built the way a team outside this repository builds one: against the public
//! `choreo` crate and nothing else.

use std::path::Path;

const MANIFEST: &str = include_str!("../Cargo.toml");

/// The names of the dependencies listed in `section` (`[dependencies]`, ...) of the manifest.
fn dependencies(section: &str) -> Vec<String> {
    MANIFEST
        .lines()
        .skip_while(|line| line.trim() != section)
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with('['))
        .filter_map(|line| {
            let line = line.trim();
            (!line.is_empty() && !line.starts_with('#'))
                .then(|| line.split(['=', '.', ' ']).next().unwrap_or("").to_owned())
        })
        .collect()
}

#[test]
fn it_depends_on_the_public_crate_alone() {
    assert_eq!(dependencies("[dependencies]"), ["choreo"]);
    for section in ["[dev-dependencies]", "[build-dependencies]"] {
        assert!(dependencies(section).is_empty(), "{section}: {:?}", dependencies(section));
    }
}

#[test]
fn its_code_names_no_internal_crate() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        let code = std::fs::read_to_string(&path).expect("source");
        for internal in ["choreo_messages", "choreo_outbox", "choreo_rabbitmq", "choreo_workers"] {
            assert!(!code.contains(internal), "{} names {internal}", path.display());
        }
    }
}

#[test]
fn the_manifest_is_read_as_cargo_reads_it() {
    assert!(dependencies("[dependencies]").len() == 1, "the parser sees the one dependency");
    assert!(dependencies("[no-such-section]").is_empty());
}
