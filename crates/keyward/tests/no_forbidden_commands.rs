//! Keeps the rule true: no `KEYS`, `FLUSHDB` or `FLUSHALL` in keyward's own (non-test) code or scripts.

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "tests" && name != "target" {
                files(&path, out);
            }
        } else if name.ends_with(".rs") || name.ends_with(".lua") {
            out.push(path);
        }
    }
}

#[test]
fn no_keys_or_flush_commands_in_library_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut all = Vec::new();
    for dir in ["crates", "examples"] {
        files(&root.join(dir), &mut all);
    }
    assert!(
        all.len() > 10,
        "walked the source tree ({} files)",
        all.len()
    );
    let forbidden = ["KEYS", "FLUSHDB", "FLUSHALL"];
    let mut hits = Vec::new();
    for path in all {
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            for word in forbidden {
                let as_command = [
                    format!("cmd(\"{word}\")"),
                    format!("\"{word}\""),
                    format!("redis.call('{word}'"),
                    format!("redis.call(\"{word}\""),
                ];
                if as_command.iter().any(|p| line.contains(p.as_str())) {
                    hits.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        hits.is_empty(),
        "forbidden commands found:\n{}",
        hits.join("\n")
    );
}
