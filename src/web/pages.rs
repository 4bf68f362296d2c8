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
use twilight_model::id::Id;
use twilight_model::id::marker::ChannelMarker;

use super::AppState;
use super::auth::SessionUser;
use super::error::{WebError, page};
use super::members::Member;
use super::rooms::RoomId;
use crate::bus::{RoomRecord, Snapshot, VoiceRecord};
use crate::event::Viewer;

/// The logged-in person as the layout shows them.
pub struct UserView {
    pub id: String,
    pub name: String,
    pub avatar_url: Option<String>,
    pub initial: String,
    /// Carried by every form (and by HTMX as `X-CSRF-Token`).
    pub csrf: String,
}

impl UserView {
    pub fn of(user: &SessionUser) -> Self {
        let name = user.person.display_name().to_owned();
        UserView {
            csrf: user.csrf.clone(),
            id: user.person.id.to_string(),
            initial: initial(&name),
            avatar_url: user.person.avatar_url.clone(),
            name,
        }
    }
}

fn initial(name: &str) -> String {
    name.chars()
        .next()
        .map(|c| c.to_uppercase().collect())
        .unwrap_or_default()
}

pub struct MemberView {
    pub id: String,
    pub name: String,
    pub avatar_url: Option<String>,
    pub initial: String,
    /// One of the palette's colours, the same for a person everywhere.
    pub hue: u64,
    /// Made the room.
    pub host: bool,
    pub mute: bool,
    pub deaf: bool,
    pub video: bool,
    pub stream: bool,
}

/// Colours of the palette (`.hue-0` to `.hue-7` in the stylesheet).
const HUES: u64 = 8;

/// A person's colour: from their id, so it is the same on every page and replica.
fn hue(id: u64) -> u64 {
    // A snowflake's bits are a clock and counters: mix them all (splitmix64's finaliser)
    // so people made one after another do not share a colour.
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % HUES
}

impl MemberView {
    fn of(v: &VoiceRecord, host: bool) -> Self {
        let name = v.user.display_name().to_owned();
        MemberView {
            id: v.user.id.to_string(),
            hue: hue(v.user.id.get()),
            host,
            initial: initial(&name),
            avatar_url: v.user.avatar_url.clone(),
            name,
            mute: v.flags.self_mute,
            deaf: v.flags.self_deaf,
            video: v.flags.self_video,
            stream: v.flags.self_stream,
        }
    }
}

pub struct ViewerView {
    pub id: String,
    pub name: String,
    pub avatar_url: Option<String>,
    pub initial: String,
    pub hue: u64,
}

impl ViewerView {
    pub fn of(v: &Viewer) -> Self {
        ViewerView {
            id: v.id.to_string(),
            hue: hue(v.id.get()),
            initial: initial(&v.username),
            name: v.username.clone(),
            avatar_url: v.avatar_url.clone(),
        }
    }
}

pub struct RoomView {
    pub id: String,
    pub name: String,
    pub members: Vec<MemberView>,
    pub limit: u16,
    pub full: bool,
    /// Unix ms of a standing closing warning.
    pub closes_at: Option<u64>,
    /// Made by Coven (other voice channels, such as a lobby, are listed apart).
    pub coven: bool,
}

impl RoomView {
    pub fn of(snapshot: &Snapshot, id: Id<ChannelMarker>, room: &RoomRecord) -> Self {
        let mut members: Vec<MemberView> = snapshot
            .members(id)
            .map(|v| MemberView::of(v, room.creator_id == Some(v.user.id)))
            .collect();
        // By name, then id: two people of one name keep one order in every render.
        members.sort_by(|a, b| (a.name.to_lowercase(), &a.id).cmp(&(b.name.to_lowercase(), &b.id)));
        let limit = room.user_limit;
        RoomView {
            id: id.to_string(),
            name: room.name.clone(),
            full: snapshot.is_full(id),
            members,
            limit,
            closes_at: room.closes_at,
            coven: room.role_id.is_some() || room.creator_id.is_some(),
        }
    }
}

/// The rooms the viewer may see, for the rooms page: Coven's rooms newest first, then the
/// server's other voice channels by name.
pub fn visible_rooms(
    snapshot: &Snapshot,
    seer: crate::access::Seer<'_>,
) -> (Vec<RoomView>, Vec<RoomView>) {
    let mut rooms: Vec<(u64, RoomView)> = snapshot
        .rooms
        .iter()
        .filter(|(id, _)| snapshot.access.can_see(seer, **id))
        .map(|(id, r)| (r.created_at, RoomView::of(snapshot, *id, r)))
        .collect();
    rooms.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let (coven, mut other): (Vec<RoomView>, Vec<RoomView>) =
        rooms.into_iter().map(|(_, r)| r).partition(|r| r.coven);
    other.sort_by(|a, b| a.name.cmp(&b.name));
    (coven, other)
}

#[derive(Template, WebTemplate)]
#[template(path = "web/landing.html")]
pub struct LandingPage {
    pub user: Option<UserView>,
    /// Why live updates are delayed, when they are (the gateway is quiet or in trouble).
    pub delayed: Option<String>,
}

/// `GET /`: logged-in people go straight to the rooms.
pub async fn landing(session: Session) -> Result<Response, WebError> {
    let user: Option<SessionUser> = session.get("user").await?;
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

/// The session key that carries a room's name from its closing to the rooms page.
pub const CLOSED_FLASH: &str = "closed_room";

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
    let (rooms, channels) = visible_rooms(&snapshot, member.seer());
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
    let record = super::rooms::visible_room(&snapshot, id, member.seer())?;
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
        can_join: snapshot.access.can_join(member.seer(), id),
        discord_url: crate::config::join_url(
            &app.settings.discord.app_url,
            &format!("channels/{}/{id}", app.settings.guild_id),
        ),
        invite: super::invites::offer(&app, &snapshot, id, member.seer())?,
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
