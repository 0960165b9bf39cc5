//! The workspace's layout rules, checked on its sources (no build of them needed):
//!
//! 1. No import circle between files: if `a.rs` names something of `b.rs` (a `use`, or a `crate::`/`super::` path
//!    in code), `b.rs` must not, directly or through others, name something of `a.rs`. Unit tests (`tests.rs` files
//!    and inline `#[cfg(test)] mod tests`) are left out: they may import anything.
//! 2. Faces only declare and re-export: `lib.rs` and every `mod.rs` hold module declarations, `use` lines and inline
//!    modules of `pub use` lines, nothing defined.
//! 3. Names are imported from the module that defines them, never through a face (`use crate::Name` or
//!    `use crate::store::Name` where `store` is a `mod.rs`), which would also make every file below that face part
//!    of the importer's circle.
//! 4. No file over 500 lines unless its first lines say why (a line containing `over 500 lines:`).
//!
//! Run alone with `cargo test --test layout`; `.ci/run` runs it first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const CRATES: [&str; 3] = ["src", "idem-runtime/src", "idem-macros/src"];
const MAX_LINES: usize = 500;

/// One source file: where it is, its module path in its crate, and its text with unit tests cut out.
struct Source {
    file: PathBuf,
    module: Vec<String>,
    text: String,
    is_face: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The module path of `file` relative to its crate's `src`: `store/redis/codec.rs` is `["store", "redis", "codec"]`,
/// `store/mod.rs` is `["store"]`, `lib.rs` is `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = relative.iter().map(|part| part.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    match last.as_str() {
        "lib.rs" | "main.rs" | "mod.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_owned()),
    }
    parts
}

/// `text` without comments (line and block), string literals' contents and inline `#[cfg(test)] mod tests { .. }`.
fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if text[i..].starts_with("//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            let mut depth = 0;
            while i < bytes.len() {
                if text[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if text[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if bytes[i] == b'"' && !text[..i].ends_with('\'') {
            let raw = text[..i].ends_with('r') || text[..i].ends_with("r#");
            out.push('"');
            i += 1;
            while i < bytes.len() {
                if !raw && bytes[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if bytes[i] == b'"' {
                    break;
                }
                if bytes[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    cut_test_modules(&out)
}

fn cut_test_modules(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if trimmed.starts_with("mod ") && trimmed.split('\n').next().is_some_and(|line| line.contains('{')) {
            // Skip to the brace that closes the module.
            let open = after.find('{').unwrap();
            let mut depth = 0;
            let mut end = after.len();
            for (offset, c) in after[open..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + offset + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn load() -> Vec<(String, Vec<Source>)> {
    let mut crates = Vec::new();
    for krate in CRATES {
        let src = root().join(krate);
        let mut files = Vec::new();
        collect(&src, &mut files);
        files.sort();
        let mut sources = Vec::new();
        for file in files {
            if file.file_name().is_some_and(|name| name == "tests.rs")
                || file.components().any(|c| c.as_os_str() == "tests")
            {
                continue;
            }
            let raw = fs::read_to_string(&file).unwrap();
            let name = file.file_name().unwrap().to_string_lossy();
            let is_face = name == "lib.rs" || name == "mod.rs";
            sources.push(Source { module: module_of(&src, &file), text: strip(&raw), file, is_face });
        }
        crates.push((krate.to_owned(), sources));
    }
    crates
}

/// Every path a file names that starts with `crate::`, `super::` or `self::`, made absolute (segments from the crate
/// root). `use` trees are expanded: `use crate::a::{b, c::d}` names `a::b` and `a::c::d`.
fn named_paths(source: &Source) -> Vec<(Vec<String>, bool)> {
    let mut paths = Vec::new();
    let text = &source.text;
    // `use` statements, with their trees.
    for statement in use_statements(text) {
        let is_pub = statement.starts_with("pub");
        let body =
            statement.trim_start_matches("pub(crate)").trim_start_matches("pub(super)").trim_start_matches("pub");
        let body = body.trim().trim_start_matches("use").trim().trim_end_matches(';').trim();
        for path in expand_tree(body) {
            // `use super::*` is how an inline module (`mod facade { .. }`, a macro's module) sees its own file.
            if path == ["super", "*"] {
                continue;
            }
            if let Some(absolute) = absolute(&source.module, source.is_face, &path) {
                paths.push((absolute, is_pub));
            }
        }
    }
    // Paths in code: `crate::a::b(..)`, `super::c::D` (outside the `use` statements read above).
    let mut code = text.clone();
    for statement in use_statements(text) {
        let body =
            statement.trim_start_matches("pub(crate)").trim_start_matches("pub(super)").trim_start_matches("pub");
        code = code.replacen(body.trim(), "", 1);
    }
    let text = &code;
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(start) {
            let at = from + at;
            from = at + start.len();
            let before = text[..at].chars().next_back();
            // `$crate::` in a macro is resolved where the macro is used.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$') {
                continue;
            }
            let end = text[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(text.len(), |end| at + end);
            let path: Vec<String> = text[at..end].split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
            if let Some(absolute) = absolute(&source.module, source.is_face, &path) {
                paths.push((absolute, false));
            }
        }
    }
    paths
}

fn use_statements(text: &str) -> Vec<String> {
    let mut statements = Vec::new();
    for (at, _) in text.match_indices("use ") {
        let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
        let prefix = text[line_start..at].trim();
        if !(prefix.is_empty() || prefix == "pub" || prefix == "pub(crate)" || prefix == "pub(super)") {
            continue;
        }
        let end = text[at..].find(';').map_or(text.len(), |end| at + end + 1);
        statements.push(format!("{prefix} {}", &text[at..end]).trim().to_owned());
    }
    statements
}

fn expand_tree(tree: &str) -> Vec<Vec<String>> {
    // `a as b` becomes `a@b` before the whitespace goes, so a name containing "as" stays whole.
    let tree = tree.split_whitespace().collect::<Vec<_>>().join(" ").replace(" as ", "@");
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    expand(&tree, Vec::new(), &mut out);
    out
}

fn expand(tree: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open].split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
        let inner = &tree[open + 1..tree.len() - 1];
        let mut base = prefix;
        base.extend(head);
        for item in split_top(inner) {
            expand(item, base.clone(), out);
        }
    } else {
        let tree = tree.split('@').next().unwrap();
        let mut path = prefix;
        path.extend(tree.split("::").filter(|s| !s.is_empty()).map(str::to_owned));
        if path.last().is_some_and(|last| last == "self") {
            path.pop();
        }
        out.push(path);
    }
}

fn split_top(list: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < list.len() {
        items.push(&list[start..]);
    }
    items.into_iter().filter(|item| !item.is_empty()).collect()
}

/// `path` from the crate root, or `None` when it names another crate.
fn absolute(module: &[String], is_face: bool, path: &[String]) -> Option<Vec<String>> {
    let first = path.first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.to_vec(),
        "super" => {
            let mut base = module.to_vec();
            base.pop();
            // In `a/b.rs` (module a::b) `super` is `a`; the same in `a/b/mod.rs`.
            let _ = is_face;
            base
        }
        _ => return None,
    };
    let mut rest = &path[1..];
    while rest.first().is_some_and(|s| s == "super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The file of the deepest module `path` names, and what of `path` is left after it (an item's name, or nothing).
fn resolve<'a>(modules: &'a BTreeMap<Vec<String>, usize>, path: &[String]) -> Option<(usize, &'a [String], usize)> {
    for len in (0..=path.len()).rev() {
        if let Some((module, &index)) = modules.get_key_value(&path[..len]) {
            return Some((index, module.as_slice(), path.len() - len));
        }
    }
    None
}

#[test]
fn no_file_imports_in_a_circle_nor_through_a_face_and_faces_define_nothing() {
    let mut problems = Vec::new();
    for (krate, sources) in load() {
        let modules: BTreeMap<Vec<String>, usize> =
            sources.iter().enumerate().map(|(index, source)| (source.module.clone(), index)).collect();
        let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); sources.len()];
        // Why each edge is there: the first path that made it, for the report.
        let mut because: BTreeMap<(usize, usize), String> = BTreeMap::new();
        for (index, source) in sources.iter().enumerate() {
            for (path, is_pub) in named_paths(source) {
                let Some((target, _, left)) = resolve(&modules, &path) else { continue };
                if target == index {
                    continue;
                }
                edges[index].insert(target);
                because.entry((index, target)).or_insert_with(|| path.join("::"));
                let through_face = sources[target].is_face && left > 0 && !(source.is_face && is_pub);
                // A face's own children re-exporting through it would be caught as a circle anyway.
                if through_face {
                    problems.push(format!(
                        "{krate}: {} names `{}` through the face {}: import it from the module that defines it",
                        rel(&source.file),
                        path.join("::"),
                        rel(&sources[target].file)
                    ));
                }
            }
        }
        for cycle in circles(&edges) {
            let names: Vec<String> = cycle.iter().map(|&i| rel(&sources[i].file)).collect();
            let links: Vec<String> = because
                .iter()
                .filter(|((from, to), _)| cycle.contains(from) && cycle.contains(to))
                .map(|((from, to), path)| {
                    format!("  {} names {path} ({})", rel(&sources[*from].file), rel(&sources[*to].file))
                })
                .collect();
            problems.push(format!("{krate}: import circle: {}\n{}", names.join(", "), links.join("\n")));
        }
        for source in sources.iter().filter(|source| source.is_face) {
            for line in defined_in_face(&source.text) {
                problems.push(format!("{krate}: the face {} defines something: `{line}`", rel(&source.file)));
            }
        }
    }
    assert!(problems.is_empty(), "layout rules broken:\n{}", problems.join("\n"));
}

#[test]
fn no_file_is_over_500_lines_without_saying_why() {
    let mut long = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        collect(&root().join(krate), &mut files);
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            let lines = text.lines().count();
            let says_why = text.lines().take(12).any(|line| line.contains("over 500 lines:"));
            if lines > MAX_LINES && !says_why {
                long.push(format!("{} has {lines} lines and no `over 500 lines:` reason at its top", rel(&file)));
            }
        }
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
}

fn rel(file: &Path) -> String {
    file.strip_prefix(root()).unwrap_or(file).display().to_string()
}

/// The lines of a face that are not declarations, `use` lines, attributes or inline modules of those.
fn defined_in_face(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_use = false;
    let mut doctest_struct = false;
    let mut in_doctest_module = false;
    // A proc-macro crate's entry points must sit at its root: `#[proc_macro*]` functions are allowed in `lib.rs`.
    let mut in_entry_point = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("#[proc_macro") {
            in_entry_point = true;
        }
        if in_entry_point {
            in_entry_point = line != "}";
            continue;
        }
        if in_use {
            in_use = !line.ends_with(';');
            continue;
        }
        let allowed = line.is_empty()
            || line.starts_with("#[")
            || line.starts_with("#![")
            || line == "}"
            || line.ends_with("\"]")
            || ["", "pub ", "pub(crate) "]
                .iter()
                .any(|vis| line.starts_with(&format!("{vis}mod ")) || line.starts_with(&format!("{vis}use ")))
            || line.starts_with("pub extern crate ")
            || ((doctest_struct || in_doctest_module) && line.starts_with("pub struct ") && line.ends_with(';'));
        // Structs that carry markdown pages as doc-tests (`#[cfg(doctest)]`, alone or in a module of them).
        if doctest_struct && line.starts_with("pub mod ") && line.ends_with('{') {
            in_doctest_module = true;
        } else if in_doctest_module && line == "}" {
            in_doctest_module = false;
        }
        doctest_struct = line.starts_with("#[cfg(doctest)]") || (doctest_struct && line.starts_with("#["));
        if line.starts_with("pub use ") || line.starts_with("use ") || line.starts_with("pub(crate) use ") {
            in_use = !line.ends_with(';');
        }
        if !allowed {
            found.push(line.to_owned());
        }
    }
    found
}

/// Every strongly connected component of more than one file (Tarjan), each as a list of files.
fn circles(edges: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        edges: &'a [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        found: Vec<Vec<usize>>,
    }
    fn visit(state: &mut State<'_>, v: usize) {
        state.index[v] = Some(state.next);
        state.low[v] = state.next;
        state.next += 1;
        state.stack.push(v);
        state.on_stack[v] = true;
        for &w in &state.edges[v] {
            match state.index[w] {
                None => {
                    visit(state, w);
                    state.low[v] = state.low[v].min(state.low[w]);
                }
                Some(index) if state.on_stack[w] => state.low[v] = state.low[v].min(index),
                Some(_) => {}
            }
        }
        if Some(state.low[v]) == state.index[v] {
            let mut component = Vec::new();
            loop {
                let w = state.stack.pop().unwrap();
                state.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.reverse();
                state.found.push(component);
            }
        }
    }
    let n = edges.len();
    let mut state = State {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in 0..n {
        if state.index[v].is_none() {
            visit(&mut state, v);
        }
    }
    state.found
}

#[test]
fn the_checker_finds_a_circle_a_face_import_and_a_definition_in_a_face() {
    let edges = vec![BTreeSet::from([1]), BTreeSet::from([2]), BTreeSet::from([0]), BTreeSet::new()];
    assert_eq!(circles(&edges), vec![vec![0, 1, 2]]);
    let source = Source {
        file: PathBuf::from("x.rs"),
        module: vec!["door".into(), "pipeline".into()],
        text: strip(
            "use crate::{Entry, store::{error::StoreError, Write as W}};\nuse super::handoff::Handoff;\n// crate::not::this\nfn f() { crate::capacity::holding(); }",
        ),
        is_face: false,
    };
    let named: Vec<String> = named_paths(&source).into_iter().map(|(path, _)| path.join("::")).collect();
    assert_eq!(
        named,
        ["Entry", "store::error::StoreError", "store::Write", "door::handoff::Handoff", "capacity::holding"]
    );
    assert_eq!(defined_in_face("mod a;\npub use a::{B,\n  C};\nfn oops() {}\n"), ["fn oops() {}"]);
}
