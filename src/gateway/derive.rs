//! Turns Discord's dispatches into Coven's domain events.
//!
//! [`Deriver`] keeps a view of the guild *as the events have told it* (the same
//! [`Snapshot`] rules the bus applies), so each dispatch is compared with what readers
//! already believe: a voice state into a channel is `voice.joined`, the same channel with
//! other flags is `voice.updated`, a move is `voice.left` then `voice.joined`, no channel
//! is `voice.left`. A full GUILD_CREATE is reconciled against the view and only the
//! differences come out.
//!
//! It also keeps what visibility is computed from: the guild's roles (`guild.updated`)
//! and every voice channel's overwrites (`channel.access`, always before the room events
//! of that channel, so a reader knows who may see a room before it hears of it). A
//! channel Discord obfuscates (the bot cannot view it) is treated as absent: its room
//! disappears, and people who enter it are seen leaving voice. Owns no I/O.
//!
//! A room Coven made carries its ownership in its overwrites ([`room_owner`]), so its
//! `room.created` names its creator and role even when Redis lost the record the web
//! wrote; when the gateway rebuilds such a record, older invite links are retired with
//! an `invite.renewed` (see [`Deriver::rebuilt`]).
//!
//! A session carries many guilds: [`route`] says whose a dispatch is (each guild has its
//! own `Deriver`), and [`registration`] what it means for the registry (`P:guilds`).

use std::collections::{BTreeMap, BTreeSet};

use twilight_model::channel::{Channel, ChannelType};
use twilight_model::gateway::event::Event as Dispatch;
use twilight_model::gateway::payload::incoming::GuildCreate;
use twilight_model::guild::{Member, Role};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};
use twilight_model::user::User;
use twilight_model::voice::VoiceState;

use crate::access::{RoomOwner, room_owner};
use crate::bus::Snapshot;
use crate::event::{EventData, Person, RoleAccess, VoiceFlags};

/// The name Discord gives a channel it obfuscates for the bot (STACK-NOTES, "Obfuscated
/// Channels"). The `CHANNEL_OBFUSCATED` flag (`1 << 17`) would say the same, but
/// twilight-model 0.18 reads channel flags with `from_bits_truncate`, which drops bits
/// it does not know, so the name is what survives deserialization.
pub const OBFUSCATED_NAME: &str = "___hidden___";

/// Whose deriver a dispatch goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The session's own news (READY, RESUMED): every guild's deriver hears it.
    Every,
    /// One guild's.
    Guild(Id<GuildMarker>),
    /// Nobody's (a dispatch of no guild Coven follows).
    Nowhere,
}

/// Where `dispatch` goes: dispatches carry their guild.
pub fn route(dispatch: &Dispatch) -> Route {
    match dispatch {
        Dispatch::Ready(_) | Dispatch::Resumed => Route::Every,
        other => other.guild_id().map_or(Route::Nowhere, Route::Guild),
    }
}

/// What a dispatch tells the registry about its guild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// GUILD_CREATE of an available guild: added or refreshed.
    Available { name: String, icon: Option<String> },
    /// GUILD_DELETE with `unavailable: true` (or an unavailable GUILD_CREATE): an outage;
    /// the guild stays, marked unavailable.
    Unavailable,
    /// GUILD_DELETE without `unavailable`: the bot was removed.
    Removed,
}

/// The registry change `dispatch` means, if any, and for which guild.
pub fn registration(dispatch: &Dispatch) -> Option<(Id<GuildMarker>, Registration)> {
    match dispatch {
        Dispatch::GuildCreate(g) => Some(match &**g {
            GuildCreate::Available(guild) => (
                guild.id,
                Registration::Available {
                    name: guild.name.clone(),
                    icon: guild.icon.map(|i| i.to_string()),
                },
            ),
            GuildCreate::Unavailable(guild) => (guild.id, Registration::Unavailable),
        }),
        Dispatch::GuildDelete(g) if g.unavailable == Some(true) => {
            Some((g.id, Registration::Unavailable))
        }
        Dispatch::GuildDelete(g) => Some((g.id, Registration::Removed)),
        _ => None,
    }
}

pub struct Deriver {
    guild_id: Id<GuildMarker>,
    /// The configured room categories (`DISCORD_ROOM_CATEGORY_ID`), of any guild.
    categories: Vec<Id<ChannelMarker>>,
    /// Which of them is in this guild, as its GUILD_CREATE says: rooms are the voice
    /// channels in it. None there: every voice channel is a room.
    category: Option<Id<ChannelMarker>>,
    cdn: String,
    view: Snapshot,
    /// Every voice channel's parent and type, to tell rooms from other channels.
    channels: BTreeMap<Id<ChannelMarker>, (ChannelType, Option<Id<ChannelMarker>>)>,
    /// Channels Discord obfuscates for the bot: nothing about them is shown.
    hidden: BTreeSet<Id<ChannelMarker>>,
    /// The bot's own user id, from READY (a resumed session has none: then the bot's
    /// overwrite is recognised by its rights alone).
    bot: Option<Id<UserMarker>>,
    /// Whether the view is still the snapshot read from Redis at the start (nothing
    /// reconciled yet): only then does a room missing from it mean Redis lost it.
    fresh: bool,
}

impl Deriver {
    /// Starts from what readers already believe (the bus snapshot), so the first
    /// dispatches and the first reconcile are compared with it.
    pub fn new(
        guild_id: Id<GuildMarker>,
        categories: Vec<Id<ChannelMarker>>,
        view: Snapshot,
    ) -> Self {
        // With one category and one guild, it is that guild's until GUILD_CREATE says.
        let category = match categories[..] {
            [one] => Some(one),
            _ => None,
        };
        Self {
            guild_id,
            categories,
            category,
            cdn: crate::event::DEFAULT_CDN.to_owned(),
            view,
            channels: BTreeMap::new(),
            hidden: BTreeSet::new(),
            bot: None,
            fresh: true,
        }
    }

    /// The bot's own user id, when READY came before this guild was first seen.
    pub fn with_bot(mut self, bot: Option<Id<UserMarker>>) -> Self {
        self.bot = bot;
        self
    }

    pub fn with_cdn(mut self, cdn: &str) -> Self {
        cdn.trim_end_matches('/').clone_into(&mut self.cdn);
        self
    }

    pub fn view(&self) -> &Snapshot {
        &self.view
    }

    pub fn guild_id(&self) -> Id<GuildMarker> {
        self.guild_id
    }

    /// A room is a voice channel (in the room category when one is set).
    fn is_room(&self, kind: ChannelType, parent: Option<Id<ChannelMarker>>) -> bool {
        matches!(kind, ChannelType::GuildVoice | ChannelType::GuildStageVoice)
            && self.category.is_none_or(|c| parent == Some(c))
    }

    /// The domain events one dispatch means; dispatches of other guilds mean nothing.
    pub fn on_dispatch(&mut self, dispatch: &Dispatch) -> Vec<EventData> {
        let mut out = Vec::new();
        match dispatch {
            Dispatch::Ready(r) => self.bot = Some(r.user.id),
            // A resumed session sends no GUILD_CREATE: a later one (a new IDENTIFY) will
            // meet this gateway's own view, not the snapshot read at the start.
            Dispatch::Resumed => self.fresh = false,
            Dispatch::GuildCreate(g) => {
                if let GuildCreate::Available(guild) = &**g
                    && guild.id == self.guild_id
                {
                    if !self.categories.is_empty() {
                        self.category = guild
                            .channels
                            .iter()
                            .map(|c| c.id)
                            .find(|id| self.categories.contains(id));
                    }
                    self.guild_changed(guild.name.clone(), guild.owner_id, &guild.roles, &mut out);
                    self.reconcile(
                        &guild.channels,
                        &guild.voice_states,
                        &guild.members,
                        &mut out,
                    );
                }
            }
            // The bot was removed: the guild's log ends here (an outage ends nothing).
            Dispatch::GuildDelete(g) if g.id == self.guild_id && g.unavailable != Some(true) => {
                out.push(EventData::GuildRemoved { id: g.id });
            }
            Dispatch::GuildUpdate(g) if g.0.id == self.guild_id => {
                self.guild_changed(g.0.name.clone(), g.0.owner_id, &g.0.roles, &mut out);
            }
            Dispatch::RoleCreate(r) if r.guild_id == self.guild_id => {
                self.role_changed(r.role.id, Some(r.role.permissions), &mut out);
            }
            Dispatch::RoleUpdate(r) if r.guild_id == self.guild_id => {
                self.role_changed(r.role.id, Some(r.role.permissions), &mut out);
            }
            Dispatch::RoleDelete(r) if r.guild_id == self.guild_id => {
                self.role_changed(r.role_id, None, &mut out);
            }
            Dispatch::ChannelCreate(c) if self.ours(&c.0) => {
                self.channel_changed(&c.0, false, &mut out);
            }
            Dispatch::ChannelUpdate(c) if self.ours(&c.0) => {
                self.channel_changed(&c.0, false, &mut out);
            }
            Dispatch::ChannelDelete(c) if self.ours(&c.0) => {
                self.channels.remove(&c.0.id);
                self.hidden.remove(&c.0.id);
                self.room_gone(c.0.id, &mut out);
                self.access_gone(c.0.id, &mut out);
            }
            Dispatch::VoiceStateUpdate(v) if v.0.guild_id == Some(self.guild_id) => {
                let person = v.0.member.as_ref().map(|m| self.person(&m.user));
                self.voice_changed(&v.0, person, &mut out);
            }
            _ => {}
        }
        out
    }

    fn ours(&self, channel: &Channel) -> bool {
        channel.guild_id == Some(self.guild_id)
    }

    fn emit(&mut self, data: EventData, out: &mut Vec<EventData>) {
        self.view.apply_data(&data, crate::event::now_ms());
        out.push(data);
    }

    /// The guild's name, owner or roles, when they differ from what readers know.
    fn guild_changed(
        &mut self,
        name: String,
        owner_id: Id<UserMarker>,
        roles: &[Role],
        out: &mut Vec<EventData>,
    ) {
        let mut roles: Vec<RoleAccess> = roles
            .iter()
            .map(|r| RoleAccess {
                id: r.id,
                permissions: r.permissions,
            })
            .collect();
        roles.sort_by_key(|r| r.id);
        let data = EventData::GuildUpdated {
            id: self.guild_id,
            name,
            owner_id,
            roles,
        };
        let mut probe = self.view.access.clone();
        if probe.apply(&data) {
            self.emit(data, out);
        }
    }

    /// One role made, changed (`Some` permissions) or deleted (`None`).
    fn role_changed(
        &mut self,
        role: Id<twilight_model::id::marker::RoleMarker>,
        permissions: Option<twilight_model::guild::Permissions>,
        out: &mut Vec<EventData>,
    ) {
        // Roles arrive only after GUILD_CREATE, which always sends the guild.
        let Some(guild) = self.view.access.guild.clone() else {
            return;
        };
        let mut roles: Vec<RoleAccess> = guild.roles.into_iter().filter(|r| r.id != role).collect();
        if let Some(permissions) = permissions {
            roles.push(RoleAccess {
                id: role,
                permissions,
            });
        }
        roles.sort_by_key(|r| r.id);
        let data = EventData::GuildUpdated {
            id: guild.id,
            name: guild.name,
            owner_id: guild.owner_id,
            roles,
        };
        let mut probe = self.view.access.clone();
        if probe.apply(&data) {
            self.emit(data, out);
        }
    }

    /// A voice channel's overwrites, when they differ from what readers know.
    fn access_changed(&mut self, c: &Channel, out: &mut Vec<EventData>) {
        let overwrites = c.permission_overwrites.clone().unwrap_or_default();
        if self.view.access.channels.get(&c.id) != Some(&overwrites) {
            self.emit(
                EventData::ChannelAccess {
                    channel_id: c.id,
                    overwrites: Some(overwrites),
                },
                out,
            );
        }
    }

    /// Readers forget a channel's overwrites (deleted, hidden, no longer voice).
    fn access_gone(&mut self, channel: Id<ChannelMarker>, out: &mut Vec<EventData>) {
        if self.view.access.channels.contains_key(&channel) {
            self.emit(
                EventData::ChannelAccess {
                    channel_id: channel,
                    overwrites: None,
                },
                out,
            );
        }
    }

    /// `rebuild`: Discord's full truth is being compared with what Redis held (see
    /// [`Self::rebuilt`]).
    fn channel_changed(&mut self, c: &Channel, rebuild: bool, out: &mut Vec<EventData>) {
        self.channels.insert(c.id, (c.kind, c.parent_id));
        let voice = matches!(
            c.kind,
            ChannelType::GuildVoice | ChannelType::GuildStageVoice
        );
        if c.name.as_deref() == Some(OBFUSCATED_NAME) {
            // Hidden from the bot: whoever sits there is gone from every reader's view
            // and the room with them.
            self.hidden.insert(c.id);
            let inside: Vec<Id<UserMarker>> = self.view.members(c.id).map(|v| v.user.id).collect();
            for user_id in inside {
                self.voice_to(user_id, None, VoiceFlags::default(), None, out);
            }
            self.room_gone(c.id, out);
            self.access_gone(c.id, out);
            return;
        }
        self.hidden.remove(&c.id);
        if voice {
            self.access_changed(c, out);
        } else {
            self.access_gone(c.id, out);
        }
        let is_room = self.is_room(c.kind, c.parent_id);
        let name = c.name.clone().unwrap_or_default();
        let user_limit = c
            .user_limit
            .and_then(|l| u16::try_from(l).ok())
            .unwrap_or(0);
        let owner = c
            .permission_overwrites
            .as_deref()
            .and_then(|o| room_owner(self.guild_id, o, self.bot));
        // A new room, or Coven's room whose owner readers do not know (Redis lost it, or
        // its overwrites only now say so): record it with its owner.
        let record = is_room
            && self.view.rooms.get(&c.id).is_none_or(|room| {
                owner.is_some() && (room.creator_id.is_none() || room.role_id.is_none())
            });
        if record {
            self.emit(
                EventData::RoomCreated {
                    channel_id: c.id,
                    name,
                    user_limit,
                    created_by: owner.map(|o| o.creator),
                    role_id: owner.map(|o| o.role),
                },
                out,
            );
            if rebuild && let Some(owner) = owner {
                self.rebuilt(c.id, owner, out);
            }
            return;
        }
        match (self.view.rooms.get(&c.id), is_room) {
            (Some(room), true) if room.name != name || room.user_limit != user_limit => self.emit(
                EventData::RoomUpdated {
                    channel_id: c.id,
                    name,
                    user_limit,
                },
                out,
            ),
            // Moved out of the room category, or no longer a voice channel.
            (Some(_), false) => self.room_gone(c.id, out),
            _ => {}
        }
    }

    /// Retires the invite links of a Coven room whose record is being rebuilt from
    /// Discord because what Redis held had no owner for it, i.e. Redis lost the record:
    /// links made before the loss carry a generation the lost record counted (from 0, one
    /// more per "New link"), so the rebuilt record starts above any of them, at the
    /// current unix time in seconds. Those links then answer 410 and the page offers a
    /// fresh one. The ordinary CHANNEL_CREATE of a room the web just made never gets
    /// here (the web's own `room.created` is not in this view, so a missing room in it
    /// proves nothing); the gateway's writer also skips this when Redis turns out to
    /// hold the room's creator after all (the web recorded it while we reconnected).
    fn rebuilt(&mut self, channel: Id<ChannelMarker>, owner: RoomOwner, out: &mut Vec<EventData>) {
        tracing::info!(
            %channel,
            creator = %owner.creator,
            role = %owner.role,
            "rebuilt a room Coven made from its overwrites in Discord"
        );
        self.emit(
            EventData::InviteRenewed {
                channel_id: channel,
                generation: lost_generation(),
            },
            out,
        );
    }

    /// A room is deleted: whoever is still in it leaves first, so every reader sees
    /// them go before the room does.
    fn room_gone(&mut self, channel: Id<ChannelMarker>, out: &mut Vec<EventData>) {
        let inside: Vec<Id<UserMarker>> = self.view.members(channel).map(|v| v.user.id).collect();
        for user_id in inside {
            self.emit(
                EventData::VoiceLeft {
                    channel_id: channel,
                    user_id,
                },
                out,
            );
        }
        if self.view.rooms.contains_key(&channel) {
            self.emit(
                EventData::RoomDeleted {
                    channel_id: channel,
                },
                out,
            );
        }
    }

    fn voice_changed(&mut self, vs: &VoiceState, person: Option<Person>, out: &mut Vec<EventData>) {
        let flags = VoiceFlags {
            self_mute: vs.self_mute,
            self_deaf: vs.self_deaf,
            self_video: vs.self_video,
            self_stream: vs.self_stream,
        };
        // Someone in a channel hidden from the bot is, as far as Coven can tell anyone,
        // not in voice.
        let to = vs.channel_id.filter(|c| !self.hidden.contains(c));
        self.voice_to(vs.user_id, to, flags, person, out);
    }

    fn voice_to(
        &mut self,
        user_id: Id<UserMarker>,
        to: Option<Id<ChannelMarker>>,
        flags: VoiceFlags,
        person: Option<Person>,
        out: &mut Vec<EventData>,
    ) {
        let before = self
            .view
            .voice
            .get(&user_id)
            .map(|v| (v.channel_id, v.flags, v.user.clone()));
        match (before, to) {
            (None, None) => {}
            (Some((from, _, _)), None) => self.emit(
                EventData::VoiceLeft {
                    channel_id: from,
                    user_id,
                },
                out,
            ),
            (Some((from, old_flags, _)), Some(to)) if from == to => {
                if old_flags != flags {
                    self.emit(
                        EventData::VoiceUpdated {
                            channel_id: to,
                            user_id,
                            flags,
                        },
                        out,
                    );
                }
            }
            (before, Some(to)) => {
                let known = before.as_ref().map(|b| b.2.clone());
                if let Some((from, _, _)) = before {
                    self.emit(
                        EventData::VoiceLeft {
                            channel_id: from,
                            user_id,
                        },
                        out,
                    );
                }
                let user = person.or(known).unwrap_or_else(|| Person {
                    id: user_id,
                    username: user_id.to_string(),
                    global_name: None,
                    avatar_url: None,
                });
                self.emit(
                    EventData::VoiceJoined {
                        channel_id: to,
                        user,
                        flags,
                    },
                    out,
                );
            }
        }
    }

    /// Compares Discord's full truth with the view and emits the differences: new and
    /// changed rooms first, then people leaving, then people arriving or changing, and
    /// vanished rooms last (after their occupants have left).
    pub fn reconcile_guild(
        &mut self,
        channels: &[Channel],
        voice: &[VoiceState],
        members: &[Member],
    ) -> Vec<EventData> {
        let mut out = Vec::new();
        self.reconcile(channels, voice, members, &mut out);
        out
    }

    fn reconcile(
        &mut self,
        channels: &[Channel],
        voice: &[VoiceState],
        members: &[Member],
        out: &mut Vec<EventData>,
    ) {
        self.channels = channels
            .iter()
            .map(|c| (c.id, (c.kind, c.parent_id)))
            .collect();
        self.hidden = channels
            .iter()
            .filter(|c| c.name.as_deref() == Some(OBFUSCATED_NAME))
            .map(|c| c.id)
            .collect();
        // Only the first reconcile compares with what Redis holds; later ones (a new
        // IDENTIFY in the same session) compare with this gateway's own view, which
        // never sees the web's `room.created`: a room missing from it may well be
        // recorded, with live invite links.
        let rebuild = std::mem::replace(&mut self.fresh, false);
        for c in channels {
            if matches!(
                c.kind,
                ChannelType::GuildVoice | ChannelType::GuildStageVoice
            ) {
                self.channel_changed(c, rebuild, out);
            }
        }
        let forgotten: Vec<Id<ChannelMarker>> = self
            .view
            .access
            .channels
            .keys()
            .filter(|id| !self.channels.contains_key(id))
            .copied()
            .collect();
        let people: BTreeMap<Id<UserMarker>, Person> = members
            .iter()
            .map(|m| (m.user.id, self.person(&m.user)))
            .collect();
        let truth: BTreeMap<Id<UserMarker>, &VoiceState> = voice
            .iter()
            .filter(|v| v.channel_id.is_some())
            .map(|v| (v.user_id, v))
            .collect();
        let gone: Vec<Id<UserMarker>> = self
            .view
            .voice
            .keys()
            .filter(|u| !truth.contains_key(u))
            .copied()
            .collect();
        for user in gone {
            self.voice_to(user, None, VoiceFlags::default(), None, out);
        }
        for (user, vs) in &truth {
            let person = vs
                .member
                .as_ref()
                .map(|m| self.person(&m.user))
                .or_else(|| people.get(user).cloned());
            self.voice_changed(vs, person, out);
        }
        let vanished: Vec<Id<ChannelMarker>> = self
            .view
            .rooms
            .keys()
            .filter(|id| {
                !self
                    .channels
                    .get(id)
                    .is_some_and(|(kind, parent)| self.is_room(*kind, *parent))
            })
            .copied()
            .collect();
        for room in vanished {
            self.room_gone(room, out);
        }
        for channel in forgotten {
            self.access_gone(channel, out);
        }
    }

    /// The events that turn `stored` (what Redis holds) into this view: used after the
    /// outage queue overflowed and events were dropped, so Redis ends up right anyway.
    pub fn diff_from(&self, stored: &Snapshot) -> Vec<EventData> {
        let mut out = Vec::new();
        let mut scratch = stored.clone();
        let mut emit = |data: EventData, scratch: &mut Snapshot| {
            scratch.apply_data(&data, crate::event::now_ms());
            out.push(data);
        };
        if let Some(guild) = &self.view.access.guild
            && scratch.access.guild.as_ref() != Some(guild)
        {
            emit(
                EventData::GuildUpdated {
                    id: guild.id,
                    name: guild.name.clone(),
                    owner_id: guild.owner_id,
                    roles: guild.roles.clone(),
                },
                &mut scratch,
            );
        }
        for (id, overwrites) in &self.view.access.channels {
            if scratch.access.channels.get(id) != Some(overwrites) {
                emit(
                    EventData::ChannelAccess {
                        channel_id: *id,
                        overwrites: Some(overwrites.clone()),
                    },
                    &mut scratch,
                );
            }
        }
        for (id, room) in &self.view.rooms {
            let owned = room.creator_id.is_some() && room.role_id.is_some();
            match scratch.rooms.get(id) {
                // Redis has no owner for a room we know Coven made: it lost the record
                // (or never had it, and then no link was ever made from it).
                old if owned
                    && old.is_none_or(|o| o.creator_id.is_none() || o.role_id.is_none()) =>
                {
                    emit(
                        EventData::RoomCreated {
                            channel_id: *id,
                            name: room.name.clone(),
                            user_limit: room.user_limit,
                            created_by: room.creator_id,
                            role_id: room.role_id,
                        },
                        &mut scratch,
                    );
                    emit(
                        EventData::InviteRenewed {
                            channel_id: *id,
                            generation: lost_generation(),
                        },
                        &mut scratch,
                    );
                }
                None => emit(
                    EventData::RoomCreated {
                        channel_id: *id,
                        name: room.name.clone(),
                        user_limit: room.user_limit,
                        created_by: None,
                        role_id: None,
                    },
                    &mut scratch,
                ),
                Some(old) if old.name != room.name || old.user_limit != room.user_limit => emit(
                    EventData::RoomUpdated {
                        channel_id: *id,
                        name: room.name.clone(),
                        user_limit: room.user_limit,
                    },
                    &mut scratch,
                ),
                Some(_) => {}
            }
        }
        let stale: Vec<_> = scratch
            .voice
            .iter()
            .filter(|(u, v)| {
                self.view
                    .voice
                    .get(u)
                    .is_none_or(|now| now.channel_id != v.channel_id)
            })
            .map(|(u, v)| (*u, v.channel_id))
            .collect();
        for (user_id, channel_id) in stale {
            emit(
                EventData::VoiceLeft {
                    channel_id,
                    user_id,
                },
                &mut scratch,
            );
        }
        for (user_id, now) in &self.view.voice {
            match scratch.voice.get(user_id) {
                None => emit(
                    EventData::VoiceJoined {
                        channel_id: now.channel_id,
                        user: now.user.clone(),
                        flags: now.flags,
                    },
                    &mut scratch,
                ),
                Some(old) if old.flags != now.flags => emit(
                    EventData::VoiceUpdated {
                        channel_id: now.channel_id,
                        user_id: *user_id,
                        flags: now.flags,
                    },
                    &mut scratch,
                ),
                Some(_) => {}
            }
        }
        let gone: Vec<_> = scratch
            .rooms
            .keys()
            .filter(|id| !self.view.rooms.contains_key(id))
            .copied()
            .collect();
        for channel_id in gone {
            emit(EventData::RoomDeleted { channel_id }, &mut scratch);
        }
        let forgotten: Vec<_> = scratch
            .access
            .channels
            .keys()
            .filter(|id| !self.view.access.channels.contains_key(id))
            .copied()
            .collect();
        for channel_id in forgotten {
            emit(
                EventData::ChannelAccess {
                    channel_id,
                    overwrites: None,
                },
                &mut scratch,
            );
        }
        out
    }

    fn person(&self, user: &User) -> Person {
        Person {
            id: user.id,
            username: user.name.clone(),
            global_name: user.global_name.clone(),
            avatar_url: user
                .avatar
                .map(|hash| crate::event::avatar_url(&self.cdn, user.id, &hash.to_string())),
        }
    }
}

/// An invite generation above any a lost record could have counted: the current unix
/// time in seconds. A record counts from 0 (or from an earlier rebuild's time), one per
/// "New link", which people press far less than once a second over a room's life.
fn lost_generation() -> u32 {
    u32::try_from(crate::event::now_ms() / 1000).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use serde_json::json;

    const GUILD: u64 = 1;
    const CATEGORY: u64 = 50;

    fn dispatch(t: &str, d: serde_json::Value) -> Dispatch {
        use serde::de::DeserializeSeed;
        use twilight_model::gateway::event::{GatewayEvent, GatewayEventDeserializer};
        let frame = json!({"t": t, "s": 1, "op": 0, "d": d}).to_string();
        let de = GatewayEventDeserializer::from_json(&frame).unwrap();
        match de
            .deserialize(&mut serde_json::Deserializer::from_str(&frame))
            .unwrap()
        {
            GatewayEvent::Dispatch(_, e) => e.into(),
            other => panic!("{other:?}"),
        }
    }

    fn channel(id: u64, parent: Option<u64>, name: &str, limit: u32) -> serde_json::Value {
        json!({"id": id.to_string(), "guild_id": GUILD.to_string(), "type": 2, "name": name,
               "parent_id": parent.map(|p| p.to_string()), "user_limit": limit, "position": 0,
               "permission_overwrites": []})
    }

    fn voice(user: u64, channel: Option<u64>, mute: bool) -> serde_json::Value {
        json!({"guild_id": GUILD.to_string(), "channel_id": channel.map(|c| c.to_string()),
               "user_id": user.to_string(), "session_id": "s", "deaf": false, "mute": false,
               "self_deaf": false, "self_mute": mute, "self_video": false, "self_stream": false,
               "suppress": false, "request_to_speak_timestamp": null,
               "member": {"user": {"id": user.to_string(), "username": format!("u{user}"),
                          "global_name": null, "avatar": "0123456789abcdef0123456789abcdef",
                          "discriminator": "0"},
                          "roles": [], "joined_at": "2024-01-01T00:00:00.000000+00:00",
                          "deaf": false, "mute": false, "flags": 0}})
    }

    /// The kinds of the events readers see (the permission bookkeeping left out; it has
    /// its own test).
    fn kinds(events: &[EventData]) -> Vec<&'static str> {
        events
            .iter()
            .filter(|e| e.audience() != crate::event::Audience::Internal)
            .map(|e| e.kind().as_str())
            .collect()
    }

    fn all_kinds(events: &[EventData]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind().as_str()).collect()
    }

    #[test]
    fn permissions_are_recorded_before_rooms_and_hidden_channels_vanish() {
        let mut d = deriver();
        let hide = json!([{"id": GUILD.to_string(), "type": 0, "allow": "0", "deny": "1024"}]);
        let mut room = channel(10, Some(CATEGORY), "t", 4);
        room["permission_overwrites"] = hide.clone();
        assert_eq!(
            all_kinds(&d.on_dispatch(&dispatch("CHANNEL_CREATE", room.clone()))),
            ["channel.access", "room.created"],
            "who may see a room is known before the room"
        );
        assert!(d.view().access.channels.contains_key(&Id::new(10)));
        // Same overwrites again: nothing to say.
        assert!(
            d.on_dispatch(&dispatch("CHANNEL_UPDATE", room.clone()))
                .is_empty()
        );
        // The lobby is not a room, but who sits in it is shown, so its overwrites count.
        assert_eq!(
            all_kinds(&d.on_dispatch(&dispatch("CHANNEL_CREATE", channel(11, None, "lobby", 0)))),
            ["channel.access"]
        );
        d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(10), false)));
        // Discord obfuscates a channel the bot can no longer view: its room and the
        // people in it disappear, and so does its access record.
        let mut hidden = channel(10, Some(CATEGORY), OBFUSCATED_NAME, 0);
        hidden["permission_overwrites"] = hide;
        hidden["flags"] = json!(1 << 17);
        assert_eq!(
            all_kinds(&d.on_dispatch(&dispatch("CHANNEL_UPDATE", hidden))),
            ["voice.left", "room.deleted", "channel.access"]
        );
        assert!(d.view().rooms.is_empty() && d.view().voice.is_empty());
        assert!(!d.view().access.channels.contains_key(&Id::new(10)));
        // Someone entering the hidden channel is seen leaving voice, nothing more.
        d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(8, Some(11), false)));
        assert_eq!(
            kinds(&d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(8, Some(10), false)))),
            ["voice.left"]
        );
        // Roles: created, changed, deleted, each a full `guild.updated`.
        let guild = json!({"id": GUILD.to_string(), "name": "g", "owner_id": "2",
            "afk_timeout": 300, "default_message_notifications": 0, "explicit_content_filter": 0,
            "features": [], "mfa_level": 0, "nsfw_level": 0, "preferred_locale": "en-US",
            "premium_progress_bar_enabled": false, "system_channel_flags": 0,
            "verification_level": 0, "channels": [], "voice_states": [], "members": [],
            "roles": [role(GUILD, 1024)]});
        assert_eq!(
            all_kinds(&d.on_dispatch(&dispatch("GUILD_CREATE", guild))),
            ["guild.updated", "channel.access"],
            "the lobby is gone from Discord's truth"
        );
        let role_event = |t: &str, id: u64, perms: u64| {
            dispatch(
                t,
                json!({"guild_id": GUILD.to_string(), "role": role(id, perms)}),
            )
        };
        assert_eq!(
            all_kinds(&d.on_dispatch(&role_event("GUILD_ROLE_CREATE", 40, 0))),
            ["guild.updated"]
        );
        assert_eq!(
            all_kinds(&d.on_dispatch(&role_event("GUILD_ROLE_UPDATE", 40, 1024))),
            ["guild.updated"]
        );
        assert!(
            d.on_dispatch(&role_event("GUILD_ROLE_UPDATE", 40, 1024))
                .is_empty()
        );
        let guild = d.view().access.guild.clone().unwrap();
        assert_eq!(guild.roles.len(), 2);
        assert_eq!(guild.owner_id, Id::new(2));
        assert_eq!(
            all_kinds(&d.on_dispatch(&dispatch(
                "GUILD_ROLE_DELETE",
                json!({"guild_id": GUILD.to_string(), "role_id": "40"})
            ))),
            ["guild.updated"]
        );
        assert_eq!(d.view().access.guild.as_ref().unwrap().roles.len(), 1);
    }

    fn role(id: u64, permissions: u64) -> serde_json::Value {
        json!({"id": id.to_string(), "name": "r", "color": 0,
               "colors": {"primary_color": 0, "secondary_color": null, "tertiary_color": null},
               "hoist": false, "position": 0, "permissions": permissions.to_string(),
               "managed": false, "mentionable": false, "flags": 0})
    }

    fn deriver() -> Deriver {
        Deriver::new(Id::new(GUILD), vec![Id::new(CATEGORY)], Snapshot::default())
    }

    #[test]
    fn join_flag_change_move_and_leave_follow_the_spec() {
        let mut d = deriver();
        let mut all = Vec::new();
        for c in [10, 11] {
            all.extend(d.on_dispatch(&dispatch(
                "CHANNEL_CREATE",
                channel(c, Some(CATEGORY), "t", 4),
            )));
        }
        all.extend(d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(10), false))));
        all.extend(d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(10), false))));
        all.extend(d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(10), true))));
        all.extend(d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(11), true))));
        all.extend(d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, None, true))));
        assert_eq!(
            kinds(&all),
            [
                "room.created",
                "room.created",
                "voice.joined",
                "voice.updated",
                "voice.left",
                "voice.joined",
                "voice.left"
            ]
        );
        all.retain(|e| e.audience() != crate::event::Audience::Internal);
        let EventData::VoiceJoined { user, .. } = &all[2] else {
            unreachable!()
        };
        assert_eq!(user.username, "u7");
        assert_eq!(
            user.avatar_url.as_deref(),
            Some(
                "https://cdn.discordapp.com/avatars/7/0123456789abcdef0123456789abcdef.png?size=64"
            )
        );
        assert!(
            matches!(all[4], EventData::VoiceLeft { channel_id, .. } if channel_id == Id::new(10))
        );
    }

    #[test]
    fn only_voice_channels_in_the_category_are_rooms_and_other_guilds_are_ignored() {
        let mut d = deriver();
        assert_eq!(
            all_kinds(&d.on_dispatch(&dispatch("CHANNEL_CREATE", channel(10, None, "lobby", 0)))),
            ["channel.access"],
            "not a room, but its overwrites decide who sees who sits there"
        );
        let mut other = channel(12, Some(CATEGORY), "elsewhere", 0);
        other["guild_id"] = json!("999");
        assert!(d.on_dispatch(&dispatch("CHANNEL_CREATE", other)).is_empty());
        let mut vs = voice(7, Some(10), false);
        vs["guild_id"] = json!("999");
        assert!(
            d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", vs))
                .is_empty()
        );
        // Voice in a non-room channel still counts: pages offer "Move me in" from there.
        assert_eq!(
            kinds(&d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(10), false)))),
            ["voice.joined"]
        );
        // Renaming a room is an update; moving it out of the category deletes it.
        d.on_dispatch(&dispatch(
            "CHANNEL_CREATE",
            channel(11, Some(CATEGORY), "a", 4),
        ));
        assert_eq!(
            kinds(&d.on_dispatch(&dispatch(
                "CHANNEL_UPDATE",
                channel(11, Some(CATEGORY), "b", 4)
            ))),
            ["room.updated"]
        );
        assert!(
            d.on_dispatch(&dispatch(
                "CHANNEL_UPDATE",
                channel(11, Some(CATEGORY), "b", 4)
            ))
            .is_empty()
        );
        assert_eq!(
            kinds(&d.on_dispatch(&dispatch("CHANNEL_UPDATE", channel(11, None, "b", 4)))),
            ["room.deleted"]
        );
    }

    #[test]
    fn dispatches_route_to_their_guild_and_the_session_s_own_to_every_guild() {
        let ready = dispatch(
            "READY",
            json!({"v": 10, "user": {"id": BOT.to_string(), "username": "coven", "discriminator": "0",
                   "avatar": null, "bot": true, "mfa_enabled": false, "verified": true, "flags": 0}, "guilds": [{"id": "1", "unavailable": true}],
                   "session_id": "s", "resume_gateway_url": "wss://x", "shard": [0, 1],
                   "application": {"id": "5", "flags": 0}}),
        );
        assert_eq!(route(&ready), Route::Every);
        assert_eq!(route(&Dispatch::Resumed), Route::Every);
        assert_eq!(
            route(&dispatch("CHANNEL_CREATE", channel(10, None, "lobby", 0))),
            Route::Guild(Id::new(GUILD))
        );
        let mut other = voice(7, Some(10), false);
        other["guild_id"] = json!("999");
        assert_eq!(
            route(&dispatch("VOICE_STATE_UPDATE", other.clone())),
            Route::Guild(Id::new(999))
        );
        assert_eq!(route(&guild(&[])), Route::Guild(Id::new(GUILD)));
        // Each guild's deriver takes its own dispatches and ignores the others'.
        let mut ours = deriver();
        let mut theirs = Deriver::new(Id::new(999), Vec::new(), Snapshot::default());
        assert!(
            ours.on_dispatch(&dispatch("VOICE_STATE_UPDATE", other.clone()))
                .is_empty()
        );
        assert_eq!(
            kinds(&theirs.on_dispatch(&dispatch("VOICE_STATE_UPDATE", other))),
            ["voice.joined"]
        );
        assert!(
            theirs.on_dispatch(&guild(&[])).is_empty(),
            "another guild's GUILD_CREATE"
        );
        assert!(
            theirs
                .on_dispatch(&dispatch("GUILD_DELETE", json!({"id": GUILD.to_string()})))
                .is_empty(),
            "another guild's removal"
        );
    }

    #[test]
    fn guild_delete_is_a_removal_without_unavailable_and_an_outage_with_it() {
        let removed = dispatch("GUILD_DELETE", json!({"id": GUILD.to_string()}));
        let outage = dispatch(
            "GUILD_DELETE",
            json!({"id": GUILD.to_string(), "unavailable": true}),
        );
        assert_eq!(
            registration(&removed),
            Some((Id::new(GUILD), Registration::Removed))
        );
        assert_eq!(
            registration(&outage),
            Some((Id::new(GUILD), Registration::Unavailable))
        );
        assert_eq!(
            registration(&guild(&[])),
            Some((
                Id::new(GUILD),
                Registration::Available {
                    name: "g".to_owned(),
                    icon: None
                }
            ))
        );
        assert_eq!(
            registration(&dispatch("CHANNEL_CREATE", channel(10, None, "lobby", 0))),
            None
        );

        let mut d = deriver();
        d.on_dispatch(&dispatch(
            "CHANNEL_CREATE",
            channel(10, Some(CATEGORY), "t", 4),
        ));
        assert!(
            d.on_dispatch(&outage).is_empty(),
            "an outage ends nothing: the guild is back when Discord is"
        );
        assert_eq!(d.view().rooms.len(), 1);
        let out = d.on_dispatch(&removed);
        assert_eq!(out, [EventData::GuildRemoved { id: Id::new(GUILD) }]);
        assert_eq!(out[0].audience(), crate::event::Audience::Internal);
    }

    #[test]
    fn deleting_an_occupied_room_empties_it_first() {
        let mut d = deriver();
        d.on_dispatch(&dispatch(
            "CHANNEL_CREATE",
            channel(10, Some(CATEGORY), "t", 4),
        ));
        d.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(10), false)));
        let out = d.on_dispatch(&dispatch(
            "CHANNEL_DELETE",
            channel(10, Some(CATEGORY), "t", 4),
        ));
        assert_eq!(kinds(&out), ["voice.left", "room.deleted"]);
        assert!(d.view().voice.is_empty());
    }

    #[test]
    fn reconcile_publishes_only_the_differences() {
        // What readers believed before we went away: a room with 7 and 8 in it, and a
        // room that was deleted while we were gone.
        let mut before = deriver();
        for c in [10, 20] {
            before.on_dispatch(&dispatch(
                "CHANNEL_CREATE",
                channel(c, Some(CATEGORY), "t", 4),
            ));
        }
        before.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(7, Some(10), false)));
        before.on_dispatch(&dispatch("VOICE_STATE_UPDATE", voice(8, Some(10), false)));
        let mut d = Deriver::new(
            Id::new(GUILD),
            vec![Id::new(CATEGORY)],
            before.view().clone(),
        );

        // Discord's truth now: 7 muted in 10, 8 gone, 9 in new room 30, room 20 gone.
        let guild_channels: Vec<Channel> = serde_json::from_value(json!([
            channel(10, Some(CATEGORY), "t", 4),
            channel(30, Some(CATEGORY), "new", 4)
        ]))
        .unwrap();
        let states: Vec<VoiceState> =
            serde_json::from_value(json!([voice(7, Some(10), true), voice(9, Some(30), false)]))
                .unwrap();
        let out = d.reconcile_guild(&guild_channels, &states, &[]);
        assert_eq!(
            kinds(&out),
            [
                "room.created",
                "voice.left",
                "voice.updated",
                "voice.joined",
                "room.deleted"
            ]
        );
        assert!(out.iter().all(|e| e.kind() != EventKind::RoomUpdated));
        // A second reconcile with the same truth says nothing.
        assert!(d.reconcile_guild(&guild_channels, &states, &[]).is_empty());
        // And the events that would take the old snapshot to the new view are the same
        // differences (what the gateway appends after its outage queue overflowed).
        let mut replayed = before.view().clone();
        for e in d.diff_from(before.view()) {
            replayed.apply_data(&e, 0);
        }
        assert_eq!(
            replayed.rooms.keys().collect::<Vec<_>>(),
            d.view().rooms.keys().collect::<Vec<_>>()
        );
        assert_eq!(replayed.voice, d.view().voice);
        assert!(d.diff_from(d.view()).is_empty());
    }

    const CREATOR: u64 = 7;
    const ROLE: u64 = 40;
    const BOT: u64 = 99;

    /// A room as the web's `create_room` makes it in Discord.
    fn coven_room(id: u64, name: &str) -> serde_json::Value {
        let mut c = channel(id, Some(CATEGORY), name, 4);
        c["permission_overwrites"] = serde_json::to_value(crate::access::room_overwrites(
            Id::new(GUILD),
            Id::new(ROLE),
            Id::new(CREATOR),
            Id::new(BOT),
        ))
        .unwrap();
        c
    }

    fn guild(channels: &[serde_json::Value]) -> Dispatch {
        dispatch(
            "GUILD_CREATE",
            json!({"id": GUILD.to_string(), "name": "g", "owner_id": "2",
            "afk_timeout": 300, "default_message_notifications": 0, "explicit_content_filter": 0,
            "features": [], "mfa_level": 0, "nsfw_level": 0, "preferred_locale": "en-US",
            "premium_progress_bar_enabled": false, "system_channel_flags": 0,
            "verification_level": 0, "channels": channels, "voice_states": [], "members": [],
            "roles": [role(GUILD, 1024)]}),
        )
    }

    fn created(events: &[EventData], room: u64) -> (Option<u64>, Option<u64>) {
        events
            .iter()
            .find_map(|e| match e {
                EventData::RoomCreated {
                    channel_id,
                    created_by,
                    role_id,
                    ..
                } if *channel_id == Id::new(room) => {
                    Some((created_by.map(Id::get), role_id.map(Id::get)))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no room.created for {room}: {events:?}"))
    }

    fn renewed(events: &[EventData]) -> Vec<(u64, u32)> {
        events
            .iter()
            .filter_map(|e| match e {
                EventData::InviteRenewed {
                    channel_id,
                    generation,
                } => Some((channel_id.get(), *generation)),
                _ => None,
            })
            .collect()
    }

    fn now_secs() -> u32 {
        u32::try_from(crate::event::now_ms() / 1000).unwrap()
    }

    #[test]
    fn a_room_coven_made_is_rebuilt_with_its_owner_and_its_older_links_retired() {
        // Redis lost everything: the gateway starts from an empty snapshot and Discord's
        // full guild has a room the web made and one someone made by hand.
        let before = now_secs();
        let mut d = deriver();
        let out = d.on_dispatch(&guild(&[
            coven_room(10, "Cube night"),
            channel(11, Some(CATEGORY), "by hand", 4),
        ]));
        assert_eq!(created(&out, 10), (Some(CREATOR), Some(ROLE)));
        assert_eq!(created(&out, 11), (None, None), "not Coven's: no owner");
        let renewals = renewed(&out);
        assert_eq!(renewals.len(), 1, "{out:?}");
        assert_eq!(renewals[0].0, 10);
        assert!(
            renewals[0].1 >= before && renewals[0].1 <= now_secs(),
            "above any counter a lost record had: the unix time"
        );
        let at = out
            .iter()
            .position(|e| matches!(e, EventData::InviteRenewed { .. }))
            .unwrap();
        assert!(
            matches!(&out[at - 1], EventData::RoomCreated { channel_id, .. } if *channel_id == Id::new(10)),
            "renewed right after the record it renews"
        );
        let room = &d.view().rooms[&Id::new(10)];
        assert_eq!(room.creator_id, Some(Id::new(CREATOR)));
        assert_eq!(room.invite_gen, renewals[0].1);
        // The same truth again (a new IDENTIFY): nothing to say.
        assert!(
            d.on_dispatch(&guild(&[
                coven_room(10, "Cube night"),
                channel(11, Some(CATEGORY), "by hand", 4)
            ]))
            .is_empty()
        );

        // Redis kept the record: a new gateway reconciling against it renews nothing.
        let mut kept = Deriver::new(Id::new(GUILD), vec![Id::new(CATEGORY)], {
            let mut v = d.view().clone();
            v.rooms.get_mut(&Id::new(10)).unwrap().invite_gen = 3;
            v
        });
        let out = kept.on_dispatch(&guild(&[
            coven_room(10, "Cube night"),
            channel(11, Some(CATEGORY), "by hand", 4),
        ]));
        assert!(renewed(&out).is_empty(), "{out:?}");
        assert_eq!(kept.view().rooms[&Id::new(10)].invite_gen, 3);

        // Redis kept the room but not its owner (a record from before the loss was
        // refilled without one): the owner is filled in and old links retired.
        let mut ownerless = d.view().clone();
        let r = ownerless.rooms.get_mut(&Id::new(10)).unwrap();
        (r.creator_id, r.role_id, r.invite_gen) = (None, None, 0);
        let mut refill = Deriver::new(Id::new(GUILD), vec![Id::new(CATEGORY)], ownerless);
        let out = refill.on_dispatch(&guild(&[coven_room(10, "Cube night")]));
        assert_eq!(created(&out, 10), (Some(CREATOR), Some(ROLE)));
        assert_eq!(renewed(&out).len(), 1);
    }

    #[test]
    fn the_web_path_names_the_owner_and_retires_no_link() {
        let mut d = deriver();
        d.on_dispatch(&guild(&[]));
        // The web made a room: its CHANNEL_CREATE reaches the gateway, whose view never
        // holds the web's own `room.created`.
        let out = d.on_dispatch(&dispatch("CHANNEL_CREATE", coven_room(10, "Cube night")));
        assert_eq!(kinds(&out), ["room.created"]);
        assert_eq!(created(&out, 10), (Some(CREATOR), Some(ROLE)));
        // Made while the gateway was away and re-identifying: still no renewal, as the
        // web may have recorded it and handed out links meanwhile.
        let out = d.on_dispatch(&guild(&[
            coven_room(10, "Cube night"),
            coven_room(12, "Draft"),
        ]));
        assert_eq!(kinds(&out), ["room.created"]);
        assert_eq!(created(&out, 12), (Some(CREATOR), Some(ROLE)));
        // A resumed session's first GUILD_CREATE comes after a RESUME: not against Redis.
        let mut resumed = deriver();
        resumed.on_dispatch(&dispatch("RESUMED", json!({})));
        let out = resumed.on_dispatch(&guild(&[coven_room(10, "Cube night")]));
        assert_eq!(created(&out, 10), (Some(CREATOR), Some(ROLE)));
        assert!(renewed(&out).is_empty(), "{out:?}");
        // A channel made by hand in Discord, even with a role and a member allowed in
        // but no bot overwrite, stays without an owner.
        let mut by_hand = coven_room(13, "Hand");
        by_hand["permission_overwrites"]
            .as_array_mut()
            .unwrap()
            .retain(|o| o["id"] != BOT.to_string().as_str());
        let out = d.on_dispatch(&dispatch("CHANNEL_CREATE", by_hand));
        assert_eq!(created(&out, 13), (None, None));
    }

    #[test]
    fn the_diff_against_a_snapshot_that_lost_a_room_rebuilds_it_and_retires_its_links() {
        let mut d = deriver();
        d.on_dispatch(&guild(&[]));
        d.on_dispatch(&dispatch("CHANNEL_CREATE", coven_room(10, "Cube night")));
        d.on_dispatch(&dispatch(
            "CHANNEL_CREATE",
            channel(11, Some(CATEGORY), "by hand", 4),
        ));
        let before = now_secs();
        let out = d.diff_from(&Snapshot::default());
        assert_eq!(created(&out, 10), (Some(CREATOR), Some(ROLE)));
        assert_eq!(created(&out, 11), (None, None));
        let renewals = renewed(&out);
        assert_eq!(renewals.len(), 1);
        assert!(renewals[0].0 == 10 && renewals[0].1 >= before);
        let mut replayed = Snapshot::default();
        for e in &out {
            replayed.apply_data(e, 0);
        }
        assert!(d.diff_from(&replayed).is_empty());
        // A snapshot holding the record with its owner: nothing lost, nothing renewed.
        let mut stored = d.view().clone();
        stored.rooms.get_mut(&Id::new(10)).unwrap().invite_gen = 2;
        assert!(renewed(&d.diff_from(&stored)).is_empty());
    }
}
