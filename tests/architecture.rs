//! The layering the folders promise, checked: the models crate (`modeling/`)
//! depends on no crate of the workspace, and no module of `nodes/` or
//! `modeling/` imports a module that imports it back — file by file, and
//! between top-level modules (`pixart`, `training`, `captioner`, …).
//!
//! Imports are read from the source text: every `crate::…` and `super::…` path
//! (`use` trees with braces included), resolved to the longest module prefix that
//! exists as a file. Test modules (`#[cfg(test)]` to the end of a file) are not
//! the architecture and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_models_crate_depends_on_no_workspace_crate() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let workspace: BTreeSet<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let models = packages
        .iter()
        .find(|p| p["name"] == "pixart-models")
        .expect("a pixart-models package in the workspace");
    let inside: Vec<&str> = models["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .filter(|name| workspace.contains(name))
        .collect();
    assert!(
        inside.is_empty(),
        "pixart-models depends on workspace crates {inside:?}"
    );
    // And the nodes use it rather than keeping model code of their own.
    let nodes = packages
        .iter()
        .find(|p| p["name"] == "pixart-nodes")
        .unwrap();
    assert!(nodes["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["name"] == "pixart-models"));
}

/// A crate's modules: path (`["training", "loss"]`) → file.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut p = prefix.to_vec();
                if name != "mod" && name != "lib" {
                    p.push(name);
                }
                out.insert(p, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The source without comments and test modules.
fn code_of(text: &str) -> String {
    let cut = text.find("#[cfg(test)]").unwrap_or(text.len());
    text[..cut]
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a `use` tree starting at `s` names, as segments; `s` starts just
/// after `crate::` or `super::` (whose segment the caller pushed in `base`).
fn use_paths(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut path = base;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            i += 1;
            loop {
                i += use_paths(&s[i..], path.clone(), out);
                while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    return i + 1;
                }
            }
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if i > start {
            path.push(s[start..i].to_string());
        }
        if s[i..].starts_with("::") {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// Module → the modules it imports (itself and its own ancestors left out).
fn import_graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mods = modules(src);
    let mut graph = BTreeMap::new();
    for (module, file) in &mods {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let mut paths = Vec::new();
        let bytes = code.as_bytes();
        for (i, _) in code
            .match_indices("crate::")
            .chain(code.match_indices("super::"))
        {
            let before = i.checked_sub(1).map(|j| bytes[j]);
            if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                continue;
            }
            let (head, rest) = code[i..].split_once("::").unwrap();
            use_paths(rest, vec![head.to_string()], &mut paths);
        }
        let mut targets = BTreeSet::new();
        for path in paths {
            let mut resolved: Vec<String> = Vec::new();
            let mut segments = path.into_iter().peekable();
            match segments.peek().map(String::as_str) {
                Some("crate") => {
                    segments.next();
                }
                _ => {
                    resolved = module.clone();
                    while segments.peek().map(String::as_str) == Some("super") {
                        segments.next();
                        resolved.pop();
                    }
                }
            }
            for seg in segments {
                let mut longer = resolved.clone();
                longer.push(seg);
                if !mods.contains_key(&longer) {
                    break;
                }
                resolved = longer;
            }
            if !module.starts_with(&resolved) {
                targets.insert(resolved);
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

/// The pairs (a, b) where a reaches b and b reaches a.
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<String> {
    let reach = |from: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let mut found = Vec::new();
    for a in graph.keys() {
        for b in graph.get(a).into_iter().flatten() {
            if reach(b).contains(a) {
                found.push(format!(
                    "{} -> {} -> … -> {}",
                    a.join("::"),
                    b.join("::"),
                    a.join("::")
                ));
            }
        }
    }
    found
}

fn top_level(
    graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let first = |m: &Vec<String>| m.iter().take(1).cloned().collect::<Vec<_>>();
    let mut out: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, targets) in graph {
        let entry = out.entry(first(m)).or_default();
        entry.extend(
            targets
                .iter()
                .map(first)
                .filter(|t| *t != first(m) && !t.is_empty()),
        );
    }
    out
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for krate in ["nodes/src", "modeling/src"] {
        let graph = import_graph(&root().join(krate));
        assert!(graph.len() > 5, "{krate}: modules found");
        let files = cycles(&graph);
        assert!(
            files.is_empty(),
            "{krate}: import cycles between files:\n{}",
            files.join("\n")
        );
        let tops = cycles(&top_level(&graph));
        assert!(
            tops.is_empty(),
            "{krate}: import cycles between top-level modules:\n{}",
            tops.join("\n")
        );
    }
}

/// The checker itself finds a cycle where there is one, through `use` trees.
#[test]
fn the_cycle_check_finds_a_planted_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "pub mod x;\npub mod y;\n").unwrap();
    std::fs::write(src.join("a/x.rs"), "use super::{y::Y, z};\n").unwrap();
    std::fs::write(src.join("a/y.rs"), "use crate::b::B;\npub struct Y;\n").unwrap();
    std::fs::write(
        src.join("b.rs"),
        "// use crate::a::x; in a comment does not count\nfn f() { crate::a::x::g(); }\n",
    )
    .unwrap();
    let graph = import_graph(src);
    let key = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    assert!(graph[&key("a::x")].contains(&key("a::y")));
    assert!(graph[&key("b")].contains(&key("a::x")));
    assert_eq!(cycles(&graph).len(), 3, "{:?}", cycles(&graph));
    assert_eq!(cycles(&top_level(&graph)).len(), 2);
}
