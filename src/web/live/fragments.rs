//! Live updates as HTML: the changing parts of the rooms page and of a room page,
//! rendered by the server from the same templates as the first render and swapped in by
//! id (htmx's out-of-band swaps). Each event's fragments are rendered once per replica,
//! by the hub, and shared by every stream that shows them, as the JSON frames are; what
//! differs per viewer (where they are, their controls, how many rooms they see) lives in
//! the page and its stylesheet, not in the fragments.
//!
//! Owns the fragments and their SSE framing. Must not decide who may see them (the stream
//! filters by the event's audience) nor change shared state.

use askama::Template;
use axum::body::Bytes;
use twilight_model::id::Id;
use twilight_model::id::marker::ChannelMarker;

use crate::access::Principal;
use crate::bus::Snapshot;
use crate::event::{Event, EventData, EventId, GatewayState};
use crate::web::view::{RoomView, ViewerView, visible_rooms};

#[derive(Template)]
#[template(path = "web/room_card.html")]
struct RoomCard<'a> {
    r: &'a RoomView,
    oob: bool,
}

#[derive(Template)]
#[template(path = "web/room_live.html")]
struct RoomLive<'a> {
    room: &'a RoomView,
    oob: bool,
}

#[derive(Template)]
#[template(path = "web/room_people.html")]
struct RoomPeople<'a> {
    room: &'a RoomView,
    viewers: &'a [ViewerView],
    oob: bool,
}

#[derive(Template)]
#[template(path = "web/room_gone.html")]
struct RoomGone<'a> {
    base: String,
    id: Id<ChannelMarker>,
    name: Option<&'a str>,
    /// The room is still there, but the viewer may no longer see it.
    hidden: bool,
    oob: bool,
}

#[derive(Template)]
#[template(path = "web/rooms_lists.html")]
struct RoomsLists {
    rooms: Vec<RoomView>,
    channels: Vec<RoomView>,
    oob: bool,
}

#[derive(Template)]
#[template(path = "web/gateway_banner.html")]
pub struct GatewayBanner<'a> {
    pub delayed: Option<&'a str>,
    pub oob: bool,
}

/// What an event's fragments need from the state before the event (a closed room's name,
/// the name of someone who left).
#[derive(Default)]
pub struct Prior {
    room_name: Option<String>,
    person: Option<String>,
}

impl Prior {
    pub fn of(state: &Snapshot, data: &EventData) -> Self {
        match data {
            EventData::RoomDeleted { channel_id } => Prior {
                room_name: state.rooms.get(channel_id).map(|r| r.name.clone()),
                person: None,
            },
            EventData::VoiceLeft { user_id, .. } => Prior {
                room_name: None,
                person: state
                    .voice
                    .get(user_id)
                    .map(|v| v.user.display_name().to_owned()),
            },
            _ => Prior::default(),
        }
    }
}

/// One event's HTML, framed for SSE: for every page showing the rooms list, and for pages
/// of the event's room. Each ends with the event's id (an `at` event), so a stream's
/// `Last-Event-ID` moves only once all of the event's parts have arrived.
#[derive(Debug)]
pub struct Html {
    /// For a stream not viewing the event's room.
    pub rooms: Bytes,
    /// For a stream viewing `room.0`: the rooms part and that room's page part.
    pub room: Option<(Id<ChannelMarker>, Bytes)>,
}

impl Html {
    /// Bytes held (for the recent-frames bound).
    pub fn size(&self) -> usize {
        self.rooms.len() + self.room.as_ref().map_or(0, |(_, b)| b.len())
    }

    /// The bytes for a stream that views the rooms `viewing` says it does.
    pub fn for_views(&self, viewing: impl Fn(Id<ChannelMarker>) -> bool) -> &Bytes {
        match &self.room {
            Some((room, bytes)) if viewing(*room) => bytes,
            _ => &self.rooms,
        }
    }
}

/// Appends one SSE message: `event:` then the HTML as `data:` lines (a carriage return
/// would end a line for the browser's parser too, so every line break is split on).
fn message(out: &mut String, event: &str, html: &str) {
    if html.trim().is_empty() {
        return;
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in html.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
}

/// An `at` event alone: where a stream stands.
pub fn position(id: EventId) -> Bytes {
    let mut out = String::new();
    at_marker(&mut out, id);
    Bytes::from(out)
}

fn at_marker(out: &mut String, id: EventId) {
    out.push_str(&format!("id: {id}\nevent: at\ndata: {id}\n\n"));
}

/// The SSE event name of a room page's part.
fn room_event(id: Id<ChannelMarker>) -> String {
    format!("room-{id}")
}

fn render(t: &impl Template) -> String {
    t.render().unwrap_or_else(|e| {
        // A template that cannot render is a bug of ours; the page catches up on reload.
        tracing::error!(error = %e, "cannot render a live fragment");
        String::new()
    })
}

fn escaped(text: &str) -> String {
    match askama::filters::escape(text, askama::filters::Html) {
        Ok(safe) => safe.to_string(),
        Err(never) => match never {},
    }
}

fn announce(words: &str) -> String {
    let escaped = escaped(words);
    format!("<div hx-swap-oob=\"innerHTML:#announce\">{escaped}</div>")
}

fn title(room: &RoomView) -> String {
    let count = if room.limit > 0 {
        format!("({}/{}) ", room.members.len(), room.limit)
    } else {
        String::new()
    };
    let escaped = escaped(&format!("{count}{} · Coven", room.name));
    format!("<title>{escaped}</title>")
}

/// A room page's part for room `id` as `state` has it (or its closed notice).
fn room_part(state: &Snapshot, id: Id<ChannelMarker>, gone_name: Option<&str>) -> String {
    match state.rooms.get(&id) {
        Some(record) => {
            let room = RoomView::of(state, id, record);
            let viewers: Vec<ViewerView> = record.viewers.iter().map(ViewerView::of).collect();
            let mut out = render(&RoomLive {
                room: &room,
                oob: true,
            });
            out.push_str(&render(&RoomPeople {
                room: &room,
                viewers: &viewers,
                oob: true,
            }));
            out.push_str(&title(&room));
            out
        }
        None => render(&RoomGone {
            base: crate::web::view::base_of(state.guild),
            id,
            name: gone_name,
            hidden: false,
            oob: true,
        }),
    }
}

/// The fragments of `event`, from `state` just after it (and `prior`, just before).
/// `None` for events no page shows.
pub fn fragments(state: &Snapshot, event: &Event, prior: &Prior) -> Option<Html> {
    let channel = match &event.data {
        EventData::RoomCreated { channel_id, .. }
        | EventData::RoomUpdated { channel_id, .. }
        | EventData::RoomDeleted { channel_id }
        | EventData::RoomClosing { channel_id, .. }
        | EventData::VoiceJoined { channel_id, .. }
        | EventData::VoiceUpdated { channel_id, .. }
        | EventData::VoiceLeft { channel_id, .. }
        | EventData::RoomViewers { channel_id, .. } => *channel_id,
        _ => return None,
    };
    if matches!(event.data, EventData::RoomDeleted { .. }) && prior.room_name.is_none() {
        // A second word of a closing already shown (Coven's and then Discord's).
        return None;
    }
    let deleted = matches!(event.data, EventData::RoomDeleted { .. });
    let view = state
        .rooms
        .get(&channel)
        .map(|record| RoomView::of(state, channel, record));
    if view.is_none() && !deleted {
        // Voice in a channel that is not a room (any more): no page shows it.
        return None;
    }
    let name = view
        .as_ref()
        .map(|v| v.name.as_str())
        .or(prior.room_name.as_deref())
        .unwrap_or("a room");
    let card = || view.as_ref().map(|r| render(&RoomCard { r, oob: true }));
    // The rooms page's part, and what a live region says of the change.
    let (rooms, words): (String, Option<String>) = match &event.data {
        EventData::RoomCreated { .. } => {
            let inner = view
                .as_ref()
                .map(|r| render(&RoomCard { r, oob: false }))
                .unwrap_or_default();
            let (how, list) = match &view {
                Some(r) if !r.coven => ("beforeend", "channels-list"),
                _ => ("afterbegin", "rooms-list"),
            };
            (
                format!("<ul hx-swap-oob=\"{how}:#{list}\">{inner}</ul>"),
                Some(format!("“{name}” opened.")),
            )
        }
        EventData::RoomDeleted { .. } => (
            format!("<li id=\"room-{channel}\" hx-swap-oob=\"delete\"></li>"),
            Some(format!("“{name}” was closed.")),
        ),
        EventData::RoomUpdated { .. } => (card().unwrap_or_default(), None),
        EventData::RoomClosing { .. } => (
            card().unwrap_or_default(),
            Some(format!(
                "“{name}” is empty and will close soon unless someone joins."
            )),
        ),
        EventData::VoiceJoined { user, .. } => {
            let full = view.as_ref().is_some_and(|r| r.full);
            let mut words = format!("{} joined “{name}”.", user.display_name());
            if full {
                words.push_str(" The room is full.");
            }
            (card().unwrap_or_default(), Some(words))
        }
        EventData::VoiceLeft { .. } => (
            card().unwrap_or_default(),
            Some(format!(
                "{} left “{name}”.",
                prior.person.as_deref().unwrap_or("Someone")
            )),
        ),
        // Flags and viewers are shown on the room's page only.
        _ => (String::new(), None),
    };
    let said = words.as_deref().map(announce).unwrap_or_default();
    let mut plain = String::new();
    message(&mut plain, "rooms", &format!("{rooms}{said}"));
    let mut with_room = plain.clone();
    at_marker(&mut plain, event.id);
    let part = room_part(state, channel, prior.room_name.as_deref());
    message(
        &mut with_room,
        &room_event(channel),
        &format!("{part}{said}"),
    );
    at_marker(&mut with_room, event.id);
    Some(Html {
        rooms: Bytes::from(plain),
        room: Some((channel, Bytes::from(with_room))),
    })
}

/// Everything a stream's pages show, whole, as `state` has it: sent when a stream starts
/// after events its pages have not seen and memory no longer holds them (`views`: all the
/// room pages it serves), and when what the viewer may see changes (`views`: the pages of
/// rooms that appeared or went). Carries `state.at` as its id.
///
/// A room in `views` that no longer exists is told as gone only when `missing_gone`: on a
/// change of sight, its `room.deleted` has already told the page, with its name.
pub fn refresh(
    state: &Snapshot,
    principal: Principal<'_>,
    views: &[Id<ChannelMarker>],
    missing_gone: bool,
) -> Bytes {
    let (rooms, channels) = visible_rooms(state, principal);
    let mut out = format!("id: {}\n", state.at);
    message(
        &mut out,
        "rooms",
        &render(&RoomsLists {
            rooms,
            channels,
            oob: true,
        }),
    );
    for id in views {
        if !missing_gone && !state.rooms.contains_key(id) {
            continue;
        }
        let part = if state.access.can_see(principal, *id) {
            room_part(state, *id, None)
        } else if missing_gone {
            // Any room id can be asked for: one the viewer may not see is told of in
            // words that say nothing of it.
            render(&RoomGone {
                base: crate::web::view::base_of(state.guild),
                id: *id,
                name: None,
                hidden: false,
                oob: true,
            })
        } else {
            // Just gone from the viewer's sight: the page showed the name already. A
            // channel Discord no longer has is being closed (its `room.deleted` follows);
            // one it still has is hidden from them.
            render(&RoomGone {
                base: crate::web::view::base_of(state.guild),
                id: *id,
                name: state.rooms.get(id).map(|r| r.name.as_str()),
                hidden: state.access.channels.contains_key(id),
                oob: true,
            })
        };
        message(&mut out, &room_event(*id), &part);
    }
    at_marker(&mut out, state.at);
    Bytes::from(out)
}

/// The viewer's own whereabouts, for their pages' "You're in" and "Move me in": the
/// channel they are in, or `none`. Sent only to that viewer's streams.
pub fn whereabouts(channel: Option<Id<ChannelMarker>>) -> Bytes {
    let mut out = String::new();
    message(
        &mut out,
        "me",
        &channel.map_or_else(|| "none".to_owned(), |c| c.to_string()),
    );
    Bytes::from(out)
}

/// The "live updates are delayed" banner as it stands (`None`: not delayed), for a stream
/// just opened: a page rendered while the gateway was quiet may have missed the notice
/// that it is back.
pub fn gateway_banner(delayed: Option<&str>) -> Bytes {
    let mut out = String::new();
    message(
        &mut out,
        "gateway",
        &render(&GatewayBanner { delayed, oob: true }),
    );
    Bytes::from(out)
}

/// The "live updates are delayed" banner, as a notice to every stream.
pub fn gateway_notice(data: &EventData) -> Option<Bytes> {
    let EventData::GatewayStatus { state, reason } = data else {
        return None;
    };
    let why = match (state, reason) {
        (GatewayState::Connected, _) => None,
        (_, Some(reason)) => Some(reason.clone()),
        (state, None) => Some(format!("the gateway is {}", state.as_str().to_lowercase())),
    };
    let mut out = String::new();
    message(
        &mut out,
        "gateway",
        &render(&GatewayBanner {
            delayed: why.as_deref(),
            oob: true,
        }),
    );
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Person, VoiceFlags};

    const GUILD: u64 = 1;
    const ROOM: u64 = 10;

    fn event(ms: u64, data: EventData) -> Event {
        Event::new(EventId { ms, seq: 0 }, Id::new(GUILD), ms, data).unwrap()
    }

    /// Applies `data` to `state` as the hub does and returns its fragments.
    fn step(state: &mut Snapshot, ms: u64, data: EventData) -> Option<Html> {
        let e = event(ms, data);
        let prior = Prior::of(state, &e.data);
        state.apply(&e);
        fragments(state, &e, &prior)
    }

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    fn hostile_room(state: &mut Snapshot) {
        step(
            state,
            1,
            EventData::RoomCreated {
                channel_id: Id::new(ROOM),
                name: "<script>x</script>\r\ndata: forged\n\nevent: rooms".to_owned(),
                user_limit: 4,
                created_by: Some(Id::new(7)),
                role_id: Some(Id::new(8)),
            },
        );
    }

    #[test]
    fn a_join_is_one_message_per_page_then_its_id_and_what_a_name_holds_stays_text() {
        let mut state = Snapshot::default();
        hostile_room(&mut state);
        let html = step(
            &mut state,
            2,
            EventData::VoiceJoined {
                channel_id: Id::new(ROOM),
                user: Person {
                    id: Id::new(7),
                    username: "amp&<ersand>".to_owned(),
                    global_name: None,
                    avatar_url: None,
                },
                flags: VoiceFlags::default(),
            },
        )
        .expect("a join is shown");
        let (room, with_room) = html.room.as_ref().unwrap();
        assert_eq!(*room, Id::new(ROOM));
        for bytes in [&html.rooms, with_room] {
            let wire = text(bytes);
            // Every line of a message is a field: no name can start a field of its own.
            for line in wire.lines().filter(|l| !l.is_empty()) {
                assert!(
                    ["event: ", "data: ", "id: "]
                        .iter()
                        .any(|f| line.starts_with(f)),
                    "{line:?} in {wire}"
                );
            }
            assert!(!wire.contains('\r'));
            assert!(!wire.contains("<script>") && !wire.contains("<ersand>"));
            assert!(wire.contains("&#60;script&#62;"));
            // The event's id comes last, once all its parts are there.
            assert!(
                wire.ends_with("id: 2-0\nevent: at\ndata: 2-0\n\n"),
                "{wire}"
            );
            assert_eq!(wire.matches("id: ").count(), 1);
            assert!(wire.contains("innerHTML:#announce"), "announced: {wire}");
            assert!(wire.contains("amp&#38;&#60;ersand&#62; joined"), "{wire}");
        }
        let events = |b: &Bytes| text(b).lines().filter(|l| l.starts_with("event: ")).count();
        assert_eq!(events(&html.rooms), 2, "rooms, at: {}", text(&html.rooms));
        assert_eq!(events(with_room), 3, "rooms, room-10, at");
        assert!(text(&html.rooms).starts_with("event: rooms\n"));
        assert!(!text(&html.rooms).contains("event: room-10"));
        assert!(text(with_room).contains("event: room-10\n"));
        assert!(text(with_room).contains("<title>(1/4) "));
        assert_eq!(html.for_views(|r| r == Id::new(ROOM)), with_room);
        assert_eq!(html.for_views(|r| r == Id::new(11)), &html.rooms);
    }

    #[test]
    fn a_room_closing_twice_is_told_once_with_its_name() {
        let mut state = Snapshot::default();
        hostile_room(&mut state);
        let first = step(
            &mut state,
            2,
            EventData::RoomDeleted {
                channel_id: Id::new(ROOM),
            },
        )
        .expect("the closing is shown");
        let wire = text(&first.room.as_ref().unwrap().1);
        assert!(
            wire.contains("data-closed") && wire.contains("was closed"),
            "{wire}"
        );
        assert!(wire.contains("hx-swap-oob=\"delete\""), "{wire}");
        let second = step(
            &mut state,
            3,
            EventData::RoomDeleted {
                channel_id: Id::new(ROOM),
            },
        );
        assert!(
            second.is_none(),
            "Discord's word after Coven's changes nothing"
        );
        // Voice leaving a channel that is no room shows nowhere.
        let left = step(
            &mut state,
            4,
            EventData::VoiceLeft {
                channel_id: Id::new(ROOM),
                user_id: Id::new(7),
            },
        );
        assert!(left.is_none());
    }
}
