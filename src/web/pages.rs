//! Server-rendered pages. Each page is rendered from one bus snapshot and hands the
//! snapshot's event id to its stream, so the stream continues exactly where the page
//! left off. Pages are complete without JavaScript; with it, `assets/app.js` applies the
//! stream's events to them.
//!
//! Owns turning snapshots into page views. Must not change shared state.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use tower_sessions::Session;

use super::AppState;
use super::guard::Member;
use super::http::error::{WebError, page};
use super::invites;
use super::rooms::{self, CLOSED_FLASH, RoomId};
use super::session::{SessionUser, USER};
use super::view::{RoomView, UserView, ViewerView, visible_rooms};

#[derive(Template, WebTemplate)]
#[template(path = "web/landing.html")]
pub struct LandingPage {
    pub user: Option<UserView>,
    /// Why live updates are delayed, when they are (the gateway is quiet or in trouble).
    pub delayed: Option<String>,
}

/// `GET /`: logged-in people go straight to the rooms.
pub async fn landing(session: Session) -> Result<Response, WebError> {
    let user: Option<SessionUser> = session.get(USER).await?;
    if user.is_some() {
        return Ok(Redirect::to("/rooms").into_response());
    }
    Ok(LandingPage {
        user: None,
        delayed: None,
    }
    .into_response())
}

#[derive(Template, WebTemplate)]
#[template(path = "web/rooms.html")]
pub struct RoomsPage {
    pub user: Option<UserView>,
    /// Why live updates are delayed, when they are (the gateway is quiet or in trouble).
    pub delayed: Option<String>,
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

/// `GET /rooms`: every room the member may see in Discord, with who is in it, live.
pub async fn rooms(
    State(app): State<AppState>,
    member: Member,
    axum::extract::Query(q): axum::extract::Query<RoomsQuery>,
) -> Result<RoomsPage, WebError> {
    let snapshot = app.bus.snapshot().await?;
    let who = &member.who;
    let (rooms, channels) = visible_rooms(&snapshot, member.principal());
    Ok(RoomsPage {
        delayed: app.upstream.current().banner(),
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

/// `GET /rooms/{channel_id}`: one room, live, for those Discord shows it to.
pub async fn room(
    State(app): State<AppState>,
    member: Member,
    RoomId(id): RoomId,
) -> Result<RoomPage, WebError> {
    let snapshot = app.bus.snapshot().await?;
    let record = rooms::visible_room(&snapshot, id, member.principal())?;
    let who = &member.who;
    let me = who.user.person.id;
    let whereabouts = match snapshot.voice.get(&me) {
        Some(v) if v.channel_id == id => Whereabouts::InRoom,
        Some(_) => Whereabouts::Elsewhere,
        None => Whereabouts::NotInVoice,
    };
    Ok(RoomPage {
        delayed: app.upstream.current().banner(),
        user: Some(UserView::of(&who.user)),
        room: RoomView::of(&snapshot, id, record),
        viewers: record.viewers.iter().map(ViewerView::of).collect(),
        at: snapshot.at.to_string(),
        whereabouts,
        can_join: snapshot.access.can_join(member.principal(), id),
        discord_url: crate::config::join_url(
            &app.settings.discord.app_url,
            &format!("channels/{}/{id}", app.settings.guild_id),
        ),
        invite: invites::offer(&app, &snapshot, id, member.principal())?,
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
