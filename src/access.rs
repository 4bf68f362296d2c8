//! Who may see and join which channel, decided exactly as Discord decides it.
//!
//! Discord's "Permissions" topic: a member's guild permissions are @everyone's plus
//! their roles'; the owner and Administrator get everything; in a channel, the
//! @everyone overwrite applies, then the member's role overwrites together, then the
//! member's own. twilight-util's `PermissionCalculator` implements that algorithm; this
//! module only feeds it what the gateway recorded (`guild.updated`, `channel.access`)
//! and a member's roles.
//!
//! A channel Coven knows nothing true about (hidden from the bot, obfuscated by Discord,
//! or never announced) is visible to nobody, owners included. Owns no I/O; must not know
//! about HTTP or storage.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use twilight_model::channel::ChannelType;
use twilight_model::channel::permission_overwrite::{PermissionOverwrite, PermissionOverwriteType};
use twilight_model::guild::Permissions;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, RoleMarker, UserMarker};
use twilight_util::permission_calculator::PermissionCalculator;

use crate::event::{EventData, RoleAccess};

/// The guild as `guild.updated` last described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuildRecord {
    pub id: Id<GuildMarker>,
    pub name: String,
    pub owner_id: Id<UserMarker>,
    pub roles: Vec<RoleAccess>,
}

/// A member's roles, as `member.updated` last recorded them (`P:{G}:members`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub user_id: Id<UserMarker>,
    pub roles: Vec<Id<RoleMarker>>,
}

/// What visibility is computed from: the guild's roles and every voice channel's
/// overwrites.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub guild: Option<GuildRecord>,
    pub channels: BTreeMap<Id<ChannelMarker>, Vec<PermissionOverwrite>>,
}

/// Someone whose permissions are asked about.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    pub user: Id<UserMarker>,
    pub roles: &'a [Id<RoleMarker>],
}

impl Access {
    /// Takes an event into account; `true` when it changed who may see what.
    pub fn apply(&mut self, data: &EventData) -> bool {
        match data {
            EventData::GuildUpdated {
                id,
                name,
                owner_id,
                roles,
            } => {
                let guild = GuildRecord {
                    id: *id,
                    name: name.clone(),
                    owner_id: *owner_id,
                    roles: roles.clone(),
                };
                let changed = self.guild.as_ref() != Some(&guild);
                self.guild = Some(guild);
                changed
            }
            EventData::ChannelAccess {
                channel_id,
                overwrites: Some(overwrites),
            } => {
                self.channels
                    .insert(*channel_id, overwrites.clone())
                    .as_ref()
                    != Some(overwrites)
            }
            EventData::ChannelAccess {
                channel_id,
                overwrites: None,
            } => self.channels.remove(channel_id).is_some(),
            _ => false,
        }
    }

    /// What `who` may do in `channel`; nothing when the guild or the channel is unknown.
    pub fn permissions(&self, who: Principal<'_>, channel: Id<ChannelMarker>) -> Permissions {
        let (Some(guild), Some(overwrites)) = (&self.guild, self.channels.get(&channel)) else {
            return Permissions::empty();
        };
        let everyone_id: Id<RoleMarker> = guild.id.cast();
        let everyone = guild
            .roles
            .iter()
            .find(|r| r.id == everyone_id)
            .map_or(Permissions::empty(), |r| r.permissions);
        // Every role the member holds counts for overwrites, even one whose
        // `guild.updated` has not arrived yet (a room role just made): its guild-level
        // permissions are then unknown, i.e. none.
        let roles: Vec<(Id<RoleMarker>, Permissions)> = who
            .roles
            .iter()
            .filter(|r| **r != everyone_id)
            .map(|r| {
                let permissions = guild
                    .roles
                    .iter()
                    .find(|g| g.id == *r)
                    .map_or(Permissions::empty(), |g| g.permissions);
                (*r, permissions)
            })
            .collect();
        PermissionCalculator::new(guild.id, who.user, everyone, &roles)
            .owner_id(guild.owner_id)
            .in_channel(ChannelType::GuildVoice, overwrites)
    }

    /// Whether Discord shows `channel` to `who` (View Channel).
    pub fn can_see(&self, who: Principal<'_>, channel: Id<ChannelMarker>) -> bool {
        self.permissions(who, channel)
            .contains(Permissions::VIEW_CHANNEL)
    }

    /// Whether `who` could join `channel` by themselves (View Channel and Connect).
    pub fn can_join(&self, who: Principal<'_>, channel: Id<ChannelMarker>) -> bool {
        self.permissions(who, channel)
            .contains(Permissions::VIEW_CHANNEL | Permissions::CONNECT)
    }

    /// Every channel `who` may see.
    pub fn visible(&self, who: Principal<'_>) -> HashSet<Id<ChannelMarker>> {
        self.channels
            .keys()
            .filter(|c| self.can_see(who, **c))
            .copied()
            .collect()
    }
}

/// What a room's role and its creator may do in the room's channel: see it, join, talk,
/// stream.
pub const ROOM_ALLOW: Permissions = Permissions::VIEW_CHANNEL
    .union(Permissions::CONNECT)
    .union(Permissions::SPEAK)
    .union(Permissions::STREAM)
    .union(Permissions::USE_VAD);

/// What the bot may do in a room: the players' rights plus managing them.
pub const BOT_ALLOW: Permissions = ROOM_ALLOW
    .union(Permissions::MOVE_MEMBERS)
    .union(Permissions::MUTE_MEMBERS)
    .union(Permissions::DEAFEN_MEMBERS)
    .union(Permissions::MANAGE_CHANNELS);

/// What Coven asks for when it is added to a server: what it grants in rooms (Discord
/// lets nobody grant what they lack) and making their channels and roles.
pub const COVEN_PERMISSIONS: Permissions = BOT_ALLOW.union(Permissions::MANAGE_ROLES);

/// The overwrites of a room Coven makes: @everyone denied, the room's role, the creator
/// and the bot allowed. They are also Coven's record of ownership in Discord itself
/// ([`room_owner`] reads it back), so a Redis that lost the room's record does not
/// orphan the room.
pub fn room_overwrites(
    guild: Id<GuildMarker>,
    role: Id<RoleMarker>,
    creator: Id<UserMarker>,
    bot: Id<UserMarker>,
) -> Vec<PermissionOverwrite> {
    vec![
        PermissionOverwrite {
            id: guild.cast(),
            kind: PermissionOverwriteType::Role,
            allow: Permissions::empty(),
            deny: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
        },
        PermissionOverwrite {
            id: role.cast(),
            kind: PermissionOverwriteType::Role,
            allow: ROOM_ALLOW,
            deny: Permissions::empty(),
        },
        // The creator may always join their own room, whatever happens to the role.
        PermissionOverwrite {
            id: creator.cast(),
            kind: PermissionOverwriteType::Member,
            allow: ROOM_ALLOW,
            deny: Permissions::empty(),
        },
        PermissionOverwrite {
            id: bot.cast(),
            kind: PermissionOverwriteType::Member,
            allow: BOT_ALLOW,
            deny: Permissions::empty(),
        },
    ]
}

/// Who made a room and which role opens it, as its overwrites say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomOwner {
    pub creator: Id<UserMarker>,
    pub role: Id<RoleMarker>,
}

/// Reads [`room_overwrites`] back: a member allowed [`BOT_ALLOW`] (the bot: `bot` when
/// known), exactly one role other than @everyone allowed [`ROOM_ALLOW`] (the room's
/// role) and exactly one other member allowed it (the creator). Anything else, including
/// a Coven room someone edited into ambiguity in Discord, is not claimed: guessing an
/// owner would hand someone the power to close a room or invite into it.
pub fn room_owner(
    guild: Id<GuildMarker>,
    overwrites: &[PermissionOverwrite],
    bot: Option<Id<UserMarker>>,
) -> Option<RoomOwner> {
    let members = |allowed: Permissions| {
        overwrites
            .iter()
            .filter(move |o| o.kind == PermissionOverwriteType::Member && o.allow.contains(allowed))
            .map(|o| o.id.cast::<UserMarker>())
    };
    let bot = match bot {
        Some(bot) => members(BOT_ALLOW).find(|m| *m == bot)?,
        None => one(members(BOT_ALLOW))?,
    };
    let role = one(overwrites
        .iter()
        .filter(|o| {
            o.kind == PermissionOverwriteType::Role
                && o.id != guild.cast()
                && o.allow.contains(ROOM_ALLOW)
        })
        .map(|o| o.id.cast::<RoleMarker>()))?;
    let creator = one(members(ROOM_ALLOW).filter(|m| *m != bot))?;
    Some(RoomOwner { creator, role })
}

/// The only item, if there is exactly one.
fn one<T>(mut items: impl Iterator<Item = T>) -> Option<T> {
    let first = items.next()?;
    items.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUILD: u64 = 1;
    const OWNER: u64 = 2;
    const STAFF: u64 = 30;
    const ADMINS: u64 = 31;
    const ROOM_ROLE: u64 = 32;

    fn overwrite(
        id: u64,
        kind: PermissionOverwriteType,
        allow: Permissions,
        deny: Permissions,
    ) -> PermissionOverwrite {
        PermissionOverwrite {
            id: Id::new(id),
            kind,
            allow,
            deny,
        }
    }

    fn access() -> Access {
        let everyone = Permissions::VIEW_CHANNEL | Permissions::CONNECT | Permissions::SPEAK;
        let mut a = Access::default();
        a.apply(&EventData::GuildUpdated {
            id: Id::new(GUILD),
            name: "g".into(),
            owner_id: Id::new(OWNER),
            roles: vec![
                RoleAccess {
                    id: Id::new(GUILD),
                    permissions: everyone,
                },
                RoleAccess {
                    id: Id::new(STAFF),
                    permissions: Permissions::empty(),
                },
                RoleAccess {
                    id: Id::new(ADMINS),
                    permissions: Permissions::ADMINISTRATOR,
                },
            ],
        });
        let hide = |allow_to: u64| {
            vec![
                overwrite(
                    GUILD,
                    PermissionOverwriteType::Role,
                    Permissions::empty(),
                    Permissions::VIEW_CHANNEL | Permissions::CONNECT,
                ),
                overwrite(
                    allow_to,
                    PermissionOverwriteType::Role,
                    Permissions::VIEW_CHANNEL | Permissions::CONNECT,
                    Permissions::empty(),
                ),
            ]
        };
        a.apply(&EventData::ChannelAccess {
            channel_id: Id::new(100),
            overwrites: Some(vec![]),
        });
        a.apply(&EventData::ChannelAccess {
            channel_id: Id::new(101),
            overwrites: Some(hide(STAFF)),
        });
        a.apply(&EventData::ChannelAccess {
            channel_id: Id::new(102),
            overwrites: Some(hide(ROOM_ROLE)),
        });
        // Seen but not joinable.
        a.apply(&EventData::ChannelAccess {
            channel_id: Id::new(103),
            overwrites: Some(vec![overwrite(
                GUILD,
                PermissionOverwriteType::Role,
                Permissions::empty(),
                Permissions::CONNECT,
            )]),
        });
        a
    }

    fn principal(user: u64, roles: &[Id<RoleMarker>]) -> Principal<'_> {
        Principal {
            user: Id::new(user),
            roles,
        }
    }

    #[test]
    fn discord_decides_who_sees_which_channel() {
        let a = access();
        let none: [Id<RoleMarker>; 0] = [];
        let staff = [Id::new(STAFF)];
        let admin = [Id::new(ADMINS)];
        let player = [Id::new(ROOM_ROLE)];
        let set = |s: Principal<'_>| {
            let mut v: Vec<u64> = a.visible(s).into_iter().map(Id::get).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(set(principal(9, &none)), [100, 103], "a plain member");
        assert_eq!(set(principal(9, &staff)), [100, 101, 103]);
        assert_eq!(
            set(principal(9, &player)),
            [100, 102, 103],
            "a role unknown to the guild still opens its overwrite"
        );
        assert_eq!(
            set(principal(9, &admin)),
            [100, 101, 102, 103],
            "Administrator sees all"
        );
        assert_eq!(
            set(principal(OWNER, &none)),
            [100, 101, 102, 103],
            "the owner sees all"
        );
        assert!(a.can_see(principal(9, &none), Id::new(103)));
        assert!(
            !a.can_join(principal(9, &none), Id::new(103)),
            "seen, but Connect denied"
        );
        assert!(a.can_join(principal(9, &player), Id::new(102)));
        assert!(
            !a.can_see(principal(OWNER, &none), Id::new(999)),
            "unknown channels are nobody's"
        );
        // A member's own overwrite beats their roles'.
        let mut b = a.clone();
        b.apply(&EventData::ChannelAccess {
            channel_id: Id::new(101),
            overwrites: Some(vec![
                overwrite(
                    STAFF,
                    PermissionOverwriteType::Role,
                    Permissions::VIEW_CHANNEL,
                    Permissions::empty(),
                ),
                overwrite(
                    9,
                    PermissionOverwriteType::Member,
                    Permissions::empty(),
                    Permissions::VIEW_CHANNEL,
                ),
            ]),
        });
        assert!(!b.can_see(principal(9, &staff), Id::new(101)));
        assert!(b.can_see(principal(8, &staff), Id::new(101)));
        // Removed channels are nobody's again.
        assert!(b.apply(&EventData::ChannelAccess {
            channel_id: Id::new(101),
            overwrites: None
        }));
        assert!(!b.can_see(principal(OWNER, &none), Id::new(101)));
        assert!(!b.apply(&EventData::ChannelAccess {
            channel_id: Id::new(101),
            overwrites: None
        }));
    }

    #[test]
    fn a_room_coven_made_names_its_creator_and_role_and_nothing_else_does() {
        let (guild, role, creator, bot) =
            (Id::new(GUILD), Id::new(ROOM_ROLE), Id::new(7), Id::new(99));
        let made = room_overwrites(guild, role, creator, bot);
        let owner = Some(RoomOwner { creator, role });
        assert_eq!(room_owner(guild, &made, Some(bot)), owner);
        assert_eq!(
            room_owner(guild, &made, None),
            owner,
            "the bot found by its rights"
        );
        assert_eq!(
            room_owner(guild, &made, Some(Id::new(98))),
            None,
            "another bot's room"
        );
        // The creator can always see and join their room, role or not.
        let mut a = access();
        a.apply(&EventData::ChannelAccess {
            channel_id: Id::new(200),
            overwrites: Some(made.clone()),
        });
        assert!(a.can_join(principal(7, &[]), Id::new(200)));
        assert!(!a.can_see(principal(8, &[]), Id::new(200)));
        // Made in Discord by someone else: a role allowed in, nobody else.
        let by_hand = vec![made[0], made[1]];
        assert_eq!(room_owner(guild, &by_hand, None), None);
        // Edited into ambiguity: a second member or a second role allowed in.
        let mut friend = made.clone();
        friend.push(overwrite(
            8,
            PermissionOverwriteType::Member,
            ROOM_ALLOW,
            Permissions::empty(),
        ));
        assert_eq!(room_owner(guild, &friend, Some(bot)), None);
        let mut second = made.clone();
        second.push(overwrite(
            STAFF,
            PermissionOverwriteType::Role,
            ROOM_ALLOW,
            Permissions::empty(),
        ));
        assert_eq!(room_owner(guild, &second, Some(bot)), None);
        // @everyone let in is not the room's role.
        let mut open = made;
        open[0] = overwrite(
            GUILD,
            PermissionOverwriteType::Role,
            ROOM_ALLOW,
            Permissions::empty(),
        );
        assert_eq!(room_owner(guild, &open, Some(bot)), owner);
    }
}
