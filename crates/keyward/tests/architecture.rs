//! The seam, checked mechanically (docs/architecture.md): only `backend/` names `redis::` types or matches on
//! the backend, every capability's Lua scripts sit next to its `store.rs`, and the top-level modules of
//! `crates/keyward/src` import each other without a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, with its path relative to `src/` and its text without unit tests and
/// comment lines (doc links are not imports).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(src())
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&p).expect("read source");
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            (rel, code)
        })
        .collect()
}

fn top_module(rel: &str) -> &str {
    rel.split('/').next().unwrap_or(rel).trim_end_matches(".rs")
}

#[test]
fn only_the_backend_names_redis_types_or_matches_on_the_backend() {
    let mut offenders = Vec::new();
    for (rel, code) in sources() {
        if rel.starts_with("backend/") {
            continue;
        }
        for (i, line) in code.lines().enumerate() {
            let names_redis = line.contains("redis::");
            let matches_backend =
                line.contains("Backend::Memory") || line.contains("Backend::Redis");
            if names_redis || matches_backend {
                offenders.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "outside backend/:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn lua_scripts_sit_next_to_their_capability() {
    let backend_lua: Vec<_> = std::fs::read_dir(src().join("backend/redis"))
        .expect("backend/redis")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "lua"))
        .map(|e| e.path())
        .collect();
    assert!(
        backend_lua.is_empty(),
        "scripts belong to their capability: {backend_lua:?}"
    );
    for capability in ["cache", "rate_limit", "session", "lock", "idempotency"] {
        let dir = src().join(capability);
        assert!(dir.join("store.rs").is_file(), "{capability}/store.rs");
        let has_lua = std::fs::read_dir(&dir)
            .expect("capability dir")
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "lua"));
        assert!(has_lua, "{capability}/ holds its .lua scripts");
    }
}

#[test]
fn no_import_cycles_between_modules() {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let files = sources();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(rel, _)| top_module(rel).to_owned())
        .filter(|m| m != "lib")
        .collect();
    for (rel, code) in &files {
        let from = top_module(rel);
        if from == "lib" {
            continue;
        }
        let entry = deps.entry(from.to_owned()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::Keyward` is the re-export of `client::Keyward`.
            let to = if name == "Keyward" {
                "client".to_owned()
            } else {
                name
            };
            if modules.contains(&to) && to != from {
                entry.insert(to);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for d in deps.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, deps, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        if let Some(cycle) = visit(m, &deps, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}\n{deps:#?}", cycle.join(" -> "));
        }
    }
    // The backend depends on no capability.
    let backend = &deps["backend"];
    for capability in [
        "cache",
        "rate_limit",
        "session",
        "lock",
        "idempotency",
        "client",
    ] {
        assert!(
            !backend.contains(capability),
            "backend imports {capability}"
        );
    }
}
