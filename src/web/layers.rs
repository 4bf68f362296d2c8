//! The layering of `web`, checked: every `super::` / `crate::web::` path in `src/web`
//! points down the order below, and files within one folder (`http/`, `live/`) use each
//! other without a circle. [`super::App`] / [`super::AppState`], the handlers' state, are
//! the one thing any module may name from the root.
//!
//! Owns nothing at run time: a test that fails when an import points up.

use std::collections::{BTreeMap, BTreeSet};

/// The layers, bottom first: a module may use modules of lower rank only.
const RANKS: &[(&str, u8)] = &[
    ("settings", 0),
    ("session", 0),
    ("return_to", 0),
    ("view", 1),
    ("http", 2),
    ("guilds", 3),
    ("members", 4),
    ("guard", 5),
    ("people", 6),
    ("live", 7),
    ("invites", 8),
    ("rooms", 9),
    ("pages", 10),
    ("adding", 10),
    ("sweeper", 10),
    ("login", 10),
    ("health", 10),
];

/// Names any module may take from the root.
const FROM_ROOT: &[&str] = &["App", "AppState"];

fn rank(module: &str) -> Option<u8> {
    let top = module.split('/').next().unwrap_or_default();
    RANKS.iter().find(|(name, _)| *name == top).map(|(_, r)| *r)
}

/// The code of a file without comments and without its test module.
fn code(source: &str) -> String {
    let body = match source.find("#[cfg(test)]\nmod ") {
        Some(at) => &source[..at],
        None => source,
    };
    body.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after each `super::...` or `crate::web::` in `code`, as segments relative to
/// the module they start from (`None` for `crate::web`), with `{a, b::c}` groups spread.
fn paths(code: &str) -> Vec<(Option<usize>, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let Some(rest) = code.get(i..) else {
            i += 1;
            continue;
        };
        let (ups, start) = if rest.starts_with("crate::web::") {
            (None, i + "crate::web::".len())
        } else if rest.starts_with("super::")
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b':'))
        {
            let mut n = 0;
            let mut j = i;
            while code[j..].starts_with("super::") {
                n += 1;
                j += "super::".len();
            }
            (Some(n), j)
        } else {
            i += 1;
            continue;
        };
        let tail = &code[start..];
        let end = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '{'))
            .unwrap_or(tail.len());
        let mut path = tail[..end].to_owned();
        if path.ends_with('{') {
            let close = tail.find('}').unwrap_or(tail.len());
            path = tail[..close].to_owned();
        }
        match path.split_once('{') {
            Some((prefix, group)) => {
                let prefix: Vec<String> = segments(prefix);
                for item in group.split(',') {
                    let item = item.split(" as ").next().unwrap_or_default().trim();
                    let mut full = prefix.clone();
                    full.extend(segments(item).into_iter().filter(|s| s != "self"));
                    out.push((ups, full));
                }
            }
            None => out.push((ups, segments(&path))),
        }
        i = start + end.max(1);
    }
    out
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Each file's module (`http/conn`, `live`, `` for the root) and the modules it uses.
fn graph(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut edges = BTreeMap::new();
    for (module, source) in files {
        let here: Vec<&str> = module.split('/').filter(|s| !s.is_empty()).collect();
        let mut uses = BTreeSet::new();
        for (ups, path) in paths(&code(source)) {
            // `super` of a folder's `mod.rs` is the folder's parent, as for a file: both
            // drop one segment of the module's path.
            let base: Vec<&str> = match ups {
                None => Vec::new(),
                Some(n) => here[..here.len().saturating_sub(n)].to_vec(),
            };
            let mut full: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
            full.extend(path.iter().cloned());
            let target = (1..=full.len())
                .rev()
                .map(|n| full[..n].join("/"))
                .find(|m| modules.contains(m))
                .unwrap_or_default();
            if target.is_empty() {
                let name = full.first().cloned().unwrap_or_default();
                uses.insert(format!("(root)::{name}"));
            } else if target != *module && !module.starts_with(&format!("{target}/")) {
                uses.insert(target);
            }
        }
        edges.insert(module.clone(), uses);
    }
    edges
}

/// Every import that points up or goes round a circle, in words.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let edges = graph(files);
    let mut out = Vec::new();
    for (from, uses) in &edges {
        for to in uses {
            if let Some(name) = to.strip_prefix("(root)::") {
                if !FROM_ROOT.contains(&name) {
                    out.push(format!("web/{from} uses `{name}` from the root; only App and AppState may come from there"));
                }
                continue;
            }
            let top_from = from.split('/').next().unwrap_or_default();
            let top_to = to.split('/').next().unwrap_or_default();
            if top_from == top_to {
                continue;
            }
            match (rank(from), rank(to)) {
                (Some(a), Some(b)) if b < a => {}
                (Some(_), Some(_)) => out.push(format!(
                    "web/{from} uses web/{to}, which is not below it (see RANKS in web/layers.rs)"
                )),
                _ if from.is_empty() => {}
                _ => out.push(format!("web/{from} or web/{to} has no layer in RANKS")),
            }
        }
    }
    // Within one folder: no circle.
    for start in edges.keys() {
        let folder = start.split('/').next().unwrap_or_default();
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next.split('/').next() != Some(folder) || next.starts_with("(root)") {
                    continue;
                }
                if next == start {
                    out.push(format!("a circle: {} -> {next}", trail.join(" -> ")));
                } else if !trail.contains(next) {
                    let mut longer = trail.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Vec<(String, String)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/web");
        let mut files = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("layers.rs")
                {
                    let rel = path.strip_prefix(&root).unwrap().with_extension("");
                    let module = rel.to_string_lossy().replace('\\', "/");
                    let module = module
                        .strip_suffix("mod")
                        .map_or(module.clone(), |m| m.trim_end_matches('/').to_owned());
                    files.push((module, std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        files
    }

    #[test]
    fn every_import_in_web_points_down() {
        let files = tree();
        assert!(files.len() > 30, "found {} files", files.len());
        assert_eq!(violations(&files), Vec::<String>::new());
    }

    #[test]
    fn an_upward_import_and_a_circle_are_found() {
        let file = |m: &str, s: &str| (m.to_owned(), s.to_owned());
        let files = vec![
            file("", "pub struct App;"),
            file("http", ""),
            file(
                "http/error",
                "use crate::web::rooms::X;\nuse super::conn::Y;",
            ),
            file("http/conn", "use super::error::Z;"),
            file("rooms", "use super::{App, http::error::WebError};"),
            file("pages", "use super::Settings;"),
        ];
        let found = violations(&files);
        assert!(
            found
                .iter()
                .any(|v| v.contains("web/http/error uses web/rooms")),
            "{found:?}"
        );
        assert!(found.iter().any(|v| v.contains("a circle")), "{found:?}");
        assert!(
            found.iter().any(|v| v.contains("`Settings` from the root")),
            "{found:?}"
        );
        assert!(
            !found.iter().any(|v| v.starts_with("web/rooms")),
            "{found:?}"
        );
    }
}
