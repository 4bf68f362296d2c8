//! Trust: Coven shows and allows exactly what Discord would. Real gateway, two real
//! replicas, the sim and a private Redis; people as browsers with cookie jars.

use std::time::Duration;

use fred::prelude::*;
use serde_json::json;
use twilight_model::guild::Permissions;

use crate::harness::rooms::{find, invite_link, invite_path};
use crate::harness::{Browser, Stack, TestSim, Web, form_value, location, metric, wait_for};
use crate::harness::{GUILD, g};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_room_is_shown_only_to_whom_discord_shows_it_and_appears_live_once_granted() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let (cinder, dusk) = (stack.user("cinder").await, stack.user("dusk").await);
    let creator = stack.login_as(a, ash).await;
    let other = stack.login_as(b, bramble).await;
    // Bramble's stream is open before the room exists and stays open throughout.
    let mut watching = other.stream(&b.url("/api/stream"), None).await;

    let room = creator.create_room(a, "Secret draft").await;
    let room_id: u64 = room.parse().unwrap();
    stack.seat(cinder, room_id, json!({})).await;
    wait_for("the creator to see Cinder in the room", || async {
        let html = creator.room_page(a, &room).await;
        html.contains("Cinder").then_some(())
    })
    .await;

    // Not in the list, not as a page, not as a room stream.
    assert!(
        creator
            .page(&a.url(&g("/rooms")))
            .await
            .contains("Secret draft")
    );
    assert!(
        !other
            .page(&b.url(&g("/rooms")))
            .await
            .contains("Secret draft")
    );
    let page = other.get(&b.url(&format!("/g/{GUILD}/rooms/{room}"))).await;
    assert_eq!(
        page.status(),
        404,
        "answered like a room that does not exist"
    );
    let text = page.text().await.unwrap();
    assert!(!text.contains("Secret draft") && !text.contains("Cinder"));
    let res = other.get(&b.url(&format!("/api/stream?room={room}"))).await;
    assert_eq!(res.status(), 404);
    let res = other.get(&b.url("/api/stream?room=123456789")).await;
    assert_eq!(res.status(), 404, "no room at all");
    // The pages' stream takes any room ids (a browser's tabs share it) and says nothing
    // of one the viewer may not see, not even its name.
    let mut pages = other
        .stream(
            &b.url(&format!("/api/stream/html?view={room},123456789")),
            None,
        )
        .await;
    let first = pages.until(|m| m.event == "at").await;
    let told: String = first
        .iter()
        .map(|m| format!("{} {}\n", m.event, m.data))
        .collect();
    assert!(told.contains(&format!("room-{room}")), "{told}");
    assert!(told.contains("you can no longer see it"), "{told}");
    assert!(
        !told.contains("Secret draft") && !told.contains("Cinder"),
        "{told}"
    );
    let viewers: Vec<String> = stack
        .redis_client()
        .await
        .zrange(
            format!("coven:{{{}}}:viewers:{room}", stack.sim.guild_id()),
            0,
            -1,
            None,
            false,
            None,
            false,
        )
        .await
        .unwrap();
    assert!(viewers.is_empty(), "no viewer recorded: {viewers:?}");
    drop(pages);

    // Nothing of the room reached Bramble's stream: Dusk joining the lobby (which
    // everyone sees) comes after everything above, and nothing before it names the room.
    stack.voice(dusk, Some(stack.lobby), json!({})).await;
    let dusk_id = dusk.to_string();
    let seen = watching
        .until(|m| m.event == "voice.joined" && m.json()["data"]["user"]["id"] == dusk_id.as_str())
        .await;
    for m in &seen {
        assert!(
            !m.data.contains(&room),
            "{m:?} reached someone who may not see the room"
        );
        assert!(
            !matches!(
                m.event.as_str(),
                "guild.updated" | "channel.access" | "member.updated"
            ),
            "Coven's own bookkeeping stays on the server: {m:?}"
        );
    }

    // Bramble follows an invite (a member: the role is granted at once) and the room
    // appears on the stream already open, with the people in it, without reconnecting.
    let invite = creator.invite_path(a, &room).await;
    let followed = other.get(&b.url(&invite)).await;
    assert_eq!(
        (followed.status().as_u16(), location(&followed)),
        (303, format!("/g/{GUILD}/rooms/{room}"))
    );
    let shown = watching
        .until(|m| m.event == "room.created" && m.json()["data"]["channel_id"] == room.as_str())
        .await;
    let created = shown.last().unwrap();
    assert_eq!(created.json()["view"], true, "{created:?}");
    assert_eq!(created.id, None, "a view event takes no place in the log");
    let cinder_id = cinder.to_string();
    watching
        .until(|m| {
            m.event == "voice.joined"
                && m.json()["data"]["channel_id"] == room.as_str()
                && m.json()["data"]["user"]["id"] == cinder_id.as_str()
        })
        .await;
    // From now on the room's events flow to Bramble.
    stack
        .voice(cinder, Some(room_id), json!({"self_mute": true}))
        .await;
    watching
        .until(|m| m.event == "voice.updated" && m.json()["data"]["channel_id"] == room.as_str())
        .await;
    assert!(other.room_page(b, &room).await.contains("Secret draft"));
    assert!(
        other
            .page(&b.url(&g("/rooms")))
            .await
            .contains("Secret draft")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_ends_that_logins_streams_on_every_replica_within_seconds() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let laptop = stack.login_as(a, ash).await;
    let phone = stack.login_as(b, ash).await;
    let mut on_a = laptop.stream(&a.url("/api/stream"), None).await;
    let mut on_b = laptop.stream(&b.url("/api/stream"), None).await;
    let mut phone_stream = phone.stream(&b.url("/api/stream"), None).await;

    // The session cookie as the laptop sent it: replayed after the logout below, it must
    // not open a stream even on the replica that has the session in its cache.
    let cookie = {
        use reqwest::cookie::CookieStore;
        laptop
            .jar
            .cookies(&b.url("/").parse().unwrap())
            .expect("the session cookie")
    };
    let out = laptop.log_out(a).await;
    assert_eq!(out.status(), 303);
    for stream in [&mut on_a, &mut on_b] {
        assert!(
            stream.ends_within(Duration::from_secs(5)).await,
            "the stream was still open 5 s after logging out"
        );
    }
    let res = laptop.get(&b.url("/api/stream")).await;
    assert_eq!(res.status(), 401, "the session is gone everywhere");
    for route in ["/api/stream", "/api/stream/html"] {
        let replayed = reqwest::Client::new()
            .get(b.url(route))
            .header(reqwest::header::COOKIE, cookie.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            replayed.status(),
            401,
            "{route}: the old cookie opens nothing, cached session or not"
        );
    }

    // The same person's other login keeps its stream.
    let cinder = stack.user("cinder").await;
    stack.voice(cinder, Some(stack.lobby), json!({})).await;
    let cinder_id = cinder.to_string();
    phone_stream
        .until(|m| {
            m.event == "voice.joined" && m.json()["data"]["user"]["id"] == cinder_id.as_str()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_link_revokes_older_links_of_the_room() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let creator = stack.login_as(a, ash).await;
    let room = creator.create_room(a, "Cube night").await;
    let old = creator.invite_path(a, &room).await;
    let fresh = creator.new_link(a, &room).await;
    assert_eq!(fresh.status(), 200);
    let new = invite_path(fresh.text().await.unwrap().trim());
    assert_ne!(old, new);
    // The page now offers a link of the new generation too.
    let shown = creator.invite_path(b, &room).await;

    let guest = stack.login_as(b, stack.user("bramble").await).await;
    let res = guest.get(&b.url(&old)).await;
    assert_eq!(res.status(), 410);
    assert!(res.text().await.unwrap().contains("newer"));
    let res = guest.get(&b.url(&shown)).await;
    assert_eq!(
        (res.status().as_u16(), location(&res)),
        (303, format!("/g/{GUILD}/rooms/{room}"))
    );
    let res = guest.get(&a.url(&new)).await;
    assert_eq!(res.status(), 303);

    // Someone the link let in may copy it, never revoke it: a guest's "New link" would cut
    // off the link its host has shared.
    let page = guest.room_page(b, &room).await;
    // The same generation (the token's times may be a second apart).
    assert_eq!(
        invite_claims(&invite_path(&invite_link(&page)))["generation"],
        invite_claims(&shown)["generation"],
        "the guest sees the current link"
    );
    assert!(!page.contains("New link"), "and no button to replace it");
    let token = guest.csrf(b).await;
    let refused = guest
        .post(
            b,
            &format!("/g/{GUILD}/rooms/{room}/invite"),
            &[("csrf_token", &token)],
        )
        .await;
    assert_eq!(refused.status(), 403);
    let res = guest.get(&b.url(&shown)).await;
    assert_eq!(res.status(), 303, "the host's link still works");

    // Someone not in the server cannot confirm an old link either: the confirm post
    // checks the generation again, and nobody is added.
    let juniper = stack.user("juniper").await;
    let outsider = Browser::new();
    let back = outsider.login_to(b, &stack.sim, juniper, &new).await;
    assert_eq!(back.status(), 303);
    let asked = outsider.page(&b.url(&new)).await;
    let token = form_value(&asked, "csrf_token").expect("the confirm form");
    let refused = outsider.post(b, &old, &[("csrf_token", &token)]).await;
    assert_eq!(refused.status(), 410);
    let state = stack.sim.state().await;
    assert!(
        find(&state, "members", &juniper.to_string()).is_none(),
        "not added by a revoked link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_me_in_only_where_discord_would_let_the_user_go() {
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let creator = stack.login_as(a, ash).await;
    let room = creator.create_room(a, "Locked").await;
    let other = stack.login_as(a, bramble).await;
    stack.voice(bramble, Some(stack.lobby), json!({})).await;
    let res = other.move_in(a, &room).await;
    assert_eq!(res.status(), 404, "a room Discord hides from Bramble");
    let state = stack.sim.state().await;
    let voice = find(&state, "voice_states", &bramble.to_string()).unwrap();
    assert_eq!(
        voice["channel_id"],
        stack.lobby.to_string().as_str(),
        "not moved"
    );
}

/// Seeing a voice channel and joining it.
const SEE_AND_JOIN: Permissions = Permissions::VIEW_CHANNEL.union(Permissions::CONNECT);

/// The overwrite hiding a channel from @everyone (the guild's own role).
fn hidden_from_everyone(guild: u64) -> serde_json::Value {
    json!({"id": guild.to_string(), "type": 0, "allow": "0",
           "deny": SEE_AND_JOIN.bits().to_string()})
}

/// A "Staff" role and a "Staff only" voice channel: hidden from @everyone, open to Staff
/// and to the bot (so Discord shows it to the bot as it is). Answers (role, channel).
async fn staff_only(sim: &TestSim) -> (u64, u64) {
    let bot = sim.id_of("bot_id").await;
    let staff = sim.create_role("Staff", 0).await;
    let allow = |id: u64, kind: u8| json!({"id": id.to_string(), "type": kind, "allow": SEE_AND_JOIN.bits().to_string(), "deny": "0"});
    let room = sim
        .create_channel(json!({"name": "Staff only", "type": 2,
            "permission_overwrites": [hidden_from_everyone(sim.guild_id()), allow(staff, 0), allow(bot, 1)]}))
        .await;
    (staff, room)
}

/// The person Discord shows a room to, as `/rooms` lists it for them.
async fn lists(browser: &Browser, web: &Web, name: &str) -> bool {
    browser.page(&web.url(&g("/rooms"))).await.contains(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_hidden_by_overwrites_follow_discord_and_those_hidden_from_the_bot_never_show() {
    let stack = Stack::start(2, &[("MEMBER_RECHECK", "2s")]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let sim = &stack.sim;
    let guild = sim.guild_id();
    let (staff, staff_room) = staff_only(sim).await;
    // Mods only: hidden from the bot too, so Discord sends it obfuscated.
    let mods = sim
        .create_channel(json!({"name": "Mods only", "type": 2,
            "permission_overwrites": [hidden_from_everyone(guild)]}))
        .await;
    let (ash, bramble, cinder) = (
        stack.user("ash").await,
        stack.user("bramble").await,
        stack.user("cinder").await,
    );
    sim.grant_role(cinder, staff).await;
    stack.voice(cinder, Some(staff_room), json!({})).await;
    // The owner sees every channel Discord lets the bot see, and is in the hidden one.
    stack.voice(ash, Some(mods), json!({})).await;
    let owner = stack.login_as(a, ash).await;
    wait_for("the owner to see Cinder in Staff only", || async {
        let html = owner.room_page(a, staff_room).await;
        html.contains("Cinder").then_some(())
    })
    .await;
    let list = owner.page(&a.url(&g("/rooms"))).await;
    assert!(
        !list.contains("Mods only") && !list.contains("___hidden___"),
        "a channel hidden from the bot is shown to nobody"
    );
    assert_eq!(
        owner
            .get(&a.url(&format!("/g/{GUILD}/rooms/{mods}")))
            .await
            .status(),
        404
    );
    let voice: Option<String> = stack
        .redis_client()
        .await
        .hget(format!("coven:{{{guild}}}:voice"), ash.to_string())
        .await
        .unwrap();
    assert_eq!(
        voice, None,
        "someone in a hidden channel is, to Coven, not in voice"
    );

    // Bramble, without the Staff role: nothing of Staff only anywhere.
    let member = stack.login_as(b, bramble).await;
    let mut watching = member.stream(&b.url("/api/stream"), None).await;
    assert!(!lists(&member, b, "Staff only").await);
    assert_eq!(
        member
            .get(&b.url(&format!("/g/{GUILD}/rooms/{staff_room}")))
            .await
            .status(),
        404
    );
    assert_eq!(
        member
            .get(&b.url(&format!("/api/stream?room={staff_room}")))
            .await
            .status(),
        404
    );
    stack
        .voice(cinder, Some(staff_room), json!({"self_mute": true}))
        .await;
    let dusk = stack.user("dusk").await;
    stack.voice(dusk, Some(stack.lobby), json!({})).await;
    let dusk_id = dusk.to_string();
    let staff_id = staff_room.to_string();
    let seen = watching
        .until(|m| m.event == "voice.joined" && m.json()["data"]["user"]["id"] == dusk_id.as_str())
        .await;
    assert!(seen.iter().all(|m| !m.data.contains(&staff_id)), "{seen:?}");

    // An admin gives Bramble the Staff role in Discord (Coven is not told: no privileged
    // intent); the recheck finds it and the room appears on the open stream.
    sim.grant_role(bramble, staff).await;
    let shown = within_secs(
        10,
        "Staff only to appear for Bramble",
        watching.until(|m| {
            m.event == "room.created" && m.json()["data"]["channel_id"] == staff_id.as_str()
        }),
    )
    .await;
    assert_eq!(shown.last().unwrap().json()["view"], true);
    let cinder_id = cinder.to_string();
    watching
        .until(|m| {
            m.event == "voice.joined" && m.json()["data"]["user"]["id"] == cinder_id.as_str()
        })
        .await;
    assert!(lists(&member, b, "Staff only").await);

    // And taken away again: the room goes, live; a room page's stream is told and ends
    // (Bramble no longer counts as viewing it).
    let mut room_page = member
        .stream(&b.url(&format!("/api/stream?room={staff_room}")), None)
        .await;
    sim.revoke_role(bramble, staff).await;
    within_secs(
        10,
        "the room page's stream to hear the room is gone and end",
        async {
            room_page.until(|m| m.event == "room.deleted").await;
            while room_page.next().await.is_some() {}
        },
    )
    .await;
    within_secs(
        10,
        "Staff only to go away for Bramble",
        watching.until(|m| {
            m.event == "room.deleted" && m.json()["data"]["channel_id"] == staff_id.as_str()
        }),
    )
    .await;
    assert!(!lists(&member, b, "Staff only").await);
}

async fn within_secs<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {secs} s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_removed_from_the_server_loses_their_stream_within_a_minute() {
    // The default MEMBER_RECHECK: this is the promise people rely on.
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let bramble = stack.user("bramble").await;
    let member = stack.login_as(a, bramble).await;
    let mut stream = member.stream(&a.url("/api/stream"), None).await;
    stack.sim.remove_member(bramble).await;
    let removed = std::time::Instant::now();
    assert!(
        stream.ends_within(Duration::from_secs(60)).await,
        "the stream of a removed member was still open after a minute"
    );
    eprintln!("stream ended {:?} after the removal", removed.elapsed());
    let res = member.get(&a.url(&g("/rooms"))).await;
    // Like a community that does not exist: nothing of it shows.
    assert_eq!(res.status(), 404, "no longer a member");
    assert_eq!(member.get(&a.url("/api/stream")).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_me_in_needs_connect_for_the_user_and_then_discord_records_no_move() {
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let creator = stack.login_as(a, ash).await;
    let room = creator.create_room(a, "Look, don't touch").await;
    let room_id: u64 = room.parse().unwrap();
    // Bramble may see the room but not connect to it.
    stack
        .sim
        .set_overwrite(
            room_id,
            bramble,
            1,
            Permissions::VIEW_CHANNEL.bits(),
            Permissions::CONNECT.bits(),
        )
        .await;
    let other = stack.login_as(a, bramble).await;
    stack.voice(bramble, Some(stack.lobby), json!({})).await;
    wait_for("Bramble to see the room", || async {
        (other
            .get(&a.url(&format!("/g/{GUILD}/rooms/{room}")))
            .await
            .status()
            == 200)
            .then_some(())
    })
    .await;
    let html = other.room_page(a, &room).await;
    assert!(
        !html.contains("Move me in"),
        "not offered where Discord would not let Bramble in"
    );
    let res = other.move_in(a, &room).await;
    assert_eq!(res.status(), 403);
    assert!(res.text().await.unwrap().contains("does not let you join"));
    assert!(
        stack.sim.moves().await.is_empty(),
        "Discord was asked for no move"
    );

    // The creator (who holds the role) is offered the move and moved in from the lobby.
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    wait_for("the creator to be offered Move me in", || async {
        let html = creator.room_page(a, &room).await;
        (html.contains("Move me in") && html.contains("data-whereabouts=\"elsewhere\""))
            .then_some(())
    })
    .await;
    let res = creator.move_in(a, &room).await;
    assert_eq!(res.status(), 303);
    assert_eq!(stack.sim.moves().await, [(ash, room_id)]);
}

/// A stream that reconnects is replayed from the replica's memory. What the replayed
/// events changed about its viewer (a role taken, then given back) is already in what the
/// stream was opened with and is not done again: the room page's stream neither ends
/// (which would repeat on every reconnect) nor tells the page the room is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumed_from_before_a_role_was_taken_and_given_back_goes_on() {
    let stack = Stack::start(1, &[("MEMBER_RECHECK", "1s")]).await;
    let a = stack.web(0);
    let sim = &stack.sim;
    let (staff, room) = staff_only(sim).await;
    let (bramble, cinder) = (stack.user("bramble").await, stack.user("cinder").await);
    sim.grant_role(bramble, staff).await;
    sim.grant_role(cinder, staff).await;
    let member = stack.login_as(a, bramble).await;
    let page_url = a.url(&format!("/api/stream?room={room}"));
    let html_url = a.url(&format!("/api/stream/html?view={room}"));
    wait_for("the room to be Bramble's to see", || async {
        (member
            .get(&a.url(&format!("/g/{GUILD}/rooms/{room}")))
            .await
            .status()
            == 200)
            .then_some(())
    })
    .await;
    // An open page keeps the replica rendering the pages' fragments.
    let _pages = member.stream(&html_url, None).await;
    let mut page = member.stream(&page_url, None).await;
    let cinder_id = cinder.to_string();
    stack.voice(cinder, Some(room), json!({})).await;
    let mark = page
        .until(|m| {
            m.event == "voice.joined" && m.json()["data"]["user"]["id"] == cinder_id.as_str()
        })
        .await
        .pop()
        .and_then(|m| m.id)
        .expect("an id");

    // Taken away (the page's stream is told and ends), then given back.
    sim.revoke_role(bramble, staff).await;
    within_secs(10, "the room page's stream to end", async {
        while page.next().await.is_some() {}
    })
    .await;
    sim.grant_role(bramble, staff).await;
    wait_for("the room to be Bramble's to see again", || async {
        (member
            .get(&a.url(&format!("/g/{GUILD}/rooms/{room}")))
            .await
            .status()
            == 200)
            .then_some(())
    })
    .await;

    // Both streams resume from before all that, and go on; the room's stream from the
    // replica's memory, where the events it replays carry their controls.
    let from_memory = metric(&a.metrics, "coven_web_replays_from_memory_total").await;
    let mut resumed = member.stream(&page_url, Some(&mark)).await;
    wait_for("the room's stream to be replayed from memory", || async {
        (metric(&a.metrics, "coven_web_replays_from_memory_total").await > from_memory)
            .then_some(())
    })
    .await;
    let mut resumed_html = member.stream(&html_url, Some(&mark)).await;
    stack
        .voice(cinder, Some(room), json!({"self_mute": true}))
        .await;
    let seen = within_secs(
        10,
        "the voice change on the resumed room stream",
        resumed.until(|m| {
            m.event == "voice.updated" && m.json()["data"]["user_id"] == cinder_id.as_str()
        }),
    )
    .await;
    assert!(
        seen.iter().all(|m| m.event != "room.deleted"),
        "the room was not taken away again: {seen:?}"
    );
    let muted = format!("room-people-{room}");
    let seen = within_secs(
        10,
        "the voice change on the resumed pages' stream",
        resumed_html.until(|m| m.data.contains(&muted) && m.data.contains("flag mute")),
    )
    .await;
    assert!(
        seen.iter().all(|m| !m.data.contains("no longer see")),
        "the page was not told the room is gone: {seen:?}"
    );
}

/// What an invite path's token says (its middle, base64url JSON).
fn invite_claims(path: &str) -> serde_json::Value {
    use base64::Engine;
    let token = path.trim_start_matches("/invite/");
    let payload = token.split('.').nth(1).expect("a JWT");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&json).expect("JSON claims")
}
