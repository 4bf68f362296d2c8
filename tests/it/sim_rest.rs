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

use crate::harness::TestSim;

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
    let (status, _) = sim
        .control(
            "/rest/fail",
            json!({"method": "POST", "path": "/guilds/*/roles", "status": 429, "retry_after": 1.5}),
        )
        .await;
    assert_eq!(status, 204);
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
async fn the_bucket_headers_keep_twilight_under_the_limit() {
    let sim = TestSim::start_with(|s| {
        s.rate_limit = 2;
        s.rate_window = Duration::from_millis(500);
    })
    .await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    for i in 0..5 {
        http.create_role(guild)
            .name(&format!("r{i}"))
            .await
            .expect("never surfaces a 429");
    }
    // twilight retries 429s silently, so ask the sim: the headers kept it from any.
    assert_eq!(sim.state().await["rest"]["rate_limited"], 0);
    // And a client that ignores the headers is refused with Discord's 429.
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
        if res.status() == 429 {
            assert!(res.headers().contains_key("retry-after"));
            assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
            let body: Value = res.json().await.unwrap();
            assert!(body["retry_after"].as_f64().is_some());
            assert_eq!(body["global"], false);
        } else {
            for h in [
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
                "x-ratelimit-reset-after",
                "x-ratelimit-bucket",
                "x-ratelimit-scope",
            ] {
                assert!(res.headers().contains_key(h), "missing {h}");
            }
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(sim.state().await["rest"]["rate_limited"], 1);
}

#[tokio::test]
async fn injected_5xx_and_50013_reach_the_client_as_discord_sends_them() {
    let sim = TestSim::start().await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    sim.control(
        "/rest/fail",
        json!({"path": "/guilds/*/channels", "method": "POST", "status": 500}),
    )
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
    sim.control(
        "/rest/fail",
        json!({"path": "/guilds/*/roles", "status": 403, "code": 50013}),
    )
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
    for name in ["bramble", "cinder"] {
        sim.join(sim.user(name).await, room).await;
    }
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
