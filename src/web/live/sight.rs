//! What one stream may show ([`Sight`]): who it is for, their roles, the rooms they may
//! see, recomputed only when permissions or their roles change, so filtering a shared
//! frame is one set lookup; and what a change of it shows them.
//!
//! Owns per-stream visibility. Must not read Redis except once at opening (roles).

use std::collections::HashSet;

use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, RoleMarker, UserMarker};

use super::frame::{Control, EventFrame};
use super::hub::Hub;
use crate::access::{Access, Principal};
use crate::bus::{Backend, Snapshot};
use crate::event::{Audience, EventData, EventId};
use crate::web::http::error::WebError;
use crate::web::session::{SessionCache, SessionUser};

/// What one stream may show: recomputed only when permissions or its viewer's roles
/// change, so filtering a shared frame is one set lookup.
pub struct Sight {
    pub user: Id<UserMarker>,
    login: String,
    roles: Vec<Id<RoleMarker>>,
    /// `?room=`: only this room's events.
    pub room: Option<Id<ChannelMarker>>,
    pub visible: HashSet<Id<ChannelMarker>>,
    /// The newest event passed on when the stream subscribed: roles and access were read
    /// after it, so they already reflect every event up to it.
    pub as_of: EventId,
}

impl Sight {
    /// Whether this is the stream of `user`'s login `login`.
    pub fn is_login(&self, user: Id<UserMarker>, login: &str) -> bool {
        self.user == user && self.login == login
    }

    pub fn principal(&self) -> Principal<'_> {
        Principal {
            user: self.user,
            roles: &self.roles,
        }
    }

    /// Recomputes what is visible; returns the channels that appeared and those gone.
    pub fn refresh(&mut self, access: &Access) -> (Vec<Id<ChannelMarker>>, Vec<Id<ChannelMarker>>) {
        let now = access.visible(self.principal());
        let appeared = now.difference(&self.visible).copied().collect();
        let gone = self.visible.difference(&now).copied().collect();
        self.visible = now;
        (appeared, gone)
    }

    pub fn shows(&self, audience: Audience) -> bool {
        match audience {
            Audience::Everyone => true,
            Audience::Internal => false,
            Audience::Channel(c) => {
                self.visible.contains(&c) && self.room.is_none_or(|room| room == c)
            }
        }
    }
}

/// What a stream does about an event's control part.
pub enum Obey {
    /// Its login ended, or its viewer left the guild.
    End,
    /// What the viewer may see may have changed.
    Refresh,
    Nothing,
}

impl Sight {
    /// What to do about `event`'s control part. Only events newer than what the sight
    /// was read from count: replayed from memory, an older "removed" would end the
    /// stream of someone who has since come back (and end it again on every
    /// reconnect), an older role change would take their newer roles away.
    pub fn obey(&mut self, event: &EventFrame) -> Obey {
        if event.id <= self.as_of {
            return Obey::Nothing;
        }
        match event.control.as_ref() {
            Some(Control::Removed(user)) if *user == self.user => {
                tracing::info!(%user, "member removed; ending their stream");
                Obey::End
            }
            Some(Control::LoggedOut(user, login))
                if *user == self.user && **login == *self.login =>
            {
                Obey::End
            }
            Some(Control::Roles(user, roles)) if *user == self.user => {
                self.roles = roles.to_vec();
                Obey::Refresh
            }
            Some(Control::Access) => Obey::Refresh,
            Some(Control::GuildGone) => Obey::End,
            _ => Obey::Nothing,
        }
    }
}

/// The events that show a viewer the rooms that just became visible to them (with the
/// people in them) and take away the rooms that no longer are.
pub fn view_changes(
    snapshot: &Snapshot,
    sight: &Sight,
    appeared: &[Id<ChannelMarker>],
    gone: &[Id<ChannelMarker>],
) -> Vec<EventData> {
    let wanted = |c: &Id<ChannelMarker>| sight.room.is_none_or(|room| room == *c);
    let mut out = Vec::new();
    for id in gone.iter().filter(|c| wanted(c)) {
        out.push(EventData::RoomDeleted { channel_id: *id });
    }
    for id in appeared.iter().filter(|c| wanted(c)) {
        let Some(room) = snapshot.rooms.get(id) else {
            continue;
        };
        out.push(EventData::RoomCreated {
            channel_id: *id,
            name: room.name.clone(),
            user_limit: room.user_limit,
            created_by: room.creator_id,
            role_id: room.role_id,
        });
        for v in snapshot.members(*id) {
            out.push(EventData::VoiceJoined {
                channel_id: *id,
                user: v.user.clone(),
                flags: v.flags,
            });
        }
        if !room.viewers.is_empty() {
            out.push(EventData::RoomViewers {
                channel_id: *id,
                viewers: room.viewers.clone(),
            });
        }
    }
    out
}

/// Who a stream is for and what they may see, read once the stream has subscribed (so a
/// change after this arrives as a frame). Refused when the login has just ended, or the
/// person is not a member.
pub async fn sight_of(
    hub: &Hub,
    sessions: &SessionCache,
    bus: &dyn Backend,
    who: &SessionUser,
    room: Option<Id<ChannelMarker>>,
    as_of: EventId,
) -> Result<Sight, WebError> {
    if sessions.was_revoked(who) {
        return Err(WebError::NotLoggedIn {
            return_to: "/rooms".to_owned(),
            api: true,
        });
    }
    let roles = hub
        .roles
        .roles(bus, who.person.id)
        .await?
        // Not a member: like a room that does not exist (nothing of the guild shows).
        .ok_or_else(WebError::no_such_room)?
        .to_vec();
    let mut sight = Sight {
        user: who.person.id,
        login: who.login.clone(),
        roles,
        room,
        visible: HashSet::new(),
        as_of,
    };
    sight.refresh(&hub.access());
    Ok(sight)
}
