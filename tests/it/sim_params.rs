//! The simulator never answers 200 to a change it did not make: every documented JSON
//! param of the routes it serves lands (with the dispatches Discord sends) or is refused
//! as Discord refuses an invalid one. Driven by twilight-http where it has the call, and
//! by plain HTTP for the shapes of Discord's refusals.

use serde_json::{Value, json};
use twilight_gateway::Event;
use twilight_model::guild::Permissions;
use twilight_model::id::Id;

use crate::harness::{TestSim, next_channel_update, next_event, shard};
use reqwest::Method;

async fn raw(sim: &TestSim, method: Method, path: &str, body: Value) -> (u16, Value) {
    let res = sim
        .http
        .request(method, sim.url(&format!("/api/v10{path}")))
        .header("authorization", format!("Bot {}", sim.token()))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Sends `body` and answers Discord's refusal of it: 400, 50035 (Invalid Form Body).
async fn invalid(sim: &TestSim, method: Method, path: &str, body: Value) -> Value {
    let (status, answer) = raw(sim, method, path, body.clone()).await;
    assert_eq!(
        (status, &answer["code"]),
        (400, &json!(50035)),
        "{body}: {answer}"
    );
    answer
}

/// The first error code Discord's nested `errors` object gives under `path`.
fn form_error<'a>(body: &'a Value, path: &[&str]) -> &'a Value {
    let mut at = &body["errors"];
    for step in path {
        at = &at[*step];
    }
    &at["_errors"][0]["code"]
}

async fn member(sim: &TestSim, user: u64) -> Value {
    let (status, m) = raw(
        sim,
        Method::GET,
        &format!("/guilds/{}/members/{user}", sim.guild_id()),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{m}");
    m
}

#[tokio::test]
async fn modify_guild_member_lands_every_field_or_none() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let (lobby, bramble) = (sim.id_of("lobby_id").await, sim.user("bramble").await);
    let bot = sim.id_of("bot_id").await;
    let player = sim.create_role("Player", 0).await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    // Mute and deafen need the member in voice: "Will throw a 400 error if the user is
    // not in a voice channel" (40032), and nothing of the request lands.
    let path = format!("/guilds/{}/members/{bramble}", sim.guild_id());
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &path,
        json!({"roles": [player.to_string()], "mute": true}),
    )
    .await;
    assert_eq!((status, &body["code"]), (400, &json!(40032)), "{body}");
    assert_eq!(member(&sim, bramble).await["roles"], json!([]));

    // A nickname needs Manage Nicknames, which the bot's role lacks: 50013, and the
    // roles in the same request are not given either.
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &path,
        json!({"nick": "Bram", "roles": [player.to_string()]}),
    )
    .await;
    assert_eq!((status, &body["code"]), (403, &json!(50013)), "{body}");
    assert_eq!(member(&sim, bramble).await["roles"], json!([]));

    // With the permissions, every field lands, through twilight.
    let staff = sim
        .create_role(
            "Staff",
            (Permissions::MANAGE_NICKNAMES | Permissions::MODERATE_MEMBERS).bits(),
        )
        .await;
    sim.grant_role(bot, staff).await;
    sim.join(bramble, lobby).await;
    let until = twilight_model::util::Timestamp::from_secs(
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3_600) as i64,
    )
    .unwrap();
    let updated = http
        .update_guild_member(guild, Id::new(bramble))
        .nick(Some("Bram"))
        .roles(&[Id::new(player)])
        .mute(true)
        .deaf(true)
        .communication_disabled_until(Some(until))
        .await
        .expect("every field is accepted")
        .model()
        .await
        .expect("twilight reads the member");
    assert_eq!(updated.nick.as_deref(), Some("Bram"));
    assert_eq!(updated.roles, [Id::new(player)]);
    assert!(updated.mute && updated.deaf);
    assert_eq!(
        updated.communication_disabled_until.map(|t| t.as_secs()),
        Some(until.as_secs())
    );
    // The server mute and deafen reach the Gateway in the member's voice state.
    let Event::VoiceStateUpdate(v) = next_event(
        &mut shard,
        |e| matches!(e, Event::VoiceStateUpdate(v) if v.0.user_id.get() == bramble && v.0.mute),
    )
    .await
    else {
        unreachable!()
    };
    assert!(v.0.deaf);
    let m = member(&sim, bramble).await;
    assert_eq!(
        (m["nick"].as_str(), m["mute"].as_bool()),
        (Some("Bram"), Some(true))
    );

    // Nulls clear: the nickname and the timeout go, the roles list empties.
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &path,
        json!({"nick": null, "communication_disabled_until": null, "roles": []}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nick"], Value::Null);
    assert_eq!(body["communication_disabled_until"], Value::Null);
    assert_eq!(body["roles"], json!([]));

    // Bad values are refused with the field named.
    for (bad, field) in [
        (json!({"nick": "x".repeat(33)}), "nick"),
        (json!({"roles": ["not a snowflake"]}), "roles"),
        (json!({"mute": "yes"}), "mute"),
        (
            json!({"communication_disabled_until": "next tuesday"}),
            "communication_disabled_until",
        ),
        (
            json!({"communication_disabled_until": "2099-01-01T00:00:00+00:00"}),
            "communication_disabled_until",
        ),
    ] {
        let body = invalid(&sim, Method::PATCH, &path, bad.clone()).await;
        assert!(form_error(&body, &[field]).is_string(), "{bad}: {body}");
    }
    // Roles the bot may not hand out: its own managed role (or any managed role), and
    // @everyone, which no one is given.
    let state = sim.state().await;
    let managed = state["roles"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["managed"] == true))
        .and_then(|r| r["id"].as_str())
        .expect("the bot's managed role")
        .to_owned();
    let (status, body) = raw(&sim, Method::PATCH, &path, json!({"roles": [managed]})).await;
    assert_eq!((status, &body["code"]), (403, &json!(50013)), "{body}");
    let everyone = sim.guild_id().to_string();
    invalid(&sim, Method::PATCH, &path, json!({"roles": [everyone]})).await;
    assert_eq!(member(&sim, bramble).await["roles"], json!([]));
    // The owner outranks the bot: no renaming them, no timing them out.
    let owner = sim.id_of("owner_id").await;
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{}/members/{owner}", sim.guild_id()),
        json!({"nick": "Boss"}),
    )
    .await;
    assert_eq!((status, &body["code"]), (403, &json!(50013)), "{body}");
    assert_eq!(member(&sim, owner).await["nick"], Value::Null);
    let (status, _) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{}/members/{owner}", sim.guild_id()),
        json!({"communication_disabled_until": until.iso_8601().to_string()}),
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn modify_channel_lands_every_voice_setting_in_the_dispatch() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let lobby = sim.id_of("lobby_id").await;
    let category = sim.id_of("room_category_id").await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/channels/{lobby}"),
        json!({"bitrate": 96000, "position": 7, "parent_id": category.to_string(),
            "nsfw": true, "rtc_region": "rotterdam", "video_quality_mode": 2,
            "rate_limit_per_user": 30, "user_limit": 12}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let c = next_channel_update(&mut shard, lobby).await;
    assert_eq!(c.bitrate, Some(96_000));
    assert_eq!(c.position, Some(7));
    assert_eq!(c.parent_id.map(|p| p.get()), Some(category));
    assert_eq!(c.nsfw, Some(true));
    assert_eq!(c.rtc_region.as_deref(), Some("rotterdam"));
    assert_eq!(c.user_limit, Some(12));
    assert_eq!(c.rate_limit_per_user, Some(30));
    assert!(c.video_quality_mode.is_some());

    // Out of the category again with a null parent.
    let (_, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/channels/{lobby}"),
        json!({"parent_id": null}),
    )
    .await;
    assert_eq!(body["parent_id"], Value::Null);

    // Refusals name their field; nothing of a refused request lands.
    let text = sim
        .create_channel(json!({"name": "notes", "type": 0}))
        .await;
    for (bad, field) in [
        (json!({"bitrate": 128000, "name": "Renamed"}), "bitrate"),
        (json!({"bitrate": 7999}), "bitrate"),
        (json!({"parent_id": text.to_string()}), "parent_id"),
        (json!({"rtc_region": "the-moon"}), "rtc_region"),
        (json!({"video_quality_mode": 3}), "video_quality_mode"),
        (json!({"available_tags": []}), "available_tags"),
        (json!({"type": 0}), "type"),
        (json!({"nsfw": "yes"}), "nsfw"),
    ] {
        let body = invalid(
            &sim,
            Method::PATCH,
            &format!("/channels/{lobby}"),
            bad.clone(),
        )
        .await;
        assert!(form_error(&body, &[field]).is_string(), "{bad}: {body}");
    }
    let (_, now) = raw(
        &sim,
        Method::GET,
        &format!("/channels/{lobby}"),
        Value::Null,
    )
    .await;
    assert_eq!(now["name"], "Lobby");
    assert_eq!(now["bitrate"], 96_000);

    // A form error inside a list nests by index, as Discord nests it.
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/channels/{lobby}"),
        json!({"permission_overwrites": [{"id": "1", "type": 7}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        form_error(&body, &["permission_overwrites", "0"]).is_string(),
        "{body}"
    );
}

#[tokio::test]
async fn role_colours_positions_and_the_reads_bots_make_first() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let g = sim.guild_id();
    let a = sim.create_role("A", 0).await;
    let b = sim.create_role("B", 0).await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    // The documented colors object sets the colour; gradient colours need a guild
    // feature the simulated guilds lack, and are refused rather than dropped.
    let (status, role) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/roles/{a}"),
        json!({"colors": {"primary_color": 0xff0000, "secondary_color": null}}),
    )
    .await;
    assert_eq!(status, 200, "{role}");
    assert_eq!(
        (
            role["color"].as_u64(),
            role["colors"]["primary_color"].as_u64()
        ),
        (Some(0xff0000), Some(0xff0000))
    );
    let Event::RoleUpdate(u) = next_event(&mut shard, |e| matches!(e, Event::RoleUpdate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(u.role.colors.primary_color, 0xff0000);
    for bad in [
        json!({"colors": {"primary_color": 1, "secondary_color": 2}}),
        json!({"unicode_emoji": "🎲"}),
    ] {
        invalid(&sim, Method::PATCH, &format!("/guilds/{g}/roles/{a}"), bad).await;
    }

    // Modify Guild Role Positions answers every role, in order, and dispatches the moves.
    let before: Vec<_> = http.roles(guild).await.unwrap().models().await.unwrap();
    let pos = |roles: &[twilight_model::guild::Role], id: u64| {
        roles.iter().find(|r| r.id.get() == id).map(|r| r.position)
    };
    // A new role takes position 1 and moves no other role (Create Guild Role fires only
    // GUILD_ROLE_CREATE): A and B tie, "sorted by id".
    assert_eq!((pos(&before, a), pos(&before, b)), (Some(1), Some(1)));
    let bot_role = before.iter().find(|r| r.managed).map(|r| r.position);
    assert!(bot_role > Some(1), "the bot's role stays where it was");
    let (status, roles) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/roles"),
        json!([{"id": a.to_string(), "position": 1}, {"id": b.to_string(), "position": 2}]),
    )
    .await;
    assert_eq!(status, 200, "{roles}");
    let after: Vec<twilight_model::guild::Role> = serde_json::from_value(roles).unwrap();
    assert!(pos(&after, b) > pos(&after, a), "{after:?}");
    next_event(
        &mut shard,
        |e| matches!(e, Event::RoleUpdate(r) if r.role.id.get() == b),
    )
    .await;
    let role = http
        .role(guild, Id::new(a))
        .await
        .unwrap()
        .model()
        .await
        .unwrap();
    assert_eq!(Some(role.position), pos(&after, a));
    // The bot cannot move a role to its own role's place or above.
    let top = after
        .iter()
        .find(|r| r.managed)
        .map(|r| r.position)
        .unwrap();
    let (status, _) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/roles"),
        json!([{"id": a.to_string(), "position": top}]),
    )
    .await;
    assert_eq!(status, 403);
    // Nor move its own role, nor anything above it.
    let bot_role = after
        .iter()
        .find(|r| r.managed)
        .map(|r| r.id.get())
        .unwrap();
    let (status, _) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/roles"),
        json!([{"id": bot_role.to_string(), "position": 1}]),
    )
    .await;
    assert_eq!(status, 403);

    // Modify Guild Channel Positions: one CHANNEL_UPDATE per moved channel; more than
    // one parent change in a request is Discord's 40009.
    let lobby = sim.id_of("lobby_id").await;
    let category = sim.id_of("room_category_id").await;
    let text = sim
        .create_channel(json!({"name": "notes", "type": 0}))
        .await;
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/channels"),
        json!([{"id": lobby.to_string(), "position": 9}]),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let c = next_channel_update(&mut shard, lobby).await;
    assert_eq!(c.position, Some(9));
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/channels"),
        json!([{"id": lobby.to_string(), "parent_id": category.to_string()},
               {"id": text.to_string(), "parent_id": category.to_string()}]),
    )
    .await;
    assert_eq!((status, &body["code"]), (400, &json!(40009)), "{body}");

    // Get Guild (with counts), Get User, Modify Current Member.
    let got = http
        .guild(guild)
        .with_counts(true)
        .await
        .unwrap()
        .model()
        .await
        .unwrap();
    assert_eq!(got.id, guild);
    assert!(got.approximate_member_count.is_some_and(|n| n > 0));
    let (status, guilds) = raw(
        &sim,
        Method::GET,
        "/users/@me/guilds?with_counts=true",
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        guilds[0]["approximate_member_count"].as_u64().is_some(),
        "{guilds}"
    );
    let (status, _) = raw(
        &sim,
        Method::GET,
        "/users/@me/guilds?with_counts=maybe",
        Value::Null,
    )
    .await;
    assert_eq!(status, 400);
    let bramble = sim.user("bramble").await;
    let user = http
        .user(Id::new(bramble))
        .await
        .unwrap()
        .model()
        .await
        .unwrap();
    assert_eq!(user.name, "bramble");
    let (status, body) = raw(&sim, Method::GET, "/users/1", Value::Null).await;
    assert_eq!((status, &body["code"]), (404, &json!(10013)));
    http.update_current_member(guild)
        .nick(Some("Coven"))
        .await
        .expect("Modify Current Member");
    let bot = sim.id_of("bot_id").await;
    assert_eq!(member(&sim, bot).await["nick"], "Coven");
    let (status, body) = raw(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/members/@me"),
        json!({"avatar": "data:image/png;base64,iVBORw0KGgo=", "bio": "a bot"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["avatar"].as_str().is_some_and(|h| h.len() == 32),
        "{body}"
    );
    invalid(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/members/@me"),
        json!({"avatar": "not an image"}),
    )
    .await;
}

#[tokio::test]
async fn routes_the_sim_does_not_serve_answer_discords_404_and_405() {
    let sim = TestSim::start().await;
    // A forced 429 past a day (or negative) is refused by the control API, not taken
    // and then failed on by the route it would answer.
    for retry in [1e300, -1.0] {
        let (status, _) = sim
            .control(
                "/rest/fail",
                json!({"path": "/users/@me", "status": 429, "retry_after": retry}),
            )
            .await;
        assert_eq!(status, 400, "retry_after {retry}");
    }
    let (status, _) = raw(&sim, Method::GET, "/users/@me", Value::Null).await;
    assert_eq!(status, 200);
    // List Guild Members needs the GUILD_MEMBERS privileged intent the app lacks.
    let (status, body) = raw(
        &sim,
        Method::GET,
        &format!("/guilds/{}/members", sim.guild_id()),
        Value::Null,
    )
    .await;
    assert_eq!((status, &body["code"]), (403, &json!(50001)), "{body}");
    let (status, body) = raw(&sim, Method::GET, "/guilds/1/emojis/2/nothing", Value::Null).await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({"message": "404: Not Found", "code": 0}));
    let (status, body) = raw(&sim, Method::PUT, "/users/@me", Value::Null).await;
    assert_eq!(status, 405);
    assert_eq!(
        body,
        json!({"message": "405: Method Not Allowed", "code": 0})
    );
}

#[tokio::test]
async fn add_guild_member_honours_nick_mute_and_deaf_with_their_permissions() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let juniper = sim.user("juniper").await;
    let token = sim.user_token(juniper, "identify guilds.join").await;
    let path = format!("/guilds/{}/members/{juniper}", sim.guild_id());
    // A nickname needs Manage Nicknames, which the bot lacks: nothing happens.
    let (status, body) = raw(
        &sim,
        Method::PUT,
        &path,
        json!({"access_token": token, "nick": "June", "mute": true}),
    )
    .await;
    assert_eq!((status, &body["code"]), (403, &json!(50013)), "{body}");
    let (status, _) = raw(&sim, Method::GET, &path, Value::Null).await;
    assert_eq!(status, 404, "a refused add adds no one");
    // Mute and deaf need only Mute and Deafen Members, which the bot has.
    let (status, body) = raw(
        &sim,
        Method::PUT,
        &path,
        json!({"access_token": token, "mute": true, "deaf": true}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!((&body["mute"], &body["deaf"]), (&json!(true), &json!(true)));
    assert_eq!(body["nick"], Value::Null);
}

#[tokio::test]
async fn a_body_of_the_wrong_shape_is_refused_as_discord_refuses_it() {
    let sim = TestSim::start().await;
    let (g, lobby) = (sim.guild_id(), sim.id_of("lobby_id").await);
    for (path, body, want) in [
        (format!("/channels/{lobby}"), json!([]), "DICT_TYPE_CONVERT"),
        (format!("/guilds/{g}/roles"), json!({}), "LIST_TYPE_CONVERT"),
        (
            format!("/guilds/{g}/channels"),
            json!("x"),
            "LIST_TYPE_CONVERT",
        ),
    ] {
        let err = invalid(&sim, Method::PATCH, &path, body).await;
        assert_eq!(err["errors"]["_errors"][0]["code"], want, "{path}: {err}");
        assert_eq!(err["message"], "Invalid Form Body");
    }
    let err = invalid(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/roles"),
        json!([5]),
    )
    .await;
    assert_eq!(form_error(&err, &["0"]), "MODEL_TYPE_CONVERT", "{err}");
    // Not JSON at all: 50109.
    let res = sim
        .http
        .patch(sim.url(&format!("/api/v10/channels/{lobby}")))
        .header("authorization", format!("Bot {}", sim.token()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["code"], 50109);
}

/// Each entry's id and position in what `path` (a list of channels or roles) answers.
async fn positions(sim: &TestSim, path: &str) -> Vec<(Value, Value)> {
    let (status, list) = raw(sim, Method::GET, path, Value::Null).await;
    assert_eq!(status, 200, "{list}");
    let mut found: Vec<_> = list
        .as_array()
        .map(|l| {
            l.iter()
                .map(|e| (e["id"].clone(), e["position"].clone()))
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|(id, _)| id.to_string());
    found
}

/// Modify Guild Channel Positions and Modify Guild Role Positions read every entry of
/// their array as Discord reads a body: a field of the wrong type, or no `id`, is refused
/// under the entry's index with the field's own code, and nothing of the list moves, not
/// even the good entries before the bad one.
#[tokio::test]
async fn a_bad_entry_in_a_positions_list_is_refused_by_its_index_and_nothing_moves() {
    // Six refusals of one route in a row: above the sim's default five a second.
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let (g, lobby) = (sim.guild_id(), sim.id_of("lobby_id").await.to_string());
    let role = sim.create_role("Regular", 0).await.to_string();
    let channels = format!("/guilds/{g}/channels");
    let roles = format!("/guilds/{g}/roles");
    let (channels_before, roles_before) = (
        positions(&sim, &channels).await,
        positions(&sim, &roles).await,
    );
    for (path, list, at, code) in [
        (
            &channels,
            json!([{"id": lobby, "position": 9}, {"position": 1}]),
            ["1", "id"],
            "BASE_TYPE_REQUIRED",
        ),
        (
            &channels,
            json!([{"id": lobby, "position": 9}, {"id": "lobby"}]),
            ["1", "id"],
            "NUMBER_TYPE_COERCE",
        ),
        (
            &channels,
            json!([{"id": lobby, "position": "first"}]),
            ["0", "position"],
            "NUMBER_TYPE_COERCE",
        ),
        (
            &channels,
            json!([{"id": lobby, "parent_id": 5.5}]),
            ["0", "parent_id"],
            "NUMBER_TYPE_COERCE",
        ),
        (
            &channels,
            json!([{"id": lobby, "lock_permissions": "yes"}]),
            ["0", "lock_permissions"],
            "BASE_TYPE_BOOLEAN",
        ),
        (
            &channels,
            json!([{"id": lobby, "position": 9, "flags": 2}]),
            ["0", "flags"],
            "SIMULATOR_UNSUPPORTED",
        ),
        (
            &roles,
            json!([{"id": role, "position": 1}, {"position": 1}]),
            ["1", "id"],
            "BASE_TYPE_REQUIRED",
        ),
        (
            &roles,
            json!([{"id": role, "position": "top"}]),
            ["0", "position"],
            "NUMBER_TYPE_COERCE",
        ),
    ] {
        let body = invalid(&sim, Method::PATCH, path, list.clone()).await;
        assert_eq!(form_error(&body, &at), code, "{list}: {body}");
    }
    assert_eq!(positions(&sim, &channels).await, channels_before);
    assert_eq!(positions(&sim, &roles).await, roles_before);
}
