//! Membership and voice: users joining the guild, kicks, moves on the bot's authority,
//! and people joining or leaving voice from their own client.
//!
//! Computes no permissions itself (see `permissions`) and builds no JSON (see `wire`).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::permissions::rank;
use super::{
    Dispatch, Member, MemberEdit, Refusal, SelfEdit, User, Voice, VoiceFlags, World, kind,
};
use crate::sim::ids::{avatar_hash, random_hex};
use twilight_model::guild::Permissions;

impl World {
    /// Adds a user to the guild (the OAuth2 `guilds.join` flow), with Add Guild Member's
    /// `roles`, `nick`, `mute` and `deaf`, each needing the permission its row names.
    /// `Ok(None)` when they were a member already (Discord changes nothing then).
    pub fn add_member(
        &mut self,
        actor: u64,
        user_id: u64,
        roles: &[u64],
        joining: Joining,
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
        if let Some(nick) = &joining.nick {
            check_nick(Some(nick))?;
            self.require(have, Permissions::MANAGE_NICKNAMES)?;
        }
        if joining.mute {
            self.require(have, Permissions::MUTE_MEMBERS)?;
        }
        if joining.deaf {
            self.require(have, Permissions::DEAFEN_MEMBERS)?;
        }
        for r in roles {
            if !self.roles.contains_key(r) {
                return Err(Refusal::UnknownRole);
            }
        }
        let mut member = Member::new(roles.iter().copied().collect());
        member.nick = joining.nick.filter(|n| !n.is_empty());
        member.mute = joining.mute;
        member.deaf = joining.deaf;
        self.members.insert(user_id, member);
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
                if self.top_rank(user_id) >= self.top_rank(actor) {
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
        self.check_move(actor, user_id, channel_id)?;
        let Some(current) = self.voice.get(&user_id).cloned() else {
            return Err(Refusal::NotInVoice);
        };
        let Some(to) = channel_id else {
            return Ok(self.set_voice_unchecked(user_id, None, current.flags));
        };
        self.moves.push((user_id, to));
        if current.channel_id == to {
            return Ok(Vec::new());
        }
        Ok(self.set_voice_unchecked(user_id, Some(to), current.flags))
    }

    /// Whether `actor` may move `user_id` to `channel_id` (or disconnect them).
    fn check_move(&self, actor: u64, user_id: u64, channel_id: Option<u64>) -> Result<(), Refusal> {
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        let Some(current) = self.voice.get(&user_id) else {
            return Err(Refusal::NotInVoice);
        };
        let from = self.channel(current.channel_id)?;
        self.require(
            self.channel_permissions(actor, from),
            Permissions::MOVE_MEMBERS,
        )?;
        let Some(to) = channel_id else {
            return Ok(());
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
        )
    }

    /// Modify Guild Member on the bot's authority: every documented field, each with the
    /// permission its row names, checked all before any lands (a refused request changes
    /// nothing). One GUILD_MEMBER_UPDATE for the member fields, a VOICE_STATE_UPDATE for
    /// a server mute or deafen, then the move (`channel_id`).
    pub fn modify_member(
        &mut self,
        actor: u64,
        user_id: u64,
        edit: MemberEdit,
        now_ms: i64,
    ) -> Result<Vec<Dispatch>, Refusal> {
        let member = self.members.get(&user_id).ok_or(Refusal::UnknownMember)?;
        let have = self.guild_permissions(actor);
        let outranks = self.top_rank(actor) > self.top_rank(user_id);
        if let Some(nick) = &edit.nick {
            // Nicknames are 1-32 characters; Discord's hierarchy keeps a bot from renaming
            // the owner or anyone whose highest role is not below its own.
            check_nick(nick.as_deref())?;
            self.require(have, Permissions::MANAGE_NICKNAMES)?;
            if !outranks && user_id != actor {
                return Err(Refusal::MissingPermission(Permissions::MANAGE_NICKNAMES));
            }
        }
        if let Some(roles) = &edit.roles {
            self.require(have, Permissions::MANAGE_ROLES)?;
            let top = self.top_rank(actor);
            let wanted: BTreeSet<u64> = roles.iter().copied().collect();
            for r in &wanted {
                if *r == self.guild_id || !self.roles.contains_key(r) {
                    return Err(Refusal::Invalid(
                        "roles",
                        "UNKNOWN_ROLE",
                        format!("Unknown role {r}."),
                    ));
                }
            }
            // Every role granted or taken must sit below the bot's highest role, and
            // managed roles come and go with their integration only.
            for r in wanted.symmetric_difference(&member.roles) {
                let Some(role) = self.roles.get(r) else {
                    continue;
                };
                if role.managed || rank(role) >= top {
                    return Err(Refusal::MissingPermission(Permissions::MANAGE_ROLES));
                }
            }
        }
        let voice_channel = self.voice.get(&user_id).map(|v| v.channel_id);
        for (asked, bit) in [
            (edit.mute, Permissions::MUTE_MEMBERS),
            (edit.deaf, Permissions::DEAFEN_MEMBERS),
        ] {
            if asked.is_none() {
                continue;
            }
            // "Will throw a 400 error if the user is not in a voice channel."
            let channel = voice_channel.ok_or(Refusal::NotInVoice)?;
            let channel = self.channel(channel)?;
            self.require(self.channel_permissions(actor, channel), bit)?;
        }
        if let Some(until) = &edit.communication_disabled_until {
            self.require(have, Permissions::MODERATE_MEMBERS)?;
            // "Will throw a 403 error if the user has the ADMINISTRATOR permission or is
            // the owner of the guild"; the hierarchy applies as for kicks.
            let target = self.guild_permissions(user_id);
            if user_id == self.owner_id || target.contains(Permissions::ADMINISTRATOR) || !outranks
            {
                return Err(Refusal::MissingPermission(Permissions::MODERATE_MEMBERS));
            }
            if let Some((_, at)) = until
                && *at > now_ms + 28 * 24 * 3_600_000
            {
                return Err(Refusal::Invalid(
                    "communication_disabled_until",
                    "COMMUNICATION_DISABLED_TIMESTAMP_TOO_LARGE",
                    "Timeout cannot be longer than 28 days.".to_owned(),
                ));
            }
        }
        if edit.flags.is_some() {
            let moderator = Permissions::MODERATE_MEMBERS
                | Permissions::KICK_MEMBERS
                | Permissions::BAN_MEMBERS;
            if !have.contains(Permissions::ADMINISTRATOR)
                && !have.contains(Permissions::MANAGE_GUILD)
                && !have.contains(Permissions::MANAGE_ROLES)
                && !have.contains(moderator)
            {
                return Err(Refusal::MissingPermission(Permissions::MANAGE_GUILD));
            }
        }
        // A move is checked by `move_member` before anything lands.
        if let Some(target) = edit.channel_id {
            self.check_move(actor, user_id, target)?;
        }

        let member_fields = edit.nick.is_some()
            || edit.roles.is_some()
            || edit.mute.is_some()
            || edit.deaf.is_some()
            || edit.communication_disabled_until.is_some()
            || edit.flags.is_some();
        let ((), mut out) = self.tracking_view(|w| {
            let Some(m) = w.members.get_mut(&user_id) else {
                return Err(Refusal::UnknownMember);
            };
            let voice_before = (m.mute, m.deaf);
            if let Some(nick) = edit.nick {
                m.nick = nick.filter(|n| !n.is_empty());
            }
            if let Some(roles) = edit.roles {
                m.roles = roles.into_iter().collect();
            }
            if let Some(mute) = edit.mute {
                m.mute = mute;
            }
            if let Some(deaf) = edit.deaf {
                m.deaf = deaf;
            }
            if let Some(until) = edit.communication_disabled_until {
                m.communication_disabled_until = until.map(|(at, _)| at);
            }
            if let Some(flags) = edit.flags {
                m.flags = (m.flags & !EDITABLE_MEMBER_FLAGS) | (flags & EDITABLE_MEMBER_FLAGS);
            }
            let voice_changed = voice_before != (m.mute, m.deaf);
            let mut out = Vec::new();
            if member_fields {
                out.push(w.member_update(user_id));
            }
            if voice_changed && let Some(v) = w.voice.get(&user_id).cloned() {
                out.push(Dispatch {
                    name: "VOICE_STATE_UPDATE",
                    data: w.voice_json(user_id, Some(v.channel_id), &v, true),
                });
            }
            Ok(((), out))
        })?;
        if let Some(target) = edit.channel_id {
            out.extend(self.move_member(actor, user_id, target)?);
        }
        Ok(out)
    }

    /// Modify Current Member: the bot's own nickname (CHANGE_NICKNAME), guild avatar,
    /// banner and bio. Images arrive as data URIs ("Image Data") and are kept as hashes.
    pub fn modify_self(&mut self, edit: SelfEdit) -> Result<Vec<Dispatch>, Refusal> {
        let me = self.bot_id;
        if !self.members.contains_key(&me) {
            return Err(Refusal::UnknownMember);
        }
        if let Some(nick) = &edit.nick {
            check_nick(nick.as_deref())?;
            self.require(self.guild_permissions(me), Permissions::CHANGE_NICKNAME)?;
        }
        if edit
            .bio
            .as_ref()
            .and_then(Option::as_deref)
            .is_some_and(|b| b.chars().count() > 190)
        {
            return Err(Refusal::Invalid(
                "bio",
                "BASE_TYPE_MAX_LENGTH",
                "Must be 190 or fewer in length.".to_owned(),
            ));
        }
        let Some(m) = self.members.get_mut(&me) else {
            return Err(Refusal::UnknownMember);
        };
        if let Some(nick) = edit.nick {
            m.nick = nick.filter(|n| !n.is_empty());
        }
        if let Some(avatar) = edit.avatar {
            m.avatar = avatar;
        }
        if let Some(banner) = edit.banner {
            m.banner = banner;
        }
        if let Some(bio) = edit.bio {
            m.bio = bio;
        }
        Ok(vec![self.member_update(me)])
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

/// Add Guild Member's fields besides the token and roles.
#[derive(Debug, Clone, Default)]
pub struct Joining {
    pub nick: Option<String>,
    pub mute: bool,
    pub deaf: bool,
}

/// Guild member flags a client may set ("Guild Member Flags", Editable column): only
/// BYPASSES_VERIFICATION.
const EDITABLE_MEMBER_FLAGS: u64 = 1 << 2;

/// A nickname: `None` or empty resets it; otherwise 1-32 characters.
fn check_nick(nick: Option<&str>) -> Result<(), Refusal> {
    match nick {
        Some(n) if n.chars().count() > 32 => Err(Refusal::Invalid(
            "nick",
            "BASE_TYPE_BAD_LENGTH",
            "Must be between 1 and 32 in length.".to_owned(),
        )),
        _ => Ok(()),
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
