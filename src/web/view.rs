//! The view models every page, live fragment and error page renders from: the logged-in
//! person in the header, rooms, the people in them and the people viewing them.
//!
//! Owns turning records into what templates show. Must not depend on any other part of
//! `web` but [`super::session`]: pages, fragments and error pages all build on it.

use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker};

use super::session::SessionUser;
use crate::access::Principal;
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
    /// The community's path (`/g/{guild}`): the room's page is under it.
    pub base: String,
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
            base: base_of(snapshot.guild),
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

/// A community's path, under which its pages are (`/g/{guild}`).
pub fn base_of(guild: Option<Id<GuildMarker>>) -> String {
    guild.map_or_else(String::new, |g| format!("/g/{g}"))
}

/// The rooms the viewer may see, for the rooms page: Coven's rooms newest first, then the
/// server's other voice channels by name.
pub fn visible_rooms(
    snapshot: &Snapshot,
    principal: Principal<'_>,
) -> (Vec<RoomView>, Vec<RoomView>) {
    let mut rooms: Vec<(u64, RoomView)> = snapshot
        .rooms
        .iter()
        .filter(|(id, _)| snapshot.access.can_see(principal, **id))
        .map(|(id, r)| (r.created_at, RoomView::of(snapshot, *id, r)))
        .collect();
    rooms.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let (coven, mut other): (Vec<RoomView>, Vec<RoomView>) =
        rooms.into_iter().map(|(_, r)| r).partition(|r| r.coven);
    other.sort_by(|a, b| a.name.cmp(&b.name));
    (coven, other)
}
