//! The guild a fresh simulator starts with: who is in it, its channels and roles, and
//! what @everyone and the bot may do.
//!
//! Seeding is deterministic so tests and demos see the same ids every run. Owns no rules:
//! changes after the seed go through the world's methods.

use std::collections::{BTreeMap, BTreeSet};

use super::{Channel, Member, Role, User, World, kind};
use crate::sim::ids::{Snowflakes, avatar_hash};
use twilight_model::guild::Permissions;

/// The seeded people: (username, display name, member of the guild).
const SEED_USERS: &[(&str, &str, bool)] = &[
    ("ash", "Ash", true),
    ("bramble", "Bramble", true),
    ("cinder", "Cinder", true),
    ("dusk", "Dusk", true),
    ("ember", "Ember", true),
    ("fable", "Fable", true),
    ("gale", "Gale", true),
    ("hollow", "Hollow", true),
    ("iris", "Iris", false),
    ("juniper", "Juniper", false),
];

/// What `@everyone` may do in a fresh guild: see, talk, join voice.
pub const EVERYONE_PERMISSIONS: Permissions = Permissions::CREATE_INVITE
    .union(Permissions::ADD_REACTIONS)
    .union(Permissions::STREAM)
    .union(Permissions::VIEW_CHANNEL)
    .union(Permissions::SEND_MESSAGES)
    .union(Permissions::READ_MESSAGE_HISTORY)
    .union(Permissions::CONNECT)
    .union(Permissions::SPEAK)
    .union(Permissions::USE_VAD)
    .union(Permissions::CHANGE_NICKNAME);

/// What the bot's managed role grants: exactly what Coven needs, not ADMINISTRATOR, so
/// permission mistakes in Coven show up as Discord's 50013.
pub const BOT_PERMISSIONS: Permissions = EVERYONE_PERMISSIONS
    .union(Permissions::MANAGE_CHANNELS)
    .union(Permissions::MANAGE_ROLES)
    .union(Permissions::MUTE_MEMBERS)
    .union(Permissions::DEAFEN_MEMBERS)
    .union(Permissions::MOVE_MEMBERS);

impl World {
    /// A guild with a text channel, a lobby voice channel, a room category, the bot and
    /// the seeded users (two of whom are not members yet).
    pub fn seeded(guild_id: u64, bot_id: u64) -> Self {
        let mut ids = Snowflakes::seeded();
        let fresh = |ids: &mut Snowflakes| loop {
            let id = ids.next_seeded();
            if id != guild_id && id != bot_id {
                return id;
            }
        };
        let mut w = World {
            guild_id,
            guild_name: "Coven Playgroup".to_owned(),
            owner_id: 0,
            bot_id,
            room_category_id: 0,
            lobby_id: 0,
            users: BTreeMap::new(),
            members: BTreeMap::new(),
            roles: BTreeMap::new(),
            channels: BTreeMap::new(),
            voice: BTreeMap::new(),
            moves: Vec::new(),
            ids: Snowflakes::seeded(),
        };

        w.roles.insert(
            guild_id,
            Role {
                id: guild_id,
                name: "@everyone".to_owned(),
                permissions: EVERYONE_PERMISSIONS,
                position: 0,
                color: 0,
                hoist: false,
                mentionable: false,
                managed: false,
            },
        );
        let bot_role = fresh(&mut ids);
        w.roles.insert(
            bot_role,
            Role {
                id: bot_role,
                name: "Coven".to_owned(),
                permissions: BOT_PERMISSIONS,
                position: 10,
                color: 0x7c3aed,
                hoist: false,
                mentionable: false,
                managed: true,
            },
        );

        w.users.insert(
            bot_id,
            User {
                id: bot_id,
                username: "Coven".to_owned(),
                global_name: None,
                avatar: Some(avatar_hash(bot_id)),
                bot: true,
            },
        );
        w.members
            .insert(bot_id, Member::new([bot_role].into_iter().collect()));

        for (i, (username, display, member)) in SEED_USERS.iter().enumerate() {
            let id = fresh(&mut ids);
            w.users.insert(
                id,
                User {
                    id,
                    username: (*username).to_owned(),
                    global_name: Some((*display).to_owned()),
                    avatar: Some(avatar_hash(id)),
                    bot: false,
                },
            );
            if *member {
                w.members.insert(id, Member::new(BTreeSet::new()));
            }
            if i == 0 {
                w.owner_id = id;
            }
        }

        let mut channel = |w: &mut World, kind: u8, name: &str, parent: Option<u64>, pos| {
            let id = fresh(&mut ids);
            w.channels.insert(
                id,
                Channel {
                    id,
                    kind,
                    name: name.to_owned(),
                    parent_id: parent,
                    position: pos,
                    user_limit: 0,
                    bitrate: if kind::is_voice(kind) { 64_000 } else { 0 },
                    overwrites: Vec::new(),
                },
            );
            id
        };
        channel(&mut w, kind::TEXT, "general", None, 0);
        w.lobby_id = channel(&mut w, kind::VOICE, "Lobby", None, 1);
        w.room_category_id = channel(&mut w, kind::CATEGORY, "Game Rooms", None, 2);
        w.ids = ids;
        w
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;

    #[test]
    fn seeds_users_two_of_whom_are_not_members() {
        let w = world();
        let humans = w.users.values().filter(|u| !u.bot).count();
        let outsiders = w
            .users
            .keys()
            .filter(|u| !w.members.contains_key(u))
            .count();
        assert!(humans >= 8);
        assert_eq!(outsiders, 2);
        assert_eq!(w.channels[&w.lobby_id].kind, kind::VOICE);
        assert_eq!(w.channels[&w.room_category_id].kind, kind::CATEGORY);
    }

    #[test]
    fn seeding_is_deterministic() {
        let (a, b) = (world(), world());
        assert_eq!(
            a.users.keys().collect::<Vec<_>>(),
            b.users.keys().collect::<Vec<_>>()
        );
    }
}
