//! The simulator's REST API, driven by twilight-http unmodified, and by plain HTTP for
//! Discord's answers to bad input.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twilight_http::api_error::ApiError;
use twilight_http::error::ErrorType;
use twilight_model::channel::ChannelType;
use twilight_model::channel::permission_overwrite::{PermissionOverwrite, PermissionOverwriteType};
use twilight_model::guild::Permissions;
use twilight_model::id::Id;

use crate::harness::{TestSim, next_event, shard};
use reqwest::Method;
use twilight_gateway::Event;

/// The Discord error code inside a twilight-http error, if it is a Discord answer.
fn discord_code(e: &twilight_http::Error) -> Option<(u16, u64)> {
    match e.kind() {
        ErrorType::Response {
            status,
            error: ApiError::General(g),
            ..
        } => Some((status.get(), g.code)),
        _ => None,
    }
}

#[tokio::test]
async fn twilight_creates_and_deletes_rooms_roles_and_grants() {
    let sim = TestSim::start().await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let bot: Id<twilight_model::id::marker::UserMarker> = Id::new(sim.id_of("bot_id").await);
    let category = Id::new(sim.id_of("room_category_id").await);

    let role = http
        .create_role(guild)
        .name("Room: table one")
        .permissions(Permissions::empty())
        .await
        .expect("create role")
        .model()
        .await
        .expect("twilight-model reads the role");
    assert_eq!(role.name, "Room: table one");

    let room_allow = Permissions::VIEW_CHANNEL
        | Permissions::CONNECT
        | Permissions::SPEAK
        | Permissions::STREAM
        | Permissions::USE_VAD;
    let overwrites = [
        PermissionOverwrite {
            id: guild.cast(),
            kind: PermissionOverwriteType::Role,
            allow: Permissions::empty(),
            deny: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
        },
        PermissionOverwrite {
            id: role.id.cast(),
            kind: PermissionOverwriteType::Role,
            allow: room_allow,
            deny: Permissions::empty(),
        },
        PermissionOverwrite {
            id: bot.cast(),
            kind: PermissionOverwriteType::Member,
            allow: room_allow
                | Permissions::MOVE_MEMBERS
                | Permissions::MUTE_MEMBERS
                | Permissions::DEAFEN_MEMBERS
                | Permissions::MANAGE_CHANNELS,
            deny: Permissions::empty(),
        },
    ];
    let channel = http
        .create_guild_channel(guild, "table one")
        .kind(ChannelType::GuildVoice)
        .user_limit(4)
        .parent_id(category)
        .permission_overwrites(&overwrites)
        .await
        .expect("create channel")
        .model()
        .await
        .expect("twilight-model reads the channel");
    assert_eq!(channel.kind, ChannelType::GuildVoice);
    assert_eq!(channel.user_limit, Some(4));
    assert_eq!(channel.parent_id, Some(category));

    let gale = Id::new(sim.user("gale").await);
    http.add_guild_member_role(guild, gale, role.id)
        .await
        .expect("grant the role");
    let member = http
        .guild_member(guild, gale)
        .await
        .expect("member")
        .model()
        .await
        .expect("member model");
    assert!(member.roles.contains(&role.id));

    // The role lets gale into the room; before it, the room was closed to them.
    sim.join(gale.get(), channel.id.get()).await;
    let moved = http
        .update_guild_member(guild, gale)
        .channel_id(Some(Id::new(sim.id_of("lobby_id").await)))
        .await
        .expect("move gale to the lobby");
    assert_eq!(moved.status().get(), 200);

    let state = sim.state().await;
    let room = state["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == channel.id.to_string())
        .unwrap();
    assert_eq!(room["permission_overwrites"].as_array().unwrap().len(), 3);

    http.delete_channel(channel.id)
        .await
        .expect("delete channel");
    http.delete_role(guild, role.id).await.expect("delete role");
    let err = http
        .delete_channel(channel.id)
        .await
        .expect_err("already gone");
    assert_eq!(discord_code(&err), Some((404, 10003)));
    let err = http
        .delete_role(guild, role.id)
        .await
        .expect_err("already gone");
    assert_eq!(discord_code(&err), Some((404, 10011)));
    let state = sim.state().await;
    assert!(
        !state["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == channel.id.to_string())
    );
    assert!(
        !state["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == role.id.to_string())
    );
}

#[tokio::test]
async fn twilight_waits_out_an_injected_429_for_the_advertised_time() {
    let sim = TestSim::start().await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    sim.fail_once(
        json!({"method": "POST", "path": "/guilds/*/roles", "status": 429, "retry_after": 1.5}),
    )
    .await;
    let started = Instant::now();
    let role = http
        .create_role(guild)
        .name("patient")
        .await
        .expect("succeeds after the wait");
    let waited = started.elapsed();
    assert_eq!(role.status().get(), 200);
    assert!(
        waited >= Duration::from_millis(1_400),
        "retried after {waited:?}, before the advertised 1.5 s"
    );
}

#[tokio::test]
async fn the_bucket_headers_come_on_every_answer_and_the_scope_on_429s_only() {
    let sim = TestSim::start_with(|s| {
        s.rate_limit = 2;
        s.rate_window = Duration::from_millis(500);
    })
    .await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    // twilight-http 0.18 reads the bucket headers only beside X-RateLimit-Scope, which
    // Discord sends with 429s only: it learns the bucket from its first 429, waits it out
    // and succeeds, never surfacing the 429.
    for i in 0..5 {
        http.create_role(guild)
            .name(&format!("r{i}"))
            .await
            .expect("never surfaces a 429");
    }
    let limited = sim.state().await["rest"]["rate_limited"].as_u64().unwrap();
    assert!(
        (1..=5).contains(&limited),
        "five calls over a limit of two meet the limit, each 429 waited out once: {limited}"
    );
    // A plain client sees the headers Discord documents, and Discord's 429.
    let url = sim.url(&format!("/api/v10/guilds/{}/channels", sim.guild_id()));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let res = sim
            .http
            .get(&url)
            .header("authorization", format!("Bot {}", sim.token()))
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
        assert_eq!(res.headers()["via"], "1.1 google", "every answer says Via");
        for h in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "x-ratelimit-reset-after",
            "x-ratelimit-bucket",
        ] {
            assert!(res.headers().contains_key(h), "missing {h}");
        }
        assert!(!res.headers().contains_key("x-ratelimit-global"));
        if res.status() == 429 {
            assert!(res.headers().contains_key("retry-after"));
            assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
            assert_eq!(res.headers()["x-ratelimit-scope"], "user");
            let body: Value = res.json().await.unwrap();
            assert!(body["retry_after"].as_f64().is_some());
            assert_eq!(body["global"], false);
        } else {
            // "X-RateLimit-Scope - Returned only on HTTP 429 responses."
            assert!(!res.headers().contains_key("x-ratelimit-scope"));
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test]
async fn a_global_and_a_shared_429_are_shaped_as_discord_documents_them() {
    let sim = TestSim::start_with(|s| s.global_rate_limit = 4).await;
    let url = sim.url(&format!("/api/v10/guilds/{}/roles", sim.guild_id()));
    let get = || {
        sim.http
            .get(&url)
            .header("authorization", format!("Bot {}", sim.token()))
            .send()
    };
    // The global limit: every route together, per token.
    let mut global = None;
    for _ in 0..6 {
        let res = get().await.unwrap();
        if res.status() == 429 {
            global = Some(res);
            break;
        }
    }
    let res = global.expect("the fifth request in a second is over a global limit of 4");
    assert_eq!(res.headers()["x-ratelimit-global"], "true");
    assert_eq!(res.headers()["x-ratelimit-scope"], "global");
    assert_eq!(res.headers()["via"], "1.1 google");
    assert!(res.headers().contains_key("retry-after"));
    assert!(!res.headers().contains_key("x-ratelimit-bucket"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["global"], true);
    assert_eq!(body["message"], "You are being rate limited.");

    // A shared (resource) limit spends nothing of the caller's bucket.
    sim.fail_once(
        json!({"path": "/guilds/*/roles", "method": "GET", "status": 429,
        "retry_after": 0.2, "scope": "shared"}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let res = loop {
        let res = get().await.unwrap();
        if res
            .headers()
            .get("x-ratelimit-scope")
            .is_some_and(|s| s == "shared")
        {
            break res;
        }
        assert!(Instant::now() < deadline, "no shared 429 came");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(res.status(), 429);
    assert_ne!(res.headers()["x-ratelimit-remaining"], "0");
    assert!(!res.headers().contains_key("x-ratelimit-global"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["message"], "The resource is being rate limited.");
    assert_eq!(body["global"], false);

    // twilight waits out each kind and succeeds.
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    for scope in ["global", "shared", "user"] {
        sim.fail_once(
            json!({"path": "/guilds/*/roles", "method": "POST", "status": 429,
            "retry_after": 0.3, "scope": scope}),
        )
        .await;
        http.create_role(guild)
            .name(scope)
            .await
            .unwrap_or_else(|e| panic!("twilight waits out a {scope} 429: {e}"));
    }
}

#[tokio::test]
async fn injected_5xx_and_50013_reach_the_client_as_discord_sends_them() {
    let sim = TestSim::start().await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    sim.fail_once(json!({"path": "/guilds/*/channels", "method": "POST", "status": 500}))
        .await;
    let err = http
        .create_guild_channel(guild, "x")
        .kind(ChannelType::GuildVoice)
        .await
        .expect_err("500");
    assert!(
        matches!(err.kind(), ErrorType::Response { status, .. } if status.get() == 500),
        "{err:?}"
    );
    sim.fail_once(json!({"path": "/guilds/*/roles", "status": 403, "code": 50013}))
        .await;
    let err = http.create_role(guild).await.expect_err("403");
    assert_eq!(discord_code(&err), Some((403, 50013)));
    // Each fault was used once; the next calls succeed.
    http.create_role(guild).await.expect("fault spent");
}

async fn raw(
    sim: &TestSim,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = sim
        .http
        .request(method, sim.url(&format!("/api/v10{path}")))
        .header("authorization", format!("Bot {}", sim.token()));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_rest_input_gets_discords_answers() {
    use reqwest::Method;
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let g = sim.guild_id();
    let ash = sim.user("ash").await;
    let long = "x".repeat(101);

    let res = sim
        .http
        .get(sim.url("/api/v10/users/@me"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"code": 0, "message": "401: Unauthorized"})
    );
    let res = sim
        .http
        .get(sim.url("/api/v10/users/@me"))
        .header("authorization", "Bot wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let cases: Vec<(Method, String, Option<String>, u16, u64)> = vec![
        (Method::GET, "/channels/1".into(), None, 404, 10003),
        (Method::GET, "/channels/abc".into(), None, 400, 50035),
        (Method::GET, "/guilds/1/channels".into(), None, 404, 10004),
        (
            Method::POST,
            format!("/guilds/{g}/channels"),
            Some(json!({"name": long, "type": 2}).to_string()),
            400,
            50035,
        ),
        (
            Method::POST,
            format!("/guilds/{g}/channels"),
            Some(json!({"name": "", "type": 2}).to_string()),
            400,
            50035,
        ),
        (
            Method::POST,
            format!("/guilds/{g}/channels"),
            Some(json!({"name": "ok", "type": 2, "user_limit": 100}).to_string()),
            400,
            50035,
        ),
        (
            Method::POST,
            format!("/guilds/{g}/channels"),
            Some(json!({"type": 2}).to_string()),
            400,
            50035,
        ),
        (
            Method::POST,
            format!("/guilds/{g}/channels"),
            Some("{nope".into()),
            400,
            50109,
        ),
        (
            Method::POST,
            format!("/guilds/{g}/roles"),
            Some(json!({"permissions": "8"}).to_string()),
            403,
            50013,
        ),
        (
            Method::PATCH,
            format!("/guilds/{g}/members/{ash}"),
            Some(json!({"channel_id": null}).to_string()),
            400,
            40032,
        ),
        (
            Method::GET,
            format!("/guilds/{g}/members/1"),
            None,
            404,
            10007,
        ),
        (
            Method::PUT,
            format!("/guilds/{g}/members/{ash}/roles/1"),
            None,
            404,
            10011,
        ),
        (
            Method::GET,
            format!("/guilds/{g}/voice-states/{ash}"),
            None,
            404,
            10065,
        ),
        (
            Method::PUT,
            format!("/guilds/{g}/members/{ash}"),
            Some(json!({"access_token": "forged"}).to_string()),
            401,
            50025,
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, json) = raw(&sim, method.clone(), &path, body.as_deref()).await;
        assert_eq!(
            (got, json["code"].as_u64()),
            (status, Some(code)),
            "{method} {path}: {json}"
        );
        assert!(json["message"].is_string());
    }
    let (_, json) = raw(
        &sim,
        Method::POST,
        &format!("/guilds/{g}/channels"),
        Some(&json!({"name": long}).to_string()),
    )
    .await;
    assert_eq!(
        json["errors"]["name"]["_errors"][0]["code"],
        "BASE_TYPE_BAD_LENGTH"
    );

    let (status, json) = raw(&sim, Method::GET, "/no/such/route", None).await;
    assert_eq!((status, json["code"].as_u64()), (404, Some(0)));
}

#[tokio::test]
async fn control_api_refuses_what_discord_would() {
    let sim = TestSim::start().await;
    let lobby = sim.id_of("lobby_id").await;
    let iris = sim.user("iris").await; // not a member of the guild
    let (status, body) = sim
        .control(
            "/voice",
            json!({"user_id": iris.to_string(), "channel_id": lobby.to_string()}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = sim
        .control(
            "/voice",
            json!({"user_id": "1", "channel_id": lobby.to_string()}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = sim
        .control("/voice", json!({"user_id": iris.to_string()}))
        .await;
    assert_eq!(status, 400, "a missing channel_id is not read as leaving");

    // A full channel refuses a further join, as Discord does.
    let (status, room) = sim
        .control("/channels", json!({"name": "Duo", "user_limit": 2}))
        .await;
    assert_eq!(status, 201);
    let room: u64 = room["id"].as_str().unwrap().parse().unwrap();
    // The demo's players ask for a seat to stay free after them: checked with the join.
    sim.join(sim.user("bramble").await, room).await;
    let cinder = sim.user("cinder").await.to_string();
    let (status, body) = sim
        .control(
            "/voice",
            json!({"user_id": cinder, "channel_id": room.to_string(), "leave_free": 1}),
        )
        .await;
    assert_eq!(status, 409, "the last seat stays free: {body}");
    sim.join(sim.user("cinder").await, room).await;
    let (status, body) = sim
        .control(
            "/voice",
            json!({"user_id": sim.user("dusk").await.to_string(), "channel_id": room.to_string()}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("channel is full"))
    );

    let (status, _) = sim
        .control("/gateway/disconnect", json!({"code": 1006}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = sim
        .control("/rest/fail", json!({"path": "x", "status": 200}))
        .await;
    assert_eq!(status, 400);
    let res = sim
        .http
        .post(sim.url("/_sim/voice"))
        .body("{bad")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    // Deleting a channel "in Discord" disconnects the people in it.
    let res = sim
        .http
        .delete(sim.url(&format!("/_sim/channels/{room}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(sim.state().await["voice_states"], json!([]));
}

#[tokio::test]
async fn the_sims_rest_payloads_deserialize_with_twilight_model() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let g = sim.guild_id();
    let lobby = sim.id_of("lobby_id").await;
    let hollow = sim.user("hollow").await;
    sim.join(hollow, lobby).await;
    let (_, channels) = raw(
        &sim,
        reqwest::Method::GET,
        &format!("/guilds/{g}/channels"),
        None,
    )
    .await;
    let channels: Vec<twilight_model::channel::Channel> =
        serde_json::from_value(channels).expect("channels");
    assert!(
        channels
            .iter()
            .any(|c| c.kind == ChannelType::GuildCategory)
    );
    let (_, vs) = raw(
        &sim,
        reqwest::Method::GET,
        &format!("/guilds/{g}/voice-states/{hollow}"),
        None,
    )
    .await;
    let vs: twilight_model::voice::VoiceState = serde_json::from_value(vs).expect("voice state");
    assert_eq!(vs.channel_id.map(|c| c.get()), Some(lobby));
    let (_, me) = raw(&sim, reqwest::Method::GET, "/users/@me", None).await;
    let me: twilight_model::user::CurrentUser = serde_json::from_value(me).expect("current user");
    assert!(me.bot);
    let (_, gw) = raw(&sim, reqwest::Method::GET, "/gateway/bot", None).await;
    let gw: twilight_model::gateway::connection_info::BotConnectionInfo =
        serde_json::from_value(gw).expect("gateway bot");
    assert_eq!(gw.url, sim.gateway_url());
}

// ---------------------------------------------------------------------------------------
// Visibility, moves, kicks, roles and overwrites, as Discord documents them.

fn room_overwrites(guild: u64, bot: u64, role: Option<u64>) -> Vec<PermissionOverwrite> {
    let mut list = vec![
        PermissionOverwrite {
            id: Id::new(guild),
            kind: PermissionOverwriteType::Role,
            allow: Permissions::empty(),
            deny: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
        },
        PermissionOverwrite {
            id: Id::new(bot),
            kind: PermissionOverwriteType::Member,
            allow: Permissions::VIEW_CHANNEL
                | Permissions::CONNECT
                | Permissions::MOVE_MEMBERS
                | Permissions::MANAGE_CHANNELS,
            deny: Permissions::empty(),
        },
    ];
    if let Some(role) = role {
        list.push(PermissionOverwrite {
            id: Id::new(role),
            kind: PermissionOverwriteType::Role,
            allow: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
            deny: Permissions::empty(),
        });
    }
    list
}

/// A private voice room made by the bot through twilight-http, as Coven makes them.
async fn bot_room(sim: &TestSim, http: &twilight_http::Client, role: Option<u64>) -> u64 {
    let bot = sim.id_of("bot_id").await;
    let overwrites = room_overwrites(sim.guild_id(), bot, role);
    http.create_guild_channel(Id::new(sim.guild_id()), "room")
        .kind(ChannelType::GuildVoice)
        .permission_overwrites(&overwrites)
        .await
        .expect("create room")
        .model()
        .await
        .expect("channel model")
        .id
        .get()
}

#[tokio::test]
async fn hidden_channels_are_left_out_of_rest_and_answer_missing_access() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = sim.guild_id();
    let view = Permissions::VIEW_CHANNEL.bits();
    let hidden = sim
        .create_channel(json!({
            "name": "Staff",
            "permission_overwrites": [{"id": guild.to_string(), "type": 0, "deny": view.to_string()}],
        }))
        .await;
    let listed = |channels: &[twilight_model::channel::Channel]| {
        channels.iter().any(|c| c.id.get() == hidden)
    };
    let channels = http
        .guild_channels(Id::new(guild))
        .await
        .expect("list")
        .models()
        .await
        .expect("channel models");
    assert!(
        !listed(&channels),
        "a channel the bot cannot view is omitted"
    );
    assert!(channels.len() >= 3);
    let err = http.channel(Id::new(hidden)).await.expect_err("hidden");
    assert_eq!(discord_code(&err), Some((403, 50001)));
    // Nor can the bot change it, or its overwrites.
    let err = http
        .update_channel(Id::new(hidden))
        .name("mine")
        .await
        .expect_err("hidden");
    assert_eq!(discord_code(&err), Some((403, 50001)));

    // An admin lets the bot see it: now it is listed and readable.
    let bot = sim.id_of("bot_id").await;
    sim.set_overwrite(hidden, bot, 1, view, 0).await;
    let channels = http
        .guild_channels(Id::new(guild))
        .await
        .unwrap()
        .models()
        .await
        .unwrap();
    assert!(listed(&channels));
    let channel = http
        .channel(Id::new(hidden))
        .await
        .expect("visible now")
        .model()
        .await
        .unwrap();
    assert_eq!(channel.name.as_deref(), Some("Staff"));
}

#[tokio::test]
async fn the_bot_moves_a_member_without_access_and_the_move_is_recorded() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let room = bot_room(&sim, &http, None).await;
    let (lobby, bramble) = (sim.id_of("lobby_id").await, sim.user("bramble").await);
    sim.join(bramble, lobby).await;
    assert_eq!(sim.moves().await, []);

    // Bramble cannot go in by themselves...
    let (status, _) = sim
        .control(
            "/voice",
            json!({"user_id": bramble.to_string(), "channel_id": room.to_string()}),
        )
        .await;
    assert_eq!(status, 403);
    // ...yet Discord lets the bot move them there: it checks only the mover.
    let moved = http
        .update_guild_member(guild, Id::new(bramble))
        .channel_id(Some(Id::new(room)))
        .await
        .expect("the move succeeds");
    assert_eq!(moved.status().get(), 200);
    assert_eq!(sim.moves().await, [(bramble, room)]);
    let state = sim.state().await;
    assert_eq!(
        state["voice_states"][0]["channel_id"],
        room.to_string(),
        "{state}"
    );
    // The mover's own checks remain: no Move Members in the lobby, no move back.
    let bot = sim.id_of("bot_id").await;
    sim.set_overwrite(lobby, bot, 1, 0, Permissions::MOVE_MEMBERS.bits())
        .await;
    let err = http
        .update_guild_member(guild, Id::new(bramble))
        .channel_id(Some(Id::new(lobby)))
        .await
        .expect_err("the bot may not move into the lobby now");
    assert_eq!(discord_code(&err), Some((403, 50013)));
    assert_eq!(sim.moves().await.len(), 1, "a refused move is not recorded");
}

#[tokio::test]
async fn a_kicked_member_leaves_voice_and_is_unknown_afterwards() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let (lobby, dusk) = (sim.id_of("lobby_id").await, sim.user("dusk").await);
    sim.join(dusk, lobby).await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    // The bot's role has no Kick Members.
    let err = http
        .remove_guild_member(guild, Id::new(dusk))
        .await
        .expect_err("no Kick Members");
    assert_eq!(discord_code(&err), Some((403, 50013)));
    let kicker = sim
        .create_role("Bouncer", Permissions::KICK_MEMBERS.bits())
        .await;
    sim.grant_role(sim.id_of("bot_id").await, kicker).await;
    let res = http
        .remove_guild_member(guild, Id::new(dusk))
        .await
        .expect("kick");
    assert_eq!(res.status().get(), 204);

    let Event::VoiceStateUpdate(left) =
        next_event(&mut shard, |e| matches!(e, Event::VoiceStateUpdate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(
        (left.0.user_id.get(), left.0.channel_id),
        (dusk, None),
        "the member is disconnected from voice"
    );
    let err = http
        .guild_member(guild, Id::new(dusk))
        .await
        .expect_err("gone");
    assert_eq!(discord_code(&err), Some((404, 10007)));
    let err = http
        .remove_guild_member(guild, Id::new(dusk))
        .await
        .expect_err("already gone");
    assert_eq!(discord_code(&err), Some((404, 10007)));
    // The owner outranks the bot.
    let owner = sim.id_of("owner_id").await;
    let err = http
        .remove_guild_member(guild, Id::new(owner))
        .await
        .expect_err("the owner cannot be kicked");
    assert_eq!(discord_code(&err), Some((403, 50013)));

    // An admin's removal works the same way.
    let ember = sim.user("ember").await;
    sim.remove_member(ember).await;
    let err = http
        .guild_member(guild, Id::new(ember))
        .await
        .expect_err("gone");
    assert_eq!(discord_code(&err), Some((404, 10007)));
    let members = sim.state().await["members"].clone();
    assert!(
        !members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| is_id(&m["user_id"], dusk) || is_id(&m["user_id"], ember))
    );
}

#[tokio::test]
async fn role_updates_through_rest_are_dispatched_and_checked() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let role = http
        .create_role(guild)
        .name("Room: dice")
        .permissions(Permissions::empty())
        .await
        .unwrap()
        .model()
        .await
        .unwrap();
    let updated = http
        .update_role(guild, role.id)
        .name(Some("Room: cards"))
        .permissions(Permissions::VIEW_CHANNEL | Permissions::CONNECT)
        .await
        .expect("update role")
        .model()
        .await
        .expect("role model");
    assert_eq!(updated.name, "Room: cards");
    let Event::RoleUpdate(event) =
        next_event(&mut shard, |e| matches!(e, Event::RoleUpdate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(
        (event.guild_id, event.role.id, event.role.name.as_str()),
        (guild, role.id, "Room: cards")
    );
    assert_eq!(
        event.role.permissions,
        Permissions::VIEW_CHANNEL | Permissions::CONNECT
    );

    // It cannot grant what it lacks...
    let err = http
        .update_role(guild, role.id)
        .permissions(Permissions::ADMINISTRATOR)
        .await
        .expect_err("no Administrator to give");
    assert_eq!(discord_code(&err), Some((403, 50013)));
    // ...nor edit a role at or above its own (its managed role)...
    let state = sim.state().await;
    let own: u64 = state["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["managed"] == true)
        .and_then(|r| r["id"].as_str())
        .and_then(|id| id.parse().ok())
        .unwrap();
    let err = http
        .update_role(guild, Id::new(own))
        .name(Some("Mine"))
        .await
        .expect_err("hierarchy");
    assert_eq!(discord_code(&err), Some((403, 50013)));
    // ...nor anything without Manage Roles.
    let bot_perms: u64 = state["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["managed"] == true)
        .and_then(|r| r["permissions"].as_str())
        .and_then(|p| p.parse().ok())
        .unwrap();
    sim.set_role_permissions(own, bot_perms & !Permissions::MANAGE_ROLES.bits())
        .await;
    let err = http
        .update_role(guild, role.id)
        .name(Some("Room: chess"))
        .await
        .expect_err("no Manage Roles");
    assert_eq!(discord_code(&err), Some((403, 50013)));
    let err = http
        .update_role(guild, Id::new(1))
        .await
        .expect_err("unknown role");
    assert_eq!(discord_code(&err), Some((404, 10011)));
}

#[tokio::test]
async fn overwrites_through_rest_are_dispatched_and_checked() {
    use twilight_model::http::permission_overwrite::{
        PermissionOverwrite as NewOverwrite, PermissionOverwriteType as NewKind,
    };
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = sim.guild_id();
    let room = bot_room(&sim, &http, None).await;
    let gale = sim.user("gale").await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    let updated = |e: &Event| matches!(e, Event::ChannelUpdate(c) if c.0.id.get() == room);
    let overwrites_of = |e: Event| match e {
        Event::ChannelUpdate(c) => c.0.permission_overwrites.unwrap_or_default(),
        _ => unreachable!(),
    };

    let grant = NewOverwrite {
        allow: Some(Permissions::VIEW_CHANNEL | Permissions::CONNECT),
        deny: None,
        id: Id::new(gale),
        kind: NewKind::Member,
    };
    let res = http
        .update_channel_permission(Id::new(room), &grant)
        .await
        .expect("edit channel permissions");
    assert_eq!(res.status().get(), 204);
    let after = overwrites_of(next_event(&mut shard, updated).await);
    assert!(
        after
            .iter()
            .any(|o| o.id.get() == gale
                && o.allow == Permissions::VIEW_CHANNEL | Permissions::CONNECT)
    );
    sim.join(gale, room).await;

    let res = http
        .delete_channel_permission(Id::new(room))
        .member(Id::new(gale))
        .await
        .expect("delete channel permission");
    assert_eq!(res.status().get(), 204);
    let after = overwrites_of(next_event(&mut shard, updated).await);
    assert!(!after.iter().any(|o| o.id.get() == gale));
    let err = http
        .delete_channel_permission(Id::new(room))
        .member(Id::new(gale))
        .await
        .expect_err("no such overwrite");
    assert_eq!(discord_code(&err), Some((404, 10009)));

    // Modify Channel with the whole list.
    let bot = sim.id_of("bot_id").await;
    let list = room_overwrites(guild, bot, None);
    let channel = http
        .update_channel(Id::new(room))
        .name("renamed")
        .permission_overwrites(&list[..1])
        .await
        .expect("modify channel")
        .model()
        .await
        .expect("channel model");
    // Dropping its own overwrite hid the room from the bot: it gets the obfuscated form.
    assert_eq!(channel.name.as_deref(), Some("___hidden___"));
    let Event::ChannelUpdate(hidden) = next_event(&mut shard, updated).await else {
        unreachable!()
    };
    assert_eq!(hidden.0.name.as_deref(), Some("___hidden___"));
    let err = http
        .update_channel_permission(Id::new(room), &grant)
        .await
        .expect_err("the bot cannot see the room any more");
    assert_eq!(discord_code(&err), Some((403, 50001)));
    sim.set_overwrite(room, bot, 1, list[1].allow.bits(), 0)
        .await;
    let revealed = next_event(&mut shard, updated).await;
    let Event::ChannelUpdate(revealed) = revealed else {
        unreachable!()
    };
    assert_eq!(revealed.0.name.as_deref(), Some("renamed"));

    // Refusals: granting what the bot lacks, setting Manage Roles, and without Manage
    // Roles at all.
    for allow in [Permissions::ADMINISTRATOR, Permissions::MANAGE_ROLES] {
        let err = http
            .update_channel_permission(
                Id::new(room),
                &NewOverwrite {
                    allow: Some(allow),
                    ..grant
                },
            )
            .await
            .expect_err("refused");
        assert_eq!(discord_code(&err), Some((403, 50013)), "{allow:?}");
    }
    let state = sim.state().await;
    let (own, perms) = state["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["managed"] == true)
        .map(|r| {
            let num = |v: &Value| v.as_str().and_then(|s| s.parse::<u64>().ok()).unwrap();
            (num(&r["id"]), num(&r["permissions"]))
        })
        .unwrap();
    sim.set_role_permissions(own, perms & !Permissions::MANAGE_ROLES.bits())
        .await;
    let err = http
        .update_channel_permission(Id::new(room), &grant)
        .await
        .expect_err("no Manage Roles");
    assert_eq!(discord_code(&err), Some((403, 50013)));
    let err = http
        .delete_channel_permission(Id::new(room))
        .role(Id::new(guild))
        .await
        .expect_err("no Manage Roles");
    assert_eq!(discord_code(&err), Some((403, 50013)));

    // The new routes carry rate-limit headers, keyed by the channel.
    let res = sim
        .http
        .put(sim.url(&format!("/api/v10/channels/{room}/permissions/{gale}")))
        .header("authorization", format!("Bot {}", sim.token()))
        .json(&json!({"type": 1, "allow": "1024"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    for h in ["x-ratelimit-bucket", "x-ratelimit-remaining", "via"] {
        assert!(res.headers().contains_key(h), "missing {h}");
    }
    assert!(
        !res.headers().contains_key("x-ratelimit-scope"),
        "a 429's header only"
    );
}

#[tokio::test]
async fn the_control_api_manages_roles_members_and_overwrites() {
    let sim = TestSim::start().await;
    let (hollow, lobby) = (sim.user("hollow").await, sim.id_of("lobby_id").await);
    let role = sim
        .create_role("Crew", Permissions::VIEW_CHANNEL.bits())
        .await;
    sim.grant_role(hollow, role).await;
    sim.set_overwrite(
        lobby,
        role,
        0,
        Permissions::CONNECT.bits(),
        Permissions::SPEAK.bits(),
    )
    .await;
    let state = sim.state().await;
    let find = |list: &str, key: &str, id: u64| {
        state[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| is_id(&x[key], id))
            .cloned()
            .unwrap_or_else(|| panic!("{list} has no {id}"))
    };
    assert_eq!(
        find("roles", "id", role)["permissions"],
        Permissions::VIEW_CHANNEL.bits().to_string()
    );
    assert_eq!(
        find("members", "user_id", hollow)["roles"],
        json!([role.to_string()])
    );
    assert_eq!(
        find("channels", "id", lobby)["permission_overwrites"],
        json!([{"id": role.to_string(), "type": 0, "allow": Permissions::CONNECT.bits().to_string(), "deny": Permissions::SPEAK.bits().to_string()}])
    );
    assert_eq!(find("channels", "id", lobby)["bot_can_view"], true);
    assert_eq!(state["moves"], json!([]));

    sim.revoke_role(hollow, role).await;
    sim.delete_overwrite(lobby, role).await;
    let state = sim.state().await;
    assert_eq!(
        state["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| is_id(&m["user_id"], hollow))
            .unwrap()["roles"],
        json!([])
    );

    use reqwest::Method;
    let cases = [
        (
            Method::PATCH,
            "/roles/1".to_owned(),
            Some(json!({"name": "x"})),
            404,
        ),
        (
            Method::POST,
            "/roles".to_owned(),
            Some(json!({"permissions": "nope"})),
            400,
        ),
        (Method::PUT, format!("/members/{hollow}/roles/1"), None, 404),
        (
            Method::DELETE,
            format!("/channels/{lobby}/permissions/{role}"),
            None,
            404,
        ),
        (
            Method::PUT,
            format!("/channels/{lobby}/permissions/{role}"),
            Some(json!({"type": 7})),
            400,
        ),
        (
            Method::DELETE,
            format!("/members/{}", sim.id_of("bot_id").await),
            None,
            400,
        ),
        (
            Method::POST,
            "/channels".to_owned(),
            Some(json!({"name": "x", "permission_overwrites": [{"id": "1", "type": 0}]})),
            400,
        ),
    ];
    for (method, path, body, want) in cases {
        let (status, answer) = sim.control_with(method.clone(), &path, body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
}

/// Whether a JSON value is this snowflake, written as Discord writes ids (a string).
fn is_id(v: &Value, id: u64) -> bool {
    v.as_str() == Some(id.to_string().as_str())
}

/// A simulator whose bot-token buckets never run out in a test of many routes.
async fn roomy_sim(guilds: u32) -> TestSim {
    TestSim::start_with(|s| {
        s.rate_limit = 1_000;
        s.token_rate_limit = 1_000;
        s.guilds = guilds;
    })
    .await
}

#[tokio::test]
async fn every_guild_route_acts_on_the_guild_in_its_path() {
    use coven::sim::defaults::{DICE_TOWER_GUILD_ID as DICE, NIGHT_OWLS_GUILD_ID as OWLS};
    let sim = roomy_sim(0).await;
    let first = sim.guild_id();
    let owls_lobby = sim.id_in(OWLS, "lobby_id").await;
    let owls_category = sim.id_in(OWLS, "room_category_id").await;
    let nyx = sim.user_of(OWLS, "nyx").await;

    // A room made in Night Owls is there, not in the first guild.
    let (status, room) = raw(
        &sim,
        Method::POST,
        &format!("/guilds/{OWLS}/channels"),
        Some(
            &json!({"name": "Owl table", "type": 2, "parent_id": owls_category.to_string()})
                .to_string(),
        ),
    )
    .await;
    assert_eq!(status, 201, "{room}");
    assert_eq!(room["guild_id"], OWLS.to_string());
    let room_id: u64 = room["id"].as_str().unwrap().parse().unwrap();
    let listed = |state: &Value| {
        state["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| is_id(&c["id"], room_id))
    };
    assert!(listed(&sim.guild_state(OWLS).await));
    assert!(!listed(&sim.state().await));

    let (status, channels) =
        raw(&sim, Method::GET, &format!("/guilds/{OWLS}/channels"), None).await;
    assert_eq!(status, 200);
    assert!(
        channels
            .as_array()
            .unwrap()
            .iter()
            .any(|c| is_id(&c["id"], owls_lobby))
    );
    let (status, member) = raw(
        &sim,
        Method::GET,
        &format!("/guilds/{OWLS}/members/{nyx}"),
        None,
    )
    .await;
    assert_eq!(
        (status, member["user"]["username"].clone()),
        (200, json!("nyx"))
    );
    // nyx is not a member of the first guild: Discord's 10007 there.
    let (status, body) = raw(
        &sim,
        Method::GET,
        &format!("/guilds/{first}/members/{nyx}"),
        None,
    )
    .await;
    assert_eq!((status, body["code"].clone()), (404, json!(10007)));

    // A role and a member's role in Night Owls.
    let (status, role) = raw(
        &sim,
        Method::POST,
        &format!("/guilds/{OWLS}/roles"),
        Some(r#"{"name":"Owl"}"#),
    )
    .await;
    assert_eq!(status, 200, "{role}");
    let role_id = role["id"].as_str().unwrap();
    let (status, _) = raw(
        &sim,
        Method::PUT,
        &format!("/guilds/{OWLS}/members/{nyx}/roles/{role_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let owls = sim.guild_state(OWLS).await;
    let nyx_roles = owls["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| is_id(&m["user_id"], nyx))
        .unwrap()["roles"]
        .clone();
    assert_eq!(nyx_roles, json!([role_id]));
    assert!(
        !sim.state().await["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == role_id)
    );

    // Channel routes find the channel's guild; moves and voice states work there too.
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/channels/{room_id}"),
        Some(r#"{"user_limit":4}"#),
    )
    .await;
    assert_eq!((status, body["user_limit"].clone()), (200, json!(4)));
    let (status, body) = raw(
        &sim,
        Method::GET,
        &format!("/guilds/{OWLS}/voice-states/{nyx}"),
        None,
    )
    .await;
    assert_eq!((status, body["code"].clone()), (404, json!(10065)));

    // Dice Tower exists but the bot is not in it: 50001. No guild at all: 10004.
    let dice_lobby = sim.id_in(DICE, "lobby_id").await;
    for (path, status, code) in [
        (format!("/guilds/{DICE}/channels"), 403, 50001),
        (format!("/guilds/{DICE}/members/{nyx}"), 403, 50001),
        (format!("/channels/{dice_lobby}"), 403, 50001),
        (format!("/guilds/{}/channels", OWLS + 1), 404, 10004),
    ] {
        let (got, body) = raw(&sim, Method::GET, &path, None).await;
        assert_eq!(
            (got, body["code"].clone()),
            (status, json!(code)),
            "{path}: {body}"
        );
    }
    let (status, body) = raw(
        &sim,
        Method::POST,
        &format!("/guilds/{DICE}/roles"),
        Some("{}"),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (403, json!(50001)));
}

#[tokio::test]
async fn the_state_lists_every_guild_and_answers_for_one() {
    use coven::sim::defaults::{DICE_TOWER_GUILD_ID as DICE, NIGHT_OWLS_GUILD_ID as OWLS};
    let sim = roomy_sim(3).await;
    let state = sim.state().await;
    // The first guild's shape is as it was.
    assert_eq!(state["guild_id"], sim.guild_id().to_string());
    for field in [
        "client_id",
        "bot_id",
        "owner_id",
        "lobby_id",
        "room_category_id",
        "users",
        "channels",
        "roles",
        "members",
        "voice_states",
        "moves",
        "gateway",
        "rest",
        "oauth",
    ] {
        assert!(!state[field].is_null(), "{field}");
    }
    let guilds = state["guilds"].as_array().unwrap();
    assert_eq!(guilds.len(), 6, "three seeded, three generated");
    let entry = |id: u64| {
        guilds
            .iter()
            .find(|g| is_id(&g["id"], id))
            .cloned()
            .unwrap()
    };
    assert_eq!(entry(sim.guild_id())["name"], "Coven Playgroup");
    assert_eq!(entry(OWLS)["name"], "Night Owls");
    assert_eq!(entry(OWLS)["bot"], true);
    assert_eq!(entry(DICE)["bot"], false);
    assert_eq!(entry(DICE)["shard"], 0);
    assert!(entry(DICE)["members"].as_u64().unwrap() >= 3);
    let generated = coven::sim::defaults::generated_guild_id(2);
    assert_eq!(entry(generated)["bot"], true);
    assert_eq!(entry(generated)["members"], 4, "the bot and three people");

    let owls = sim.guild_state(OWLS).await;
    assert_eq!(owls["guild_id"], OWLS.to_string());
    assert_eq!(owls["bot_id"], state["bot_id"]);
    assert_ne!(owls["lobby_id"], state["lobby_id"]);
    assert_eq!(owls["guilds"], state["guilds"]);
    let gen_state = sim.guild_state(generated).await;
    assert!(
        gen_state["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == gen_state["lobby_id"] && c["type"] == 2)
    );

    for (query, status) in [("?guild=1", 404), ("?guild=abc", 400)] {
        let res = sim
            .http
            .get(sim.url(&format!("/_sim/state{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{query}");
    }
}

#[tokio::test]
async fn a_users_guilds_and_member_come_with_their_token_and_scopes() {
    use coven::sim::defaults::{DICE_TOWER_GUILD_ID as DICE, NIGHT_OWLS_GUILD_ID as OWLS};
    let sim = roomy_sim(0).await;
    let (first, ash, dusk, hollow) = (
        sim.guild_id(),
        sim.user("ash").await,
        sim.user("dusk").await,
        sim.user("hollow").await,
    );
    let token = sim
        .user_token(ash, "identify guilds guilds.members.read")
        .await;

    // ash plays in the first guild (as its owner) and in Night Owls.
    let (status, guilds) = sim.as_user(&token, "/users/@me/guilds").await;
    assert_eq!(status, 200, "{guilds}");
    let ids: Vec<&str> = guilds
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.to_string(), OWLS.to_string()]);
    let mine = &guilds[0];
    assert_eq!(mine["name"], "Coven Playgroup");
    assert_eq!(mine["owner"], true);
    assert!(
        mine["permissions"].is_string(),
        "permissions as a string: {mine}"
    );
    let perms: u64 = mine["permissions"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        Permissions::from_bits_truncate(perms),
        Permissions::all(),
        "the owner has all"
    );
    assert_eq!(guilds[1]["owner"], false);
    assert!(guilds[1]["features"].is_array() && guilds[1].get("icon").is_some());
    let typed: Vec<twilight_model::user::CurrentUserGuild> =
        serde_json::from_value(guilds.clone()).expect("twilight-model reads the partial guilds");
    assert_eq!(typed.len(), 2);

    // Pages: after, before, limit.
    let (_, page) = sim
        .as_user(&token, &format!("/users/@me/guilds?after={first}"))
        .await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["id"], OWLS.to_string());
    let (_, page) = sim
        .as_user(&token, &format!("/users/@me/guilds?before={OWLS}"))
        .await;
    assert_eq!(page[0]["id"], first.to_string());
    let (_, page) = sim.as_user(&token, "/users/@me/guilds?limit=1").await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    let (status, body) = sim.as_user(&token, "/users/@me/guilds?limit=0").await;
    assert_eq!((status, body["code"].clone()), (400, json!(50035)));

    // Dice Tower: dusk owns it, and the bot is not in it; it is listed all the same.
    let dusk_token = sim.user_token(dusk, "guilds").await;
    let (_, dusk_guilds) = sim.as_user(&dusk_token, "/users/@me/guilds").await;
    let dice = dusk_guilds
        .as_array()
        .unwrap()
        .iter()
        .find(|g| is_id(&g["id"], DICE))
        .cloned()
        .expect("Dice Tower listed");
    assert_eq!(dice["owner"], true);

    // The member object, and Discord's 10004 for a guild the user is not in.
    let (status, member) = sim
        .as_user(&token, &format!("/users/@me/guilds/{OWLS}/member"))
        .await;
    assert_eq!(status, 200, "{member}");
    assert_eq!(member["user"]["id"], ash.to_string());
    assert!(member["roles"].is_array() && member["joined_at"].is_string());
    let _: twilight_model::guild::Member =
        serde_json::from_value(member).expect("twilight-model reads the member");
    for guild in [DICE, 1] {
        let (status, body) = sim
            .as_user(&token, &format!("/users/@me/guilds/{guild}/member"))
            .await;
        assert_eq!(
            (status, body["code"].clone()),
            (404, json!(10004)),
            "{guild}"
        );
    }
    let hollow_token = sim.user_token(hollow, "guilds.members.read").await;
    let (status, body) = sim
        .as_user(&hollow_token, &format!("/users/@me/guilds/{OWLS}/member"))
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (404, json!(10004)),
        "hollow is not in Night Owls"
    );

    // A token without the scope gets Discord's plain 401, as /users/@me does without
    // `identify`.
    let narrow = sim.user_token(ash, "identify").await;
    for path in [
        "/users/@me/guilds".to_owned(),
        format!("/users/@me/guilds/{first}/member"),
    ] {
        let (status, body) = sim.as_user(&narrow, &path).await;
        assert_eq!(
            (status, body),
            (401, json!({"code": 0, "message": "401: Unauthorized"})),
            "{path}"
        );
    }
    let (status, _) = sim.as_user(&hollow_token, "/users/@me/guilds").await;
    assert_eq!(
        status, 401,
        "guilds.members.read alone does not list guilds"
    );
    // Night Owls' own people log in too, and see only their guild.
    let nyx = sim.user_of(OWLS, "nyx").await;
    let nyx_token = sim.user_token(nyx, "identify guilds").await;
    let (status, me) = sim.as_user(&nyx_token, "/users/@me").await;
    assert_eq!((status, me["username"].clone()), (200, json!("nyx")));
    let (_, nyx_guilds) = sim.as_user(&nyx_token, "/users/@me/guilds").await;
    assert_eq!(nyx_guilds.as_array().unwrap().len(), 1);
    assert_eq!(nyx_guilds[0]["owner"], true);
    // The bot's own list is the guilds it is in.
    let (status, bot_guilds) = raw(&sim, Method::GET, "/users/@me/guilds", None).await;
    assert_eq!(status, 200);
    assert_eq!(bot_guilds.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn twilight_reads_a_persons_guilds_and_member_with_their_bearer_token() {
    use coven::sim::defaults::{DICE_TOWER_GUILD_ID as DICE, NIGHT_OWLS_GUILD_ID as OWLS};
    let sim = roomy_sim(0).await;
    let ember = sim.user("ember").await;
    let token = sim
        .user_token(ember, "identify guilds guilds.members.read")
        .await;
    let person = twilight_http::Client::builder()
        .token(format!("Bearer {token}"))
        .proxy(sim.host(), true)
        .timeout(Duration::from_secs(10))
        .build();
    let guilds = person
        .current_user_guilds()
        .limit(200)
        .await
        .expect("the guilds")
        .models()
        .await
        .expect("twilight reads them");
    let ids: Vec<u64> = guilds.iter().map(|g| g.id.get()).collect();
    assert_eq!(
        ids,
        [sim.guild_id(), DICE],
        "ember plays in the first guild and Dice Tower"
    );
    let dice = &guilds[1];
    assert!(!dice.owner && dice.permissions.contains(Permissions::MANAGE_GUILD));
    let after = person
        .current_user_guilds()
        .after(Id::new(sim.guild_id()))
        .await
        .unwrap()
        .models()
        .await
        .unwrap();
    assert_eq!(after.len(), 1);

    let member = person
        .current_user_guild_member(Id::new(DICE))
        .await
        .expect("ember's member object")
        .model()
        .await
        .expect("twilight reads it");
    assert_eq!(member.user.id.get(), ember);
    assert_eq!(member.roles.len(), 1, "the Moderator role");
    let e = person
        .current_user_guild_member(Id::new(OWLS))
        .await
        .expect_err("ember is not in Night Owls");
    assert_eq!(discord_code(&e), Some((404, 10004)));
}

/// What a client library asks before its first event: the application of the bot token
/// (discord.py's login calls `GET /oauth2/applications/@me` and stops on a 404), and the
/// Gateway URL without authorization ("Get Gateway").
#[tokio::test]
async fn the_bot_s_application_and_the_gateway_url_are_served_as_discord_serves_them() {
    let sim = TestSim::start().await;
    let bot = format!("Bot {}", sim.token());
    let owner = sim.user("ash").await.to_string();
    for path in [
        "/api/v10/oauth2/applications/@me",
        "/api/v10/applications/@me",
    ] {
        let res = sim
            .http
            .get(sim.url(path))
            .header("authorization", &bot)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let app: Value = res.json().await.unwrap();
        assert_eq!(app["id"], "1190000000000000002", "{path}: the client id");
        assert_eq!(app["owner"]["id"], owner.as_str(), "{path}");
        assert_eq!(app["bot"]["bot"], true, "{path}");
        assert_eq!(app["bot_public"], true, "{path}");
        assert_eq!(app["bot_require_code_grant"], false, "{path}");
        assert_eq!(app["description"], "", "{path}");
        assert_eq!(app["team"], Value::Null, "{path}");
        assert_eq!(
            app["verify_key"].as_str().map(str::len),
            Some(64),
            "{path}: an Ed25519 key's hex"
        );
        // A bot's own application: a person's token does not get it.
        let res = sim
            .http
            .get(sim.url(path))
            .header("authorization", "Bearer not-a-bot")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    let res = sim
        .http
        .get(sim.url("/api/v10/gateway"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let gateway: Value = res.json().await.unwrap();
    assert_eq!(gateway["url"], sim.gateway_url().as_str());
    assert!(
        gateway.get("shards").is_none(),
        "only /gateway/bot says shards"
    );
}
