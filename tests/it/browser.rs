//! Real browsers: headless Chromium (through chromedriver) with two profiles, two
//! players on two web replicas, against the sim, a real gateway and a private Redis.
//! Screenshots of every step are kept under `target/e2e/` as test artifacts.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::harness::redis::free_port;
use crate::harness::{DEADLINE, Stack, wait_for};

/// chromedriver on a free port, stopped when dropped.
pub(crate) struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    pub(crate) fn start() -> Self {
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

    /// A new browser with its own profile (cookies and all).
    pub(crate) async fn browser(&self) -> Client {
        self.open(1100, 900, true).await
    }

    /// A new browser of its own profile with a window of `width`×`height`, and with
    /// JavaScript off unless `script`.
    pub(crate) async fn open(&self, width: u32, height: u32, script: bool) -> Client {
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

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/e2e");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

pub(crate) async fn shot(c: &Client, name: &str) {
    match c.screenshot().await {
        Ok(png) => {
            let _ = std::fs::write(artifacts().join(format!("{name}.png")), png);
        }
        Err(e) => eprintln!("screenshot {name} failed: {e}"),
    }
}

/// Waits until `css` matches something on the page.
pub(crate) async fn appears(c: &Client, what: &str, css: &str) {
    wait_for(what, || async {
        c.find(Locator::Css(css)).await.ok().map(|_| ())
    })
    .await;
}

pub(crate) async fn url_has(c: &Client, what: &str, part: &str) -> String {
    wait_for(what, || async {
        let url = c.current_url().await.ok()?;
        url.as_str().contains(part).then(|| url.to_string())
    })
    .await
}

/// The text of the first element matching `css`, once it is displayed.
pub(crate) async fn shown(c: &Client, what: &str, css: &str) -> String {
    wait_for(what, || async {
        let el = c.find(Locator::Css(css)).await.ok()?;
        if !el.is_displayed().await.ok()? {
            return None;
        }
        el.text().await.ok()
    })
    .await
}

/// Waits until the page's live stream is open (app.js marks it).
pub(crate) async fn stream_open(c: &Client) {
    wait_for("the page's stream to open", || async {
        let open = c
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

/// Types a room name into the create form on `/rooms` and sends it.
pub(crate) async fn create(c: &Client, name: &str) {
    let field = c.find(Locator::Css("#room-name")).await.expect("the form");
    field.clear().await.unwrap();
    field.send_keys(name).await.unwrap();
    c.find(Locator::Css("form.create button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Logs in on `web` as the sim's player `name`, ending on the rooms page.
pub(crate) async fn log_in(c: &Client, web: &crate::harness::Web, name: &str) {
    c.goto(&web.url("/auth/login")).await.unwrap();
    pick(c, name).await;
    url_has(c, "the rooms page", "/rooms").await;
}

/// Logs in on the sim's authorize page by picking `name`.
pub(crate) async fn pick(c: &Client, name: &str) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_players_in_two_browsers_share_a_room_live_until_it_closes() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let driver = Driver::start();
    let ash = driver.browser().await;
    let bramble = driver.browser().await;

    // Ash logs in on replica A and creates a room.
    ash.goto(&a.url("/")).await.unwrap();
    shot(&ash, "01-landing").await;
    ash.find(Locator::Css("a[href^='/auth/login']"))
        .await
        .expect("a login button")
        .click()
        .await
        .unwrap();
    pick(&ash, "Ash").await;
    url_has(&ash, "the rooms page", "/rooms").await;
    appears(&ash, "the create form", "#room-name").await;
    create(&ash, "Friday draft").await;
    let room_url = wait_for("the new room's page", || async {
        let url = ash.current_url().await.ok()?;
        let path = url.path().to_owned();
        (path.starts_with("/rooms/") && path.len() > "/rooms/".len()).then_some(path)
    })
    .await;
    let room = room_url.trim_start_matches("/rooms/").to_owned();
    appears(&ash, "the invite link", "#invite-link").await;
    shot(&ash, "02-room-created").await;
    let invite = ash
        .find(Locator::Css("#invite-link"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .expect("an invite link");

    // Bramble follows the invite on replica B: log in, come back, land in the room.
    let invite_on_b = invite.replace(&a.url, &b.url);
    bramble.goto(&invite_on_b).await.unwrap();
    pick(&bramble, "Bramble").await;
    url_has(&bramble, "the room page after the invite", &room_url).await;
    appears(&bramble, "the live room", "#live[data-page=room]").await;
    shot(&bramble, "03-guest-arrived").await;

    // A voice join in "Discord" shows on both pages within a second.
    let bramble_id = stack.user("bramble").await;
    let row = format!(".members li[data-user='{bramble_id}']");
    // Both pages are connected to their streams before the change happens.
    for c in [&ash, &bramble] {
        stream_open(c).await;
    }
    let started = Instant::now();
    stack
        .voice(
            bramble_id,
            Some(room.parse().unwrap()),
            json!({"self_video": true}),
        )
        .await;
    for (c, who) in [(&ash, "creator"), (&bramble, "guest")] {
        wait_for(&format!("the join on the {who}'s page"), || async {
            c.find(Locator::Css(&row)).await.ok().map(|_| ())
        })
        .await;
    }
    // Pushed, not polled: a join that waited for a timer (a keep-alive, a reload) would
    // take seconds. The margin is for a loaded 2-core CI machine; speed is the bench's.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the join took {took:?} to show on both pages"
    );
    assert_eq!(
        ash.title().await.unwrap(),
        "(1/4) Friday draft · Coven",
        "the tab carries the count, live"
    );
    shot(&ash, "04-creator-sees-join").await;
    shot(&bramble, "05-guest-is-in").await;
    shown(
        &bramble,
        "the guest's page saying they are in",
        "[data-state=in]",
    )
    .await;

    // The creator closes the room; both pages leave it.
    ash.find(Locator::XPath("//button[normalize-space(.)='Close room']"))
        .await
        .expect("Close room for the creator")
        .click()
        .await
        .unwrap();
    // HTMX asks first.
    wait_for("the confirmation", || async {
        ash.accept_alert().await.ok()
    })
    .await;
    url_has(&ash, "the creator back on the rooms list", "/rooms").await;
    let notice = shown(&ash, "the creator's notice", "p.banner.info").await;
    assert!(notice.contains("“Friday draft” was closed"), "{notice}");
    // The guest's page says so where the room was, naming it.
    let notice = shown(
        &bramble,
        "the closed notice on the guest's page",
        ".room-live[data-closed] .banner",
    )
    .await;
    assert!(notice.contains("“Friday draft” was closed"), "{notice}");
    assert!(
        !displayed(&bramble, ".controls").await,
        "a closed room offers nothing more"
    );
    shot(&ash, "06-creator-after-close").await;
    shot(&bramble, "07-guest-after-close").await;
    assert!(
        !stack.sim.state().await["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == room.as_str()),
        "the channel is gone from Discord"
    );
    let _ = ash.close().await;
    let _ = bramble.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_page_shows_full_and_closing_as_they_happen() {
    use coven::bus::Bus;
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let driver = Driver::start();
    let ash = driver.browser().await;
    log_in(&ash, a, "Ash").await;

    // Discord failing: the HTMX post's error page is shown in words on the same page.
    stack
        .sim
        .fail_once(json!({"method": "POST", "path": "/guilds/*/channels", "status": 500}))
        .await;
    create(&ash, "Commander night").await;
    let flash = shown(&ash, "the error in the page", "#flash").await;
    assert!(flash.contains("Discord is not answering"), "{flash}");
    shot(&ash, "09-create-failed").await;
    create(&ash, "Commander night").await;
    appears(
        &ash,
        "the room page",
        "#live[data-page=room][data-stream-open]",
    )
    .await;
    let room: u64 = ash
        .current_url()
        .await
        .unwrap()
        .path()
        .trim_start_matches("/rooms/")
        .parse()
        .unwrap();

    // Four players with the room's role join: the page fills up to "Room full".
    for (name, flags) in [
        ("bramble", json!({"self_mute": true})),
        ("cinder", json!({"self_video": true})),
        ("dusk", json!({"self_stream": true})),
        ("ember", json!({"self_deaf": true, "self_mute": true})),
    ] {
        stack.seat(stack.user(name).await, room, flags).await;
    }
    shown(&ash, "Room full", ".full-note").await;
    assert_eq!(
        shown(&ash, "the count", ".room-live .count").await,
        "4/4 · full"
    );
    // Offline, the avatars show the players' initials.
    let faces = ash
        .find_all(Locator::Css(".members .avatar"))
        .await
        .unwrap();
    assert_eq!(faces.len(), 4);
    for el in faces {
        let initial = el.text().await.unwrap();
        assert_eq!(initial.chars().count(), 1, "an initial, got {initial:?}");
    }
    shot(&ash, "10-room-full").await;

    // Everyone leaves; a closing warning arrives (as the sweeper sends it) and counts down.
    for name in ["bramble", "cinder", "dusk", "ember"] {
        stack.voice(stack.user(name).await, None, json!({})).await;
    }
    let bus = coven::bus::redis::RedisBus::connect(
        &stack.redis.url(),
        "coven",
        twilight_model::id::Id::new(stack.sim.guild_id()),
        100_000,
    )
    .await
    .unwrap();
    bus.append(
        coven::event::EventData::RoomClosing {
            channel_id: twilight_model::id::Id::new(room),
            reason: "idle".to_owned(),
            closes_at: coven::event::now_ms() + 30_000,
        },
        None,
    )
    .await
    .unwrap();
    let banner = shown(&ash, "the closing banner", "[data-closes-at]").await;
    assert!(banner.contains("will close in "), "{banner}");
    shot(&ash, "11-room-closing").await;

    // Someone joining calls it off, and the page says so.
    stack
        .voice(stack.user("bramble").await, Some(room), json!({}))
        .await;
    wait_for("the closing banner to go", || async {
        (!displayed(&ash, "[data-closes-at]").await).then_some(())
    })
    .await;
    let said = shown_text(&ash, "#announce").await;
    assert!(said.contains("joined “Commander night”"), "{said}");
    shot(&ash, "12-room-reprieved").await;
    let _ = ash.close().await;
}

/// The text of `css` as a screen reader has it (shown or not).
pub(crate) async fn shown_text(c: &Client, css: &str) -> String {
    c.execute(
        &format!("return document.querySelector({css:?}).textContent"),
        vec![],
    )
    .await
    .ok()
    .and_then(|v| v.as_str().map(str::to_owned))
    .unwrap_or_default()
}

/// Whether `css` matches a displayed element right now. Asked in one script: finding an
/// element and then asking about it races the live swaps (htmx replaces an element with
/// its new version), and a replaced element would read as "not displayed".
pub(crate) async fn displayed(c: &Client, css: &str) -> bool {
    c.execute(
        "var e = document.querySelector(arguments[0]); \
         return !!e && e.checkVisibility({ checkOpacity: true, checkVisibilityCSS: true });",
        vec![json!(css)],
    )
    .await
    .ok()
    .and_then(|v| v.as_bool())
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_shows_the_delayed_banner_on_open_and_fresh_pages_until_one_is_back() {
    // The harness's gateway holds a 2 s lease.
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let driver = Driver::start();
    let ash = driver.browser().await;
    log_in(&ash, a, "Ash").await;
    appears(&ash, "the create form", "#room-name").await;
    create(&ash, "Quiet night").await;
    appears(&ash, "the live room", "#live[data-page=room]").await;
    stream_open(&ash).await;
    assert!(!displayed(&ash, "#gateway-banner").await);

    stack.gateway.signal("KILL");
    let killed = Instant::now();
    let why = shown(&ash, "the banner on the open page", "#gateway-banner").await;
    assert!(
        killed.elapsed() < Duration::from_secs(2 + 5),
        "banner after {:?}",
        killed.elapsed()
    );
    assert!(why.contains("delayed"), "{why}");
    shot(&ash, "20-gateway-delayed").await;

    // A page loaded now shows it from the start.
    let fresh = driver.browser().await;
    log_in(&fresh, a, "Bramble").await;
    // The rooms page has loaded (the URL can change before its document is there).
    appears(&fresh, "the create form", "#room-name").await;
    assert!(
        displayed(&fresh, "#gateway-banner").await,
        "rendered with the banner"
    );

    // A gateway comes back: the banner goes away by itself.
    let _back = stack.spawn_gateway();
    wait_for("the banner to go away", || async {
        (!displayed(&ash, "#gateway-banner").await).then_some(())
    })
    .await;
    shot(&ash, "21-gateway-back").await;
    let _ = ash.close().await;
    let _ = fresh.close().await;
}
