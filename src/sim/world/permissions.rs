//! Who may do what in the simulated guild: permissions as Discord's "Permissions" topic
//! computes them, the grant and hierarchy rules of the routes that change permissions,
//! and the bot's view of channels (which decides obfuscation).
//!
//! The computation is twilight-util's `PermissionCalculator`, the one Coven itself uses
//! (`access.rs`); only rules it lacks are added here, each saying where Discord documents
//! it. Answers questions only; must not change the world.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use twilight_model::channel::ChannelType;
use twilight_model::channel::permission_overwrite::{PermissionOverwrite, PermissionOverwriteType};
use twilight_model::guild::Permissions;
use twilight_model::id::Id;
use twilight_model::id::marker::RoleMarker;
use twilight_util::permission_calculator::PermissionCalculator;

use super::{Channel, Dispatch, Overwrite, Refusal, Role, World};

/// The permissions that exist only guild-wide (Kick Members, Change Nickname, ...: no
/// channel type in Discord's table, so no overwrite governs them). The calculator leaves
/// them out of every channel result; asking it for a category (which drops nothing by
/// type) with everything but Administrator shows which they are, without a second list.
const GUILD_ONLY: Permissions = Permissions::all().difference(
    PermissionCalculator::new(
        Id::new(1),
        Id::new(2),
        Permissions::all().difference(Permissions::ADMINISTRATOR),
        &[],
    )
    .in_channel(ChannelType::GuildCategory, &[]),
);

/// The name of a permission for messages ("VIEW_CHANNEL"), as twilight-model spells it.
pub fn name(p: Permissions) -> &'static str {
    p.iter_names()
        .next()
        .map_or("a permission", |(name, _)| name)
}

impl Overwrite {
    /// The overwrite as twilight-model has it; `None` for an id of 0, which no role or
    /// member has (targets are checked to exist before an overwrite is stored).
    fn to_twilight(&self) -> Option<PermissionOverwrite> {
        Some(PermissionOverwrite {
            id: Id::new_checked(self.id)?,
            kind: PermissionOverwriteType::from(self.kind),
            allow: self.allow,
            deny: self.deny,
        })
    }
}

impl World {
    /// Runs the calculator for `user_id`: @everyone's permissions, then the member's roles
    /// (ones deleted meanwhile count for overwrites with no permissions of their own).
    /// Nothing for someone who is neither the owner nor a member.
    fn calculate(
        &self,
        user_id: u64,
        f: impl FnOnce(PermissionCalculator<'_>) -> Permissions,
    ) -> Permissions {
        let member = self.members.get(&user_id);
        let ids = (Id::new_checked(self.guild_id), Id::new_checked(user_id));
        let (Some(guild), Some(user)) = ids else {
            return Permissions::empty();
        };
        if member.is_none() && user_id != self.owner_id {
            return Permissions::empty();
        }
        let of = |id: &u64| {
            self.roles
                .get(id)
                .map_or(Permissions::empty(), |r| r.permissions)
        };
        let roles: Vec<(Id<RoleMarker>, Permissions)> = member
            .into_iter()
            .flat_map(|m| &m.roles)
            .filter(|r| **r != self.guild_id)
            .filter_map(|r| Some((Id::new_checked(*r)?, of(r))))
            .collect();
        let mut calculator = PermissionCalculator::new(guild, user, of(&self.guild_id), &roles);
        if let Some(owner) = Id::new_checked(self.owner_id) {
            calculator = calculator.owner_id(owner);
        }
        f(calculator)
    }

    /// Guild-level permissions of a member (none for a non-member); everything for the
    /// owner and for Administrator.
    pub fn guild_permissions(&self, user_id: u64) -> Permissions {
        self.calculate(user_id, |c| c.root())
    }

    /// Permissions of a member in a channel, overwrites applied.
    pub fn channel_permissions(&self, user_id: u64, channel: &Channel) -> Permissions {
        let overwrites: Vec<PermissionOverwrite> = channel
            .overwrites
            .iter()
            .filter_map(Overwrite::to_twilight)
            .collect();
        let kind = ChannelType::from(channel.kind);
        let p = self.calculate(user_id, |c| c.in_channel(kind, &overwrites));
        // Discord's "Implicit Permissions": without View Channel nothing else in the
        // channel applies. The calculator empties the set only when a role or member
        // overwrite denies View Channel; lacking it at guild level, or through the
        // @everyone overwrite, must empty it too.
        if p.contains(Permissions::VIEW_CHANNEL) {
            p
        } else {
            Permissions::empty()
        }
    }

    /// Whether the bot may view a channel, which decides if Discord obfuscates it.
    pub fn bot_can_view(&self, channel: &Channel) -> bool {
        self.channel_permissions(self.bot_id, channel)
            .contains(Permissions::VIEW_CHANNEL)
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
            Some(a)
                if !self
                    .channel_permissions(a, channel)
                    .contains(Permissions::VIEW_CHANNEL) =>
            {
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
            applies && o.allow.contains(Permissions::MANAGE_ROLES)
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
        changed: Permissions,
    ) -> Result<(), Refusal> {
        let base = self.guild_permissions(actor);
        if base.contains(Permissions::ADMINISTRATOR)
            || self.has_manage_roles_overwrite(actor, channel)
        {
            return Ok(());
        }
        if changed.contains(Permissions::MANAGE_ROLES) {
            return Err(Refusal::MissingPermission(Permissions::MANAGE_ROLES));
        }
        // Guild-only permissions are had in the parent exactly as in the guild: the
        // calculator drops them from channel results, but they are the bot's all the same.
        let have = match channel.parent_id.and_then(|p| self.channels.get(&p)) {
            Some(parent) => self.channel_permissions(actor, parent) | (base & GUILD_ONLY),
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

    /// `Ok` when `have` holds all of `need`; otherwise names the lowest missing bit, as
    /// one permission is what a refusal reports.
    pub(super) fn require(&self, have: Permissions, need: Permissions) -> Result<(), Refusal> {
        let missing = need.difference(have);
        match missing.bits() {
            0 => Ok(()),
            bits => Err(Refusal::MissingPermission(Permissions::from_bits_retain(
                1 << bits.trailing_zeros(),
            ))),
        }
    }

    /// The rank of a member's highest role (the owner outranks everyone; no role is
    /// @everyone's rank).
    pub(super) fn top_rank(&self, user_id: u64) -> Rank {
        if user_id == self.owner_id {
            return (i64::MAX, Reverse(0));
        }
        let everyone = (0, Reverse(self.guild_id));
        self.members.get(&user_id).map_or(everyone, |m| {
            m.roles
                .iter()
                .filter_map(|r| self.roles.get(r))
                .map(rank)
                .max()
                .unwrap_or(everyone)
        })
    }
}

/// Where a role stands in the hierarchy: its position, and on a tie the lower id above
/// ("roles with the same position are sorted by id", Permissions, "Role Object"; the
/// lower id first, as Discord's clients, discord.py's `Role.__lt__` and discord.js's
/// `RoleManager#comparePositions` rank them).
pub(super) type Rank = (i64, Reverse<u64>);

pub(super) fn rank(role: &Role) -> Rank {
    (role.position, Reverse(role.id))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;

    use super::GUILD_ONLY;

    fn overwrite(id: u64, kind: u8, allow: Permissions, deny: Permissions) -> Overwrite {
        Overwrite {
            id,
            kind,
            allow,
            deny,
        }
    }

    /// Discord's order: @everyone overwrite, then the member's role overwrites together
    /// (allow beating deny), then the member's own; without View Channel, nothing.
    #[test]
    fn channel_permissions_follow_discords_order() {
        let mut w = world();
        let (v, c) = (Permissions::VIEW_CHANNEL, Permissions::CONNECT);
        let none = Permissions::empty();
        let (a, _) = w
            .create_role(None, Some("a".into()), none, 0, false, false)
            .unwrap();
        let (b, _) = w
            .create_role(None, Some("b".into()), none, 0, false, false)
            .unwrap();
        let id = |r: &serde_json::Value| r["id"].as_str().unwrap().parse::<u64>().unwrap();
        let (a, b) = (id(&a), id(&b));
        let bramble = member_named(&w, "bramble");
        w.set_member_role(None, bramble, a, true).unwrap();
        w.set_member_role(None, bramble, b, true).unwrap();
        let g = w.guild_id;
        let cases: &[(&str, Vec<Overwrite>, bool, bool)] = &[
            ("no overwrites", vec![], true, true),
            (
                "@everyone loses View",
                vec![overwrite(g, 0, none, v)],
                false,
                false,
            ),
            (
                "@everyone loses Connect",
                vec![overwrite(g, 0, none, c)],
                true,
                false,
            ),
            (
                "a role gives back what @everyone lost",
                vec![overwrite(g, 0, none, v | c), overwrite(a, 0, v | c, none)],
                true,
                true,
            ),
            (
                "one role's allow beats another's deny",
                vec![overwrite(a, 0, none, v), overwrite(b, 0, v, none)],
                true,
                true,
            ),
            (
                "the member's own deny beats their roles",
                vec![overwrite(a, 0, v, none), overwrite(bramble, 1, none, v)],
                false,
                false,
            ),
            (
                "the member's own allow beats a role's deny",
                vec![
                    overwrite(a, 0, none, v | c),
                    overwrite(bramble, 1, v | c, none),
                ],
                true,
                true,
            ),
        ];
        for (what, overwrites, sees, joins) in cases {
            let mut channel = w.channels[&w.lobby_id].clone();
            channel.overwrites = overwrites.clone();
            let p = w.channel_permissions(bramble, &channel);
            assert_eq!(p.contains(v), *sees, "{what}: {p:?}");
            assert_eq!(p.contains(v | c), *joins, "{what}: {p:?}");
            if !sees {
                assert_eq!(p, none, "{what}: without View Channel, nothing");
            }
        }
        // The owner and non-members, whatever the overwrites.
        let mut hidden = w.channels[&w.lobby_id].clone();
        hidden.overwrites = vec![overwrite(g, 0, none, v)];
        assert!(w.channel_permissions(w.owner_id, &hidden).contains(v));
        let iris = member_named(&w, "iris");
        assert_eq!(w.guild_permissions(iris), none);
        assert_eq!(w.channel_permissions(iris, &w.channels[&w.lobby_id]), none);
    }

    #[test]
    fn guild_only_permissions_are_the_ones_no_channel_has() {
        assert!(GUILD_ONLY.contains(Permissions::KICK_MEMBERS | Permissions::CHANGE_NICKNAME));
        assert!(!GUILD_ONLY.intersects(
            Permissions::VIEW_CHANNEL | Permissions::CONNECT | Permissions::MANAGE_ROLES
        ));
    }

    #[test]
    fn the_bot_may_set_guild_only_bits_it_has_in_a_room_of_a_category() {
        let mut w = world();
        let bot = w.bot_id;
        let room = private_room(&mut w, None);
        let ash = member_named(&w, "ash");
        let nick = overwrite(ash, 1, Permissions::CHANGE_NICKNAME, Permissions::empty());
        assert_eq!(
            names(&w.set_overwrite(Some(bot), room, nick).unwrap()),
            ["CHANNEL_UPDATE"]
        );
        let kick = overwrite(ash, 1, Permissions::KICK_MEMBERS, Permissions::empty());
        assert_eq!(
            w.set_overwrite(Some(bot), room, kick).unwrap_err(),
            Refusal::MissingPermission(Permissions::KICK_MEMBERS)
        );
    }

    #[test]
    fn the_bot_cannot_grant_what_it_lacks() {
        let mut w = world();
        let bot = w.bot_id;
        let err = w
            .create_role(Some(bot), None, Permissions::ADMINISTRATOR, 0, false, false)
            .unwrap_err();
        assert_eq!(err, Refusal::MissingPermission(Permissions::ADMINISTRATOR));
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
            deny: Permissions::empty(),
        };
        // The bot cannot allow what it does not have...
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(Permissions::ADMINISTRATOR))
                .unwrap_err(),
            Refusal::MissingPermission(Permissions::ADMINISTRATOR)
        );
        // ...nor set MANAGE_ROLES without being an administrator...
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(Permissions::MANAGE_ROLES))
                .unwrap_err(),
            Refusal::MissingPermission(Permissions::MANAGE_ROLES)
        );
        // ...but may grant what it has.
        let events = w
            .set_overwrite(Some(bot), room, grant(Permissions::VIEW_CHANNEL))
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
                allow: Permissions::empty(),
                deny: Permissions::MANAGE_ROLES,
            },
        )
        .unwrap();
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(Permissions::VIEW_CHANNEL))
                .unwrap_err(),
            Refusal::MissingPermission(Permissions::MANAGE_ROLES)
        );
    }
}
