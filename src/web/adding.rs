//! "Add Coven": someone who manages a server where the bot is not sends it there through
//! Discord's advanced bot authorization (`GET /g/{guild}/add` → Discord → `GET
//! /auth/added`), then waits on "Setting up…" (`GET /g/{guild}/setting-up`) until the
//! gateway has the guild's GUILD_CREATE and the registry lists it.
//!
//! Owns that round trip (state and PKCE as login has). Must not register anything: the
//! registry is written by the gateway from what Discord says, never from a redirect's
//! `guild_id`, which anyone can type.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use super::AppState;
use super::guard::{GuildId, LoggedIn};
use super::http::error::WebError;
use super::people;
use super::settings::AddCoven;
use super::view::UserView;
use crate::discord::DiscordError;

const ADDING: &str = "adding";

/// An authorization in progress: what its return must match.
#[derive(Debug, Serialize, Deserialize)]
struct PendingAdd {
    state: String,
    verifier: String,
    guild: Id<GuildMarker>,
}

/// The server `guild` as the person's own list has it, if they may add Coven to it:
/// adding is offered here, they manage it, and Coven is not in it.
async fn addable(
    app: &AppState,
    who: &LoggedIn,
    guild: Id<GuildMarker>,
) -> Result<people::KnownGuild, WebError> {
    if app.settings.add_coven == AddCoven::Off || app.guilds.fixed() {
        return Err(WebError::no_such_room());
    }
    let mine = people::guilds_of(app, who).await?;
    let Some(known) = mine.into_iter().find(|g| g.id == guild && g.manages) else {
        return Err(WebError::no_such_room());
    };
    Ok(known)
}

/// `GET /g/{guild}/add`: off to Discord's bot authorization for that server. A link, as
/// login is: the page's `form-action 'self'` would stop a form at its redirect to
/// Discord, and nothing changes here but the session's pending authorization, which
/// Discord's own page must still approve.
pub async fn add(
    State(app): State<AppState>,
    GuildId(guild): GuildId,
    who: LoggedIn,
) -> Result<Response, WebError> {
    addable(&app, &who, guild).await?;
    if app.guilds.get(guild).await?.is_some() {
        return Ok(Redirect::to(&format!("/g/{guild}/rooms")).into_response());
    }
    if app.guilds.count().await? >= app.settings.max_guilds {
        return Err(WebError::Conflict(format!(
            "This Coven serves as many communities as it may ({}); ask its operator.",
            app.settings.max_guilds
        )));
    }
    let authorization = app.discord.add_bot(guild)?;
    who.session
        .insert(
            ADDING,
            PendingAdd {
                state: authorization.state,
                verifier: authorization.verifier,
                guild,
            },
        )
        .await?;
    tracing::info!(user = %who.user.person.id, %guild, "adding Coven to a server");
    Ok(Redirect::to(authorization.url.as_str()).into_response())
}

#[derive(Debug, Deserialize)]
pub struct AddedQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /auth/added`: Discord sends the person back. The code is traded (proof Discord
/// completed it); the guild is the one this session asked for, whatever the redirect
/// names.
pub async fn added(
    State(app): State<AppState>,
    who: LoggedIn,
    Query(q): Query<AddedQuery>,
) -> Result<Response, WebError> {
    let pending: Option<PendingAdd> = who.session.remove(ADDING).await?;
    let Some(pending) = pending else {
        return Err(WebError::BadRequest(
            "This was already used or has expired. Start again from your communities.".to_owned(),
        ));
    };
    if q.state.as_deref() != Some(pending.state.as_str()) {
        return Err(WebError::BadRequest(
            "This could not be verified (it did not start here). Start again from your communities."
                .to_owned(),
        ));
    }
    if let Some(error) = q.error {
        tracing::info!(error, "adding Coven not completed");
        return Err(WebError::BadRequest(
            "Adding Coven was cancelled. You can start again from your communities.".to_owned(),
        ));
    }
    let Some(code) = q.code else {
        return Err(WebError::BadRequest(
            "Discord sent no code back. Start again from your communities.".to_owned(),
        ));
    };
    match app.discord.exchange_added(code, pending.verifier).await {
        Ok(_) => {}
        Err(DiscordError::Unauthorized | DiscordError::Refused { .. }) => {
            return Err(WebError::BadRequest(
                "Discord did not confirm adding Coven. Start again from your communities."
                    .to_owned(),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Redirect::to(&format!("/g/{}/setting-up", pending.guild)).into_response())
}

#[derive(Template, WebTemplate)]
#[template(path = "web/setting_up.html")]
pub struct SettingUpPage {
    pub user: Option<UserView>,
    pub delayed: Option<String>,
    pub name: String,
}

/// `GET /g/{guild}/setting-up`: "Setting up…" until the registry lists the guild, then
/// its rooms. Only for a server the person manages.
pub async fn setting_up(
    State(app): State<AppState>,
    GuildId(guild): GuildId,
    who: LoggedIn,
) -> Result<Response, WebError> {
    // Only for someone who manages the server: anyone else learns nothing, not even
    // whether Coven is in it.
    let mine = people::guilds_of(&app, &who).await?;
    let Some(known) = mine.into_iter().find(|g| g.id == guild && g.manages) else {
        return Err(WebError::no_such_room());
    };
    if app.guilds.get(guild).await?.is_some() {
        return Ok(Redirect::to(&format!("/g/{guild}/rooms")).into_response());
    }
    let mut page = SettingUpPage {
        user: Some(UserView::of(&who.user)),
        delayed: None,
        name: known.name,
    }
    .into_response();
    // Looked at again every two seconds (no script needed): the guild appears when the
    // gateway has Discord's word for it.
    page.headers_mut().insert(
        axum::http::HeaderName::from_static("refresh"),
        axum::http::HeaderValue::from_static("2"),
    );
    Ok(page)
}
