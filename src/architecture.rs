//! The crate's import graph, read from its source, kept as docs/architecture.md draws it: no
//! circles between top-level modules or between files, and every module imports only the modules
//! the document's table allows. Test code (`#[cfg(test)]` modules) is left out: tests may reach
//! anywhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// A module path below the crate root (`["jobs", "service"]`); empty for `lib.rs`.
type ModPath = Vec<String>;

/// One source file of the library, without its comments and test modules.
struct SourceFile {
    module: ModPath,
    display: String,
    lines: Vec<(usize, String)>,
}

/// An import edge and where it was seen first (`src/jobs/service.rs:12`).
type Edges = BTreeMap<(String, String), String>;

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

/// The library's files: everything under `src/` but the binaries and test-only files.
fn library() -> Vec<SourceFile> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    let mut files: Vec<SourceFile> = Vec::new();
    let mut test_only = BTreeSet::new();
    for path in paths {
        let relative = path.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        if relative == "main.rs" || relative.starts_with("bin/") {
            continue;
        }
        let mut module: ModPath = relative.trim_end_matches(".rs").split('/').map(String::from).collect();
        if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
            module.pop();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let (lines, test_modules) = code_lines(&text);
        for name in test_modules {
            let mut child = module.clone();
            child.push(name);
            test_only.insert(child);
        }
        files.push(SourceFile { module, display: format!("src/{relative}"), lines });
    }
    files.retain(|f| !test_only.contains(&f.module));
    files
}

/// The file's lines of code (numbered from 1) without comments and `#[cfg(test)]` modules, and
/// the names of the test-only modules it declares in files of their own.
fn code_lines(text: &str) -> (Vec<(usize, String)>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = Vec::new();
    let mut test_files = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line == "#[cfg(test)]" {
            let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
            let declared = next.strip_prefix("pub ").unwrap_or(next);
            if let Some(name) = declared.strip_prefix("mod ").and_then(|d| d.strip_suffix(';')) {
                test_files.push(name.trim().to_string());
                i += 2;
                continue;
            }
            if declared.starts_with("mod ") && declared.ends_with('{') {
                let indent = lines[i + 1].len() - lines[i + 1].trim_start().len();
                i += 2;
                while i < lines.len()
                    && !(lines[i].trim() == "}" && lines[i].len() - lines[i].trim_start().len() == indent)
                {
                    i += 1;
                }
                i += 1;
                continue;
            }
        }
        if !line.starts_with("//") {
            kept.push((i + 1, lines[i].to_string()));
        }
        i += 1;
    }
    (kept, test_files)
}

/// Every path a `use` tree names, as segments: `{a::{b, c::D}, e}` gives `a::b`, `a::c::D`, `e`.
/// Reads as far as the tree goes; also reads a plain path in code (`telemetry::init(..)`).
fn use_tree(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    tree(&mut chars, Vec::new(), &mut out);
    out
}

fn tree(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    skip_space(chars);
    match chars.peek() {
        Some('{') => {
            chars.next();
            loop {
                skip_space(chars);
                if chars.peek() == Some(&'}') {
                    chars.next();
                    break;
                }
                tree(chars, prefix.clone(), out);
                skip_space(chars);
                match chars.next() {
                    Some(',') => continue,
                    _ => break,
                }
            }
        }
        Some('*') => {
            chars.next();
            out.push(prefix);
        }
        Some(c) if c.is_alphabetic() || *c == '_' => {
            let mut ident = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_alphanumeric() || c == '_' {
                    ident.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            let mut path = prefix;
            path.push(ident);
            let mut ahead = chars.clone();
            skip_space(&mut ahead);
            if ahead.next() == Some(':') && ahead.next() == Some(':') {
                skip_space(&mut ahead);
                if matches!(ahead.peek(), Some(c) if *c == '{' || *c == '*' || c.is_alphabetic() || *c == '_') {
                    *chars = ahead;
                    tree(chars, path, out);
                    return;
                }
            }
            // `name as alias`: the alias changes nothing.
            let mut ahead = chars.clone();
            skip_space(&mut ahead);
            if ahead.clone().take(3).collect::<String>() == "as " {
                ahead.nth(2);
                skip_space(&mut ahead);
                while ahead.peek().is_some_and(|c| c.is_alphanumeric() || *c == '_') {
                    ahead.next();
                }
                *chars = ahead;
            }
            out.push(path);
        }
        _ => out.push(prefix),
    }
}

fn skip_space(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while chars.peek().is_some_and(|c| c.is_whitespace()) {
        chars.next();
    }
}

/// Every `crate::`, `self::` and `super::` path in a file, made absolute, with its line number.
/// A `use` tree may span lines, so the text from each start to the end of the file is read.
fn paths_in(file: &SourceFile) -> Vec<(usize, ModPath)> {
    let mut text = String::new();
    let mut line_at = Vec::new();
    for (number, line) in &file.lines {
        line_at.push((text.len(), *number));
        text.push_str(line);
        text.push('\n');
    }
    let line_of = |offset: usize| line_at[line_at.partition_point(|(start, _)| *start <= offset) - 1].1;
    let mut found = Vec::new();
    for keyword in ["crate::", "self::", "super::"] {
        for (offset, _) in text.match_indices(keyword) {
            let before = text[..offset].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':') {
                continue;
            }
            let mut base: ModPath = if keyword == "crate::" { Vec::new() } else { file.module.clone() };
            if keyword == "super::" {
                base.pop();
            }
            for path in use_tree(&text[offset + keyword.len()..]) {
                let mut absolute = base.clone();
                for segment in path {
                    match segment.as_str() {
                        "super" => {
                            absolute.pop();
                        }
                        "self" => {}
                        _ => absolute.push(segment),
                    }
                }
                found.push((line_of(offset), absolute));
            }
        }
    }
    found
}

/// The crate's modules and, for each, the names it re-exports from a child (`pub use
/// service::JobService` in `jobs/mod.rs`): an import of `jobs::JobService` depends on
/// `jobs::service`.
struct Crate {
    modules: BTreeSet<ModPath>,
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
}

impl Crate {
    fn new(files: &[SourceFile]) -> Self {
        let modules: BTreeSet<ModPath> = files.iter().map(|f| f.module.clone()).collect();
        let mut reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>> = BTreeMap::new();
        for file in files {
            for (_, line) in &file.lines {
                let line = line.trim();
                let Some(tree) = ["pub use ", "pub(crate) use "].iter().find_map(|p| line.strip_prefix(p)) else {
                    continue;
                };
                for path in use_tree(tree) {
                    let mut child = file.module.clone();
                    child.push(path[0].clone());
                    if path.len() > 1 && modules.contains(&child) {
                        let name = path.last().unwrap().clone();
                        reexports.entry(file.module.clone()).or_default().insert(name, child);
                    }
                }
            }
        }
        Crate { modules, reexports }
    }

    /// The file that defines what `path` names: its longest prefix that is a module, followed
    /// through re-exports.
    fn resolve(&self, path: &[String]) -> ModPath {
        let mut len = path.len();
        while len > 0 && !self.modules.contains(&path[..len]) {
            len -= 1;
        }
        let module = path[..len].to_vec();
        if let (Some(name), Some(names)) = (path.get(len), self.reexports.get(&module))
            && let Some(child) = names.get(name)
        {
            let mut rest = child.clone();
            rest.extend(path[len..].iter().cloned());
            return self.resolve(&rest);
        }
        module
    }
}

/// The import graphs: between top-level modules, and between files. A parent's imports of its
/// own children (declaring and re-exporting them) are how a module is built, not dependencies.
fn graphs(files: &[SourceFile]) -> (Edges, Edges) {
    let krate = Crate::new(files);
    let mut modules = Edges::new();
    let mut file_edges = Edges::new();
    let name = |m: &ModPath| if m.is_empty() { "crate".to_string() } else { m.join("::") };
    for file in files {
        for (line, path) in paths_in(file) {
            let target = krate.resolve(&path);
            let at = format!("{}:{line}", file.display);
            if let (Some(from), Some(to)) = (file.module.first(), target.first())
                && from != to
            {
                modules.entry((from.clone(), to.clone())).or_insert_with(|| at.clone());
            }
            if target != file.module && !target.starts_with(&file.module) {
                file_edges.entry((name(&file.module), name(&target))).or_insert(at);
            }
        }
    }
    (modules, file_edges)
}

/// Every circle in the graph, each as a path that returns to its start, with where each edge
/// was seen.
fn circles(edges: &Edges) -> Vec<String> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    let reaches = |from: &str, to: &str| -> Option<Vec<String>> {
        // Breadth first, so the circle reported is a shortest one.
        let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([from]);
        while let Some(node) = queue.pop_front() {
            for &n in next.get(node).map(Vec::as_slice).unwrap_or(&[]) {
                if n == to {
                    let mut path = vec![n.to_string(), node.to_string()];
                    let mut at = node;
                    while at != from {
                        at = came_from[at];
                        path.push(at.to_string());
                    }
                    path.reverse();
                    return Some(path);
                }
                if !came_from.contains_key(n) && n != from {
                    came_from.insert(n, node);
                    queue.push_back(n);
                }
            }
        }
        None
    };
    let mut seen: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    let mut found = Vec::new();
    for &node in next.keys() {
        if let Some(path) = reaches(node, node) {
            let members: BTreeSet<String> = path.iter().cloned().collect();
            if seen.insert(members) {
                let steps: Vec<String> = path
                    .windows(2)
                    .map(|w| format!("{} -> {} ({})", w[0], w[1], edges[&(w[0].clone(), w[1].clone())]))
                    .collect();
                found.push(steps.join(", "));
            }
        }
    }
    found
}

/// The table under "Who may import whom" in docs/architecture.md: each module (first column)
/// and the modules it may import (second column), all in backticks; `—` for none.
fn allowed_imports() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md")).unwrap();
    let section =
        doc.split("## Who may import whom").nth(1).expect("docs/architecture.md has no \"Who may import whom\"");
    let names = |cell: &str| -> Vec<String> { cell.split('`').skip(1).step_by(2).map(String::from).collect() };
    let mut table = BTreeMap::new();
    for row in section.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).skip(2) {
        let cells: Vec<&str> = row.split('|').collect();
        let allowed: BTreeSet<String> = names(cells[2]).into_iter().collect();
        for module in names(cells[1]) {
            table.insert(module, allowed.clone());
        }
    }
    table
}

#[test]
fn no_import_circles_between_modules() {
    let (modules, _) = graphs(&library());
    let found = circles(&modules);
    assert!(found.is_empty(), "import circles between modules:\n{}", found.join("\n"));
}

#[test]
fn no_import_circles_between_files() {
    let (_, files) = graphs(&library());
    let found = circles(&files);
    assert!(found.is_empty(), "import circles between files:\n{}", found.join("\n"));
}

#[test]
fn modules_import_only_what_the_architecture_allows() {
    let files = library();
    let allowed = allowed_imports();
    let top: BTreeSet<&String> = files.iter().filter_map(|f| f.module.first()).collect();
    let undocumented: Vec<&&String> = top.iter().filter(|m| !allowed.contains_key(m.as_str())).collect();
    assert!(undocumented.is_empty(), "modules missing from docs/architecture.md's import table: {undocumented:?}");
    let (modules, _) = graphs(&files);
    let forbidden: Vec<String> = modules
        .iter()
        .filter(|((from, to), _)| !allowed[from].contains(to))
        .map(|((from, to), at)| format!("{from} -> {to} ({at})"))
        .collect();
    assert!(forbidden.is_empty(), "imports docs/architecture.md does not allow:\n{}", forbidden.join("\n"));
}

#[test]
fn the_domain_imports_no_wing() {
    let allowed = allowed_imports();
    for wing in ["api", "backend", "telemetry", "store", "llm", "agent", "cli"] {
        assert!(!allowed["jobs"].contains(wing), "jobs may not import {wing}: the wings depend on the domain");
    }
}

#[test]
fn use_trees_name_every_path() {
    let paths = use_tree("{a::{b, c::D as E}, self, f::*};\nuse x;");
    let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(joined, ["a::b", "a::c::D", "self", "f"]);
    assert_eq!(use_tree("telemetry::init(&config)"), [["telemetry", "init"]]);
}

#[test]
fn circles_are_found_and_named() {
    let edge = |a: &str, b: &str| ((a.to_string(), b.to_string()), format!("{a}.rs"));
    let edges: Edges = [edge("a", "b"), edge("b", "c"), edge("c", "a"), edge("c", "d")].into();
    assert_eq!(circles(&edges), ["a -> b (a.rs), b -> c (b.rs), c -> a (c.rs)"]);
    let acyclic: Edges = [edge("a", "b"), edge("b", "c"), edge("a", "c")].into();
    assert!(circles(&acyclic).is_empty());
}

#[test]
fn paths_resolve_through_reexports_and_super() {
    let file = |module: &[&str], code: &str| SourceFile {
        module: module.iter().map(|s| s.to_string()).collect(),
        display: String::new(),
        lines: code.lines().enumerate().map(|(i, l)| (i + 1, l.to_string())).collect(),
    };
    let files = [
        file(&["jobs"], "mod service;\npub use service::JobService;"),
        file(&["jobs", "service"], "use super::JobPhase;"),
        file(&["api"], "use crate::jobs::{JobService, self};"),
    ];
    let (modules, edges) = graphs(&files);
    assert!(modules.contains_key(&("api".into(), "jobs".into())));
    assert!(edges.contains_key(&("api".into(), "jobs::service".into())));
    assert!(edges.contains_key(&("jobs::service".into(), "jobs".into())));
    assert!(!edges.contains_key(&("jobs".into(), "jobs::service".into())));
}
