//! axe-core run inside the page a test's Chromium shows (the browser itself is
//! `super::browser::Driver`).

use std::time::Duration;

use fantoccini::Client;
use serde_json::{Value, json};

use super::{DEADLINE, wait_for};

/// axe-core, as vendored from the npm registry (see `tests/fixtures/axe/README.md`).
const AXE: &str = include_str!("../../fixtures/axe/axe-4.14.1.min.js");

/// One rule axe found broken, with the elements that break it.
#[derive(Debug, serde::Deserialize)]
pub struct Violation {
    pub id: String,
    pub impact: Option<String>,
    pub help: String,
    pub nodes: Vec<Value>,
}

impl Violation {
    /// Serious and critical: what keeps someone from using the page.
    pub fn blocks(&self) -> bool {
        matches!(self.impact.as_deref(), Some("serious" | "critical"))
    }
}

/// Runs axe-core on the page the browser shows, once it has loaded, and returns every
/// violation (WCAG 2.0/2.1 A and AA rules and axe's best practices). A run that throws
/// (a live swap can take a node out from under it) is run again until the deadline; a
/// violation is never retried away.
pub async fn axe(c: &Client) -> Vec<Violation> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match axe_once(c).await {
            Ok(found) => return found,
            Err(why) if tokio::time::Instant::now() < deadline => {
                eprintln!("axe did not finish a run, running it again: {why}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(why) => panic!("axe never finished a run within {DEADLINE:?}: {why}"),
        }
    }
}

async fn axe_once(c: &Client) -> Result<Vec<Violation>, String> {
    wait_for("the page to load", || async {
        let state = c.execute("return document.readyState", vec![]).await.ok()?;
        (state == json!("complete")).then_some(())
    })
    .await;
    // Injected through WebDriver, which the page's CSP does not govern: the site itself
    // never serves axe.
    c.execute(&format!("{AXE}\nreturn true;"), vec![])
        .await
        .map_err(|e| format!("axe does not load into the page: {e}"))?;
    let answer = c
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
            axe.run(document, {resultTypes: ["violations"]}).then(
              (r) => done(JSON.stringify(r.violations.map((v) => ({
                id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.map((n) => ({target: n.target, html: n.html, why: n.failureSummary})),
              })))),
              (e) => done("axe failed: " + e));"#,
            vec![],
        )
        .await
        .map_err(|e| format!("axe does not run: {e}"))?;
    let text = answer
        .as_str()
        .ok_or_else(|| format!("axe answered {answer}"))?;
    serde_json::from_str(text).map_err(|_| text.to_owned())
}

/// Fails the test with every serious or critical violation on the page, named.
pub async fn assert_accessible(c: &Client, page: &str) {
    let found = axe(c).await;
    for v in found.iter().filter(|v| !v.blocks()) {
        eprintln!(
            "{page}: axe ({}) {}: {} ({} elements)",
            v.impact.as_deref().unwrap_or("?"),
            v.id,
            v.help,
            v.nodes.len()
        );
    }
    let blocking: Vec<_> = found.into_iter().filter(Violation::blocks).collect();
    assert!(
        blocking.is_empty(),
        "{page}: serious or critical accessibility violations:\n{}",
        blocking
            .iter()
            .map(|v| format!(
                "- {} ({}): {}\n{}",
                v.id,
                v.impact.as_deref().unwrap_or("?"),
                v.help,
                serde_json::to_string_pretty(&v.nodes).unwrap_or_default()
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
