//! The agent's modules form no import cycle, and the layers import only downwards:
//! a policy never imports the proxy, the config or the transport (but for an endpoint's
//! connection pool); the config never imports the proxy; the transport and the metrics
//! know no policy.
//!
//! Reads `src/` as text: each file is a module, each `crate::…` or `super::…` path in
//! its non-test code an edge to the longest module that path names. A child's use of
//! its own ancestors (`super::InvalidTopology` in `shard/key.rs`) is the parent's
//! business and not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn modules(dir: &Path, root: &Path, out: &mut BTreeMap<Module, PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src/")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            modules(&path, root, out);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("under src/")
            .with_extension("");
        let name: Module = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if name.last().is_some_and(|n| n == "tests") {
            continue;
        }
        let name = if name == ["lib"] || name == ["main"] {
            Vec::new()
        } else {
            name
        };
        out.insert(name, path);
    }
}

/// The `a::b::c` paths after each occurrence of `prefix` in `code`.
fn paths<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = Vec<&'a str>> + 'a {
    code.match_indices(prefix).filter_map(move |(at, _)| {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        let rest = &code[at + prefix.len()..];
        let mut parts = Vec::new();
        let mut rest = rest;
        loop {
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            parts.push(&rest[..end]);
            match rest[end..].strip_prefix("::") {
                Some(next) => rest = next,
                None => break,
            }
        }
        (!parts.is_empty()).then_some(parts)
    })
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    modules(&root, &root, &mut files);
    let resolve = |mut path: Module| {
        while !path.is_empty() && !files.contains_key(&path) {
            path.pop();
        }
        path
    };
    let mut edges = BTreeMap::new();
    for (module, file) in &files {
        let text = std::fs::read_to_string(file).expect("read module");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut out = BTreeSet::new();
        let crate_paths = paths(code, "crate::").map(|p| p.iter().map(|s| s.to_string()).collect());
        let parent = &module[..module.len().saturating_sub(1)];
        let super_paths = paths(code, "super::").map(|p| {
            parent
                .iter()
                .cloned()
                .chain(p.iter().map(|s| s.to_string()))
                .collect()
        });
        for target in crate_paths.chain(super_paths).map(resolve) {
            let ancestor = module.starts_with(&target);
            if !target.is_empty() && !ancestor {
                out.insert(target);
            }
        }
        edges.insert(module.clone(), out);
    }
    edges
}

/// Modules reachable from `from` (not counting `from` itself unless on a cycle).
fn reachable(edges: &BTreeMap<Module, BTreeSet<Module>>, from: &Module) -> BTreeSet<Module> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&Module> = edges[from].iter().collect();
    while let Some(next) = todo.pop() {
        if seen.insert(next.clone()) {
            todo.extend(edges.get(next).into_iter().flatten());
        }
    }
    seen
}

#[test]
fn no_module_imports_form_a_cycle() {
    let edges = graph();
    assert!(edges.len() > 30, "read the modules: {:?}", edges.keys());
    let cycles: Vec<String> = edges
        .keys()
        .filter(|m| reachable(&edges, m).contains(*m))
        .map(|m| m.join("::"))
        .collect();
    assert!(
        cycles.is_empty(),
        "modules on an import cycle: {cycles:?}; move the shared piece down into its own module"
    );
}

#[test]
fn layers_import_only_downwards() {
    let edges = graph();
    let forbidden: [(&str, &[&str]); 4] = [
        ("policy", &["proxy", "config", "transport", "admin"]),
        ("config", &["proxy", "admin"]),
        ("transport", &["proxy", "config", "policy", "metrics"]),
        ("metrics", &["proxy", "config", "policy", "transport"]),
    ];
    // An endpoint owns its connections, so that the balancer's pick leads to them
    // without a lookup; the pool itself knows no policy.
    let allowed: [(&str, &str); 1] = [("policy::endpoint", "transport::pool")];
    let mut wrong = Vec::new();
    for (module, targets) in &edges {
        for (layer, banned) in forbidden {
            if module.first().map(String::as_str) != Some(layer) {
                continue;
            }
            for target in targets {
                let edge = (module.join("::"), target.join("::"));
                if allowed.iter().any(|(m, t)| edge.0 == *m && edge.1 == *t) {
                    continue;
                }
                if banned.contains(&target[0].as_str()) {
                    wrong.push(format!(
                        "{} imports {}",
                        module.join("::"),
                        target.join("::")
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering: {wrong:?}");
}
