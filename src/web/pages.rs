//! Server-rendered pages. Each page is rendered from one bus snapshot and hands the
//! snapshot's event id to its stream, so the stream continues exactly where the page
//! left off. Pages are complete without JavaScript; with it, `assets/app.js` applies the
//! stream's events to them.
//!
//! Owns turning snapshots into page views. Must not change shared state.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker};

use super::AppState;
use super::guard::{LoggedIn, Member, parse_id};
use super::http::error::{WebError, page};
use super::rooms::{self, CLOSED_FLASH, RoomId};
use super::settings::AddCoven;
use super::view::{RoomView, UserView, ViewerView, base_of, visible_rooms};
use super::{invites, members, people};
use crate::access::Principal;

#[derive(Template, WebTemplate)]
#[template(path = "web/landing.html")]
pub struct LandingPage {
    pub user: Option<UserView>,
    /// Why live updates are delayed, when they are (the gateway is quiet or in trouble).
    pub delayed: Option<String>,
}

/// A community in the picker.
pub struct CommunityView {
    pub id: String,
    pub name: String,
    pub initial: String,
    pub icon_url: Option<String>,
    pub available: bool,
}

impl CommunityView {
    fn of(id: Id<GuildMarker>, name: &str, icon: Option<&str>, available: bool) -> Self {
        CommunityView {
            id: id.to_string(),
            name: name.to_owned(),
            initial: name
                .chars()
                .find(|c| c.is_alphanumeric())
                .map_or_else(|| "?".to_owned(), |c| c.to_uppercase().collect()),
            icon_url: icon.map(|hash| {
                format!(
                    "{}/icons/{id}/{hash}.png?size=64",
                    crate::event::DEFAULT_CDN
                )
            }),
            available,
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "web/communities.html")]
pub struct CommunitiesPage {
    pub user: Option<UserView>,
    pub delayed: Option<String>,
    /// The person's servers Coven serves.
    pub communities: Vec<CommunityView>,
    /// Servers the person manages where Coven is not (when adding is offered).
    pub addable: Vec<CommunityView>,
    /// Why nothing can be added right now, when that is so.
    pub full: bool,
}

impl CommunitiesPage {
    pub fn csrf(&self) -> &str {
        csrf(&self.user)
    }
}

/// `GET /`: the landing page, or, logged in, the person's communities (straight to the
/// only one when there is nothing else to choose).
pub async fn landing(State(app): State<AppState>, request: Request) -> Result<Response, WebError> {
    let (mut parts, _) = request.into_parts();
    let who = match LoggedIn::from_request_parts(&mut parts, &app).await {
        Ok(who) => who,
        Err(WebError::NotLoggedIn { .. }) => {
            return Ok(LandingPage {
                user: None,
                delayed: None,
            }
            .into_response());
        }
        Err(e) => return Err(e),
    };
    let mine = people::guilds_of(&app, &who).await?;
    let ids: Vec<Id<GuildMarker>> = mine.iter().map(|g| g.id).collect();
    let served = app.guilds.served_of(&ids).await?;
    let communities: Vec<CommunityView> = served
        .iter()
        .map(|(id, e)| CommunityView::of(*id, &e.name, e.icon.as_deref(), e.available))
        .collect();
    let offered = app.settings.add_coven == AddCoven::Anyone && !app.guilds.fixed();
    let addable: Vec<CommunityView> = if offered {
        mine.iter()
            .filter(|g| g.manages && !served.iter().any(|(id, _)| *id == g.id))
            .map(|g| CommunityView::of(g.id, &g.name, g.icon.as_deref(), true))
            .collect()
    } else {
        Vec::new()
    };
    if let ([only], true) = (&communities[..], addable.is_empty()) {
        return Ok(Redirect::to(&format!("/g/{}/rooms", only.id)).into_response());
    }
    let full = !addable.is_empty() && app.guilds.count().await? >= app.settings.max_guilds;
    Ok(CommunitiesPage {
        user: Some(UserView::of(&who.user)),
        delayed: None,
        communities,
        addable,
        full,
    }
    .into_response())
}

/// `GET /g/{guild}`: its rooms.
pub async fn community(member: Member) -> Response {
    Redirect::to(&format!("/g/{}/rooms", member.guild.id)).into_response()
}

/// `/rooms`, from before communities: a page view goes to the picker, which leads
/// straight to the person's only community (and shows someone outside it the way in);
/// a post goes to the only community's (308, so it keeps its method and body).
pub async fn old_rooms(
    State(app): State<AppState>,
    method: axum::http::Method,
    uri: Uri,
) -> Result<Response, WebError> {
    if method == axum::http::Method::GET {
        return Ok(Redirect::to("/").into_response());
    }
    match app.guilds.only().await? {
        Some(guild) => Ok(permanent(&format!("/g/{guild}/rooms"), &uri)),
        None => Err(WebError::no_such_room()),
    }
}

/// `/rooms/{room}[/…]`, from before communities: 308 to the room's community when the
/// room is known (the only community's, or one of the person's that has it), else 404.
pub async fn old_room(
    State(app): State<AppState>,
    Path(rest): Path<String>,
    request: Request,
) -> Result<Response, WebError> {
    let room = rest
        .split('/')
        .next()
        .and_then(parse_id::<ChannelMarker>)
        .ok_or_else(WebError::no_such_room)?;
    let uri = request.uri().clone();
    if let Some(guild) = app.guilds.only().await? {
        return Ok(permanent(&format!("/g/{guild}/rooms/{rest}"), &uri));
    }
    let (mut parts, _) = request.into_parts();
    let who = LoggedIn::from_request_parts(&mut parts, &app).await?;
    let mine = people::guilds_of(&app, &who).await?;
    let ids: Vec<Id<GuildMarker>> = mine.iter().map(|g| g.id).collect();
    for (id, _) in app.guilds.served_of(&ids).await? {
        let Some(guild) = app.guilds.get(id).await? else {
            continue;
        };
        if !guild.bus.has_room(room).await? {
            continue;
        }
        // Only a room the person may see leads anywhere: another answers like a missing
        // one, so the redirect tells nothing of rooms hidden from them.
        let Some(member) = members::current(&app, &guild, &who.user).await? else {
            break;
        };
        let snapshot = guild.bus.snapshot().await?;
        let principal = Principal {
            user: who.user.person.id,
            roles: &member.roles,
        };
        if rooms::visible_room(&snapshot, room, principal).is_ok() {
            return Ok(permanent(&format!("/g/{id}/rooms/{rest}"), &uri));
        }
        break;
    }
    Err(WebError::no_such_room())
}

/// A 308 to `path`, keeping the request's query.
fn permanent(path: &str, uri: &Uri) -> Response {
    let to = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    Redirect::permanent(&to).into_response()
}

#[derive(Template, WebTemplate)]
#[template(path = "web/rooms.html")]
pub struct RoomsPage {
    pub user: Option<UserView>,
    /// Why live updates are delayed, when they are (the gateway is quiet or in trouble).
    pub delayed: Option<String>,
    /// Discord reports the server unavailable.
    pub unavailable: Option<String>,
    /// The community's path (`/g/{guild}`), its id and name.
    pub base: String,
    pub guild: String,
    pub community: String,
    pub rooms: Vec<RoomView>,
    /// Voice channels Coven did not make.
    pub channels: Vec<RoomView>,
    /// The snapshot's event id: the stream resumes after it.
    pub at: String,
    /// Set after the user closed a room (or their room page saw it close).
    pub notice: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
pub struct RoomsQuery {
    #[serde(default)]
    closed: Option<String>,
}

/// `GET /g/{guild}/rooms`: every room the member may see in Discord, with who is in it,
/// live.
pub async fn rooms(
    State(app): State<AppState>,
    member: Member,
    axum::extract::Query(q): axum::extract::Query<RoomsQuery>,
) -> Result<RoomsPage, WebError> {
    let guild = &member.guild;
    let snapshot = guild.bus.snapshot().await?;
    let who = &member.who;
    let (rooms, channels) = visible_rooms(&snapshot, member.principal());
    Ok(RoomsPage {
        delayed: app.upstream.of(guild.id).banner(),
        unavailable: guild.unavailable(),
        base: base_of(Some(guild.id)),
        guild: guild.id.to_string(),
        community: guild.entry.name.clone(),
        user: Some(UserView::of(&who.user)),
        rooms,
        channels,
        at: snapshot.at.to_string(),
        notice: match who.session.remove::<String>(CLOSED_FLASH).await? {
            Some(name) => Some(format!("“{name}” was closed.")),
            None => q
                .closed
                .is_some()
                .then(|| "The room was closed.".to_owned()),
        },
    })
}

/// Where the viewer is relative to the room.
#[derive(Debug, PartialEq, Eq)]
pub enum Whereabouts {
    InRoom,
    /// In another voice channel of the guild.
    Elsewhere,
    NotInVoice,
}

impl Whereabouts {
    /// As the page's `data-whereabouts` says it (the stylesheet keys on it).
    pub fn as_str(&self) -> &'static str {
        match self {
            Whereabouts::InRoom => "in",
            Whereabouts::Elsewhere => "elsewhere",
            Whereabouts::NotInVoice => "none",
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "web/room.html")]
pub struct RoomPage {
    pub user: Option<UserView>,
    /// Why live updates are delayed, when they are (the gateway is quiet or in trouble).
    pub delayed: Option<String>,
    /// Discord reports the server unavailable.
    pub unavailable: Option<String>,
    pub guild: String,
    pub community: String,
    pub room: RoomView,
    pub viewers: Vec<ViewerView>,
    pub at: String,
    pub whereabouts: Whereabouts,
    /// Discord would let the viewer join (so Coven may move them in).
    pub can_join: bool,
    pub discord_url: String,
    /// A fresh invite link, for the creator and the people in the room.
    pub invite: Option<String>,
    pub is_creator: bool,
}

/// The CSRF token the page's forms carry: the logged-in user's.
fn csrf(user: &Option<UserView>) -> &str {
    user.as_ref().map_or("", |u| u.csrf.as_str())
}

impl RoomsPage {
    pub fn csrf(&self) -> &str {
        csrf(&self.user)
    }
}

impl RoomPage {
    pub fn csrf(&self) -> &str {
        csrf(&self.user)
    }
}

/// `GET /g/{guild}/rooms/{channel_id}`: one room, live, for those Discord shows it to.
pub async fn room(
    State(app): State<AppState>,
    member: Member,
    RoomId(id): RoomId,
) -> Result<RoomPage, WebError> {
    let guild = &member.guild;
    let snapshot = guild.bus.snapshot().await?;
    let record = rooms::visible_room(&snapshot, id, member.principal())?;
    let who = &member.who;
    let me = who.user.person.id;
    let whereabouts = match snapshot.voice.get(&me) {
        Some(v) if v.channel_id == id => Whereabouts::InRoom,
        Some(_) => Whereabouts::Elsewhere,
        None => Whereabouts::NotInVoice,
    };
    Ok(RoomPage {
        delayed: app.upstream.of(guild.id).banner(),
        unavailable: guild.unavailable(),
        guild: guild.id.to_string(),
        community: guild.entry.name.clone(),
        user: Some(UserView::of(&who.user)),
        room: RoomView::of(&snapshot, id, record),
        viewers: record.viewers.iter().map(ViewerView::of).collect(),
        at: snapshot.at.to_string(),
        whereabouts,
        can_join: snapshot.access.can_join(member.principal(), id),
        discord_url: crate::config::join_url(
            &app.settings.discord.app_url,
            &format!("channels/{}/{id}", guild.id),
        ),
        invite: invites::offer(&app, guild.id, &snapshot, id, member.principal())?,
        is_creator: record.creator_id == Some(me),
    })
}

/// Anything else.
pub async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no page here.",
        "",
    )
}
