//! Turns Discord's dispatches into Coven's domain events.
//!
//! [`Deriver`] keeps a view of the guild *as the events have told it* (the same
//! [`Snapshot`] rules the bus applies), so each dispatch is compared with what readers
//! already believe: a voice state into a channel is `voice.joined`, the same channel with
//! other flags is `voice.updated`, a move is `voice.left` then `voice.joined`, no channel
//! is `voice.left`. A full GUILD_CREATE is reconciled against the view and only the
//! differences come out. Owns no I/O.

use std::collections::BTreeMap;

use twilight_model::channel::{Channel, ChannelType};
use twilight_model::gateway::event::Event as Dispatch;
use twilight_model::gateway::payload::incoming::GuildCreate;
use twilight_model::guild::Member;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};
use twilight_model::user::User;
use twilight_model::voice::VoiceState;

use crate::bus::Snapshot;
use crate::event::{EventData, Person, VoiceFlags};

/// Where avatar images live (Discord's CDN).
pub const DEFAULT_CDN: &str = "https://cdn.discordapp.com";

pub struct Deriver {
    guild_id: Id<GuildMarker>,
    category: Option<Id<ChannelMarker>>,
    cdn: String,
    view: Snapshot,
    /// Every voice channel's parent and type, to tell rooms from other channels.
    channels: BTreeMap<Id<ChannelMarker>, (ChannelType, Option<Id<ChannelMarker>>)>,
}

impl Deriver {
    /// Starts from what readers already believe (the bus snapshot), so the first
    /// dispatches and the first reconcile are compared with it.
    pub fn new(
        guild_id: Id<GuildMarker>,
        category: Option<Id<ChannelMarker>>,
        view: Snapshot,
    ) -> Self {
        Self {
            guild_id,
            category,
            cdn: DEFAULT_CDN.to_owned(),
            view,
            channels: BTreeMap::new(),
        }
    }

    pub fn with_cdn(mut self, cdn: &str) -> Self {
        cdn.trim_end_matches('/').clone_into(&mut self.cdn);
        self
    }

    pub fn view(&self) -> &Snapshot {
        &self.view
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
            Dispatch::GuildCreate(g) => {
                if let GuildCreate::Available(guild) = &**g
                    && guild.id == self.guild_id
                {
                    self.reconcile(
                        &guild.channels,
                        &guild.voice_states,
                        &guild.members,
                        &mut out,
                    );
                }
            }
            Dispatch::ChannelCreate(c) if self.ours(&c.0) => self.channel_changed(&c.0, &mut out),
            Dispatch::ChannelUpdate(c) if self.ours(&c.0) => self.channel_changed(&c.0, &mut out),
            Dispatch::ChannelDelete(c) if self.ours(&c.0) => {
                self.channels.remove(&c.0.id);
                self.room_gone(c.0.id, &mut out);
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

    fn channel_changed(&mut self, c: &Channel, out: &mut Vec<EventData>) {
        self.channels.insert(c.id, (c.kind, c.parent_id));
        let is_room = self.is_room(c.kind, c.parent_id);
        let name = c.name.clone().unwrap_or_default();
        let user_limit = c
            .user_limit
            .and_then(|l| u16::try_from(l).ok())
            .unwrap_or(0);
        match (self.view.rooms.get(&c.id), is_room) {
            (None, true) => self.emit(
                EventData::RoomCreated {
                    channel_id: c.id,
                    name,
                    user_limit,
                    created_by: None,
                    role_id: None,
                },
                out,
            ),
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
        self.voice_to(vs.user_id, vs.channel_id, flags, person, out);
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
        for c in channels {
            if self.is_room(c.kind, c.parent_id) {
                self.channel_changed(c, out);
            }
        }
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
    }

    /// The events that turn `stored` (what Redis holds) into this view: used after the
    /// outage queue overflowed and events were dropped, so Redis ends up right anyway.
    pub fn diff_from(&self, stored: &Snapshot) -> Vec<EventData> {
        let mut out = Vec::new();
        let mut scratch = Snapshot {
            at: stored.at,
            rooms: stored.rooms.clone(),
            voice: stored.voice.clone(),
        };
        let mut emit = |data: EventData, scratch: &mut Snapshot| {
            scratch.apply_data(&data, crate::event::now_ms());
            out.push(data);
        };
        for (id, room) in &self.view.rooms {
            match scratch.rooms.get(id) {
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
        out
    }

    fn person(&self, user: &User) -> Person {
        Person {
            id: user.id,
            username: user.name.clone(),
            global_name: user.global_name.clone(),
            avatar_url: user.avatar.map(|hash| {
                let ext = if hash.is_animated() { "gif" } else { "png" };
                format!("{}/avatars/{}/{hash}.{ext}?size=64", self.cdn, user.id)
            }),
        }
    }
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

    fn kinds(events: &[EventData]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind().as_str()).collect()
    }

    fn deriver() -> Deriver {
        Deriver::new(Id::new(GUILD), Some(Id::new(CATEGORY)), Snapshot::default())
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
        assert!(
            d.on_dispatch(&dispatch("CHANNEL_CREATE", channel(10, None, "lobby", 0)))
                .is_empty()
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
            Some(Id::new(CATEGORY)),
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
}
