//! The reference workers are built on the public `choreo` crate: they do not reach past it into the crates
//! it is made of (the outbox, the broker), which their tests alone may use.

const MANIFEST: &str = include_str!("../Cargo.toml");

/// The names of the dependencies listed in `section` of the manifest.
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
fn the_reference_workers_depend_on_the_public_crate_not_on_its_parts() {
    let deps = dependencies("[dependencies]");
    assert!(deps.iter().any(|d| d == "choreo"), "{deps:?}");
    for internal in ["choreo-outbox", "choreo-rabbitmq"] {
        assert!(!deps.iter().any(|d| d == internal), "the workers depend on {internal}: {deps:?}");
    }
}
