//! Headless Chromium through chromedriver, for tests that need a real browser, and
//! axe-core run inside it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use super::redis::free_port;
use super::{DEADLINE, Web, wait_for};

/// chromedriver on a free port, stopped when dropped.
pub struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromedriver ({e}); scripts/test.sh installs chromium and chromium-driver")
            });
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A new browser with its own profile (cookies and all), `width`×`height`.
    pub async fn browser_sized(&self, width: u32, height: u32) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-background-networking", "--disable-dev-shm-usage",
                            format!("--window-size={width},{height}")]}),
        );
        ClientBuilder::native()
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Screenshots are kept under `target/e2e/` as test artifacts.
pub async fn shot(c: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/e2e");
    let _ = std::fs::create_dir_all(&dir);
    match c.screenshot().await {
        Ok(png) => {
            let _ = std::fs::write(dir.join(format!("{name}.png")), png);
        }
        Err(e) => eprintln!("screenshot {name} failed: {e}"),
    }
}

/// Waits until `css` matches something on the page.
pub async fn appears(c: &Client, what: &str, css: &str) {
    wait_for(what, || async {
        c.find(Locator::Css(css)).await.ok().map(|_| ())
    })
    .await;
}

/// Waits until the address has `part` in it.
pub async fn url_has(c: &Client, what: &str, part: &str) -> String {
    wait_for(what, || async {
        let url = c.current_url().await.ok()?;
        url.as_str().contains(part).then(|| url.to_string())
    })
    .await
}

/// Logs in on `web` as the sim's player `name` (picked on the sim's authorize page),
/// ending on the rooms page.
pub async fn log_in(c: &Client, web: &Web, name: &str) {
    c.goto(&web.url("/auth/login")).await.unwrap();
    let link = format!("//a[span[starts-with(normalize-space(.), '{name}')]]");
    wait_for("the sim's login page", || async {
        c.find(Locator::XPath(&link)).await.ok().map(|_| ())
    })
    .await;
    c.find(Locator::XPath(&link))
        .await
        .expect("the player")
        .click()
        .await
        .expect("pick");
    url_has(c, "the rooms page", "/rooms").await;
}

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
/// violation (WCAG 2.0/2.1 A and AA rules and axe's best practices).
pub async fn axe(c: &Client) -> Vec<Violation> {
    wait_for("the page to load", || async {
        let state = c.execute("return document.readyState", vec![]).await.ok()?;
        (state == json!("complete")).then_some(())
    })
    .await;
    // Injected through WebDriver, which the page's CSP does not govern: the site itself
    // never serves axe.
    c.execute(&format!("{AXE}\nreturn true;"), vec![])
        .await
        .expect("axe loads into the page");
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
        .expect("axe runs");
    let text = answer.as_str().expect("axe's answer");
    serde_json::from_str(text).unwrap_or_else(|_| panic!("{text}"))
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
