//! The metrics table is complete: every metric name the source emits (a `"keyward_…"` string literal in
//! `src/`, which only metric names use) is a row of docs/metrics.md, every row is emitted, and the crate docs'
//! copy of the table is the same table.

#![allow(unreachable_pub)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `"keyward_[a-z0-9_]+"` literal in `text`.
fn metric_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("\"keyward_") {
        let name: String = rest[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if name.len() > "keyward_".len() && rest[at + 1 + name.len()..].starts_with('"') {
            out.push(name.clone());
        }
        rest = &rest[at + 1 + name.len()..];
    }
    out
}

/// The table's lines (those starting with `|`), and the metric names in its first column.
fn table(lines: impl Iterator<Item = String>) -> (Vec<String>, BTreeSet<String>) {
    let rows: Vec<String> = lines.filter(|l| l.starts_with('|')).collect();
    let names = rows
        .iter()
        .filter_map(|r| r.strip_prefix("| `keyward_"))
        .map(|r| format!("keyward_{}", &r[..r.find('`').unwrap()]))
        .collect();
    (rows, names)
}

#[test]
fn every_emitted_metric_is_in_the_table_and_every_row_is_emitted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut emitted = BTreeSet::new();
    for file in &files {
        emitted.extend(metric_literals(&std::fs::read_to_string(file).unwrap()));
    }
    assert!(
        emitted.contains("keyward_cache_hits_total") && emitted.len() > 40,
        "the scan finds the metrics: {emitted:?}"
    );

    let doc = std::fs::read_to_string(root.join("../../docs/metrics.md")).unwrap();
    let (doc_rows, documented) = table(doc.lines().map(str::to_owned));
    let missing: Vec<_> = emitted.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "emitted but not in docs/metrics.md: {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&emitted).collect();
    assert!(
        stale.is_empty(),
        "in docs/metrics.md but never emitted: {stale:?}"
    );
    assert_eq!(
        doc_rows.len(),
        documented.len() + 2,
        "one row per metric, plus the header"
    );

    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let (lib_rows, _) = table(
        lib.lines()
            .filter_map(|l| l.strip_prefix("//! "))
            .map(str::to_owned),
    );
    assert_eq!(
        lib_rows, doc_rows,
        "the crate docs' table (src/lib.rs) differs from docs/metrics.md"
    );
}

#[test]
fn the_scan_finds_names_and_skips_other_strings() {
    let text = r#"metrics::counter!("keyward_a_total", "class" => c); let s = "keyward_"; x("keyward_b_seconds")"#;
    assert_eq!(
        metric_literals(text),
        ["keyward_a_total", "keyward_b_seconds"]
    );
}
