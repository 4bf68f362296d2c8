//! Helpers shared by the world's tests.

use super::*;

pub fn world() -> World {
    World::seeded(900, 901)
}

pub fn member_named(w: &World, name: &str) -> u64 {
    w.users
        .values()
        .find(|u| u.username == name)
        .map(|u| u.id)
        .unwrap()
}

/// A voice room closed to @everyone, open to `role` and to the bot.
pub fn private_room(w: &mut World, role: Option<u64>) -> u64 {
    let room_perms = Permissions::VIEW_CHANNEL | Permissions::CONNECT | Permissions::SPEAK;
    let mut overwrites = vec![
        Overwrite {
            id: w.guild_id,
            kind: 0,
            allow: Permissions::empty(),
            deny: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
        },
        Overwrite {
            id: w.bot_id,
            kind: 1,
            allow: room_perms | Permissions::MOVE_MEMBERS,
            deny: Permissions::empty(),
        },
    ];
    if let Some(role) = role {
        overwrites.push(Overwrite {
            id: role,
            kind: 0,
            allow: room_perms,
            deny: Permissions::empty(),
        });
    }
    let new = NewChannel {
        extras: Default::default(),
        name: "table".into(),
        kind: kind::VOICE,
        parent_id: Some(w.room_category_id),
        user_limit: 0,
        overwrites,
    };
    w.create_channel(None, new).unwrap().0
}

pub fn names(events: &[Dispatch]) -> Vec<&'static str> {
    events.iter().map(|d| d.name).collect()
}
