//! Membership and voice: users joining the guild, kicks, moves on the bot's authority,
//! and people joining or leaving voice from their own client.
//!
//! Computes no permissions itself (see `permissions`) and builds no JSON (see `wire`).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{Dispatch, Member, Refusal, User, Voice, VoiceFlags, World, kind};
use crate::sim::ids::{avatar_hash, random_hex};
use twilight_model::guild::Permissions;

impl World {
    /// Adds a user to the guild (the OAuth2 `guilds.join` flow). `Ok(None)` when they were
    /// a member already.
    pub fn add_member(
        &mut self,
        actor: u64,
        user_id: u64,
        roles: &[u64],
    ) -> Result<Option<Vec<Dispatch>>, Refusal> {
        if !self.users.contains_key(&user_id) {
            return Err(Refusal::UnknownUser);
        }
        if self.members.contains_key(&user_id) {
            return Ok(None);
        }
        let have = self.guild_permissions(actor);
        self.require(have, Permissions::CREATE_INVITE)?;
        if !roles.is_empty() {
            self.require(have, Permissions::MANAGE_ROLES)?;
        }
        for r in roles {
            if !self.roles.contains_key(r) {
                return Err(Refusal::UnknownRole);
            }
        }
        self.members
            .insert(user_id, Member::new(roles.iter().copied().collect()));
        let mut data = self.member_json(user_id).unwrap_or(Value::Null);
        data["guild_id"] = json!(self.guild_id.to_string());
        Ok(Some(vec![Dispatch {
            name: "GUILD_MEMBER_ADD",
            data,
        }]))
    }

    /// Remove Guild Member (a kick): KICK_MEMBERS, and Discord's Permission Hierarchy ("A
    /// bot can only kick ... users whose highest role is lower than the bot's highest
    /// role"). The member leaves voice first, then GUILD_MEMBER_REMOVE follows.
    pub fn remove_member(
        &mut self,
        actor: Option<u64>,
        user_id: u64,
    ) -> Result<Vec<Dispatch>, Refusal> {
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        match actor {
            Some(actor) => {
                self.require(self.guild_permissions(actor), Permissions::KICK_MEMBERS)?;
                if self.top_position(user_id) >= self.top_position(actor) {
                    return Err(Refusal::MissingPermission(Permissions::KICK_MEMBERS));
                }
            }
            // The owner cannot leave without transferring the guild, and the bot leaving
            // would end the simulated guild for every Gateway session.
            None if user_id == self.owner_id || user_id == self.bot_id => {
                return Err(Refusal::Invalid(
                    "user_id",
                    "MEMBER_NOT_REMOVABLE",
                    "The owner and the bot cannot be removed.".to_owned(),
                ));
            }
            None => {}
        }
        let mut out = self.set_voice_unchecked(user_id, None, VoiceFlags::default());
        self.members.remove(&user_id);
        out.push(Dispatch {
            name: "GUILD_MEMBER_REMOVE",
            data: json!({
                "guild_id": self.guild_id.to_string(),
                "user": self.user_json(user_id).unwrap_or(Value::Null),
            }),
        });
        Ok(out)
    }

    /// Moves a member between voice channels (or disconnects them with `None`) on the
    /// bot's authority. The mover needs MOVE_MEMBERS; the target must be in voice.
    pub fn move_member(
        &mut self,
        actor: u64,
        user_id: u64,
        channel_id: Option<u64>,
    ) -> Result<Vec<Dispatch>, Refusal> {
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        let Some(current) = self.voice.get(&user_id).cloned() else {
            return Err(Refusal::NotInVoice);
        };
        let from = self.channel(current.channel_id)?;
        self.require(
            self.channel_permissions(actor, from),
            Permissions::MOVE_MEMBERS,
        )?;
        let Some(to) = channel_id else {
            return Ok(self.set_voice_unchecked(user_id, None, current.flags));
        };
        let target = self.channel(to)?;
        if !kind::is_voice(target.kind) {
            return Err(Refusal::Invalid(
                "channel_id",
                "CHANNEL_TYPE_INVALID",
                "Channel is not a voice channel.".to_owned(),
            ));
        }
        // Modify Guild Member: "When moving members to channels, the API user must have
        // permissions to both connect to the channel and have the MOVE_MEMBERS
        // permission." That is all Discord checks: nothing about whether the moved member
        // could see or join the target themselves, so a bot can move anyone anywhere it
        // may go (Coven must make that check itself).
        self.require(
            self.channel_permissions(actor, target),
            Permissions::MOVE_MEMBERS | Permissions::CONNECT,
        )?;
        self.moves.push((user_id, to));
        if current.channel_id == to {
            return Ok(Vec::new());
        }
        Ok(self.set_voice_unchecked(user_id, Some(to), current.flags))
    }

    /// A user joins, changes flags in, or leaves (`None`) voice on their own, with the
    /// checks Discord's client faces: membership, VIEW_CHANNEL + CONNECT, and the limit.
    pub fn user_voice(
        &mut self,
        user_id: u64,
        channel_id: Option<u64>,
        flags: VoiceFlags,
    ) -> Result<Vec<Dispatch>, Refusal> {
        if !self.users.contains_key(&user_id) {
            return Err(Refusal::UnknownUser);
        }
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        let Some(to) = channel_id else {
            return Ok(if self.voice.contains_key(&user_id) {
                self.set_voice_unchecked(user_id, None, flags)
            } else {
                Vec::new()
            });
        };
        let target = self.channel(to)?;
        if !kind::is_voice(target.kind) {
            return Err(Refusal::Invalid(
                "channel_id",
                "CHANNEL_TYPE_INVALID",
                "Channel is not a voice channel.".to_owned(),
            ));
        }
        let perms = self.channel_permissions(user_id, target);
        self.require(perms, Permissions::VIEW_CHANNEL | Permissions::CONNECT)?;
        let already_here = self.voice.get(&user_id).is_some_and(|v| v.channel_id == to);
        if !already_here && target.user_limit > 0 && !perms.contains(Permissions::MOVE_MEMBERS) {
            let present = self.voice.values().filter(|v| v.channel_id == to).count();
            if present >= target.user_limit as usize {
                return Err(Refusal::ChannelFull);
            }
        }
        if already_here && self.voice.get(&user_id).is_some_and(|v| v.flags == flags) {
            return Ok(Vec::new());
        }
        Ok(self.set_voice_unchecked(user_id, Some(to), flags))
    }

    pub(super) fn set_voice_unchecked(
        &mut self,
        user_id: u64,
        channel_id: Option<u64>,
        flags: VoiceFlags,
    ) -> Vec<Dispatch> {
        match channel_id {
            Some(c) => {
                let session_id = match self.voice.get(&user_id) {
                    Some(v) => v.session_id.clone(),
                    None => random_hex(16),
                };
                self.voice.insert(
                    user_id,
                    Voice {
                        channel_id: c,
                        session_id,
                        flags,
                    },
                );
            }
            None => {
                let Some(old) = self.voice.remove(&user_id) else {
                    return Vec::new();
                };
                let mut data = self.voice_json(user_id, None, &old, true);
                data["channel_id"] = Value::Null;
                return vec![Dispatch {
                    name: "VOICE_STATE_UPDATE",
                    data,
                }];
            }
        }
        let state = self.voice.get(&user_id).cloned();
        state
            .map(|v| Dispatch {
                name: "VOICE_STATE_UPDATE",
                data: self.voice_json(user_id, Some(v.channel_id), &v, true),
            })
            .into_iter()
            .collect()
    }

    pub(super) fn member_update(&self, user_id: u64) -> Dispatch {
        let mut data = self.member_json(user_id).unwrap_or(Value::Null);
        data["guild_id"] = json!(self.guild_id.to_string());
        Dispatch {
            name: "GUILD_MEMBER_UPDATE",
            data,
        }
    }

    pub fn add_user(&mut self, username: String, global_name: Option<String>, member: bool) -> u64 {
        let id = self.ids.mint();
        self.users.insert(
            id,
            User {
                id,
                username,
                global_name,
                avatar: Some(avatar_hash(id)),
                bot: false,
            },
        );
        if member {
            self.members.insert(id, Member::new(BTreeSet::new()));
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use serde_json::Value;

    #[test]
    fn the_bot_moves_a_member_who_could_not_join_by_themselves() {
        let mut w = world();
        let bot = w.bot_id;
        let room = private_room(&mut w, None);
        let bramble = member_named(&w, "bramble");
        w.user_voice(bramble, Some(w.lobby_id), VoiceFlags::default())
            .unwrap();
        // Bramble may not enter the room on their own...
        assert_eq!(
            w.user_voice(bramble, Some(room), VoiceFlags::default())
                .unwrap_err(),
            Refusal::MissingPermission(Permissions::VIEW_CHANNEL)
        );
        // ...but Discord lets a mover with Move Members and Connect put them there.
        let events = w.move_member(bot, bramble, Some(room)).unwrap();
        assert_eq!(names(&events), ["VOICE_STATE_UPDATE"]);
        assert_eq!(w.voice[&bramble].channel_id, room);
        assert_eq!(w.moves, [(bramble, room)]);
    }

    #[test]
    fn the_movers_own_permissions_still_count() {
        let mut w = world();
        let bot = w.bot_id;
        let ash = member_named(&w, "ash");
        w.user_voice(ash, Some(w.lobby_id), VoiceFlags::default())
            .unwrap();
        let room = private_room(&mut w, None);
        // Without Connect for the bot in the target, no move.
        w.set_overwrite(
            None,
            room,
            Overwrite {
                id: bot,
                kind: 1,
                allow: Permissions::VIEW_CHANNEL | Permissions::MOVE_MEMBERS,
                deny: Permissions::CONNECT,
            },
        )
        .unwrap();
        assert_eq!(
            w.move_member(bot, ash, Some(room)).unwrap_err(),
            Refusal::MissingPermission(Permissions::CONNECT)
        );
        // Nor without Move Members.
        w.set_overwrite(
            None,
            room,
            Overwrite {
                id: bot,
                kind: 1,
                allow: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
                deny: Permissions::MOVE_MEMBERS,
            },
        )
        .unwrap();
        assert_eq!(
            w.move_member(bot, ash, Some(room)).unwrap_err(),
            Refusal::MissingPermission(Permissions::MOVE_MEMBERS)
        );
        assert!(w.moves.is_empty());
    }

    #[test]
    fn removing_a_member_disconnects_them_first() {
        let mut w = world();
        let bot = w.bot_id;
        let cinder = member_named(&w, "cinder");
        w.user_voice(cinder, Some(w.lobby_id), VoiceFlags::default())
            .unwrap();
        assert_eq!(
            w.remove_member(Some(bot), cinder).unwrap_err(),
            Refusal::MissingPermission(Permissions::KICK_MEMBERS)
        );
        let (kicker, _) = w
            .create_role(
                None,
                Some("kick".into()),
                Permissions::KICK_MEMBERS,
                0,
                false,
                false,
            )
            .unwrap();
        let kicker: u64 = kicker["id"].as_str().unwrap().parse().unwrap();
        w.set_member_role(None, bot, kicker, true).unwrap();
        // The owner outranks the bot.
        assert_eq!(
            w.remove_member(Some(bot), w.owner_id).unwrap_err(),
            Refusal::MissingPermission(Permissions::KICK_MEMBERS)
        );
        let events = w.remove_member(Some(bot), cinder).unwrap();
        assert_eq!(
            names(&events),
            ["VOICE_STATE_UPDATE", "GUILD_MEMBER_REMOVE"]
        );
        assert_eq!(events[0].data["channel_id"], Value::Null);
        assert_eq!(events[1].data["user"]["id"], cinder.to_string());
        assert!(!w.members.contains_key(&cinder));
        assert!(w.voice.is_empty());
        assert_eq!(
            w.remove_member(None, cinder).unwrap_err(),
            Refusal::UnknownMember
        );
    }

    #[test]
    fn moving_needs_voice() {
        let mut w = world();
        let bot = w.bot_id;
        let ash = member_named(&w, "ash");
        assert_eq!(
            w.move_member(bot, ash, Some(w.lobby_id)).unwrap_err(),
            Refusal::NotInVoice
        );
    }
}
