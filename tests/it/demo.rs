//! `coven` with no command: the demo a newcomer runs first. One process, nothing else
//! installed: it must log people in through the simulated Discord, make rooms, and fill
//! them with simulated players' voice activity.

use serde_json::Value;

use crate::harness::{Browser, CovenProcess, Sse, form_value, location};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_logs_in_through_the_sim_and_players_fill_a_new_room() {
    let mut demo = CovenProcess::spawn(
        &["--bind", "127.0.0.1:0", "--sim-bind", "127.0.0.1:0"],
        &[("DEMO_PLAYER_INTERVAL", "100ms")],
    );
    let open = demo.wait_for_stdout("Open http");
    let web = open
        .rsplit(' ')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let sim_line = demo.wait_for_stdout("Simulated Discord: ");
    let sim_state = sim_line.rsplit(' ').next().unwrap().to_owned();
    assert!(sim_state.ends_with("/_sim/state"), "{sim_line}");
    let state: Value = reqwest::get(&sim_state)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ash = state["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "ash")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

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

    let rooms = browser
        .get(&format!("{web}/rooms"))
        .await
        .text()
        .await
        .unwrap();
    let token = form_value(&rooms, "csrf_token").unwrap();
    let made = browser
        .http
        .post(format!("{web}/rooms"))
        .form(&[("name", "Demo night"), ("csrf_token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 303);
    let room = location(&made).trim_start_matches("/rooms/").to_owned();

    // Simulated players join the new room and do things in it.
    let res = browser
        .http
        .get(format!("{web}/api/stream?room={room}"))
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
    let page = browser
        .get(&format!("{web}/rooms/{room}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("class=\"member\""),
        "players show on the page"
    );

    drop(stream);
    demo.signal("TERM");
    assert_eq!(demo.wait_exit(), Some(0), "stops cleanly on SIGTERM");
}
