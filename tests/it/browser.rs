//! Real browsers: headless Chromium (through chromedriver) with two profiles, two
//! players on two web replicas, against the sim, a real gateway and a private Redis.
//! Screenshots of every step are kept under `target/e2e/` as test artifacts.

use std::time::{Duration, Instant};

use fantoccini::Locator;
use serde_json::json;

use crate::harness::GUILD;
use crate::harness::browser::Driver;
use crate::harness::{Stack, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_players_in_two_browsers_share_a_room_live_until_it_closes() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let driver = Driver::start();
    let ash = driver.browser().await;
    let bramble = driver.browser().await;

    // Ash logs in on replica A and creates a room.
    ash.open(&a.url("/")).await;
    ash.shot("01-landing").await;
    ash.click_log_in().await;
    ash.pick("Ash").await;
    ash.url_has("the rooms page", "/rooms").await;
    ash.appears("the create form", "#room-name").await;
    ash.create_room("Friday draft").await;
    let room = ash.room_id().await.to_string();
    let room_url = format!("/g/{GUILD}/rooms/{room}");
    let invite = ash.invite_link().await;
    ash.shot("02-room-created").await;

    // Bramble follows the invite on replica B: log in, come back, land in the room.
    bramble.open(&invite.replace(&a.url, &b.url)).await;
    bramble.pick("Bramble").await;
    bramble
        .url_has("the room page after the invite", &room_url)
        .await;
    bramble
        .appears("the live room", "#live[data-page=room]")
        .await;
    bramble.shot("03-guest-arrived").await;

    // A voice join in "Discord" shows on both pages within a second.
    let bramble_id = stack.user("bramble").await;
    let row = format!(".members li[data-user='{bramble_id}']");
    // Both pages are connected to their streams before the change happens.
    for c in [&ash, &bramble] {
        c.stream_open().await;
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
    ash.shot("04-creator-sees-join").await;
    bramble.shot("05-guest-is-in").await;
    bramble
        .shown("the guest's page saying they are in", "[data-state=in]")
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
    ash.url_has("the creator back on the rooms list", "/rooms")
        .await;
    let notice = ash.shown("the creator's notice", "p.banner.info").await;
    assert!(notice.contains("“Friday draft” was closed"), "{notice}");
    // The guest's page says so where the room was, naming it.
    let notice = bramble
        .shown(
            "the closed notice on the guest's page",
            ".room-live[data-closed] .banner",
        )
        .await;
    assert!(notice.contains("“Friday draft” was closed"), "{notice}");
    assert!(
        !bramble.displayed(".controls").await,
        "a closed room offers nothing more"
    );
    ash.shot("06-creator-after-close").await;
    bramble.shot("07-guest-after-close").await;
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
    ash.log_in(a, "Ash").await;

    // Discord failing: the HTMX post's error page is shown in words on the same page.
    stack
        .sim
        .fail_once(json!({"method": "POST", "path": "/guilds/*/channels", "status": 500}))
        .await;
    ash.create_room("Commander night").await;
    let flash = ash.shown("the error in the page", "#flash").await;
    assert!(flash.contains("Discord is not answering"), "{flash}");
    assert!(
        !flash.contains("Back to the rooms"),
        "only the marked words: {flash}"
    );
    ash.shot("09-create-failed").await;
    ash.create_room("Commander night").await;
    ash.appears("the room page", "#live[data-page=room][data-stream-open]")
        .await;
    let room = ash.room_id().await;

    // Four players with the room's role join: the page fills up to "Room full".
    for (name, flags) in [
        ("bramble", json!({"self_mute": true})),
        ("cinder", json!({"self_video": true})),
        ("dusk", json!({"self_stream": true})),
        ("ember", json!({"self_deaf": true, "self_mute": true})),
    ] {
        stack.seat(stack.user(name).await, room, flags).await;
    }
    ash.shown("Room full", ".full-note").await;
    assert_eq!(
        ash.shown("the count", ".room-live .count").await,
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
    ash.shot("10-room-full").await;

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
    let banner = ash.shown("the closing banner", "[data-closes-at]").await;
    assert!(banner.contains("will close in "), "{banner}");
    ash.shot("11-room-closing").await;

    // Someone joining calls it off, and the page says so.
    stack
        .voice(stack.user("bramble").await, Some(room), json!({}))
        .await;
    wait_for("the closing banner to go", || async {
        (!ash.displayed("[data-closes-at]").await).then_some(())
    })
    .await;
    let said = ash.shown_text("#announce").await;
    assert!(said.contains("joined “Commander night”"), "{said}");
    ash.shot("12-room-reprieved").await;
    let _ = ash.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_shows_the_delayed_banner_on_open_and_fresh_pages_until_one_is_back() {
    // The harness's gateway holds a 2 s lease.
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let driver = Driver::start();
    let ash = driver.browser().await;
    ash.log_in(a, "Ash").await;
    ash.appears("the create form", "#room-name").await;
    ash.create_room("Quiet night").await;
    ash.appears("the live room", "#live[data-page=room]").await;
    ash.stream_open().await;
    assert!(!ash.displayed("#gateway-banner").await);

    stack.gateway.signal("KILL");
    let killed = Instant::now();
    let why = ash
        .shown("the banner on the open page", "#gateway-banner")
        .await;
    assert!(
        killed.elapsed() < Duration::from_secs(2 + 5),
        "banner after {:?}",
        killed.elapsed()
    );
    assert!(why.contains("delayed"), "{why}");
    ash.shot("20-gateway-delayed").await;

    // A page loaded now shows it from the start.
    let fresh = driver.browser().await;
    fresh.log_in(a, "Bramble").await;
    // The rooms page has loaded (the URL can change before its document is there).
    fresh.appears("the create form", "#room-name").await;
    assert!(
        fresh.displayed("#gateway-banner").await,
        "rendered with the banner"
    );

    // A gateway comes back: the banner goes away by itself.
    let _back = stack.spawn_gateway();
    wait_for("the banner to go away", || async {
        (!ash.displayed("#gateway-banner").await).then_some(())
    })
    .await;
    ash.shot("21-gateway-back").await;
    let _ = ash.close().await;
    let _ = fresh.close().await;
}
