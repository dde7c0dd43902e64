//! The shape of the agent's crates, checked from their sources and manifests: no import cycle
//! between the top-level modules of a crate, and aya (with the eBPF build) only in
//! `mesh-datapath`, so the proxy builds and tests on stable Rust without root.
//!
//! A module's edges are the `crate::x` paths its files name (its own file and its directory,
//! without tests), read textually: good enough for code that imports by path, which is the
//! house style.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The crates whose modules must not form an import cycle.
const ACYCLIC: &[&str] = &[
    "mesh-netns",
    "mesh-datapath",
    "mesh-proxy",
    "mesh-agent",
    "mesh-cni",
    "mesh-api",
    "mesh-core",
    "mesh-oci",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// One edge `from -> to` with where it was seen.
#[derive(Debug, Clone)]
struct Edge {
    to: String,
    at: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "tests" || name == "tests.rs" || name == "testing.rs" {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// The top-level modules of a crate and the files of each.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut mods = BTreeMap::new();
    for e in fs::read_dir(src).expect("read src/").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".rs") else {
            continue;
        };
        if stem == "lib" || stem == "main" {
            continue;
        }
        let mut files = vec![e.path()];
        rust_files(&src.join(stem), &mut files);
        mods.insert(stem.to_string(), files);
    }
    mods
}

/// The top-level module names a line refers to with `crate::`, including inside a grouped
/// `use crate::{a, b::c}` (the names right after `{` or `,` at the group's first level).
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `mesh_crate::` or `foo_crate::` are other paths.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(head(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            out.push(head(&item));
        } else {
            out.push(head(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

fn head(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Source without comments and without the in-file `mod tests`.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("mod tests") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn graph(krate: &str) -> BTreeMap<String, Vec<Edge>> {
    let src = workspace().join(krate).join("src");
    let mods = modules(&src);
    let mut g: BTreeMap<String, Vec<Edge>> = BTreeMap::new();
    for (m, files) in &mods {
        let edges = g.entry(m.clone()).or_default();
        for f in files {
            let text = fs::read_to_string(f).expect("read source");
            // Grouped imports span lines: look at the file's code as one string, and name the
            // first line that mentions each target.
            let code = code_of(&text);
            for to in crate_refs(&code.replace('\n', " ")) {
                if &to == m || !mods.contains_key(&to) || edges.iter().any(|e| e.to == to) {
                    continue;
                }
                let line = code
                    .lines()
                    .position(|l| l.contains(&format!("{to}::")) || l.contains(&format!("{to},")))
                    .map_or(0, |i| i + 1);
                let rel = f.strip_prefix(workspace()).unwrap_or(f);
                edges.push(Edge {
                    to,
                    at: format!("{}:{line}", rel.display()),
                });
            }
        }
    }
    g
}

/// A cycle as the modules on it with where each edge is, or None.
fn find_cycle(g: &BTreeMap<String, Vec<Edge>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        m: &str,
        g: &BTreeMap<String, Vec<Edge>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<(String, String)>,
    ) -> Option<Vec<String>> {
        marks.insert(m.to_string(), Mark::Open);
        for e in g.get(m).into_iter().flatten() {
            stack.push((m.to_string(), format!("{m} -> {} ({})", e.to, e.at)));
            match marks.get(&e.to) {
                Some(Mark::Open) => {
                    let start = stack.iter().position(|(from, _)| *from == e.to)?;
                    return Some(stack[start..].iter().map(|(_, s)| s.clone()).collect());
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(c) = visit(&e.to, g, marks, stack) {
                        return Some(c);
                    }
                }
            }
            stack.pop();
        }
        marks.insert(m.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in g.keys() {
        if !marks.contains_key(m)
            && let Some(c) = visit(m, g, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_agent_crates_have_no_import_cycle() {
    let mut cycles = Vec::new();
    for krate in ACYCLIC {
        let g = graph(krate);
        assert!(
            !g.is_empty() || *krate == "mesh-netns",
            "{krate}: no modules read"
        );
        if let Some(c) = find_cycle(&g) {
            cycles.push(format!("{krate}:\n    {}", c.join("\n    ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between top-level modules:\n  {}",
        cycles.join("\n  ")
    );
}

#[test]
fn the_cycle_check_finds_a_cycle_and_grouped_imports() {
    assert_eq!(
        crate_refs("use crate::{a::B, b, c::{d, e}}; x = crate::f::g(); mesh_crate::h"),
        ["a", "b", "c", "f"]
    );
    let edge = |to: &str| Edge {
        to: to.into(),
        at: "x.rs:1".into(),
    };
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), vec![edge("b")]);
    g.insert("b".to_string(), vec![edge("c")]);
    g.insert("c".to_string(), vec![]);
    assert_eq!(find_cycle(&g), None);
    g.insert("c".to_string(), vec![edge("a")]);
    let cycle = find_cycle(&g).expect("a -> b -> c -> a");
    assert_eq!(cycle.len(), 3, "{cycle:?}");
    assert!(cycle[0].starts_with("a -> b"), "{cycle:?}");
}

/// The `[dependencies]` and `[dev-dependencies]` names of a manifest.
fn dependencies(manifest: &str) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_deps = t == "[dependencies]" || t == "[dev-dependencies]";
            continue;
        }
        if in_deps && let Some((name, _)) = t.split_once('=') {
            deps.insert(name.trim().to_string());
        }
    }
    deps
}

#[test]
fn only_the_datapath_depends_on_aya_and_the_proxy_not_on_the_datapath() {
    let read = |krate: &str| {
        fs::read_to_string(workspace().join(krate).join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("{krate}/Cargo.toml: {e}"))
    };
    let datapath = dependencies(&read("mesh-datapath"));
    assert!(datapath.contains("aya"), "{datapath:?}");
    for krate in ["mesh-netns", "mesh-proxy", "mesh-agent", "mesh-controller"] {
        let deps = dependencies(&read(krate));
        assert!(!deps.contains("aya"), "{krate} depends on aya: {deps:?}");
        assert!(
            !read(krate).contains("[build-dependencies]"),
            "{krate} has a build script's dependencies: only mesh-datapath builds the kernel \
             programs"
        );
    }
    for krate in ["mesh-netns", "mesh-proxy"] {
        let deps = dependencies(&read(krate));
        for forbidden in ["mesh-datapath", "mesh-agent"] {
            assert!(
                !deps.contains(forbidden),
                "{krate} depends on {forbidden}: {deps:?}"
            );
        }
    }
}
