//! The engine's layers only depend downward. Reads `engine/src`, maps each file to its
//! top-level module, collects the `crate::…` paths it uses (in code, not comments), and fails
//! with `file:line` on any import the layering forbids:
//!
//! | layer | modules | may use |
//! |---|---|---|
//! | 0, leaves | `util`, `error`, `settings`, `partitioner`, `progress`, `acks`, `transports`, `codec`, `cron` | layer 0 |
//! | 1 | `runtime` (the per-core engine and the contract table shards implement) | layers 0–1 |
//! | 2 | `table`, `topic`, `window`, `stream`, in that order | layers 0–1 and the layer-2 modules listed before it |
//! | 3 | `app` | layers 0–3 |
//! | 4, composition roots | `control`, `worker`, `cli`, `testing`, in that order | everything below and the roots listed before it |
//!
//! Inside `runtime/`, the leaves `executor`, `crash` and `signal` use no other part of the
//! runtime, and `mailbox` only `signal`. `lib.rs` re-exports from everywhere and is not
//! checked; a path to one of its re-exports (`crate::Table`) counts as a use of the module it
//! re-exports from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each module with its layer and, within a layer, its order (a module may use those of a
/// lower layer, and those of its own layer that come before it when the layer is ordered).
const MODULES: &[(&str, u32, u32)] = &[
    ("util", 0, 0),
    ("error", 0, 0),
    ("settings", 0, 0),
    ("partitioner", 0, 0),
    ("progress", 0, 0),
    ("acks", 0, 0),
    ("transports", 0, 0),
    ("codec", 0, 0),
    ("cron", 0, 0),
    ("runtime", 1, 0),
    ("table", 2, 0),
    ("topic", 2, 1),
    ("window", 2, 2),
    ("stream", 2, 3),
    ("app", 3, 0),
    ("control", 4, 0),
    ("worker", 4, 1),
    ("cli", 4, 2),
    ("testing", 4, 3),
];

/// Layers whose modules may use one another freely (the leaves).
const UNORDERED_LAYERS: &[u32] = &[0];

/// Within `runtime/`: files that are leaves of the runtime, with the runtime files each may use.
const RUNTIME_LEAVES: &[(&str, &[&str])] =
    &[("executor", &[]), ("crash", &[]), ("signal", &[]), ("mailbox", &["signal"])];

fn rank(module: &str) -> Option<(u32, u32)> {
    MODULES.iter().find(|(m, _, _)| *m == module).map(|&(_, layer, order)| (layer, order))
}

/// Whether `from` may use `to`.
fn allowed(from: &str, to: &str) -> bool {
    if from == to {
        return true;
    }
    let (Some((fl, fo)), Some((tl, to_order))) = (rank(from), rank(to)) else { return false };
    tl < fl || (tl == fl && (UNORDERED_LAYERS.contains(&fl) || to_order < fo))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("list engine/src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The identifiers that follow `crate::` on `line` (for `crate::{a, b::c}`, `a` and `b`).
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            found.extend(inner.split(',').filter_map(|p| {
                let ident: String = p.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                (!ident.is_empty()).then_some(ident)
            }));
        } else {
            let ident: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !ident.is_empty() {
                found.push(ident);
            }
        }
        rest = after;
    }
    found
}

/// The names `lib.rs` re-exports at the crate root, with the module each comes from.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    let text = lib.replace('\n', " ");
    for statement in text.split(';') {
        let Some(path) = statement.trim().strip_prefix("pub use crate::") else { continue };
        let module: String = path.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let items = match (path.find('{'), path.rfind('}')) {
            (Some(a), Some(b)) => path[a + 1..b].to_string(),
            _ => path.rsplit("::").next().unwrap_or_default().to_string(),
        };
        for item in items.split(',') {
            let name = item.trim().rsplit(' ').next().unwrap_or_default().trim();
            if !name.is_empty() {
                names.insert(name.to_string(), module.clone());
            }
        }
    }
    names
}

#[test]
fn engine_modules_only_depend_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under engine/src");
        let parts: Vec<String> =
            relative.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
        if parts == ["lib"] {
            continue;
        }
        let module = parts[0].clone();
        assert!(rank(&module).is_some(), "{}: module `{module}` has no layer (add it to MODULES)", relative.display());
        // The runtime's leaves, by file.
        let runtime_leaf = (module == "runtime" && parts.len() == 2)
            .then(|| RUNTIME_LEAVES.iter().find(|(f, _)| *f == parts[1]))
            .flatten();
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for ident in crate_paths(code) {
                checked += 1;
                let target = match rank(&ident) {
                    Some(_) => ident.clone(),
                    None => match reexports.get(&ident) {
                        Some(m) => m.clone(),
                        None => continue, // a crate-root item of lib.rs itself (a macro, a doc struct)
                    },
                };
                let location = format!("engine/src/{}:{}", relative.display(), n + 1);
                if !allowed(&module, &target) {
                    violations.push(format!("{location}: `{module}` may not use `{target}` ({})", code.trim()));
                }
                if let Some((leaf, may)) = runtime_leaf
                    && target == "runtime"
                {
                    let used = code.split("crate::runtime::").nth(1).unwrap_or_default();
                    let sibling: String = used.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !sibling.is_empty() && sibling != *leaf && !may.contains(&sibling.as_str()) {
                        violations.push(format!(
                            "{location}: the runtime's leaf `{leaf}` may not use `runtime::{sibling}` ({})",
                            code.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} crate paths found: is engine/src where this test looks?");
    assert!(violations.is_empty(), "imports that break the engine's layering:\n{}", violations.join("\n"));
}

#[test]
fn the_rules_themselves() {
    assert!(allowed("runtime", "util") && allowed("stream", "table") && allowed("stream", "topic"));
    assert!(!allowed("runtime", "table") && !allowed("table", "stream") && !allowed("topic", "stream"));
    assert!(allowed("worker", "control") && !allowed("control", "worker") && !allowed("app", "worker"));
    assert!(allowed("settings", "codec") && allowed("codec", "util"));
    assert_eq!(crate_paths("use crate::{a, b::c};"), ["a", "b"]);
    assert_eq!(crate_paths("x(crate::runtime::crash_point(\"p\")) + crate::util::lock(m)"), ["runtime", "util"]);
    let lib = "pub use crate::app::{Agent, App};\npub use crate::table::{\n    Table,\n    TableError,\n};";
    let map = root_reexports(lib);
    assert_eq!(map.get("App").map(String::as_str), Some("app"));
    assert_eq!(map.get("TableError").map(String::as_str), Some("table"));
}
