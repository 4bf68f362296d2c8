//! The guilds a fresh simulator starts with: who is in them, their channels and roles,
//! and what @everyone and the bot may do. The first ("Coven Playgroup") is seeded first,
//! so its ids never depend on how many others follow.
//!
//! Seeding is deterministic so tests and demos see the same ids every run. Owns no rules:
//! changes after the seed go through the world's methods.

use std::collections::{BTreeMap, BTreeSet};

use super::{Channel, Member, Role, User, World, kind};
use crate::sim::defaults;
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
            unavailable: false,
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
                bot: None,
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
                bot: Some(bot_id),
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
                    settings: Default::default(),
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

/// Manage Server: who has it (or Administrator, or ownership) may add a bot to a guild.
pub const MODERATOR_PERMISSIONS: Permissions =
    EVERYONE_PERMISSIONS.union(Permissions::MANAGE_GUILD);

/// A guild of the simulator other than the first, being built from the shared id
/// sequence.
struct Builder<'a> {
    w: World,
    ids: &'a mut Snowflakes,
    taken: [u64; 2],
}

impl Builder<'_> {
    fn fresh(&mut self) -> u64 {
        loop {
            let id = self.ids.next_seeded();
            if !self.taken.contains(&id) {
                return id;
            }
        }
    }

    /// The bot joins with its managed role granting `BOT_PERMISSIONS`.
    fn bot(&mut self) {
        let role = self.fresh();
        self.w.roles.insert(
            role,
            Role {
                id: role,
                name: "Coven".to_owned(),
                permissions: BOT_PERMISSIONS,
                position: 10,
                color: 0x7c3aed,
                hoist: false,
                mentionable: false,
                managed: true,
                bot: Some(self.w.bot_id),
            },
        );
        self.w
            .members
            .insert(self.w.bot_id, Member::new([role].into_iter().collect()));
    }

    fn role(&mut self, name: &str, permissions: Permissions, position: i64) -> u64 {
        let id = self.fresh();
        self.w.roles.insert(
            id,
            Role {
                id,
                name: name.to_owned(),
                permissions,
                position,
                color: 0,
                hoist: false,
                mentionable: false,
                managed: false,
                bot: None,
            },
        );
        id
    }

    /// A user of its own (new to the simulator) as a member with these roles.
    fn own_member(&mut self, username: &str, display: &str, roles: &[u64]) -> u64 {
        let id = self.fresh();
        let user = User {
            id,
            username: username.to_owned(),
            global_name: Some(display.to_owned()),
            avatar: Some(avatar_hash(id)),
            bot: false,
        };
        self.member(user, roles);
        id
    }

    fn member(&mut self, user: User, roles: &[u64]) {
        let id = user.id;
        self.w.users.insert(id, user);
        self.w
            .members
            .insert(id, Member::new(roles.iter().copied().collect()));
    }

    fn channel(&mut self, kind: u8, name: &str, parent: Option<u64>, position: i64) -> u64 {
        let id = self.fresh();
        self.w.channels.insert(
            id,
            Channel {
                id,
                kind,
                name: name.to_owned(),
                parent_id: parent,
                position,
                user_limit: 0,
                bitrate: if kind::is_voice(kind) { 64_000 } else { 0 },
                overwrites: Vec::new(),
                settings: Default::default(),
            },
        );
        id
    }

    /// The channels every seeded guild has: a text channel, a lobby, a room category.
    fn channels(&mut self) {
        self.channel(kind::TEXT, "general", None, 0);
        self.w.lobby_id = self.channel(kind::VOICE, "Lobby", None, 1);
        self.w.room_category_id = self.channel(kind::CATEGORY, "Game Rooms", None, 2);
    }
}

fn blank(guild_id: u64, name: &str, first: &World) -> World {
    let mut w = World {
        guild_id,
        guild_name: name.to_owned(),
        owner_id: 0,
        bot_id: first.bot_id,
        room_category_id: 0,
        lobby_id: 0,
        users: BTreeMap::new(),
        members: BTreeMap::new(),
        roles: BTreeMap::new(),
        channels: BTreeMap::new(),
        voice: BTreeMap::new(),
        unavailable: false,
        moves: Vec::new(),
        ids: first.ids.clone(),
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
            bot: None,
        },
    );
    // The bot's user is known to every guild, member or not, as Discord knows it.
    if let Some(bot) = first.users.get(&first.bot_id) {
        w.users.insert(bot.id, bot.clone());
    }
    w
}

/// The guilds after the first: "Night Owls" (the bot in it; its own people plus ash and
/// bramble from the first guild), "Dice Tower" (the bot not in it; dusk owns it, ember
/// has Manage Server there, fable is a plain member), then `generated` guilds with the
/// bot in them, each with a lobby, a room category and three people of its own. Ids come
/// from the first guild's sequence, so they are the same every run.
pub fn seed_others(first: &World, generated: u32) -> Vec<World> {
    let mut ids = first.ids.clone();
    let taken = [first.guild_id, first.bot_id];
    let player = |name: &str| first.users.values().find(|u| u.username == name).cloned();
    let mut out = Vec::new();

    let mut b = Builder {
        w: blank(defaults::NIGHT_OWLS_GUILD_ID, "Night Owls", first),
        ids: &mut ids,
        taken,
    };
    b.bot();
    b.w.owner_id = b.own_member("nyx", "Nyx", &[]);
    b.own_member("moth", "Moth", &[]);
    b.own_member("vesper", "Vesper", &[]);
    for name in ["ash", "bramble"] {
        if let Some(u) = player(name) {
            b.member(u, &[]);
        }
    }
    b.channels();
    out.push(b.w);

    let mut b = Builder {
        w: blank(defaults::DICE_TOWER_GUILD_ID, "Dice Tower", first),
        ids: &mut ids,
        taken,
    };
    let moderator = b.role("Moderator", MODERATOR_PERMISSIONS, 1);
    for (name, roles) in [
        ("dusk", vec![]),
        ("ember", vec![moderator]),
        ("fable", vec![]),
    ] {
        if let Some(u) = player(name) {
            if name == "dusk" {
                b.w.owner_id = u.id;
            }
            b.member(u, &roles);
        }
    }
    b.own_member("rook", "Rook", &[]);
    b.channels();
    out.push(b.w);

    for i in 0..generated.min(defaults::MAX_GENERATED_GUILDS) {
        let id = defaults::generated_guild_id(i);
        let n = i + 1;
        let mut b = Builder {
            w: blank(id, &format!("Generated {n:05}"), first),
            ids: &mut ids,
            taken,
        };
        b.bot();
        b.w.owner_id = b.own_member(&format!("g{n}.host"), &format!("Host {n}"), &[]);
        for k in 1..=2 {
            b.own_member(&format!("g{n}.guest{k}"), &format!("Guest {n}.{k}"), &[]);
        }
        b.channels();
        out.push(b.w);
    }
    out
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

    #[test]
    fn the_other_guilds_are_seeded_after_the_first_and_leave_it_unchanged() {
        use crate::sim::defaults::{DICE_TOWER_GUILD_ID, NIGHT_OWLS_GUILD_ID, generated_guild_id};
        let alone = world();
        let first = world();
        let others = seed_others(&first, 3);
        let ids = |w: &World| {
            w.users
                .keys()
                .chain(w.channels.keys())
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&alone),
            ids(&first),
            "the first guild is the same with others"
        );
        assert_eq!(
            others.iter().map(|w| w.guild_id).collect::<Vec<_>>(),
            [
                NIGHT_OWLS_GUILD_ID,
                DICE_TOWER_GUILD_ID,
                generated_guild_id(0),
                generated_guild_id(1),
                generated_guild_id(2)
            ]
        );
        let [owls, dice, generated @ ..] = &others[..] else {
            panic!("five guilds")
        };
        assert!(owls.bot_in() && !dice.bot_in());
        assert!(generated.iter().all(|g| g.bot_in() && g.members.len() == 4));
        assert_eq!(owls.channels[&owls.lobby_id].kind, kind::VOICE);
        assert_eq!(owls.channels[&owls.room_category_id].kind, kind::CATEGORY);
        let ash = member_named(&first, "ash");
        assert!(owls.members.contains_key(&ash), "ash plays in both");
        // Who may add the bot to Dice Tower: its owner and a moderator, not a plain member.
        let manages = |name: &str| {
            dice.guild_permissions(member_named(&first, name))
                .contains(Permissions::MANAGE_GUILD)
        };
        assert!(manages("dusk") && manages("ember"));
        assert!(!manages("fable") && !manages("ash"));
        assert_eq!(dice.owner_id, member_named(&first, "dusk"));
        // No id is handed out twice, and the same ids come every run.
        let mut all: Vec<u64> = std::iter::once(&first)
            .chain(&others)
            .flat_map(|w| w.channels.keys().chain(w.roles.keys()).copied())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        let again = seed_others(&world(), 3);
        assert_eq!(ids(&again[0]), ids(owls));
    }
}
