//! Making, entering and closing rooms from the web: `POST /rooms`,
//! `POST /rooms/{id}/close`, `POST /rooms/{id}/move`, `POST /rooms/{id}/invite`, and how
//! a room's id is read from a route.
//!
//! Owns the rules for rooms (names, who may close; the idle rule is in `sweeper`). Changes
//! Discord only through [`crate::discord`] and records what it did through the bus; must
//! not render pages beyond redirects.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, RoleMarker};

use super::guard::{Member, Posted, path_id};
use super::http::error::WebError;
use super::http::protect::NoFields;
use super::view::UserView;
use super::{App, AppState, invites, members};
use crate::access::Principal;
use crate::bus::{Backend, Fence, RoomRecord, Snapshot};
use crate::event::EventData;

/// The session key that carries a room's name from its closing to the rooms page.
pub const CLOSED_FLASH: &str = "closed_room";

/// The longest room name Discord accepts for a channel.
const MAX_NAME: usize = 100;

#[derive(Debug, Default, Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    name: String,
}

/// A room name as people type it, checked once at the edge: trimmed, 1-100 characters,
/// readable (something visible in it) and unable to reorder the text around it on
/// someone else's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomName(String);

/// Why a typed room name was refused; each says so in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("A room name needs at least one character.")]
    Empty,
    #[error("A room name can be at most {MAX_NAME} characters (this one has {0}).")]
    TooLong(usize),
    #[error("A room name cannot contain line breaks or control characters.")]
    Control,
    #[error(
        "A room name cannot contain characters that change the direction of the text around \
         it (Unicode bidirectional embeddings, overrides or isolates)."
    )]
    Bidi,
    #[error(
        "A room name needs at least one visible character (this one is only blank or invisible characters)."
    )]
    Invisible,
}

impl RoomName {
    /// `raw` trimmed and checked. Empty (after trimming) is [`NameError::Empty`]: the
    /// caller decides whether a default applies.
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name
            .chars()
            .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
        {
            return Err(NameError::Control);
        }
        if name.chars().any(is_bidi_control) {
            return Err(NameError::Bidi);
        }
        if name.chars().all(|c| c.is_whitespace() || is_invisible(c)) {
            return Err(NameError::Invisible);
        }
        let len = name.chars().count();
        if len > MAX_NAME {
            return Err(NameError::TooLong(len));
        }
        Ok(Self(name.to_owned()))
    }

    /// `{username}'s Game #{4 chars}`, or `Game #{4 chars}` when that would be too long
    /// or unreadable (a username is not checked like a room name).
    pub fn default_for(username: &str) -> Self {
        let tag: String = (0..4)
            .map(|_| {
                let i = rand::random_range(0..32usize);
                char::from(b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[i])
            })
            .collect();
        match Self::parse(&format!("{username}'s Game #{tag}")) {
            Ok(name) => name,
            Err(_) => Self(format!("Game #{tag}")),
        }
    }

    /// The form's name, or the default when it was left empty.
    pub fn from_form(raw: &str, username: &str) -> Result<Self, WebError> {
        match Self::parse(raw) {
            Ok(name) => Ok(name),
            Err(NameError::Empty) => Ok(Self::default_for(username)),
            Err(e) => Err(WebError::BadRequest(e.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): one
/// left open in a name reorders whatever a page shows after it.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Characters that show nothing: Unicode's Default_Ignorable_Code_Point set (zero-width
/// spaces and joiners, soft hyphen, word joiner, BOM, variation selectors, tags, Hangul
/// fillers, ...) plus the blank Braille pattern, which fonts draw empty.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{2800}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// The `{channel_id}` of a room route, parsed once; anything else is "no such room".
pub struct RoomId(pub Id<ChannelMarker>);

impl FromRequestParts<AppState> for RoomId {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, WebError> {
        path_id(parts, app, "channel_id").await.map(RoomId)
    }
}

/// The room as the snapshot has it, if Discord shows it to `who`; 404 otherwise (a room
/// one may not see answers exactly like a room that does not exist).
pub fn visible_room<'s>(
    snapshot: &'s Snapshot,
    id: Id<ChannelMarker>,
    who: Principal<'_>,
) -> Result<&'s RoomRecord, WebError> {
    snapshot
        .rooms
        .get(&id)
        .filter(|_| snapshot.access.can_see(who, id))
        .ok_or_else(WebError::no_such_room)
}

/// Where to go next: a 303 for a plain form, `HX-Redirect` for an HTMX post (HTMX would
/// otherwise follow the redirect itself and swap the page into the form).
fn go(htmx: bool, to: &str) -> Response {
    if htmx {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Ok(v) = HeaderValue::from_str(to) {
            r.headers_mut().insert("hx-redirect", v);
        }
        return r;
    }
    Redirect::to(to).into_response()
}

/// `POST /rooms`: make a room and go to it.
pub async fn create(
    axum::extract::State(app): axum::extract::State<AppState>,
    post: Posted<CreateForm>,
) -> Result<Response, WebError> {
    let person = &post.who.user.person;
    let name = RoomName::from_form(&post.form.name, &person.username)?;
    let me = person.id;
    let guild = &post.guild;
    let made = app
        .discord
        .create_room(
            guild.id,
            name.as_str(),
            me,
            app.settings.max_players,
            category_in(&app, guild.id).await,
        )
        .await?;
    tracing::info!(channel = %made.channel, role = %made.role, creator = %me, "room created");
    // Who may see the room, and that its creator holds its role, are recorded before
    // the room itself: every reader knows who sees it the moment it appears.
    guild
        .bus
        .append(
            EventData::ChannelAccess {
                channel_id: made.channel,
                overwrites: Some(made.overwrites.clone()),
            },
            None,
        )
        .await?;
    members::granted(&*guild.bus, me, made.role).await?;
    guild
        .bus
        .append(
            EventData::RoomCreated {
                channel_id: made.channel,
                name: name.into_string(),
                user_limit: app.settings.max_players,
                created_by: Some(me),
                role_id: Some(made.role),
            },
            None,
        )
        .await?;
    Ok(go(
        post.htmx,
        &format!("/g/{}/rooms/{}", guild.id, made.channel),
    ))
}

/// The configured room category in `guild`, if there is one: each category names its
/// guild, which Discord is asked once per category. Unknown (Discord not answering), the
/// room is made at the top level, as with no category.
async fn category_in(app: &App, guild: Id<GuildMarker>) -> Option<Id<ChannelMarker>> {
    let categories = &app.settings.room_categories;
    if categories.is_empty() {
        return None;
    }
    let found = app
        .categories
        .get_or_try_init(|| async {
            let mut found = std::collections::HashMap::new();
            for category in categories {
                if let Some(g) = app.discord.channel_guild(*category).await? {
                    found.insert(g, *category);
                } else {
                    tracing::warn!(%category, "DISCORD_ROOM_CATEGORY_ID names a channel the bot cannot see");
                }
            }
            Ok::<_, crate::discord::DiscordError>(found)
        })
        .await;
    match found {
        Ok(found) => found.get(&guild).copied(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell which guild each room category is in");
            None
        }
    }
}

#[derive(askama::Template, askama_web::WebTemplate)]
#[template(path = "web/close.html")]
pub struct ClosePage {
    pub user: Option<UserView>,
    pub delayed: Option<String>,
    pub base: String,
    pub id: String,
    pub room: String,
    pub csrf: String,
}

/// `GET /rooms/{id}/close`: the confirmation a plain form (no JavaScript) leads to; only
/// its post closes the room.
pub async fn confirm_close(
    axum::extract::State(app): axum::extract::State<AppState>,
    member: Member,
    RoomId(id): RoomId,
) -> Result<ClosePage, WebError> {
    let snapshot = member.guild.bus.snapshot().await?;
    let room = visible_room(&snapshot, id, member.principal())?;
    if room.creator_id != Some(member.id()) {
        return Err(WebError::Forbidden(
            "Only the person who made this room can close it.".to_owned(),
        ));
    }
    let user = UserView::of(&member.who.user);
    Ok(ClosePage {
        csrf: user.csrf.clone(),
        user: Some(user),
        delayed: app.upstream.of(member.guild.id).banner(),
        base: super::view::base_of(Some(member.guild.id)),
        id: id.to_string(),
        room: room.name.clone(),
    })
}

/// `POST /rooms/{id}/close`: the creator closes the room. Closing a room that is already
/// gone is a success.
pub async fn close(
    axum::extract::State(app): axum::extract::State<AppState>,
    RoomId(id): RoomId,
    post: Posted<NoFields>,
) -> Result<Response, WebError> {
    let me = post.who.user.person.id;
    let guild = &post.guild;
    let snapshot = guild.bus.snapshot().await?;
    if let Some(room) = snapshot.rooms.get(&id) {
        if room.creator_id != Some(me) {
            // Someone Discord does not show the room to learns nothing of it.
            visible_room(&snapshot, id, post.principal())?;
            return Err(WebError::Forbidden(
                "Only the person who made this room can close it.".to_owned(),
            ));
        }
        close_room(&app, guild.id, &*guild.bus, id, room.role_id, None).await?;
        tracing::info!(channel = %id, by = %me, "room closed");
        // The rooms page names the closed room from the session, not from the URL: a
        // link cannot make Coven print words of someone else's choosing.
        post.who.session.insert(CLOSED_FLASH, &room.name).await?;
    }
    Ok(go(post.htmx, &format!("/g/{}/rooms?closed=1", guild.id)))
}

/// Deletes the room in Discord and records it at once (the gateway will see the
/// deletion too; a second `room.deleted` changes nothing).
pub async fn close_room(
    app: &App,
    guild: Id<GuildMarker>,
    bus: &dyn Backend,
    id: Id<ChannelMarker>,
    role: Option<Id<RoleMarker>>,
    fence: Option<&Fence>,
) -> Result<(), WebError> {
    app.discord.delete_room(guild, Some(id), role).await?;
    bus.append(EventData::RoomDeleted { channel_id: id }, fence)
        .await?;
    Ok(())
}

/// `POST /rooms/{id}/move`: move me from another voice channel of the guild into the
/// room (Discord cannot pull someone into voice who is not in voice).
pub async fn move_in(
    axum::extract::State(app): axum::extract::State<AppState>,
    RoomId(id): RoomId,
    post: Posted<NoFields>,
) -> Result<Response, WebError> {
    let guild = &post.guild;
    let snapshot = guild.bus.snapshot().await?;
    visible_room(&snapshot, id, post.principal())?;
    let me = post.who.user.person.id;
    // Discord lets a bot with Move Members move anyone anywhere; Coven moves people only
    // where Discord would let them go by themselves.
    if !snapshot.access.can_join(post.principal(), id) {
        return Err(WebError::Forbidden(
            "Discord does not let you join this room, so Coven will not move you into it. \
             Ask someone in the room for an invite link."
                .to_owned(),
        ));
    }
    match snapshot.voice.get(&me) {
        Some(v) if v.channel_id == id => {}
        Some(_) if snapshot.is_full(id) => {
            return Err(WebError::Conflict("This room is full.".to_owned()));
        }
        Some(_) => app.discord.move_member(guild.id, me, id).await?,
        None => {
            return Err(WebError::Conflict(
                "You are not in a voice channel, and Discord only lets Coven move people who are. \
                 Join the room from Discord (\"Open in Discord\") instead."
                    .to_owned(),
            ));
        }
    }
    if post.htmx {
        // The page is live: the stream shows the move (and "You're in") without a reload.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(go(false, &format!("/g/{}/rooms/{id}", guild.id)))
}

/// `POST /rooms/{id}/invite`: a fresh invite link; every older link of the room stops
/// working, so only the room's creator may ask for one (the people they invited may copy
/// the current link, but never cut off the link its host has shared). HTMX gets the link
/// itself; a plain form goes back to the page, which shows the fresh one.
pub async fn new_invite(
    axum::extract::State(app): axum::extract::State<AppState>,
    RoomId(id): RoomId,
    post: Posted<NoFields>,
) -> Result<Response, WebError> {
    let guild = &post.guild;
    let mut snapshot = guild.bus.snapshot().await?;
    let room = visible_room(&snapshot, id, post.principal())?;
    let generation = room.invite_gen.saturating_add(1);
    if room.creator_id != Some(post.who.user.person.id) {
        return Err(WebError::Forbidden(
            "Only the room's creator can make a new invite link (it stops the old one \
             working); you can copy the current one."
                .to_owned(),
        ));
    }
    if invites::offer(&app, guild.id, &snapshot, id, post.principal())?.is_none() {
        return Err(WebError::Forbidden(
            "Only the creator of a room Coven made, and the people holding its role, can hand \
             out invites."
                .to_owned(),
        ));
    }
    let renewed = guild
        .bus
        .append(
            EventData::InviteRenewed {
                channel_id: id,
                generation,
            },
            None,
        )
        .await?;
    snapshot.apply(&renewed);
    let Some(link) = invites::offer(&app, guild.id, &snapshot, id, post.principal())? else {
        return Err(WebError::no_such_room());
    };
    if post.htmx {
        return Ok(link.into_response());
    }
    Ok(Redirect::to(&format!("/g/{}/rooms/{id}", guild.id)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed_once_with_a_reason_for_each_refusal() {
        let hundred = "x".repeat(100);
        let accented = "\u{e9}".repeat(100);
        let cases: &[(&str, Result<&str, NameError>)] = &[
            (" Draft pod ", Ok("Draft pod")),
            ("\tCube night\n", Ok("Cube night")),
            (&hundred, Ok(&hundred)),
            (&accented, Ok(&accented)),
            (
                "\u{5d7}\u{5d3}\u{5e8} \u{5de}\u{5e9}\u{5d7}\u{5e7}",
                Ok("\u{5d7}\u{5d3}\u{5e8} \u{5de}\u{5e9}\u{5d7}\u{5e7}"),
            ),
            ("Game\u{200B}Night", Ok("Game\u{200B}Night")),
            ("\u{200F}\u{5d0}", Ok("\u{200F}\u{5d0}")),
            ("\u{1F0CF} Joker", Ok("\u{1F0CF} Joker")),
            ("👨\u{200D}👩\u{200D}👧", Ok("👨\u{200D}👩\u{200D}👧")),
            ("", Err(NameError::Empty)),
            ("   \t ", Err(NameError::Empty)),
            ("\u{3000}\u{00A0}", Err(NameError::Empty)),
            ("a\nb", Err(NameError::Control)),
            ("a\rb", Err(NameError::Control)),
            ("a\u{0}b", Err(NameError::Control)),
            ("a\u{1b}[31mb", Err(NameError::Control)),
            ("a\u{7f}", Err(NameError::Control)),
            ("a\u{85}b", Err(NameError::Control)),
            ("a\u{2028}b", Err(NameError::Control)),
            ("a\u{2029}b", Err(NameError::Control)),
            ("\u{202E}", Err(NameError::Bidi)),
            ("\u{202E}\u{202D}\u{202C}", Err(NameError::Bidi)),
            ("Pod \u{202E}gnp.exe", Err(NameError::Bidi)),
            ("\u{202A}a", Err(NameError::Bidi)),
            ("\u{202B}a", Err(NameError::Bidi)),
            ("a\u{2066}b", Err(NameError::Bidi)),
            ("a\u{2067}b", Err(NameError::Bidi)),
            ("a\u{2068}b", Err(NameError::Bidi)),
            ("a\u{2069}", Err(NameError::Bidi)),
            ("\u{200B}", Err(NameError::Invisible)),
            ("\u{200B}\u{200C}\u{200D}", Err(NameError::Invisible)),
            ("\u{200B} \u{200B}", Err(NameError::Invisible)),
            ("\u{2060}\u{FEFF}\u{00AD}", Err(NameError::Invisible)),
            ("\u{3164}\u{3164}", Err(NameError::Invisible)),
            ("\u{115F}\u{1160}\u{FFA0}", Err(NameError::Invisible)),
            ("\u{2800}", Err(NameError::Invisible)),
            ("\u{200E}\u{200F}\u{061C}", Err(NameError::Invisible)),
            ("\u{FE0F}\u{034F}", Err(NameError::Invisible)),
            ("\u{E0041}\u{E0042}", Err(NameError::Invisible)),
            ("\u{180E}", Err(NameError::Invisible)),
        ];
        for (raw, want) in cases {
            let got = RoomName::parse(raw);
            assert_eq!(
                got.as_ref().map(RoomName::as_str).map_err(Clone::clone),
                want.clone(),
                "{raw:?}"
            );
        }
        let long = "x".repeat(101);
        assert_eq!(RoomName::parse(&long), Err(NameError::TooLong(101)));
        let long = format!("  {}  ", "\u{e9}".repeat(101));
        assert_eq!(RoomName::parse(&long), Err(NameError::TooLong(101)));
        assert!(RoomName::parse(&format!(" {} ", "x".repeat(100))).is_ok());
    }

    #[test]
    fn refusals_say_why_and_an_empty_name_gets_the_default() {
        for raw in ["a\nb", "\u{202E}", "\u{200B}", &"x".repeat(101)] {
            match RoomName::from_form(raw, "ash") {
                Err(WebError::BadRequest(m)) => assert!(m.contains("room name"), "{m}"),
                other => panic!("{raw:?}: {other:?}"),
            }
        }
        let n = RoomName::from_form("  ", "ash").map(RoomName::into_string);
        let n = n.unwrap_or_default();
        assert!(n.starts_with("ash's Game #"), "{n}");
        assert_eq!(n.len(), "ash's Game #".len() + 4);
        for username in ["u".repeat(99), "\u{202E}evil".to_owned(), "a\nb".to_owned()] {
            let n = RoomName::default_for(&username);
            assert!(RoomName::parse(n.as_str()).is_ok(), "{n:?}");
            assert!(n.as_str().starts_with("Game #"), "{n:?}");
        }
    }
}
