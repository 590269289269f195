//! The configuration reference (`docs/src/configuration.md`) against the
//! code (issue 26, item 2): every environment variable `src/config.rs`
//! defines (its clap `env = "..."` attributes, read from the source text)
//! is a row of the reference's settings table, and every variable the
//! table documents (the backticked UPPER_SNAKE names of its first column)
//! is defined in the code.
//!
//! Two exceptions, both visible here: a setting clap hides from `--help`
//! (`hide = true`, the test-only `WS_TEST_ECHO`) need not be documented,
//! and a documented variable that is not a clap setting must be read by
//! name somewhere in `src/` (`RUST_LOG`, read by `main.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_file(relative: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// The settings of `src/config.rs`: (shown in `--help`, hidden), by the
/// `env = "NAME"` of each `#[arg(...)]` attribute (which may span lines).
fn code_settings(source: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut shown = BTreeSet::new();
    let mut hidden = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("#[arg(") {
        let attribute = &rest[at..];
        let end = attribute.find(")]").map_or(attribute.len(), |e| e + 2);
        let attribute = &attribute[..end];
        if let Some(env_at) = attribute.find("env = \"") {
            let name = &attribute[env_at + "env = \"".len()..];
            let name = &name[..name.find('"').expect("a closing quote after env = \"")];
            if attribute.contains("hide = true") {
                hidden.insert(name.to_owned());
            } else {
                shown.insert(name.to_owned());
            }
        }
        rest = &rest[at + end..];
    }
    (shown, hidden)
}

fn is_variable_name(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_uppercase())
        && word
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The variables the reference documents: the backticked UPPER_SNAKE names
/// in the first column of the settings table, the first table of the page
/// (before its first `## ` section; the endpoints table comes later).
fn documented(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines().take_while(|l| !l.starts_with("## ")) {
        let Some(row) = line.strip_prefix('|') else {
            continue;
        };
        let first_column = row.split('|').next().unwrap_or_default();
        for (i, part) in first_column.split('`').enumerate() {
            if i % 2 == 1 && is_variable_name(part) {
                names.insert(part.to_owned());
            }
        }
    }
    names
}

/// Every Rust source file under `dir`, as text.
fn sources(dir: &Path, out: &mut String) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).expect("a source file"));
        }
    }
}

#[test]
fn configuration_reference_matches_the_code() {
    let (_, config) = repo_file("src/config.rs");
    let (page_path, page) = repo_file("docs/src/configuration.md");
    let (shown, hidden) = code_settings(&config);
    let documented = documented(&page);
    assert!(
        shown.len() >= 40,
        "only {} settings found in src/config.rs: has the attribute syntax changed?",
        shown.len()
    );
    assert!(
        documented.len() >= 40,
        "only {} variables found in {}'s settings table: has the page changed shape?",
        documented.len(),
        page_path.display()
    );

    let mut all_sources = String::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut all_sources,
    );

    let undocumented: Vec<_> = shown.difference(&documented).collect();
    let unknown: Vec<_> = documented
        .iter()
        .filter(|name| !shown.contains(*name) && !hidden.contains(*name))
        .filter(|name| !all_sources.contains(&format!("\"{name}\"")))
        .collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/src/configuration.md and src/config.rs disagree:\n  \
         defined in src/config.rs but not documented: {undocumented:?}\n  \
         documented but not defined anywhere in src/: {unknown:?}"
    );
}

#[test]
fn the_parsers_find_what_they_should() {
    let (shown, hidden) = code_settings(
        "#[arg(long, env = \"A_B\", default_value = \"1\")]\n\
         #[arg(\n    long,\n    env = \"C\",\n    hide = true\n)]\n#[arg(long)]",
    );
    assert_eq!(shown, BTreeSet::from(["A_B".to_owned()]));
    assert_eq!(hidden, BTreeSet::from(["C".to_owned()]));
    let page = "# T\n\n| Variable | Default |\n|---|---|\n\
                | `HOST` | `0.0.0.0` |\n| `JWT_ISSUER`, `JWT_AUDIENCE` | `wsproxy` |\n\
                | `lower` | `X_Y` |\n\n## Endpoints\n\n| `GET /ws` | `NOT_ME` |\n";
    assert_eq!(
        documented(page),
        BTreeSet::from(["HOST", "JWT_ISSUER", "JWT_AUDIENCE"].map(str::to_owned))
    );
}
