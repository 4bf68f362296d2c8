//! Rooms as a person makes, shares and leaves them over HTTP, one helper per action on a
//! `Browser` (`create_room`, `invite_link`, `new_link`, `close_room`, `move_in`), and
//! reading rooms, members and voice states out of the simulator's state.
//!
//! Owns: the requests the site's forms send for rooms, and where a page keeps its invite
//! link. Must not: assert what a test is about; each helper only checks that the step it
//! names happened (a created room redirects to its page).

use std::fmt::Display;

use serde_json::Value;

use super::{Browser, Web, location};
use super::{GUILD, g};

/// The entry of `list` (`channels`, `roles`, `members`, `voice_states`, ...) in the
/// simulator's `state` whose `id` (or `user_id`) is `id`.
pub fn find<'a>(state: &'a Value, list: &str, id: &str) -> Option<&'a Value> {
    state[list]
        .as_array()?
        .iter()
        .find(|v| v["id"] == id || v["user_id"] == id)
}

/// The invite link a room page offers (its `#invite-link` field).
pub fn invite_link(html: &str) -> String {
    let at = html
        .find("id=\"invite-link\"")
        .expect("an invite link on the page");
    let rest = &html[at..];
    let v = rest.find("value=\"").expect("its value") + 7;
    let end = rest[v..].find('"').expect("end of value");
    rest[v..v + end].to_owned()
}

/// A path on the site from a full invite link.
pub fn invite_path(link: &str) -> String {
    let at = link.find("/invite/").expect("an invite link");
    link[at..].to_owned()
}

impl Browser {
    /// Creates a room named `name` from `web`'s rooms page, as its form posts it; the
    /// room's id.
    pub async fn create_room(&self, web: &Web, name: &str) -> String {
        let token = self.csrf(web).await;
        let made = self
            .post(web, &g("/rooms"), &[("name", name), ("csrf_token", &token)])
            .await;
        assert_eq!(
            made.status(),
            303,
            "{}",
            made.text().await.unwrap_or_default()
        );
        let to = location(&made);
        to.strip_prefix(&g("/rooms/"))
            .unwrap_or_else(|| panic!("redirected to {to}"))
            .to_owned()
    }

    /// The room's page on `web` (asserting 200).
    pub async fn room_page(&self, web: &Web, room: impl Display) -> String {
        self.page(&web.url(&format!("/g/{GUILD}/rooms/{room}")))
            .await
    }

    /// The invite link the room's page on `web` offers.
    pub async fn invite_link(&self, web: &Web, room: impl Display) -> String {
        invite_link(&self.room_page(web, room).await)
    }

    /// The path on the site of the invite link the room's page on `web` offers.
    pub async fn invite_path(&self, web: &Web, room: impl Display) -> String {
        invite_path(&self.invite_link(web, room).await)
    }

    /// "New link" as HTMX sends it from the room page (the answer is the link itself).
    pub async fn new_link(&self, web: &Web, room: impl Display) -> reqwest::Response {
        let token = self.csrf(web).await;
        self.http
            .post(web.url(&format!("/g/{GUILD}/rooms/{room}/invite")))
            .header("hx-request", "true")
            .header("x-csrf-token", &token)
            .send()
            .await
            .unwrap()
    }

    /// "Close room", confirmed, as the confirmation page posts it.
    pub async fn close_room(&self, web: &Web, room: impl Display) -> reqwest::Response {
        let token = self.csrf(web).await;
        self.post(
            web,
            &format!("/g/{GUILD}/rooms/{room}/close"),
            &[("csrf_token", &token)],
        )
        .await
    }

    /// "Move me in", as the room page's form posts it.
    pub async fn move_in(&self, web: &Web, room: impl Display) -> reqwest::Response {
        let token = self.csrf(web).await;
        self.post(
            web,
            &format!("/g/{GUILD}/rooms/{room}/move"),
            &[("csrf_token", &token)],
        )
        .await
    }
}
