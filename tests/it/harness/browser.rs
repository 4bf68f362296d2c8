//! Real browsers for the tests: chromedriver on a free port (`Driver`) and a `Page`, one
//! Chromium profile's window, with one helper per thing a person does or looks for on the
//! site (open, log in, create a room, wait for something to show).
//!
//! Owns: starting Chromium, screenshots under `target/e2e/`, waiting on the page with the
//! harness's deadline. Must not: know any test's scenario; every wait here fails the test
//! at `DEADLINE` with what it was waiting for.

use std::io::{BufRead, BufReader};
use std::ops::Deref;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use super::g;
use super::{DEADLINE, Web, wait_for};

/// chromedriver on a free port, stopped when dropped.
pub struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    /// chromedriver picks its own port (`--port=0`) and says which: a port found free
    /// here and handed over could be taken by another test's socket in between.
    pub fn start() -> Self {
        let mut child = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromedriver ({e}); scripts/test.sh installs chromium and chromium-driver")
            });
        let Some(stdout) = child.stdout.take() else {
            panic!("chromedriver's output is not ours to read");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // Read to the end, so chromedriver never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .strip_prefix("ChromeDriver was started successfully on port ")
                    .and_then(|rest| rest.trim_end_matches('.').parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = match rx.recv_timeout(DEADLINE) {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                panic!("chromedriver did not say within {DEADLINE:?} that it started");
            }
        };
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A new browser with its own profile (cookies and all).
    pub async fn browser(&self) -> Page {
        self.window(1100, 900, true).await
    }

    /// A new browser of its own profile with a window of `width`×`height`, and with
    /// JavaScript off unless `script`.
    pub async fn window(&self, width: u32, height: u32, script: bool) -> Page {
        let mut caps = serde_json::Map::new();
        let mut options = json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-dev-shm-usage",
                        format!("--window-size={width},{height}")]});
        if width < 500 {
            // Below the smallest window Chromium makes: a phone's screen, emulated.
            options["mobileEmulation"] =
                json!({"deviceMetrics": {"width": width, "height": height, "pixelRatio": 1}});
        }
        if !script {
            options["prefs"] = json!({"profile.managed_default_content_settings.javascript": 2});
        }
        caps.insert("goog:chromeOptions".to_owned(), options);
        // A Chromium that fails to start (it can, on a busy machine: "session not
        // created") is started again; a third failure fails the test with its reason.
        let mut tries = 0;
        let client = loop {
            match ClientBuilder::native()
                .capabilities(caps.clone())
                .connect(&self.url)
                .await
            {
                Ok(client) => break client,
                Err(e) if tries < 2 => {
                    tries += 1;
                    eprintln!("Chromium did not start, starting it again: {e}");
                }
                Err(e) => panic!("no Chromium session: {e}"),
            }
        };
        Page { client }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/e2e");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// One browser profile's window. Everything fantoccini's `Client` does is there too
/// (through `Deref`), for the steps no helper names.
pub struct Page {
    client: Client,
}

impl Deref for Page {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Page {
    /// Goes to `url`.
    pub async fn open(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Ends the browser session.
    pub async fn close(self) -> Result<(), CmdError> {
        self.client.close().await
    }

    /// Keeps a screenshot as `target/e2e/{name}.png`.
    pub async fn shot(&self, name: &str) {
        match self.client.screenshot().await {
            Ok(png) => {
                let _ = std::fs::write(artifacts().join(format!("{name}.png")), png);
            }
            Err(e) => eprintln!("screenshot {name} failed: {e}"),
        }
    }

    /// Waits until `css` matches something on the page.
    pub async fn appears(&self, what: &str, css: &str) {
        wait_for(what, || async {
            self.client.find(Locator::Css(css)).await.ok().map(|_| ())
        })
        .await;
    }

    /// Waits until the URL contains `part`; the URL.
    pub async fn url_has(&self, what: &str, part: &str) -> String {
        wait_for(what, || async {
            let url = self.client.current_url().await.ok()?;
            url.as_str().contains(part).then(|| url.to_string())
        })
        .await
    }

    /// The text of the first element matching `css`, once it is displayed.
    pub async fn shown(&self, what: &str, css: &str) -> String {
        wait_for(what, || async {
            let el = self.client.find(Locator::Css(css)).await.ok()?;
            if !el.is_displayed().await.ok()? {
                return None;
            }
            el.text().await.ok()
        })
        .await
    }

    /// The text of `css` as a screen reader has it (shown or not).
    pub async fn shown_text(&self, css: &str) -> String {
        self.client
            .execute(
                &format!("return document.querySelector({css:?}).textContent"),
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Whether `css` matches a displayed element right now. Asked in one script: finding
    /// an element and then asking about it races the live swaps (htmx replaces an element
    /// with its new version), and a replaced element would read as "not displayed".
    pub async fn displayed(&self, css: &str) -> bool {
        self.client
            .execute(
                "var e = document.querySelector(arguments[0]); \
                 return !!e && e.checkVisibility({ checkOpacity: true, checkVisibilityCSS: true });",
                vec![json!(css)],
            )
            .await
            .ok()
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    /// Waits until the page's live stream is open (app.js marks it).
    pub async fn stream_open(&self) {
        wait_for("the page's stream to open", || async {
            let open = self
                .client
                .execute(
                    "return document.querySelector('#live').dataset.streamOpen || null",
                    vec![],
                )
                .await
                .ok()?;
            (open == json!("1")).then_some(())
        })
        .await;
    }

    /// Clicks the landing page's login button.
    pub async fn click_log_in(&self) {
        self.client
            .find(Locator::Css("a[href^='/auth/login']"))
            .await
            .expect("a login button")
            .click()
            .await
            .unwrap();
    }

    /// Clicks what `at` finds, once it is there.
    pub async fn click_on(&self, what: &str, at: Locator<'_>) {
        wait_for(what, || async {
            self.client.find(at).await.ok().map(|_| ())
        })
        .await;
        self.client
            .find(at)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {what}: {e}"));
    }

    /// Logs in on the sim's authorize page by picking `name`.
    pub async fn pick(&self, name: &str) {
        let link = format!("//a[span[starts-with(normalize-space(.), '{name}')]]");
        self.click_on("the player on the sim's login page", Locator::XPath(&link))
            .await;
    }

    /// Logs in on `web` as the sim's player `name`, ending on the rooms page.
    pub async fn log_in(&self, web: &Web, name: &str) {
        self.open(&web.url("/auth/login")).await;
        self.pick(name).await;
        self.url_has("the rooms page", "/rooms").await;
    }

    /// On the communities page, opens the community named `name`.
    pub async fn choose_community(&self, name: &str) {
        let link = format!("//a[@class='community-link'][.//span[normalize-space(.)='{name}']]");
        self.click_on("the community in the picker", Locator::XPath(&link))
            .await;
        self.url_has("the community's rooms", "/rooms").await;
    }

    /// Types a room name into the create form on `/rooms` and sends it.
    pub async fn create_room(&self, name: &str) {
        let field = self
            .client
            .find(Locator::Css("#room-name"))
            .await
            .expect("the form");
        field.clear().await.unwrap();
        field.send_keys(name).await.unwrap();
        self.client
            .find(Locator::Css("form.create button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The room id of the room page the browser is on, once it is on one.
    pub async fn room_id(&self) -> u64 {
        wait_for("a room page", || async {
            let url = self.client.current_url().await.ok()?;
            url.path().strip_prefix(&g("/rooms/"))?.parse().ok()
        })
        .await
    }

    /// The invite link the room page offers, once it shows.
    pub async fn invite_link(&self) -> String {
        self.appears("the invite link", "#invite-link").await;
        self.client
            .find(Locator::Css("#invite-link"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .expect("an invite link")
    }
}
