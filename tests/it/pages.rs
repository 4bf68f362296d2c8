//! The pages in a real browser (headless Chromium): live updates rendered by the server,
//! one stream shared by all of a browser's tabs, what a screen reader is told, and the
//! pages without JavaScript. Two web replicas, plain HTTP/1.1, no proxy.

use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::json;

use crate::harness::browser::{Driver, Page};
use crate::harness::demo::Demo;
use crate::harness::{GUILD, g};
use crate::harness::{Stack, metric, wait_for};

/// Whether the current tab shows `user` in the room's member list.
async fn shows_member(c: &Client, room: u64, user: u64) -> bool {
    c.find(Locator::Css(&format!(
        "#room-people-{room} .members li[data-user='{user}']"
    )))
    .await
    .is_ok()
}

/// The markup of the element `css` selects.
async fn members_html(c: &Client, css: &str) -> Option<String> {
    c.execute(
        &format!("return document.querySelector({css:?}).innerHTML"),
        vec![],
    )
    .await
    .ok()?
    .as_str()
    .map(str::to_owned)
}

/// Opens seven more tabs on `url` in `c`'s window set; returns all eight handles.
async fn eight_tabs(c: &Page, url: &str) -> Vec<fantoccini::wd::WindowHandle> {
    let mut tabs = vec![c.window().await.unwrap()];
    for _ in 1..8 {
        let tab = c.new_window(true).await.unwrap().handle;
        c.switch_to_window(tab.clone()).await.unwrap();
        c.open(url).await;
        tabs.push(tab);
    }
    for tab in &tabs {
        c.switch_to_window(tab.clone()).await.unwrap();
        c.stream_open().await;
    }
    tabs
}

/// Waits until every tab in `tabs` satisfies `check`; returns how long it took.
async fn every_tab<F, Fut>(
    c: &Client,
    tabs: &[fantoccini::wd::WindowHandle],
    what: &str,
    check: F,
) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    for (i, tab) in tabs.iter().enumerate() {
        c.switch_to_window(tab.clone()).await.unwrap();
        wait_for(&format!("{what} in tab {i}"), || async {
            check().await.then_some(())
        })
        .await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tabs_share_one_stream_and_lose_nothing_when_its_holder_closes() {
    let stack = Stack::start(2, &[]).await;
    let driver = Driver::start();
    let (bramble, cinder, dusk) = (
        stack.user("bramble").await,
        stack.user("cinder").await,
        stack.user("dusk").await,
    );
    // A SharedWorker where the browser has one; else one tab, elected by a Web Lock,
    // holds the stream for the others (forced here as a browser without SharedWorker).
    for (i, mode) in ["shared", "locks"].into_iter().enumerate() {
        let web = stack.web(i);
        let c = driver.browser().await;
        c.log_in(web, "Ash").await;
        if mode == "locks" {
            c.execute("localStorage.setItem('coven.tabs', 'locks')", vec![])
                .await
                .unwrap();
        }
        c.appears("the create form", "#room-name").await;
        c.create_room(&format!("Tabs {mode}")).await;
        let room = c.room_id().await;
        let tabs = eight_tabs(&c, &web.url(&format!("/g/{GUILD}/rooms/{room}"))).await;
        // Eight tabs, one stream: HTTP/1.1's six connections per host are not used up.
        assert_eq!(
            metric(&web.metrics, "coven_web_streams").await,
            1.0,
            "{mode}: one stream for the browser's eight tabs"
        );

        let joined = Instant::now();
        stack.seat(bramble, room, json!({})).await;
        every_tab(&c, &tabs, &format!("{mode}: Bramble's join"), || {
            shows_member(&c, room, bramble)
        })
        .await;
        let took = joined.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{mode}: the join took {took:?} to reach all eight tabs"
        );
        eprintln!("{mode}: a join reached all eight tabs in {took:?}");
        let said = c.shown_text("#announce").await;
        assert!(
            said.contains(&format!("joined “Tabs {mode}”")),
            "{mode}: the live region announces the join: {said:?}"
        );

        // Close the tab holding the stream (with a SharedWorker, the first tab: the
        // worker outlives it); changes made right then reach every other tab.
        let mut roles = Vec::new();
        for tab in &tabs {
            c.switch_to_window(tab.clone()).await.unwrap();
            let role = c
                .execute("return document.documentElement.dataset.streamRole", vec![])
                .await
                .unwrap();
            roles.push(role.as_str().unwrap_or_default().to_owned());
        }
        let holder = if mode == "locks" {
            // Exactly one tab was elected to hold the stream; the others follow it.
            let leaders: Vec<usize> = (0..roles.len()).filter(|n| roles[*n] == "leader").collect();
            assert_eq!(leaders.len(), 1, "one leader among {roles:?}");
            assert!(
                roles.iter().filter(|r| *r == "follower").count() == 7,
                "{roles:?}"
            );
            leaders[0]
        } else {
            assert!(roles.iter().all(|r| r == "shared"), "{roles:?}");
            0
        };
        c.switch_to_window(tabs[holder].clone()).await.unwrap();
        c.close_window().await.unwrap();
        let rest: Vec<_> = tabs
            .iter()
            .enumerate()
            .filter(|(n, _)| *n != holder)
            .map(|(_, t)| t.clone())
            .collect();
        stack.seat(cinder, room, json!({})).await;
        stack.voice(bramble, None, json!({})).await;
        stack.seat(dusk, room, json!({})).await;
        every_tab(
            &c,
            &rest,
            &format!("{mode}: the changes after the holder closed"),
            || async {
                shows_member(&c, room, cinder).await
                    && shows_member(&c, room, dusk).await
                    && !shows_member(&c, room, bramble).await
            },
        )
        .await;
        c.shot(&format!("30-tabs-{mode}")).await;
        let _ = c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_member_list_is_exactly_what_a_fresh_render_shows() {
    let stack = Stack::start(2, &[]).await;
    let driver = Driver::start();
    let c = driver.browser().await;
    c.log_in(stack.web(0), "Ash").await;
    c.appears("the create form", "#room-name").await;
    c.create_room("Parity").await;
    let room = c.room_id().await;
    c.stream_open().await;
    let ash = stack.user("ash").await;
    // Names out of alphabetical order, flags, the host himself, someone leaving.
    for (name, flags) in [
        ("ember", json!({"self_deaf": true, "self_mute": true})),
        ("bramble", json!({"self_video": true})),
        ("dusk", json!({"self_stream": true})),
    ] {
        stack.seat(stack.user(name).await, room, flags).await;
    }
    stack.voice(ash, Some(room), json!({})).await;
    stack.voice(stack.user("dusk").await, None, json!({})).await;
    let list = format!("#room-people-{room} .members");
    wait_for("the live page to show the three in the room", || async {
        let html = members_html(&c, &list).await?;
        (html.matches("class=\"member\"").count() == 3).then_some(())
    })
    .await;
    // A second browser renders the same state afresh (on the other replica).
    let fresh = driver.browser().await;
    fresh.log_in(stack.web(1), "Ash").await;
    fresh
        .open(&stack.web(1).url(&format!("/g/{GUILD}/rooms/{room}")))
        .await;
    let (live, rendered) = wait_for("the live list to equal a fresh render", || async {
        let live = members_html(&c, &list).await?;
        let rendered = members_html(&fresh, &list).await?;
        (live == rendered).then_some((live, rendered))
    })
    .await;
    assert_eq!(live, rendered);
    let at = |name: &str| {
        live.find(&format!(">{name}<"))
            .unwrap_or_else(|| panic!("{name} is listed: {live}"))
    };
    assert!(
        at("Ash") < at("Bramble") && at("Bramble") < at("Ember"),
        "sorted by name: {live}"
    );
    assert!(!live.contains(">Dusk<"), "who left is gone: {live}");
    assert!(
        live.contains("class=\"host\""),
        "the host is marked: {live}"
    );
    let _ = c.close().await;
    let _ = fresh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_javascript_close_asks_on_a_page_of_its_own_then_closes() {
    let stack = Stack::start(2, &[]).await;
    let driver = Driver::start();
    let c = driver.window(1100, 900, false).await;
    let web = stack.web(1);
    c.log_in(web, "Ash").await;
    c.appears("the create form", "#room-name").await;
    c.create_room("No script night").await;
    let room = c.room_id().await;
    // Rendered right without a script: the viewer is not in voice, so no "You're in".
    c.shown("the hint to join in Discord", ".hint[data-state~=none]")
        .await;
    c.find(Locator::XPath("//button[normalize-space(.)='Close room']"))
        .await
        .expect("Close room for the creator")
        .click()
        .await
        .unwrap();
    c.url_has(
        "the confirmation page",
        &format!("/g/{GUILD}/rooms/{room}/close"),
    )
    .await;
    c.shot("40-close-confirm-no-js").await;
    assert!(
        stack.sim.state().await["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ch| ch["id"].as_str() == Some(&*room.to_string())),
        "nothing is closed before the confirmation"
    );
    c.find(Locator::Css("main form[method=post] button"))
        .await
        .expect("the confirm button")
        .click()
        .await
        .unwrap();
    c.url_has("the rooms page", "/rooms").await;
    let notice = c.shown("the closed notice", "p.banner.info").await;
    assert!(notice.contains("“No script night” was closed"), "{notice}");
    wait_for("the channel to be gone from Discord", || async {
        (!stack.sim.state().await["channels"]
            .as_array()?
            .iter()
            .any(|ch| ch["id"].as_str() == Some(&*room.to_string())))
        .then_some(())
    })
    .await;
    let _ = c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_me_in_appears_when_the_viewer_enters_voice_elsewhere_and_takes_them_in() {
    let stack = Stack::start(1, &[]).await;
    let driver = Driver::start();
    let c = driver.browser().await;
    c.log_in(stack.web(0), "Ash").await;
    c.appears("the create form", "#room-name").await;
    c.create_room("Come in").await;
    let room = c.room_id().await;
    c.stream_open().await;
    c.shown("the hint to join in Discord", ".hint[data-state~=none]")
        .await;
    assert!(!c.displayed("form[data-state~=elsewhere] button").await);

    // Ash enters another voice channel of the server: the page offers to move him in.
    let ash = stack.user("ash").await;
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    let button = c
        .shown("Move me in, live", "form[data-state~=elsewhere] button")
        .await;
    assert_eq!(button, "Move me in");
    c.shot("41-move-me-in").await;
    c.find(Locator::Css("form[data-state~=elsewhere] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.shown("You're in", "[data-state=in]").await;
    wait_for("Ash in the member list", || async {
        shows_member(&c, room, ash).await.then_some(())
    })
    .await;
    // Leaving says so, with the way back.
    stack.voice(ash, None, json!({})).await;
    let left = c.shown("the left notice", "[data-state~=left]").await;
    assert!(left.contains("You left the voice channel"), "{left}");
    let _ = c.close().await;
}

/// Waits until no highlight is running.
async fn settled(c: &Client) {
    wait_for("highlights to end", || async {
        let n = c
            .execute("return document.getAnimations().length", vec![])
            .await
            .ok()?;
        (n == json!(0)).then_some(())
    })
    .await;
}

/// The pages as the README shows them, at a laptop's and a phone's size. They are kept
/// under `target/e2e/docs-*.png`; `cp target/e2e/docs-*.png docs/` refreshes the README's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_at_laptop_and_phone_size() {
    let stack = Stack::start(1, &[]).await;
    let driver = Driver::start();
    let web = stack.web(0);
    let mut room = None;
    for (size, (w, h)) in [("1280x800", (1280, 800)), ("390x844", (390, 844))] {
        let c = driver.window(w, h, true).await;
        c.log_in(web, "Ash").await;
        c.appears("the create form", "#room-name").await;
        let id = match room {
            Some(id) => {
                c.open(&web.url(&format!("/g/{GUILD}/rooms/{id}"))).await;
                id
            }
            None => {
                c.create_room("Friday Night Catan").await;
                let id = c.room_id().await;
                c.stream_open().await;
                for (name, flags) in [
                    ("bramble", json!({"self_video": true})),
                    ("cinder", json!({"self_mute": true})),
                ] {
                    stack.seat(stack.user(name).await, id, flags).await;
                }
                stack
                    .voice(stack.user("ash").await, Some(id), json!({}))
                    .await;
                room = Some(id);
                id
            }
        };
        c.stream_open().await;
        wait_for("three in the room", || async {
            let n = c
                .find_all(Locator::Css(&format!("#room-people-{id} .member")))
                .await
                .ok()?
                .len();
            (n == 3).then_some(())
        })
        .await;
        c.shown("You're in", "[data-state=in]").await;
        // Ash's own viewing is the first event on the page's new connection: it must not
        // be taken for one the page already has.
        c.appears(
            "Ash viewing the page",
            &format!("#room-people-{id} .viewers li"),
        )
        .await;
        settled(&c).await;
        c.shot(&format!("docs-room-{size}")).await;
        c.open(&web.url(&g("/rooms"))).await;
        c.appears("the room's card", &format!("#room-{id}")).await;
        settled(&c).await;
        c.shot(&format!("docs-rooms-{size}")).await;
        let _ = c.close().await;
    }
}

/// The README's demo walk in two browsers: one logs in and makes a room while the
/// simulated players play; a second profile logs in as another player, follows the
/// room's invite link, opens it "in Discord" (the simulator's page) and joins voice, all
/// within 15 s of the room's creation, and the room page says they are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_demo_walk_lets_a_friend_in_within_fifteen_seconds() {
    let demo = Demo::start(&[], &[("DEMO_PLAYER_INTERVAL", "200ms")]);
    let driver = Driver::start();
    let first = driver.browser().await;
    first.open(&format!("{}/", demo.web)).await;
    first.click_log_in().await;
    first.pick("Ash").await;
    // Two communities have Coven in the demo: Ash picks one.
    first.choose_community("Coven Playgroup").await;
    first.appears("the create form", "#room-name").await;
    first.create_room("Friday Night Catan").await;
    let created = Instant::now();
    let room = first.room_id().await;
    let invite = first.invite_link().await;

    // "Open a second browser, log in as another player, and follow the room's invite link."
    let friend = driver.browser().await;
    friend.open(&format!("{}/", demo.web)).await;
    friend.click_log_in().await;
    friend.pick("Bramble").await;
    friend
        .appears("the communities page", ".community-list")
        .await;
    friend.open(&invite).await;
    friend
        .url_has("the room's page", &format!("/g/{GUILD}/rooms/{room}"))
        .await;
    // Into voice the way the page offers: "Open in Discord", the simulator's channel page.
    let open = friend
        .find(Locator::XPath("//a[normalize-space(.)='Open in Discord']"))
        .await
        .expect("Open in Discord")
        .attr("href")
        .await
        .unwrap()
        .expect("a link");
    assert!(open.starts_with(&demo.sim), "{open} is the simulator's");
    friend.open(&open).await;
    friend
        .find(Locator::Css("button.join"))
        .await
        .expect("Join voice")
        .click()
        .await
        .unwrap();
    // The click submits a form; navigating away before its answer would cancel the
    // join. The simulator's page comes back listing the friend in voice.
    wait_for("the simulator's page listing the friend in voice", || async {
        friend
            .find(Locator::XPath(
                "//h2[starts-with(., 'In voice')]/following-sibling::ul[1]/li[span[normalize-space(.)='Bramble']]",
            ))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    friend
        .open(&format!("{}/g/{GUILD}/rooms/{room}", demo.web))
        .await;
    friend
        .shown("the friend's page saying they are in", "[data-state=in]")
        .await;
    let took = created.elapsed();
    eprintln!("the README's invite walk took {took:?} from the room's creation");
    // The demo's gateway is up: no page keeps saying live updates are delayed.
    wait_for("no delayed banner on the friend's page", || async {
        (!friend.displayed("#gateway-banner").await).then_some(())
    })
    .await;
    assert!(took < Duration::from_secs(15), "the walk took {took:?}");
    friend.shot("50-demo-friend-in").await;
    let _ = first.close().await;
    let _ = friend.close().await;
}

/// The relay (`assets/relay.js`) keeps the last messages for tabs that open later and
/// forgets whole events only: what it keeps starts right after the id it says it is
/// complete from, however many messages passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_whole_events_for_tabs_that_open_later() {
    let stack = Stack::start(1, &[]).await;
    let driver = Driver::start();
    let c = driver.browser().await;
    c.open(&stack.web(0).url("/")).await;
    let kept = wait_for("the relay script", || async {
        c.execute(
            r#"
            if (!window.CovenRelay) return null;
            var r = new CovenRelay(), got = [];
            r.tabs.set("t", { post: function (x) { got.push(x.msg); }, view: "5" });
            // 1,700 events of two messages and their id: some for the rooms list (not this
            // tab's), some for room 5's page (this tab's).
            for (var i = 1; i <= 1700; i++) {
              var w = "1-" + (i - 1);
              r.relay({ type: "rooms", data: "list " + i, w: w });
              r.relay({ type: "room-5", data: "room " + i, w: w });
              r.relay({ type: "at", data: "1-" + i, w: "1-" + i });
            }
            var first = r.recent[0], last = r.recent[r.recent.length - 1];
            return {
              kept: r.recent.length, complete: r.complete, first_w: first.w,
              first_type: first.type, last: last.data,
              posted: got.length, posted_rooms: got.filter(function (m) { return m.type === "rooms"; }).length
            };
            "#,
            vec![],
        )
        .await
        .ok()
        .filter(|v| !v.is_null())
    })
    .await;
    let n = |k: &str| kept[k].as_u64().unwrap();
    assert!((500..=1000).contains(&n("kept")), "{kept}");
    assert_eq!(n("kept") % 3, 0, "whole events only: {kept}");
    assert_eq!(
        kept["first_w"], kept["complete"],
        "kept from right after `complete`: {kept}"
    );
    assert_eq!(kept["first_type"], "rooms", "{kept}");
    assert_eq!(kept["last"], "1-1700");
    // The tab viewing room 5 got its room's messages and every id, not the rooms list's.
    assert_eq!((n("posted"), n("posted_rooms")), (3400, 0), "{kept}");
    let _ = c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_walk_switches_community_and_adds_coven_to_a_third_without_a_restart() {
    use coven::sim::defaults::{DICE_TOWER_GUILD_ID as DICE_TOWER, NIGHT_OWLS_GUILD_ID as OWLS};
    let demo = Demo::start(&["--quiet"], &[]);
    let driver = Driver::start();
    let c = driver.browser().await;

    // Log in, pick a community, make a room.
    c.open(&format!("{}/", demo.web)).await;
    c.click_log_in().await;
    c.pick("Ash").await;
    c.appears("the communities page", ".community-list").await;
    c.shot("communities-picker").await;
    c.choose_community("Coven Playgroup").await;
    c.appears("the create form", "#room-name").await;
    c.create_room("Walk night").await;
    c.room_id().await;

    // Switch community from the header.
    c.click_on("the Communities link", Locator::Css("nav.me a[href='/']"))
        .await;
    c.choose_community("Night Owls").await;
    c.url_has("Night Owls' rooms", &format!("/g/{OWLS}/rooms"))
        .await;
    c.appears("Night Owls' create form", "#room-name").await;
    assert!(
        c.shown_text("[data-community]")
            .await
            .contains("Night Owls"),
        "the page names its community"
    );

    // Dusk manages Dice Tower, where Coven is not: Add Coven, approve on (simulated)
    // Discord, "Setting up…", then its rooms, with nothing restarted.
    c.click_on(
        "Log out",
        Locator::Css("form[action='/auth/logout'] button"),
    )
    .await;
    c.appears("the landing page", "a[href^='/auth/login']")
        .await;
    c.click_log_in().await;
    c.pick("Dusk").await;
    let add = format!("[data-addable='{DICE_TOWER}'] a.button");
    c.appears("Add Coven next to Dice Tower", &add).await;
    c.shot("communities-add-coven").await;
    c.click_on("Add Coven", Locator::Css(&add)).await;
    c.click_on(
        "Dice Tower on Discord's bot authorization page",
        Locator::XPath("//a[normalize-space(.)='Dice Tower']"),
    )
    .await;
    c.url_has("Dice Tower's rooms", &format!("/g/{DICE_TOWER}/rooms"))
        .await;
    c.appears("Dice Tower's create form", "#room-name").await;
    c.shot("communities-added").await;
    let _ = c.close().await;
}
