//! Discord's bot authorization: `/oauth2/authorize` with `bot` among the scopes adds the
//! bot to a guild the user picks. Plain (`scope=bot`, no redirect: the bot is added and
//! a page says so) or advanced (another scope too: a code grant whose redirect carries
//! `code`, `state`, `guild_id` and `permissions`, and whose token response carries the
//! `guild`), as "Bot Authorization Flow" and "Advanced Bot Authorization" in Discord's
//! OAuth2 documentation describe them.
//!
//! Decides who may add the bot where; the world adds it, and the bot's sessions get the
//! guild's GUILD_CREATE. Must not touch codes beyond issuing one.

use std::time::Instant;

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use twilight_model::guild::Permissions;
use url::Url;

use super::{
    AuthorizeQuery, CODE_TTL, Grant, KNOWN_SCOPES, error_page, find_user, log_in_browser, pkce,
    redirect_allowed,
};
use std::collections::BTreeMap;

use crate::sim::ids::random_hex;
use crate::sim::world::World;
use crate::sim::{Shared, State};

#[derive(Template)]
#[template(path = "sim/authorize_bot.html")]
struct PickGuild {
    bot: String,
    scopes: String,
    users: Vec<Adder>,
    public: bool,
}

struct Adder {
    name: String,
    username: String,
    guilds: Vec<Choice>,
}

struct Choice {
    name: String,
    href: String,
}

#[derive(Template)]
#[template(path = "sim/bot_added.html")]
struct Added {
    bot: String,
    guild: String,
}

/// Why `user` may not add the bot to `guild`, in the words Discord's page uses; `None`
/// when they may: they have Manage Server there (Administrator and ownership include
/// it), the bot is not in it yet, and, when the bot is not public, they own the
/// application ("Public Bot": "If unchecked, only you can add the bot to guilds").
pub(super) fn refusal(state: &State, public: bool, user: u64, guild: u64) -> Option<&'static str> {
    let Some(w) = state.guild(guild) else {
        return Some("You do not have permission to add the bot to this server.");
    };
    if !public && user != state.app_owner() {
        return Some("This bot is private: only its owner can add it to servers.");
    }
    if !w
        .guild_permissions(user)
        .contains(Permissions::MANAGE_GUILD)
    {
        return Some("You do not have permission to add the bot to this server.");
    }
    if w.bot_in() {
        return Some("The bot is already in this server.");
    }
    None
}

fn refused(message: &str) -> Response {
    let mut response = error_page(message);
    *response.status_mut() = StatusCode::FORBIDDEN;
    response
}

fn render(page: impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The authorize request with `bot` among its scopes (the client id is checked already).
pub(super) fn authorize(shared: &Shared, q: &AuthorizeQuery, scopes: Vec<String>) -> Response {
    if scopes.iter().any(|s| !KNOWN_SCOPES.contains(&s.as_str())) {
        return error_page("The requested scope is invalid, unknown, or malformed.");
    }
    // "If you request any scopes outside of bot and applications.commands, response_type
    // is again mandatory; we will also automatically redirect the user to the first URI
    // in your application's registered list unless redirect_uri is specified."
    let advanced = scopes
        .iter()
        .any(|s| s != "bot" && s != "applications.commands");
    let redirect = if advanced {
        let given = match q.redirect_uri.as_deref() {
            Some(raw) => Url::parse(raw).ok(),
            None => shared.settings.redirect_uris.first().cloned(),
        };
        match given.filter(|u| redirect_allowed(shared, u)) {
            Some(u) => Some(u),
            None => return error_page("Invalid OAuth2 redirect_uri."),
        }
    } else {
        None
    };
    if advanced && q.response_type.as_deref() != Some("code") {
        return error_page("response_type must be code.");
    }
    let challenge = match pkce(q) {
        Ok(c) => c,
        Err(why) => return error_page(why),
    };
    let permissions = match q.permissions.as_deref().map(str::parse::<u64>) {
        None => Permissions::empty(),
        Some(Ok(bits)) => Permissions::from_bits_truncate(bits),
        Some(Err(_)) => return error_page("Invalid permissions."),
    };
    let guild = match q.guild_id.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return error_page("Invalid guild_id."),
    };
    let locked = q.disable_guild_select.as_deref() == Some("true");
    let public = shared.settings.bot_public;

    let mut state = shared.lock();
    let user = match q.sim_user.as_deref() {
        None => None,
        Some(pick) => match find_user(&state, pick) {
            Some(id) => Some(id),
            None => return error_page(format!("No simulated user {pick:?}.")),
        },
    };
    let (Some(user), Some(guild)) = (user, guild) else {
        let guilds = Offer {
            only: guild.filter(|_| locked),
            first: guild,
        };
        return picker(&state, q, &scopes, user, guilds, public);
    };
    if let Some(why) = refusal(&state, public, user, guild) {
        return refused(why);
    }
    let Some(w) = state.guild_mut(guild) else {
        return refused("You do not have permission to add the bot to this server.");
    };
    w.add_bot(permissions);
    let names = (
        w.users
            .get(&w.bot_id)
            .map_or_else(|| "the bot".to_owned(), |u| u.username.clone()),
        w.guild_name.clone(),
    );
    state.announce_guild(guild, crate::sim::Announce::Joined);

    let mut response = match redirect {
        None => render(Added {
            bot: names.0,
            guild: names.1,
        }),
        Some(redirect) => {
            let code = random_hex(16);
            state.oauth.codes.retain(|_, g| g.expires > Instant::now());
            state.oauth.codes.insert(
                code.clone(),
                Grant {
                    redirect_uri: redirect.as_str().to_owned(),
                    scopes,
                    user_id: user,
                    challenge,
                    expires: Instant::now() + CODE_TTL,
                    guild: Some(guild),
                },
            );
            let mut to = redirect;
            {
                let mut pairs = to.query_pairs_mut();
                pairs.append_pair("code", &code);
                if let Some(s) = &q.state {
                    pairs.append_pair("state", s);
                }
                pairs.append_pair("guild_id", &guild.to_string());
                pairs.append_pair("permissions", &permissions.bits().to_string());
            }
            Redirect::to(to.as_str()).into_response()
        }
    };
    log_in_browser(&mut response, user);
    response
}

/// Which guilds the page offers: only one (`disable_guild_select=true` with `guild_id`),
/// and the one `guild_id` pre-selects, listed first.
struct Offer {
    only: Option<u64>,
    first: Option<u64>,
}

/// The page: each simulated person (or only `user`) who may add the bot somewhere, with
/// the guilds they may add it to, each a link approving as them. One pass over the
/// guilds' members, so it stays quick with thousands of guilds.
fn picker(
    state: &State,
    q: &AuthorizeQuery,
    scopes: &[String],
    user: Option<u64>,
    offer: Offer,
    public: bool,
) -> Response {
    let mut choices: BTreeMap<u64, Vec<&World>> = BTreeMap::new();
    for w in state
        .guilds()
        .filter(|w| !w.bot_in() && offer.only.is_none_or(|g| g == w.guild_id))
    {
        for id in w.members.keys().chain([&w.owner_id]) {
            if user.is_none_or(|u| u == *id)
                && refusal(state, public, *id, w.guild_id).is_none()
                && choices
                    .get(id)
                    .is_none_or(|c| !c.iter().any(|g| g.guild_id == w.guild_id))
            {
                choices.entry(*id).or_default().push(w);
            }
        }
    }
    let users = choices
        .into_iter()
        .filter_map(|(id, mut guilds)| {
            let u = state.user(id).filter(|u| !u.bot)?;
            guilds.sort_by_key(|w| Some(w.guild_id) != offer.first);
            Some(Adder {
                name: u.global_name.clone().unwrap_or_else(|| u.username.clone()),
                username: u.username.clone(),
                guilds: guilds
                    .into_iter()
                    .map(|w| Choice {
                        name: w.guild_name.clone(),
                        href: approve_href(q, scopes, id, w.guild_id),
                    })
                    .collect(),
            })
        })
        .collect();
    let bot = state
        .user(state.world.bot_id)
        .map_or_else(|| "the bot".to_owned(), |u| u.username.clone());
    render(PickGuild {
        bot,
        scopes: scopes.join(", "),
        users,
        public,
    })
}

/// The same request, approved as `user` for `guild`.
fn approve_href(q: &AuthorizeQuery, scopes: &[String], user: u64, guild: u64) -> String {
    let mut pairs = url::form_urlencoded::Serializer::new(String::new());
    let optional = [
        ("client_id", q.client_id.as_deref()),
        ("redirect_uri", q.redirect_uri.as_deref()),
        ("response_type", q.response_type.as_deref()),
        ("state", q.state.as_deref()),
        ("code_challenge", q.code_challenge.as_deref()),
        ("code_challenge_method", q.code_challenge_method.as_deref()),
        ("permissions", q.permissions.as_deref()),
        ("disable_guild_select", q.disable_guild_select.as_deref()),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            pairs.append_pair(name, v);
        }
    }
    pairs
        .append_pair("scope", &scopes.join(" "))
        .append_pair("guild_id", &guild.to_string())
        .append_pair("sim_user", &user.to_string());
    format!("/oauth2/authorize?{}", pairs.finish())
}
