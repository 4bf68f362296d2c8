//! The simulated Discord's web app, as far as Coven links to it: a voice channel's page
//! (`/channels/{guild}/{channel}`, where "Open in Discord" goes) showing who is in it,
//! with Join voice and Disconnect as Discord's client offers them. A voice change made
//! here goes through the world's checks (membership, View Channel and Connect, the user
//! limit) and its dispatches, exactly like `POST /_sim/voice`.
//!
//! Who "you" are: the simulated user last picked on the OAuth2 authorize page (a cookie,
//! as logging in on Discord's authorize page logs the browser in to discord.com), or any
//! member chosen on the page.

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;

use super::Shared;
use super::world::{VoiceFlags, World, kind};

/// The cookie naming the simulated user this browser logged in as.
pub const USER_COOKIE: &str = "sim_user";

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/channels/{guild}/{channel}", get(show).post(change))
}

#[derive(Template)]
#[template(path = "sim/channel.html")]
struct ChannelPage {
    guild: String,
    channel: String,
    action: String,
    limit: u32,
    in_voice: Vec<InVoice>,
    people: Vec<Person>,
    /// Why the last change was refused, in Discord's words.
    refused: Option<String>,
}

struct InVoice {
    name: String,
    flags: Vec<&'static str>,
}

struct Person {
    id: u64,
    name: String,
    /// The browser's user, chosen by default.
    you: bool,
}

fn display_name(world: &World, user: u64) -> String {
    world.users.get(&user).map_or_else(
        || user.to_string(),
        |u| u.global_name.clone().unwrap_or_else(|| u.username.clone()),
    )
}

/// The simulated user this browser last logged in as.
fn you(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == USER_COOKIE)
        .and_then(|(_, id)| id.parse().ok())
}

/// The page, or Discord's "nothing here" when the channel is not a voice channel of that
/// guild.
fn render(
    shared: &Shared,
    guild: u64,
    channel: u64,
    you: Option<u64>,
    refused: Option<(StatusCode, String)>,
) -> Response {
    let state = shared.lock();
    let Some((w, ch)) = state.guild(guild).and_then(|w| {
        w.channels
            .get(&channel)
            .filter(|c| kind::is_voice(c.kind))
            .map(|c| (w, c))
    }) else {
        return (
            StatusCode::NOT_FOUND,
            Html("<!doctype html><title>Not found · Discord simulator</title><h1>No such voice channel</h1>"),
        )
            .into_response();
    };
    let in_voice = w
        .voice
        .iter()
        .filter(|(_, v)| v.channel_id == channel)
        .map(|(u, v)| InVoice {
            name: display_name(w, *u),
            flags: [
                (v.flags.self_mute, "muted"),
                (v.flags.self_deaf, "deafened"),
                (v.flags.self_video, "camera"),
                (v.flags.self_stream, "live"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect(),
        })
        .collect();
    let people = w
        .members
        .keys()
        .filter(|u| w.users.get(u).is_some_and(|u| !u.bot))
        .map(|u| Person {
            id: *u,
            name: display_name(w, *u),
            you: Some(*u) == you,
        })
        .collect();
    let (status, refused) = match refused {
        Some((status, why)) => (status, Some(why)),
        None => (StatusCode::OK, None),
    };
    let page = ChannelPage {
        guild: w.guild_name.clone(),
        channel: ch.name.clone(),
        action: format!("/channels/{guild}/{channel}"),
        limit: ch.user_limit,
        in_voice,
        people,
        refused,
    };
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn show(
    State(shared): State<Arc<Shared>>,
    Path((guild, channel)): Path<(u64, u64)>,
    headers: HeaderMap,
) -> Response {
    render(&shared, guild, channel, you(&headers), None)
}

#[derive(Debug, Deserialize)]
struct Change {
    user_id: u64,
    /// `join` or `leave`.
    action: String,
}

/// Join voice (or Disconnect) as the chosen user, then back to the page.
async fn change(
    State(shared): State<Arc<Shared>>,
    Path((guild, channel)): Path<(u64, u64)>,
    headers: HeaderMap,
    Form(change): Form<Change>,
) -> Response {
    let to = match change.action.as_str() {
        "join" => Some(channel),
        "leave" => None,
        _ => return (StatusCode::BAD_REQUEST, "action must be join or leave").into_response(),
    };
    let done = {
        let mut state = shared.lock();
        match state.guild_mut(guild) {
            None => Err(super::world::Refusal::UnknownChannel),
            Some(w) => {
                // Joining from Discord's client starts unmuted, camera off.
                let changed = w.user_voice(change.user_id, to, VoiceFlags::default());
                if let Ok(events) = &changed {
                    state.emit_in(guild, events);
                }
                changed.map(|_| ())
            }
        }
    };
    match done {
        Ok(()) => Redirect::to(&format!("/channels/{guild}/{channel}")).into_response(),
        Err(refusal) => {
            let super::control::Fail(status, why) = super::control::refusal(refusal);
            let you = you(&headers).or(Some(change.user_id));
            render(&shared, guild, channel, you, Some((status, why)))
        }
    }
}
