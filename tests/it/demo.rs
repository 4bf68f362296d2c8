//! `coven` with no command: the demo a newcomer runs first. One process, nothing else
//! installed: it must log people in through the simulated Discord, make rooms, and fill
//! them with simulated players' voice activity.

use serde_json::Value;

use crate::harness::GUILD;
use crate::harness::demo::Demo;
use crate::harness::rooms::invite_link;
use crate::harness::{Browser, Message, Sse, form_value, location};

/// The id of the sim's user `name` in `state`.
fn user_id(state: &Value, name: &str) -> String {
    state["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == name)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Makes a room named `name` as `browser`'s logged-in user; its id.
async fn make_room(browser: &Browser, web: &str, name: &str) -> String {
    let rooms = browser
        .get(&format!("{web}/g/{GUILD}/rooms"))
        .await
        .text()
        .await
        .unwrap();
    let token = form_value(&rooms, "csrf_token").unwrap();
    let made = browser
        .http
        .post(format!("{web}/g/{GUILD}/rooms"))
        .form(&[("name", name), ("csrf_token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 303);
    location(&made)
        .trim_start_matches(&format!("/g/{GUILD}/rooms/"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_logs_in_through_the_sim_and_players_fill_a_new_room() {
    let mut demo = Demo::start(&[], &[("DEMO_PLAYER_INTERVAL", "100ms")]);
    let web = demo.web.clone();
    let state = demo.state().await;
    let ash = user_id(&state, "ash");

    // The landing page, then the simulated Discord's login page offering players.
    let browser = Browser::new();
    let landing = browser.get(&format!("{web}/")).await;
    assert_eq!(landing.status(), 200);
    assert!(landing.text().await.unwrap().contains("/auth/login"));
    let start = browser.get(&format!("{web}/auth/login")).await;
    let authorize = location(&start);
    let picker = browser.get(&authorize).await;
    assert_eq!(picker.status(), 200);
    assert!(
        picker.text().await.unwrap().contains("Ash"),
        "the login page offers players"
    );
    let picked = browser.get(&format!("{authorize}&sim_user={ash}")).await;
    let done = browser.get(&location(&picked)).await;
    assert_eq!(
        (done.status().as_u16(), location(&done)),
        (303, "/rooms".to_owned())
    );

    let room = make_room(&browser, &web, "Demo night").await;
    let created = std::time::Instant::now();

    // Simulated players join the new room and do things in it.
    let res = browser
        .http
        .get(format!("{web}/api/stream?guild={GUILD}&room={room}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the room's stream opens for its creator");
    let mut stream = Sse::new(res);
    let mut seen = Vec::new();
    let events = stream
        .until(|m| {
            seen.push(m.event.clone());
            seen.iter().filter(|e| *e == "voice.joined").count() >= 2
                && seen.iter().any(|e| e == "voice.updated")
        })
        .await;
    assert!(!events.is_empty());
    // The README's walk: the friend gets the link, logs in and gets a seat, however
    // busy the players are, within 15 s of the room's creation.
    let link = invite_link(
        &browser
            .get(&format!("{web}/g/{GUILD}/rooms/{room}"))
            .await
            .text()
            .await
            .unwrap(),
    );
    let friend_id = user_id(&state, "bramble");
    let friend = Browser::new();
    let path = &link[link.find("/invite/").unwrap()..];
    let start = friend.get(&format!("{web}{path}")).await;
    let login = friend.get(&format!("{web}{}", location(&start))).await;
    let picked = friend
        .get(&format!("{}&sim_user={friend_id}", location(&login)))
        .await;
    let back = friend.get(&location(&picked)).await;
    let followed = friend.get(&format!("{web}{}", location(&back))).await;
    assert_eq!(
        location(&followed),
        format!("/g/{GUILD}/rooms/{room}"),
        "the invite lets the friend in"
    );
    let sim = demo.sim.clone();
    let joined = reqwest::Client::new()
        .post(format!("{sim}/_sim/voice"))
        .json(&serde_json::json!({"user_id": friend_id, "channel_id": room}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        joined.status(),
        200,
        "a seat was free for the friend: {}",
        joined.text().await.unwrap()
    );
    let took = created.elapsed();
    assert!(
        took < std::time::Duration::from_secs(15),
        "the invite walk took {took:?}"
    );
    // Players keep a seat for the creator (who never joined voice here) and leave the
    // friend's alone, however long they play: follow the room through many more moves.
    let mut inside = std::collections::BTreeSet::new();
    let mut most = 0;
    let mut moves = 0;
    for m in &events {
        track(m, &mut inside);
    }
    while moves < 40 {
        let m = stream.next().await.expect("the stream goes on");
        if m.event.starts_with("voice.") {
            moves += 1;
        }
        track(&m, &mut inside);
        most = most.max(inside.len());
    }
    assert!(
        most <= 3,
        "players took the creator's seat: {most} of 4 seats taken, the creator not among them"
    );
    assert!(
        inside.contains(&friend_id),
        "no player took the friend's seat"
    );
    let page = browser
        .get(&format!("{web}/g/{GUILD}/rooms/{room}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("class=\"member\""),
        "players show on the page"
    );

    drop(stream);
    demo.process.signal("TERM");
    assert_eq!(
        demo.process.wait_exit(),
        Some(0),
        "stops cleanly on SIGTERM"
    );
}

/// Who is in the room, from its stream's voice events.
fn track(m: &Message, inside: &mut std::collections::BTreeSet<String>) {
    let data = m.json()["data"].clone();
    match m.event.as_str() {
        "voice.joined" => {
            inside.insert(data["user"]["id"].as_str().unwrap_or_default().to_owned());
        }
        "voice.left" => {
            inside.remove(data["user_id"].as_str().unwrap_or_default());
        }
        _ => {}
    }
}

/// In the demo, a room's "Open in Discord" opens the simulator's page of that voice
/// channel, where the person who logged in joins voice: the room page then has them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_in_discord_leads_to_the_sims_channel_page_where_you_join_voice() {
    let mut demo = Demo::start(&["--quiet"], &[]);
    let (web, sim) = (demo.web.clone(), demo.sim.clone());
    let state = demo.state().await;
    let guild = state["guild_id"].as_str().unwrap().to_owned();
    let (ash, bramble) = (user_id(&state, "ash"), user_id(&state, "bramble"));

    // Ash logs in through the sim (which remembers who the browser is) and makes a room.
    let browser = Browser::new();
    let start = browser.get(&format!("{web}/auth/login")).await;
    let picked = browser
        .get(&format!("{}&sim_user={ash}", location(&start)))
        .await;
    let done = browser.get(&location(&picked)).await;
    assert_eq!(location(&done), "/rooms");
    let room = make_room(&browser, &web, "Demo night").await;
    let page = browser
        .get(&format!("{web}/g/{GUILD}/rooms/{room}"))
        .await
        .text()
        .await
        .unwrap();
    let channel_page = format!("{sim}/channels/{guild}/{room}");
    assert!(
        page.contains(&format!("href=\"{channel_page}\"")),
        "Open in Discord goes to the sim's page of the channel: {page}"
    );

    // The sim's page: the channel, nobody in it yet, Ash chosen as "you".
    let res = browser.get(&channel_page).await;
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(html.contains("Demo night"), "{html}");
    assert!(html.contains("Nobody is in this voice channel"), "{html}");
    assert!(
        html.contains(&format!("<option value=\"{ash}\" selected>")),
        "the browser's own user is preselected: {html}"
    );

    // The page's form: who, and join or leave.
    let press = |user: &str, action: &str| {
        browser
            .http
            .post(&channel_page)
            .form(&[("user_id", user), ("action", action)])
            .send()
    };
    // Someone without the room's role is refused as Discord refuses them.
    let refused = press(&bramble, "join").await.unwrap();
    assert_eq!(refused.status(), 403);
    let html = refused.text().await.unwrap();
    assert!(html.contains("Discord refused"), "{html}");

    // Ash joins voice there; the room page's stream says so, and the page has them in.
    let res = browser
        .http
        .get(format!("{web}/api/stream?guild={GUILD}&room={room}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut stream = Sse::new(res);
    let joined = press(&ash, "join").await.unwrap();
    assert_eq!(joined.status(), 303, "{}", joined.text().await.unwrap());
    assert_eq!(location(&joined), format!("/channels/{guild}/{room}"));
    let events = stream
        .until(|m| m.event == "voice.joined" && m.json()["data"]["user"]["id"] == ash.as_str())
        .await;
    assert!(!events.is_empty());
    let html = browser.get(&channel_page).await.text().await.unwrap();
    assert!(!html.contains("Nobody is in this voice channel"), "{html}");
    assert!(html.contains("Ash"), "{html}");

    // Disconnect, from the same page.
    let left = press(&ash, "leave").await.unwrap();
    assert_eq!(left.status(), 303);
    stream
        .until(|m| m.event == "voice.left" && m.json()["data"]["user_id"] == ash.as_str())
        .await;
    drop(stream);
    demo.process.signal("TERM");
    assert_eq!(demo.process.wait_exit(), Some(0));
}
