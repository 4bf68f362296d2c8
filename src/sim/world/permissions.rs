//! Who may do what in the simulated guild: permissions computed as Discord's
//! "Permissions" topic documents them, the grant and hierarchy rules of the routes that
//! change permissions, and the bot's view of channels (which decides obfuscation).
//!
//! Answers questions only; must not change the world.

use std::collections::BTreeSet;

use super::{Channel, Dispatch, Refusal, World};

/// Discord's permission bits that the simulator checks or grants.
pub mod perm {
    pub const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    pub const KICK_MEMBERS: u64 = 1 << 1;
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_CHANNELS: u64 = 1 << 4;
    pub const ADD_REACTIONS: u64 = 1 << 6;
    pub const STREAM: u64 = 1 << 9;
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    pub const SEND_MESSAGES: u64 = 1 << 11;
    pub const READ_MESSAGE_HISTORY: u64 = 1 << 16;
    pub const CONNECT: u64 = 1 << 20;
    pub const SPEAK: u64 = 1 << 21;
    pub const MUTE_MEMBERS: u64 = 1 << 22;
    pub const DEAFEN_MEMBERS: u64 = 1 << 23;
    pub const MOVE_MEMBERS: u64 = 1 << 24;
    pub const USE_VAD: u64 = 1 << 25;
    pub const CHANGE_NICKNAME: u64 = 1 << 26;
    pub const MANAGE_ROLES: u64 = 1 << 28;
    /// Every bit Discord defines today (up to SEND_VOICE_MESSAGES and friends).
    pub const ALL: u64 = (1 << 51) - 1;

    /// Names for the bits, for error messages that say which permission is missing.
    pub fn name(bit: u64) -> &'static str {
        match bit {
            CREATE_INSTANT_INVITE => "CREATE_INSTANT_INVITE",
            KICK_MEMBERS => "KICK_MEMBERS",
            ADMINISTRATOR => "ADMINISTRATOR",
            MANAGE_CHANNELS => "MANAGE_CHANNELS",
            STREAM => "STREAM",
            VIEW_CHANNEL => "VIEW_CHANNEL",
            CONNECT => "CONNECT",
            SPEAK => "SPEAK",
            MUTE_MEMBERS => "MUTE_MEMBERS",
            DEAFEN_MEMBERS => "DEAFEN_MEMBERS",
            MOVE_MEMBERS => "MOVE_MEMBERS",
            USE_VAD => "USE_VAD",
            MANAGE_ROLES => "MANAGE_ROLES",
            _ => "a permission",
        }
    }
}

impl World {
    // -----------------------------------------------------------------------------------
    // Permissions, as Discord's documentation computes them.

    /// Guild-level permissions of a member (0 for a non-member).
    pub fn base_permissions(&self, user_id: u64) -> u64 {
        if user_id == self.owner_id {
            return perm::ALL;
        }
        let Some(member) = self.members.get(&user_id) else {
            return 0;
        };
        let mut p = self.roles.get(&self.guild_id).map_or(0, |r| r.permissions);
        for role in &member.roles {
            p |= self.roles.get(role).map_or(0, |r| r.permissions);
        }
        if p & perm::ADMINISTRATOR != 0 {
            return perm::ALL;
        }
        p
    }

    /// Permissions of a member in a channel, overwrites applied.
    pub fn channel_permissions(&self, user_id: u64, channel: &Channel) -> u64 {
        let mut p = self.base_permissions(user_id);
        if p == perm::ALL {
            return p;
        }
        let Some(member) = self.members.get(&user_id) else {
            return 0;
        };
        let ow = &channel.overwrites;
        if let Some(o) = ow.iter().find(|o| o.kind == 0 && o.id == self.guild_id) {
            p = (p & !o.deny) | o.allow;
        }
        let (mut allow, mut deny) = (0, 0);
        for o in ow
            .iter()
            .filter(|o| o.kind == 0 && member.roles.contains(&o.id))
        {
            allow |= o.allow;
            deny |= o.deny;
        }
        p = (p & !deny) | allow;
        if let Some(o) = ow.iter().find(|o| o.kind == 1 && o.id == user_id) {
            p = (p & !o.deny) | o.allow;
        }
        // Discord's "Implicit Permissions": without View Channel nothing else in the
        // channel applies.
        if p & perm::VIEW_CHANNEL == 0 {
            return 0;
        }
        p
    }

    /// Whether the bot may view a channel, which decides if Discord obfuscates it.
    pub fn bot_can_view(&self, channel: &Channel) -> bool {
        self.channel_permissions(self.bot_id, channel) & perm::VIEW_CHANNEL != 0
    }

    fn bot_view(&self) -> BTreeSet<u64> {
        self.channels
            .values()
            .filter(|c| self.bot_can_view(c))
            .map(|c| c.id)
            .collect()
    }

    /// A channel as `actor` may address it through REST: Discord answers 50001 Missing
    /// Access for a channel the caller cannot view. `None` (an admin) sees everything.
    pub fn channel_for(&self, actor: Option<u64>, id: u64) -> Result<&Channel, Refusal> {
        let channel = self.channel(id)?;
        match actor {
            Some(a) if self.channel_permissions(a, channel) & perm::VIEW_CHANNEL == 0 => {
                Err(Refusal::MissingAccess)
            }
            _ => Ok(channel),
        }
    }

    /// Whether an overwrite in the channel that applies to `user` allows MANAGE_ROLES.
    fn has_manage_roles_overwrite(&self, user: u64, channel: &Channel) -> bool {
        let roles = self.members.get(&user).map(|m| &m.roles);
        channel.overwrites.iter().any(|o| {
            let applies = match o.kind {
                0 => o.id == self.guild_id || roles.is_some_and(|r| r.contains(&o.id)),
                _ => o.id == user,
            };
            applies && o.allow & perm::MANAGE_ROLES != 0
        })
    }

    /// May `actor` allow or deny the bits `changed` in an overwrite of `channel`?
    /// Edit Channel Permissions and Modify Channel: "Only permissions your bot has in the
    /// guild or parent channel (if applicable) can be allowed/denied (unless your bot has
    /// a MANAGE_ROLES overwrite in the channel)"; change log 2021-01-22: "Setting
    /// MANAGE_ROLES permission in channel overwrites is only possible for guild
    /// administrators or users with MANAGE_ROLES as a permission overwrite in the
    /// channel".
    pub(super) fn may_set_overwrite_bits(
        &self,
        actor: u64,
        channel: &Channel,
        changed: u64,
    ) -> Result<(), Refusal> {
        let base = self.base_permissions(actor);
        if base == perm::ALL || self.has_manage_roles_overwrite(actor, channel) {
            return Ok(());
        }
        if changed & perm::MANAGE_ROLES != 0 {
            return Err(Refusal::MissingPermission(perm::MANAGE_ROLES));
        }
        let have = match channel.parent_id.and_then(|p| self.channels.get(&p)) {
            Some(parent) => self.channel_permissions(actor, parent),
            None => base,
        };
        self.require(have, changed)
    }

    /// Runs a change that may alter what the bot can view (a role's permissions, the
    /// bot's roles) and adds the CHANNEL_UPDATE Discord sends for each channel whose
    /// visibility flipped: full data once the bot gains View Channel, the obfuscated form
    /// once it loses it. Channels the change dispatched itself are not repeated.
    pub(super) fn tracking_view<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<(T, Vec<Dispatch>), Refusal>,
    ) -> Result<(T, Vec<Dispatch>), Refusal> {
        let before = self.bot_view();
        let (out, mut events) = change(self)?;
        let after = self.bot_view();
        let mentioned: BTreeSet<String> = events
            .iter()
            .filter(|d| d.name.starts_with("CHANNEL_"))
            .filter_map(|d| d.data["id"].as_str().map(str::to_owned))
            .collect();
        for id in before.symmetric_difference(&after) {
            if let Some(c) = self.channels.get(id)
                && !mentioned.contains(&id.to_string())
            {
                events.push(self.channel_dispatch("CHANNEL_UPDATE", c));
            }
        }
        Ok((out, events))
    }

    pub(super) fn require(&self, have: u64, need: u64) -> Result<(), Refusal> {
        let missing = need & !have;
        if missing == 0 {
            Ok(())
        } else {
            Err(Refusal::MissingPermission(1 << missing.trailing_zeros()))
        }
    }

    /// The highest position among a member's roles (the owner outranks everyone).
    pub(super) fn top_position(&self, user_id: u64) -> i64 {
        if user_id == self.owner_id {
            return i64::MAX;
        }
        self.members.get(&user_id).map_or(0, |m| {
            m.roles
                .iter()
                .filter_map(|r| self.roles.get(r))
                .map(|r| r.position)
                .max()
                .unwrap_or(0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;

    #[test]
    fn the_bot_cannot_grant_what_it_lacks() {
        let mut w = world();
        let bot = w.bot_id;
        let err = w
            .create_role(Some(bot), None, perm::ADMINISTRATOR, 0, false, false)
            .unwrap_err();
        assert_eq!(err, Refusal::MissingPermission(perm::ADMINISTRATOR));
    }

    #[test]
    fn overwrite_edits_follow_discords_grant_rules() {
        let mut w = world();
        let bot = w.bot_id;
        let room = private_room(&mut w, None);
        let ash = member_named(&w, "ash");
        let grant = |allow| Overwrite {
            id: ash,
            kind: 1,
            allow,
            deny: 0,
        };
        // The bot cannot allow what it does not have...
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(perm::ADMINISTRATOR))
                .unwrap_err(),
            Refusal::MissingPermission(perm::ADMINISTRATOR)
        );
        // ...nor set MANAGE_ROLES without being an administrator...
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(perm::MANAGE_ROLES))
                .unwrap_err(),
            Refusal::MissingPermission(perm::MANAGE_ROLES)
        );
        // ...but may grant what it has.
        let events = w
            .set_overwrite(Some(bot), room, grant(perm::VIEW_CHANNEL))
            .unwrap();
        assert_eq!(names(&events), ["CHANNEL_UPDATE"]);
        assert_eq!(
            w.delete_overwrite(Some(bot), room, 1).unwrap_err(),
            Refusal::UnknownOverwrite
        );
        assert_eq!(
            names(&w.delete_overwrite(Some(bot), room, ash).unwrap()),
            ["CHANNEL_UPDATE"]
        );
        // With its role's MANAGE_ROLES denied in the channel, nothing at all.
        let bot_role = *w.members[&bot].roles.iter().next().unwrap();
        w.set_overwrite(
            None,
            room,
            Overwrite {
                id: bot_role,
                kind: 0,
                allow: 0,
                deny: perm::MANAGE_ROLES,
            },
        )
        .unwrap();
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(perm::VIEW_CHANNEL))
                .unwrap_err(),
            Refusal::MissingPermission(perm::MANAGE_ROLES)
        );
    }
}
