//! A person's Discord servers, as their own token lists them (`GET /users/@me/guilds`,
//! scope `guilds`): what the communities picker and "Add Coven" are built from, at no
//! cost to the bot's request budget. Kept in the session for a minute, so a person
//! moving between pages asks Discord at most once a minute.
//!
//! Owns that list and its keeping. Must not decide what is shown (the pages do).

use serde::{Deserialize, Serialize};
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use super::App;
use super::guard::LoggedIn;
use super::http::error::WebError;
use super::session::GUILDS;
use crate::discord::{DiscordError, PersonGuild};
use crate::event::now_ms;

/// How long a person's list is kept.
const KEPT_MS: u64 = 60_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnownGuild {
    pub id: Id<GuildMarker>,
    pub name: String,
    #[serde(default)]
    pub icon: Option<String>,
    /// Owner, Manage Server or Administrator: may add a bot to it.
    pub manages: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    at: u64,
    guilds: Vec<KnownGuild>,
}

/// The person's servers: the session's list while it is under a minute old, else
/// Discord's (an older list stands in while Discord asks us to slow down). A revoked
/// token ends the session: they log in again.
pub async fn guilds_of(app: &App, who: &LoggedIn) -> Result<Vec<KnownGuild>, WebError> {
    let kept: Option<Kept> = who.session.get(GUILDS).await?;
    let now = now_ms();
    if let Some(kept) = &kept
        && now.saturating_sub(kept.at) < KEPT_MS
    {
        return Ok(kept.guilds.clone());
    }
    match app.discord.guilds_of(&who.user.access_token).await {
        Ok(list) => {
            let guilds: Vec<KnownGuild> = list.into_iter().map(KnownGuild::from).collect();
            who.session
                .insert(
                    GUILDS,
                    Kept {
                        at: now,
                        guilds: guilds.clone(),
                    },
                )
                .await?;
            Ok(guilds)
        }
        Err(DiscordError::Unauthorized) => {
            who.session.flush().await?;
            Err(WebError::NotLoggedIn {
                return_to: "/".to_owned(),
                api: false,
            })
        }
        Err(e) => match kept {
            Some(kept) => {
                tracing::info!(error = %e, "cannot refresh a person's servers; showing the last list");
                Ok(kept.guilds)
            }
            None => Err(e.into()),
        },
    }
}

impl From<PersonGuild> for KnownGuild {
    fn from(g: PersonGuild) -> Self {
        KnownGuild {
            id: g.id,
            name: g.name,
            icon: g.icon,
            manages: g.manages,
        }
    }
}
