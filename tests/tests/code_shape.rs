//! The shape ARCHITECTURE.md promises, kept true for whoever carries the
//! code on:
//! - modules depend one way ("No import cycles"): in every crate, no
//!   module reaches itself through the `crate::` and `super::` paths of
//!   its non-test code;
//! - no product source file is over 600 lines of non-test code, and no
//!   function over 80 lines: past that, split by concern.
//!
//! A module is a source file (`a/b.rs` or `a/b/mod.rs` is `a::b`); a path
//! names the longest module it starts with. A module's use of its own
//! descendants or ancestors is not an edge: `mod.rs` declares its children,
//! and children may read what their parent holds. Code after a file's
//! `#[cfg(test)]` and `*_tests.rs` files are left out: tests may look
//! anywhere, and a table of cases may be long.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: &[&str] = &[
    "api/src",
    "hookd/src",
    "hostnet/src",
    "qemu-hooks/src",
    "bridge-helper/src",
    "macvtap-helper/src",
    "tests/src",
];

#[test]
fn no_module_imports_itself_through_others() {
    let root = workspace();
    let mut cycles = Vec::new();
    for dir in CRATES {
        let graph = module_graph(&root.join(dir));
        assert!(graph.len() > 1, "{dir}: no modules read");
        cycles.extend(
            cycle_members(&graph)
                .into_iter()
                .map(|c| format!("{dir}: {c:?}")),
        );
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;

#[test]
fn no_file_or_function_is_too_long() {
    let root = workspace();
    let mut long = Vec::new();
    for dir in CRATES.iter().filter(|d| !d.starts_with("tests/")) {
        for file in rust_files(&root.join(dir), true) {
            let text = std::fs::read_to_string(&file).unwrap();
            let code = non_test(&text);
            let shown = file.strip_prefix(&root).unwrap().display().to_string();
            if code.len() > MAX_FILE_LINES {
                long.push(format!("{shown}: {} lines", code.len()));
            }
            for (line, name, length) in functions(&code) {
                if length > MAX_FN_LINES {
                    long.push(format!("{shown}:{line}: fn {name} is {length} lines"));
                }
            }
        }
    }
    assert!(long.is_empty(), "too long: {long:#?}");
}

#[test]
fn functions_are_measured_from_fn_to_their_closing_brace() {
    let code: Vec<&str> = "impl A {\n    pub async fn a(&self) {\n        x();\n    }\n}\n\
                           fn b() -> u8 {\n    1\n}\nfn declared();\n"
        .lines()
        .collect();
    assert_eq!(
        functions(&code),
        [(2, "a".to_owned(), 3), (6, "b".to_owned(), 3)]
    );
}

#[test]
fn a_cycle_is_found() {
    let graph: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_owned(), to.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        cycle_members(&graph),
        [BTreeSet::from(["a", "b", "c"].map(String::from))]
    );
}

#[test]
fn paths_name_the_longest_module() {
    let modules = BTreeSet::from(["config", "config::lan", "state::alloc"].map(String::from));
    assert_eq!(
        target("config::lan::validate", &modules).as_deref(),
        Some("config::lan")
    );
    assert_eq!(
        target("config::Limits", &modules).as_deref(),
        Some("config")
    );
    assert_eq!(
        target("state::alloc::Limits", &modules).as_deref(),
        Some("state::alloc")
    );
    assert_eq!(target("fsutil::write", &modules), None);
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The workspace's root, which [`CRATES`] are relative to.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Module → the modules its non-test code names.
fn module_graph(src: &Path) -> Graph {
    let files: Vec<PathBuf> = rust_files(src, false)
        .into_iter()
        .filter(|f| !["main.rs", "lib.rs"].contains(&file_name(f).as_str()))
        .collect();
    let module_of = |file: &Path| -> String {
        let rel = file.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        parts.join("::")
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let module = module_of(file);
        let text = std::fs::read_to_string(file).unwrap();
        let code = non_test(&text).join("\n");
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        let mut edges = BTreeSet::new();
        for path in paths_in(&code) {
            let absolute = match path.split_once("::") {
                Some(("crate", rest)) => rest.to_owned(),
                Some(("super", rest)) if !parent.is_empty() => format!("{parent}::{rest}"),
                _ => continue,
            };
            if let Some(to) = target(&absolute, &modules) {
                let related = to == module
                    || to.starts_with(&format!("{module}::"))
                    || module.starts_with(&format!("{to}::"));
                if !related {
                    edges.insert(to);
                }
            }
        }
        graph.insert(module, edges);
    }
    graph
}

/// The `.rs` files under `dir` but test files; with `bins`, also those of
/// `bin/` (each binary is a crate of its own, so not for the module graph).
fn rust_files(dir: &Path, bins: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = file_name(&path);
        if path.is_dir() {
            if bins || name != "bin" {
                files.extend(rust_files(&path, bins));
            }
        } else if name.ends_with(".rs") && !name.ends_with("_tests.rs") {
            files.push(path);
        }
    }
    files
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The lines of `text` before its `#[cfg(test)]`.
fn non_test(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .collect()
}

/// Each function of `code` with a body, as rustfmt lays it out: its line
/// (from 1), name and length, from its `fn` line to the `}` at its indent.
fn functions(code: &[&str]) -> Vec<(usize, String, usize)> {
    let mut found = Vec::new();
    for (i, line) in code.iter().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "fn") else {
            continue;
        };
        let qualifiers = words[..at].iter().all(|w| {
            w.starts_with("pub") || ["async", "unsafe", "const", "extern", "\"C\""].contains(w)
        });
        if !qualifiers || line.trim_end().ends_with(';') || words.len() <= at + 1 {
            continue;
        }
        let name: String = words[at + 1]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = code[i..].iter().position(|l| l.trim_end() == close) {
            found.push((i + 1, name, end + 1));
        }
    }
    found
}

/// Every `crate::…` and `super::…` path in `code` outside comments, with
/// `use crate::{a::b, c}` groups spread into one path each (one level).
fn paths_in(code: &str) -> Vec<String> {
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths = Vec::new();
    for start in ["crate::", "super::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(start) {
            let after = &rest[at + start.len()..];
            let prefix = &start[..start.len() - 2];
            if let Some(group) = after.strip_prefix('{') {
                let inside = group.split('}').next().unwrap_or_default();
                for item in inside.split(',') {
                    let item: String = item.chars().filter(|c| !c.is_whitespace()).collect();
                    paths.push(format!("{prefix}::{}", item.trim_start_matches('{')));
                }
            } else {
                let end = after
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(after.len());
                paths.push(format!("{prefix}::{}", &after[..end]));
            }
            rest = after;
        }
    }
    paths
}

/// The longest module of `modules` that `path` (without `crate::`) starts
/// with.
fn target(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// The modules on a cycle, one set per strongly connected component of
/// more than one module (Tarjan's algorithm).
fn cycle_members(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct Walk<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        found: Vec<BTreeSet<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    self.low.insert(v, self.low[v].min(self.low[w]));
                } else if self.stack.contains(&w) {
                    self.low.insert(v, self.low[v].min(self.index[w]));
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().rposition(|m| *m == v).unwrap();
                let component: BTreeSet<String> =
                    self.stack.drain(at..).map(str::to_owned).collect();
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}
