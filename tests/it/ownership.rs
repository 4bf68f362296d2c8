//! Ownership kept in Discord: a Redis without persistence restarts empty, and the rooms
//! Coven made come back with their creator and role (read from their overwrites by the
//! gateway), so they can still be closed, shared and swept; links from before the loss
//! are retired. Real gateway, two real replicas, the sim and a private Redis.

use fred::prelude::*;
use serde_json::{Value, json};

use crate::harness::GUILD;
use crate::harness::rooms::{find, invite_link, invite_path};
use crate::harness::{Stack, location, wait_for};

/// The room records in `P:{G}:rooms`, by channel id.
async fn stored_rooms(stack: &Stack) -> std::collections::HashMap<String, Value> {
    let client = Client::new(
        Config::from_url(&stack.redis.url()).unwrap(),
        None,
        None,
        None,
    );
    let Ok(()) = client.init().await.map(|_| ()) else {
        return Default::default();
    };
    let key = format!("coven:{{{}}}:rooms", stack.sim.guild_id());
    let rooms: std::collections::HashMap<String, String> =
        client.hgetall(key).await.unwrap_or_default();
    let _ = client.quit().await;
    rooms
        .into_iter()
        .map(|(id, json)| (id, serde_json::from_str(&json).unwrap_or(Value::Null)))
        .collect()
}

fn id(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_loses_everything_rooms_keep_their_creator_role_and_sweeper() {
    let mut stack = Stack::start(
        2,
        &[
            ("ROOM_IDLE_TIMEOUT", "3s"),
            ("ROOM_SWEEP_INTERVAL", "300ms"),
            ("ROOM_CLOSE_WARNING", "1s"),
        ],
    )
    .await;
    let a = stack.web(0);
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let creator = stack.login_as(a, ash).await;
    // Both rooms are kept busy (someone in voice) so the sweeper leaves them alone
    // until the test says otherwise.
    let table = creator.create_room(a, "Cube night").await;
    stack
        .voice(ash, Some(table.parse().unwrap()), json!({}))
        .await;
    let idle = creator.create_room(stack.web(1), "Draft").await;
    stack.seat(bramble, idle.parse().unwrap(), json!({})).await;
    let table_role = stack.room_role(table.parse().unwrap()).await.to_string();
    let idle_role = stack.room_role(idle.parse().unwrap()).await.to_string();
    let old = creator.invite_path(a, &table).await;
    let before = stored_rooms(&stack).await;
    assert_eq!(id(&before[&table]["creator_id"]), ash.to_string());
    assert!(before[&table].get("invite_gen").is_none(), "generation 0");

    // Redis dies and comes back empty: records, log, leases, sessions are gone.
    tokio::task::block_in_place(|| stack.redis.restart());

    let rebuilt = wait_for(
        "the gateway to rebuild both rooms with their owners",
        || async {
            let rooms = stored_rooms(&stack).await;
            let owned = |room: &str, role: &str| {
                rooms.get(room).is_some_and(|r| {
                    id(&r["creator_id"]) == ash.to_string()
                        && id(&r["role_id"]) == role
                        && r["invite_gen"].as_u64().unwrap_or(0) > 0
                })
            };
            (owned(&table, &table_role) && owned(&idle, &idle_role)).then_some(rooms)
        },
    )
    .await;
    let loss = coven::event::now_ms() / 1000;
    let generation = rebuilt[&table]["invite_gen"].as_u64().unwrap_or(0);
    assert!(
        generation + 60 > loss && generation <= loss,
        "the rebuilt generation is the unix time ({generation} vs {loss})"
    );

    let (a, b) = (stack.web(0), stack.web(1));
    // Sessions lived in Redis too: log in again.
    creator.login(b, &stack.sim, ash).await;
    let html = creator.room_page(b, &table).await;
    let fresh = invite_path(&invite_link(&html));
    assert_ne!(fresh, old, "a link of the rebuilt room's generation");
    assert!(
        html.contains("Close room"),
        "the creator may still close it"
    );

    let guest = stack.login_as(a, bramble).await;
    let res = guest.get(&a.url(&old)).await;
    assert_eq!(res.status(), 410, "a link from before the loss is retired");
    assert!(res.text().await.unwrap_or_default().contains("newer"));
    let res = guest.get(&b.url(&fresh)).await;
    assert_eq!(
        (res.status().as_u16(), location(&res)),
        (303, format!("/g/{GUILD}/rooms/{table}")),
        "the fresh link works"
    );

    // The creator closes the rebuilt room: channel and role are gone in Discord.
    let closed = creator.close_room(a, &table).await;
    assert_eq!(closed.status(), 303);
    let state = stack.sim.state().await;
    assert!(
        find(&state, "channels", &table).is_none(),
        "channel deleted"
    );
    assert!(find(&state, "roles", &table_role).is_none(), "role deleted");

    // The other room, left idle, is swept like any room Coven made.
    stack.voice(bramble, None, json!({})).await;
    wait_for("the sweeper to close the idle rebuilt room", || async {
        let state = stack.sim.state().await;
        (find(&state, "channels", &idle).is_none() && find(&state, "roles", &idle_role).is_none())
            .then_some(())
    })
    .await;
    // Discord first, then the record (the sweeper appends `room.deleted` once Discord
    // has deleted the channel).
    wait_for("the idle room's record to go", || async {
        (!stored_rooms(&stack).await.contains_key(&idle)).then_some(())
    })
    .await;
    // The gateway learnt of the loss by losing its lease, and reconciled Discord's full
    // guild against the empty snapshot on a fresh IDENTIFY.
    assert_eq!(stack.sim.gateway_counter("identifies").await, 2);
}
