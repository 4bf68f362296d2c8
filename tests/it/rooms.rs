//! Rooms from the web, end to end: a real gateway and two real web replicas against the
//! sim and a private Redis, driven as browsers with cookie jars.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use twilight_model::guild::Permissions;

use crate::harness::rooms::{find, invite_link};
use crate::harness::{Browser, INVITE_SECRET, Stack, form_value, location, wait_for, within};
use crate::harness::{GUILD, g};

/// What a room's role (and its creator) may do in its channel.
const ROOM_ALLOW: Permissions = Permissions::VIEW_CHANNEL
    .union(Permissions::CONNECT)
    .union(Permissions::SPEAK)
    .union(Permissions::STREAM)
    .union(Permissions::USE_VAD);

/// An overwrite's `allow` or `deny` as the sim's state writes it (a decimal string).
fn bits(v: &Value) -> Permissions {
    Permissions::from_bits_retain(v.as_str().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_room_is_a_private_voice_channel_with_its_role_streamed_to_every_replica() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let browser = stack.login_as(a, ash).await;
    let mut on_a = browser.stream(&a.url("/api/stream"), None).await;
    let mut on_b = browser.stream(&b.url("/api/stream"), None).await;

    let room = browser.create_room(a, "Draft pod").await;

    let state = stack.sim.state().await;
    let channel = find(&state, "channels", &room).expect("the channel exists in Discord");
    assert_eq!(channel["type"], 2, "a voice channel");
    assert_eq!(channel["user_limit"], 4);
    assert_eq!(channel["name"], "Draft pod");
    let overwrites = channel["permission_overwrites"].as_array().unwrap();
    assert_eq!(overwrites.len(), 4, "{overwrites:?}");
    let guild = stack.sim.guild_id().to_string();
    let bot = stack.sim.id_of("bot_id").await.to_string();
    let everyone = overwrites
        .iter()
        .find(|o| o["id"] == guild)
        .expect("@everyone");
    assert_eq!(
        (
            everyone["type"].as_u64(),
            bits(&everyone["allow"]),
            bits(&everyone["deny"])
        ),
        (
            Some(0),
            Permissions::empty(),
            Permissions::VIEW_CHANNEL | Permissions::CONNECT
        )
    );
    let role = overwrites
        .iter()
        .find(|o| o["type"] == 0 && o["id"] != guild)
        .expect("the room role");
    assert_eq!(
        (
            role["type"].as_u64(),
            bits(&role["allow"]),
            bits(&role["deny"])
        ),
        (Some(0), ROOM_ALLOW, Permissions::empty())
    );
    // The creator's own overwrite: they may always join their room, and it is how the
    // gateway knows who made it when Redis lost the record.
    let creator = overwrites
        .iter()
        .find(|o| o["id"] == ash.to_string().as_str())
        .expect("the creator");
    assert_eq!(
        (
            creator["type"].as_u64(),
            bits(&creator["allow"]),
            bits(&creator["deny"])
        ),
        (Some(1), ROOM_ALLOW, Permissions::empty())
    );
    let bot_ow = overwrites.iter().find(|o| o["id"] == bot).expect("the bot");
    assert_eq!(
        (
            bot_ow["type"].as_u64(),
            bits(&bot_ow["allow"]),
            bits(&bot_ow["deny"])
        ),
        (
            Some(1),
            ROOM_ALLOW
                | Permissions::MOVE_MEMBERS
                | Permissions::MUTE_MEMBERS
                | Permissions::DEAFEN_MEMBERS
                | Permissions::MANAGE_CHANNELS,
            Permissions::empty()
        )
    );
    let role_id = role["id"].as_str().unwrap().to_owned();
    let role_rec = find(&state, "roles", &role_id).expect("the role exists");
    assert_eq!(
        role_rec["permissions"], "0",
        "the role has no permissions of its own"
    );
    let ash_member = find(&state, "members", &ash.to_string()).unwrap();
    assert!(
        ash_member["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == &role_id),
        "the creator holds the role"
    );

    let ash_id = ash.to_string();
    for stream in [&mut on_a, &mut on_b] {
        let created = stream
            .until(|m| {
                m.event == "room.created" && m.json()["data"]["created_by"] == ash_id.as_str()
            })
            .await;
        let data = created.last().unwrap().json()["data"].clone();
        assert_eq!(data["channel_id"], room);
        assert_eq!(data["role_id"], role_id);
    }

    // The room page (on the other replica) shows the creator's controls and an invite.
    let html = browser.room_page(b, &room).await;
    assert!(html.contains("Close room"), "the creator may close");
    assert!(invite_link(&html).starts_with(&format!("{}/invite/", b.url)));

    // "New link" gives HTMX a fresh link; someone outside the room may not ask.
    let fresh = browser.new_link(a, &room).await;
    assert_eq!(fresh.status(), 200);
    assert!(
        fresh
            .text()
            .await
            .unwrap()
            .starts_with(&format!("{}/invite/", a.url))
    );
    let stranger = stack.login_as(b, stack.user("cinder").await).await;
    let theirs = stranger.csrf(b).await;
    let refused = stranger
        .post(
            b,
            &format!("/g/{GUILD}/rooms/{room}/invite"),
            &[("csrf_token", &theirs)],
        )
        .await;
    assert_eq!(
        refused.status(),
        404,
        "a room Discord hides from someone does not exist for them"
    );

    // An HTMX post is answered with HX-Redirect, and an empty name gets the default.
    let token = browser.csrf(a).await;
    let htmx = browser
        .http
        .post(a.url(&g("/rooms")))
        .header("hx-request", "true")
        .header("x-csrf-token", &token)
        .form(&[("name", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(htmx.status(), 204);
    let to = htmx.headers()["hx-redirect"].to_str().unwrap().to_owned();
    let second = to.strip_prefix(&g("/rooms/")).expect("to the new room");
    let state = stack.sim.state().await;
    let name = find(&state, "channels", second).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        name.starts_with("ash's Game #") && name.len() == "ash's Game #".len() + 4,
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_brings_a_non_member_into_the_guild_and_the_room_and_bad_ones_say_why() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let juniper = stack.user("juniper").await;
    let creator = stack.login_as(a, ash).await;
    let room = creator.create_room(a, "Pauper league").await;
    let link = creator.invite_link(a, &room).await;
    let token = link.rsplit('/').next().unwrap().to_owned();
    let path = format!("/invite/{token}");

    // Juniper is not in the guild and not logged in: log in, come back, get in.
    let guest = Browser::new();
    let first = guest.get(&b.url(&path)).await;
    assert_eq!(first.status(), 303);
    assert!(
        location(&first).starts_with("/auth/login?return_to=%2Finvite%2F"),
        "{}",
        location(&first)
    );
    let back = guest.login_to(b, &stack.sim, juniper, &path).await;
    assert_eq!(
        (back.status().as_u16(), location(&back)),
        (303, path.clone())
    );
    // Following the link would add Juniper to the Discord server: Coven asks first, and
    // nothing happens until they confirm.
    let asked = guest.get(&b.url(&path)).await;
    assert_eq!(asked.status(), 200);
    let html = asked.text().await.unwrap();
    assert!(
        html.contains("Coven Playgroup") && html.contains("Pauper league"),
        "{html}"
    );
    let state = stack.sim.state().await;
    assert!(
        find(&state, "members", &juniper.to_string()).is_none(),
        "not added before confirming"
    );
    let confirm = form_value(&html, "csrf_token").expect("the confirm form's token");
    let unconfirmed = guest.post(b, &path, &[]).await;
    assert_eq!(
        unconfirmed.status(),
        403,
        "the confirm post needs its token"
    );
    let followed = guest.post(b, &path, &[("csrf_token", &confirm)]).await;
    assert_eq!(
        (followed.status().as_u16(), location(&followed)),
        (303, format!("/g/{GUILD}/rooms/{room}"))
    );
    let state = stack.sim.state().await;
    let member = find(&state, "members", &juniper.to_string()).expect("juniper joined the guild");
    let channel = find(&state, "channels", &room).unwrap();
    let role_id = channel["permission_overwrites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == 0 && o["allow"].as_str() == Some(&ROOM_ALLOW.bits().to_string()))
        .unwrap()["id"]
        .clone();
    assert!(
        member["roles"].as_array().unwrap().contains(&role_id),
        "juniper holds the role"
    );
    let html = guest
        .page(&b.url(&format!("/g/{GUILD}/rooms/{room}")))
        .await;
    assert!(html.contains("Pauper league"));

    // Forged: a changed signature, or another key.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let res = guest.get(&b.url(&format!("/invite/{forged}"))).await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("not valid"));
    let claims = |exp: u64, key: &str| {
        let now = coven::event::now_ms() / 1000;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"guild_id": stack.sim.guild_id().to_string(), "channel_id": room, "role_id": role_id,
                    "creator_id": ash.to_string(), "iat": now - 100, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let now = coven::event::now_ms() / 1000;
    let res = guest
        .get(&b.url(&format!(
            "/invite/{}",
            claims(now + 60, "another-key-another-key-another-key")
        )))
        .await;
    assert_eq!(res.status(), 400);
    // Expired.
    let res = guest
        .get(&b.url(&format!("/invite/{}", claims(now - 10, INVITE_SECRET))))
        .await;
    assert_eq!(res.status(), 410);
    assert!(res.text().await.unwrap().contains("expired"));

    // Full: four people in voice, and a fifth follows the link.
    for u in ["bramble", "cinder", "dusk", "ember"] {
        stack
            .seat(stack.user(u).await, room.parse().unwrap(), json!({}))
            .await;
    }
    wait_for("the room to fill", || async {
        let html = creator.room_page(a, &room).await;
        html.contains("4/4").then_some(())
    })
    .await;
    let fable = stack.user("fable").await;
    let fifth = stack.login_as(a, fable).await;
    let res = fifth.get(&a.url(&path)).await;
    assert_eq!(res.status(), 409);
    assert!(res.text().await.unwrap().contains("full"));

    // Closed: the room is gone.
    let closed = creator.close_room(a, &room).await;
    assert_eq!(closed.status(), 303);
    let res = fifth.get(&b.url(&path)).await;
    assert_eq!(res.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_need_their_token_and_only_the_creator_closes_a_room_once_or_twice() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let bramble = stack.user("bramble").await;
    let creator = stack.login_as(a, ash).await;
    let other = stack.login_as(b, bramble).await;
    let mut stream = creator.stream(&b.url("/api/stream"), None).await;

    // Without the token, with a wrong one, or from another site: 403, nothing made.
    let before = stack.sim.state().await["channels"]
        .as_array()
        .unwrap()
        .len();
    let res = creator.post(a, &g("/rooms"), &[("name", "x")]).await;
    assert_eq!(res.status(), 403);
    let res = creator
        .post(a, &g("/rooms"), &[("name", "x"), ("csrf_token", "guess")])
        .await;
    assert_eq!(res.status(), 403);
    let token = creator.csrf(a).await;
    let res = creator
        .http
        .post(a.url(&g("/rooms")))
        .header("origin", "https://elsewhere.example")
        .form(&[("name", "x"), ("csrf_token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        stack.sim.state().await["channels"]
            .as_array()
            .unwrap()
            .len(),
        before
    );

    // Validation and size.
    let long = "x".repeat(101);
    let res = creator
        .post(a, &g("/rooms"), &[("name", &long), ("csrf_token", &token)])
        .await;
    assert_eq!(res.status(), 400);
    assert!(
        res.headers().get("connection").is_none(),
        "its body was read: the connection stays usable"
    );
    assert!(res.text().await.unwrap().contains("at most 100"));
    // Answers that leave a body unread tell the client not to reuse the connection.
    let huge = "x".repeat(64 * 1024);
    let res = creator
        .post(a, &g("/rooms"), &[("name", &huge), ("csrf_token", &token)])
        .await;
    assert_eq!(res.status(), 413);
    assert_eq!(res.headers()["connection"], "close");
    let anonymous = Browser::new()
        .post(a, &g("/rooms"), &[("name", "x"), ("csrf_token", &token)])
        .await;
    assert_eq!(anonymous.status(), 303, "log in first");
    assert_eq!(anonymous.headers()["connection"], "close");

    let room = creator.create_room(a, "Commander night").await;

    // "Move me in": only from another voice channel of the guild.
    let res = creator
        .post(
            a,
            &format!("/g/{GUILD}/rooms/{room}/move"),
            &[("csrf_token", &token)],
        )
        .await;
    assert_eq!(res.status(), 409);
    assert!(res.text().await.unwrap().contains("not in a voice channel"));
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    let room_page = format!("/g/{GUILD}/rooms/{room}");
    // The form is in every page of someone who may join; the stylesheet shows it where
    // the page says they are elsewhere in voice.
    wait_for("the page to offer Move me in", || async {
        let page = creator.page(&a.url(&room_page)).await;
        (page.contains("data-whereabouts=\"elsewhere\"") && page.contains("Move me in"))
            .then_some(())
    })
    .await;
    let res = creator
        .post(
            a,
            &format!("/g/{GUILD}/rooms/{room}/move"),
            &[("csrf_token", &token)],
        )
        .await;
    assert_eq!(
        (res.status().as_u16(), location(&res)),
        (303, room_page.clone())
    );
    let state = stack.sim.state().await;
    let ash_voice = find(&state, "voice_states", &ash.to_string()).expect("ash in voice");
    assert_eq!(
        ash_voice["channel_id"],
        room.as_str(),
        "moved into the room"
    );
    stack.voice(ash, None, json!({})).await;

    // Without JavaScript, Close leads to a confirmation page; only its post closes.
    let page = creator.room_page(a, &room).await;
    assert!(page.contains(&format!(
        "method=\"get\" action=\"/g/{GUILD}/rooms/{room}/close\""
    )));
    let confirm = creator
        .page(&a.url(&format!("/g/{GUILD}/rooms/{room}/close")))
        .await;
    assert!(confirm.contains("Close Commander night?"), "{confirm}");
    assert!(confirm.contains(&format!(
        "method=\"post\" action=\"/g/{GUILD}/rooms/{room}/close\""
    )));
    assert!(
        form_value(&confirm, "csrf_token").is_some(),
        "the post carries the token"
    );
    assert!(
        find(&stack.sim.state().await, "channels", &room).is_some(),
        "looking at the confirmation closes nothing"
    );

    // Someone without the room's role does not see it at all, and cannot close it.
    let res = other.get(&b.url(&format!("/g/{GUILD}/rooms/{room}"))).await;
    assert_eq!(res.status(), 404);
    assert_eq!(
        other
            .get(&b.url(&format!("/g/{GUILD}/rooms/{room}/close")))
            .await
            .status(),
        404
    );
    let theirs = other.csrf(b).await;
    let res = other
        .post(
            b,
            &format!("/g/{GUILD}/rooms/{room}/close"),
            &[("csrf_token", &theirs)],
        )
        .await;
    assert_eq!(res.status(), 404);

    let res = creator
        .post(
            b,
            &format!("/g/{GUILD}/rooms/{room}/close"),
            &[("csrf_token", &token)],
        )
        .await;
    assert_eq!(
        (res.status().as_u16(), location(&res)),
        (303, g("/rooms?closed=1"))
    );
    let list = creator.page(&a.url(&g("/rooms?closed=1"))).await;
    assert!(
        list.contains("“Commander night” was closed."),
        "the notice names the room"
    );
    let again = creator.page(&a.url(&g("/rooms?closed=1"))).await;
    assert!(!again.contains("Commander night"), "named once");
    // A link cannot make the page say words of its own.
    let hostile = creator
        .page(&a.url(&g("/rooms?closed=Your+account+is+locked")))
        .await;
    assert!(!hostile.contains("locked") && hostile.contains("The room was closed."));
    let state = stack.sim.state().await;
    assert!(
        find(&state, "channels", &room).is_none(),
        "the channel is gone"
    );
    assert!(
        !state["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "Room: Commander night"),
        "the role is gone"
    );
    stream
        .until(|m| m.event == "room.deleted" && m.json()["data"]["channel_id"] == room)
        .await;
    let again = creator
        .post(
            a,
            &format!("/g/{GUILD}/rooms/{room}/close"),
            &[("csrf_token", &token)],
        )
        .await;
    assert_eq!(again.status(), 303, "closing twice is fine");
    let page = creator
        .get(&a.url(&format!("/g/{GUILD}/rooms/{room}")))
        .await;
    assert_eq!(page.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_part_way_leaves_nothing_behind_and_rate_limits_are_waited_out() {
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = stack.login_as(a, ash).await;
    let token = browser.csrf(a).await;
    let roles = || async { stack.sim.state().await["roles"].as_array().unwrap().len() };
    let roles_before = roles().await;

    // The channel fails after the role was made: the role is removed again.
    stack
        .sim
        .fail_once(json!({"method": "POST", "path": "/guilds/*/channels", "status": 500}))
        .await;
    let res = browser
        .post(
            a,
            &g("/rooms"),
            &[("name", "Doomed"), ("csrf_token", &token)],
        )
        .await;
    assert_eq!(res.status(), 503);
    assert!(res.text().await.unwrap().contains("Nothing was changed"));
    assert_eq!(roles().await, roles_before, "no role left behind");

    // Missing permission: plain words.
    stack
        .sim
        .fail_once(
            json!({"method": "POST", "path": "/guilds/*/roles", "status": 403, "code": 50013}),
        )
        .await;
    let res = browser
        .post(
            a,
            &g("/rooms"),
            &[("name", "Doomed"), ("csrf_token", &token)],
        )
        .await;
    assert_eq!(res.status(), 502);
    assert!(res.text().await.unwrap().contains("lacks a permission"));
    assert_eq!(roles().await, roles_before);

    // A 429 on the channel is waited out, and the room is made.
    stack
        .sim
        .fail_once(json!({"method": "POST", "path": "/guilds/*/channels", "status": 429, "retry_after": 1.0}))
        .await;
    let started = Instant::now();
    let res = browser
        .post(
            a,
            &g("/rooms"),
            &[("name", "Patient"), ("csrf_token", &token)],
        )
        .await;
    assert_eq!(res.status(), 303);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited {:?}",
        started.elapsed()
    );

    // Per-user limit: a burst of 10 posts, then 429 with Retry-After.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = browser
            .post(a, &g("/rooms/1/move"), &[("csrf_token", &token)])
            .await;
        statuses.push((r.status().as_u16(), r.headers().get("retry-after").cloned()));
    }
    let limited = statuses.iter().position(|(s, _)| *s == 429).expect("a 429");
    assert!(limited >= 5, "limited after {limited} posts: {statuses:?}");
    assert!(statuses[limited].1.is_some(), "Retry-After is set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_rooms_are_warned_then_closed_by_one_sweeper_unless_someone_joins() {
    let stack = Stack::start(
        2,
        &[
            ("ROOM_IDLE_TIMEOUT", "1s"),
            ("ROOM_SWEEP_INTERVAL", "300ms"),
            ("ROOM_CLOSE_WARNING", "2s"),
        ],
    )
    .await;
    let b = stack.web(1);
    let ash = stack.user("ash").await;
    let browser = stack.login_as(stack.web(0), ash).await;
    let mut stream = browser.stream(&b.url("/api/stream"), None).await;
    let kept = browser.create_room(stack.web(0), "Kept").await;
    let forgotten = browser.create_room(stack.web(1), "Forgotten").await;

    // The kept room's warning is answered by someone joining; the other room closes.
    let mut closings: Vec<(String, u64)> = Vec::new();
    let mut kept_until = None;
    within("the forgotten room to close", async {
        loop {
            let m = stream.next_domain().await;
            let d = m.json()["data"].clone();
            let channel = d["channel_id"].as_str().unwrap_or_default().to_owned();
            if m.event == "room.closing" {
                assert_eq!(d["reason"], "idle");
                closings.push((channel.clone(), d["closes_at"].as_u64().unwrap_or(0)));
                if channel == kept && kept_until.is_none() {
                    kept_until = d["closes_at"].as_u64();
                    stack
                        .voice(ash, Some(kept.parse().unwrap()), json!({}))
                        .await;
                }
            }
            if m.event == "room.deleted" && channel == forgotten {
                break;
            }
        }
    })
    .await;
    let count = |id: &str| closings.iter().filter(|(c, _)| c == id).count();
    assert_eq!(
        count(&forgotten),
        1,
        "one warning, from one sweeper: {closings:?}"
    );
    assert_eq!(count(&kept), 1, "{closings:?}");
    // One replica holds the sweeper lease and does all of it; the other never sweeps.
    let said = |i: usize, what: &str| {
        stack
            .web(i)
            .process
            .stderr()
            .iter()
            .any(|l| l.contains(what))
    };
    let sweeper = (0..2)
        .filter(|i| said(*i, "this replica sweeps idle rooms"))
        .collect::<Vec<_>>();
    assert_eq!(sweeper.len(), 1, "exactly one replica took the lease");
    let other = 1 - sweeper[0];
    // (Logged just after the `room.deleted` the stream already showed.)
    wait_for("the sweeper to log the close", || async {
        said(sweeper[0], "idle room closed").then_some(())
    })
    .await;
    assert!(
        !said(other, "idle room will close") && !said(other, "idle room closed"),
        "the other replica did nothing"
    );
    assert!(
        find(&stack.sim.state().await, "channels", &forgotten).is_none(),
        "closed in Discord"
    );
    // Past the kept room's deadline (and a sweep after it), it is still there.
    let deadline = kept_until.expect("the kept room was warned") + 1_000;
    wait_for("the kept room's warning to run out", || async {
        (coven::event::now_ms() > deadline).then_some(())
    })
    .await;
    assert!(
        find(&stack.sim.state().await, "channels", &kept).is_some(),
        "a join called the closing off"
    );
    let html = browser.room_page(b, &kept).await;
    assert!(
        html.contains("<h1>") && !html.contains("data-closes-at"),
        "no closing banner any more"
    );
}
