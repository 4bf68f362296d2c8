//! Trust: Coven shows and allows exactly what Discord would. Real gateway, two real
//! replicas, the sim and a private Redis; people as browsers with cookie jars.

use std::time::Duration;

use fred::prelude::*;
use serde_json::json;

use crate::harness::{Browser, Stack, location, wait_for};
use crate::rooms::{create_room, invite_link};

/// A path on the site from a full invite link.
fn path_of(link: &str) -> String {
    let at = link.find("/invite/").expect("an invite link");
    link[at..].to_owned()
}

async fn redis(stack: &Stack) -> Client {
    let client = Client::new(
        Config::from_url(&stack.redis.url()).unwrap(),
        None,
        None,
        None,
    );
    client.init().await.unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_room_is_shown_only_to_whom_discord_shows_it_and_appears_live_once_granted() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let (cinder, dusk) = (stack.user("cinder").await, stack.user("dusk").await);
    let creator = Browser::new();
    creator.login(a, &stack.sim, ash).await;
    let other = Browser::new();
    other.login(b, &stack.sim, bramble).await;
    // Bramble's stream is open before the room exists and stays open throughout.
    let mut watching = other.stream(&b.url("/api/stream"), None).await;

    let room = create_room(&stack, 0, &creator, "Secret draft").await;
    let room_id: u64 = room.parse().unwrap();
    stack.seat(cinder, room_id, json!({})).await;
    wait_for("the creator to see Cinder in the room", || async {
        let html = creator.page(&a.url(&format!("/rooms/{room}"))).await;
        html.contains("Cinder").then_some(())
    })
    .await;

    // Not in the list, not as a page, not as a room stream.
    assert!(
        creator
            .page(&a.url("/rooms"))
            .await
            .contains("Secret draft")
    );
    assert!(!other.page(&b.url("/rooms")).await.contains("Secret draft"));
    let page = other.get(&b.url(&format!("/rooms/{room}"))).await;
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
    let viewers: Vec<String> = redis(&stack)
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
    let link = invite_link(&creator.page(&a.url(&format!("/rooms/{room}"))).await);
    let followed = other.get(&b.url(&path_of(&link))).await;
    assert_eq!(
        (followed.status().as_u16(), location(&followed)),
        (303, format!("/rooms/{room}"))
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
    assert!(
        other
            .page(&b.url(&format!("/rooms/{room}")))
            .await
            .contains("Secret draft")
    );
    assert!(other.page(&b.url("/rooms")).await.contains("Secret draft"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_ends_that_logins_streams_on_every_replica_within_seconds() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let laptop = Browser::new();
    laptop.login(a, &stack.sim, ash).await;
    let phone = Browser::new();
    phone.login(b, &stack.sim, ash).await;
    let mut on_a = laptop.stream(&a.url("/api/stream"), None).await;
    let mut on_b = laptop.stream(&b.url("/api/stream"), None).await;
    let mut phone_stream = phone.stream(&b.url("/api/stream"), None).await;

    let token = laptop.csrf(a).await;
    let out = laptop
        .post(a, "/auth/logout", &[("csrf_token", &token)])
        .await;
    assert_eq!(out.status(), 303);
    for stream in [&mut on_a, &mut on_b] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match stream.next_within(left).await {
                Ok(None) => break,
                Ok(Some(_)) => continue,
                Err(()) => panic!("the stream was still open 5 s after logging out"),
            }
        }
    }
    let res = laptop.get(&b.url("/api/stream")).await;
    assert_eq!(res.status(), 401, "the session is gone everywhere");

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
    let creator = Browser::new();
    creator.login(a, &stack.sim, ash).await;
    let room = create_room(&stack, 0, &creator, "Cube night").await;
    let old = path_of(&invite_link(
        &creator.page(&a.url(&format!("/rooms/{room}"))).await,
    ));
    let token = creator.csrf(a).await;
    let fresh = creator
        .http
        .post(a.url(&format!("/rooms/{room}/invite")))
        .header("hx-request", "true")
        .header("x-csrf-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200);
    let new = path_of(fresh.text().await.unwrap().trim());
    assert_ne!(old, new);
    // The page now offers a link of the new generation too.
    let shown = path_of(&invite_link(
        &creator.page(&b.url(&format!("/rooms/{room}"))).await,
    ));

    let guest = Browser::new();
    guest
        .login(b, &stack.sim, stack.user("bramble").await)
        .await;
    let res = guest.get(&b.url(&old)).await;
    assert_eq!(res.status(), 410);
    assert!(res.text().await.unwrap().contains("newer"));
    let res = guest.get(&b.url(&shown)).await;
    assert_eq!(
        (res.status().as_u16(), location(&res)),
        (303, format!("/rooms/{room}"))
    );
    let res = guest.get(&a.url(&new)).await;
    assert_eq!(res.status(), 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_me_in_only_where_discord_would_let_the_user_go() {
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let creator = Browser::new();
    creator.login(a, &stack.sim, ash).await;
    let room = create_room(&stack, 0, &creator, "Locked").await;
    let other = Browser::new();
    other.login(a, &stack.sim, bramble).await;
    stack.voice(bramble, Some(stack.lobby), json!({})).await;
    let token = other.csrf(a).await;
    let res = other
        .post(a, &format!("/rooms/{room}/move"), &[("csrf_token", &token)])
        .await;
    assert_eq!(res.status(), 404, "a room Discord hides from Bramble");
    let state = stack.sim.state().await;
    let voice = crate::rooms::find(&state, "voice_states", &bramble.to_string()).unwrap();
    assert_eq!(
        voice["channel_id"],
        stack.lobby.to_string().as_str(),
        "not moved"
    );
}
