//! Accessibility: the palette held to WCAG 2.1 AA, and axe-core (vendored under
//! `tests/fixtures/axe/`) run in headless Chromium on the pages people see.

use std::collections::BTreeMap;

use fantoccini::Locator;
use serde_json::json;

use crate::harness::axe::{assert_accessible, axe};
use crate::harness::browser::{Driver, Page};
use crate::harness::{GUILD, g};
use crate::harness::{Stack, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The custom properties of `assets/app.css`'s `:root` that are colours, by name.
fn palette() -> BTreeMap<String, [u8; 3]> {
    let css = std::fs::read_to_string(format!("{ROOT}/assets/app.css")).unwrap();
    let start = css.find(":root {").expect("a :root block");
    let start = start + ":root {".len();
    let block = without_comments(&css[start..start + css[start..].find('}').unwrap()]);
    block
        .split(';')
        .filter_map(|decl| {
            let (name, value) = decl.split_once(':')?;
            Some((name.trim().to_owned(), hex(value.trim())?))
        })
        .filter(|(name, _)| name.starts_with("--"))
        .collect()
}

fn without_comments(css: &str) -> String {
    let mut out = String::new();
    let mut rest = css;
    while let Some(at) = rest.find("/*") {
        out.push_str(&rest[..at]);
        rest = rest[at..]
            .find("*/")
            .map_or("", |end| &rest[at + end + 2..]);
    }
    out.push_str(rest);
    out
}

fn hex(raw: &str) -> Option<[u8; 3]> {
    let h = raw.strip_prefix('#')?;
    let digits: Vec<u8> = match h.len() {
        3 => h
            .chars()
            .map(|c| c.to_digit(16).map(|d| (d * 17) as u8))
            .collect::<Option<_>>()?,
        6 => (0..3)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<_>>()?,
        _ => return None,
    };
    Some([digits[0], digits[1], digits[2]])
}

/// WCAG 2.1 relative luminance.
fn luminance([r, g, b]: [u8; 3]) -> f64 {
    let channel = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
}

pub fn contrast(a: [u8; 3], b: [u8; 3]) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

/// Text needs 4.5:1 (WCAG 1.4.3); control borders and the focus ring 3:1 (1.4.11).
const TEXT: f64 = 4.5;
const UI: f64 = 3.0;

/// Every pair the stylesheet puts in front of people: (foreground, background, minimum,
/// where).
const PAIRS: &[(&str, &str, f64, &str)] = &[
    ("--text", "--bg", TEXT, "body text"),
    ("--text", "--panel", TEXT, "text on cards and the header"),
    ("--text", "--panel-2", TEXT, "text in inputs and buttons"),
    ("--muted", "--bg", TEXT, "muted text (headings, footer)"),
    (
        "--muted",
        "--panel",
        TEXT,
        "muted text on cards (counts, hints, the header's name)",
    ),
    ("--muted", "--panel-2", TEXT, "placeholders, plain flags"),
    ("--accent", "--bg", TEXT, "links"),
    ("--accent", "--panel", TEXT, "links on cards, Log out"),
    ("--accent", "--panel-2", TEXT, "links on raised surfaces"),
    ("--bad", "--bg", TEXT, "the red full count, Close room"),
    (
        "--bad",
        "--panel",
        TEXT,
        "the red full count on a card, Room full",
    ),
    ("--bad", "--panel-2", TEXT, "red text on raised surfaces"),
    ("--ok", "--panel", TEXT, "You're in"),
    ("--ok", "--panel-2", TEXT, "You're in on raised surfaces"),
    ("--warn", "--panel", TEXT, "Closing soon on a room card"),
    ("--warn", "--bg", TEXT, "warnings on the page"),
    (
        "--on-accent",
        "--accent-2",
        TEXT,
        "primary buttons, avatar initials",
    ),
    (
        "--on-accent",
        "--accent-2-hover",
        TEXT,
        "primary buttons under the pointer",
    ),
    (
        "--on-accent",
        "--danger-fill",
        TEXT,
        "the confirmation page's Close",
    ),
    ("--warn-text", "--warn-bg", TEXT, "warning banners"),
    ("--info-text", "--info-bg", TEXT, "information banners"),
    (
        "--flag-red",
        "--flag-red-bg",
        TEXT,
        "muted and deafened flags",
    ),
    ("--flag-green", "--flag-green-bg", TEXT, "camera flag"),
    ("--flag-live", "--flag-live-bg", TEXT, "live flag"),
    ("--control", "--bg", UI, "input and button borders"),
    (
        "--control",
        "--panel",
        UI,
        "input and button borders on cards",
    ),
    (
        "--control",
        "--panel-2",
        UI,
        "input and button borders on raised surfaces",
    ),
    ("--bad", "--panel", UI, "Close room's outline"),
    ("--accent", "--bg", UI, "the focus ring"),
    ("--accent", "--panel", UI, "the focus ring on cards"),
    (
        "--accent",
        "--panel-2",
        UI,
        "the focus ring on raised surfaces",
    ),
    ("--accent-2", "--bg", UI, "a primary button's edge"),
    (
        "--accent-2",
        "--panel",
        UI,
        "a primary button's edge on cards",
    ),
];

#[test]
fn the_palette_meets_wcag_aa() {
    let palette = palette();
    let mut failures = Vec::new();
    for (fg, bg, min, what) in PAIRS {
        let colour = |name: &str| {
            *palette
                .get(name)
                .unwrap_or_else(|| panic!("app.css's :root has no colour {name}"))
        };
        let ratio = contrast(colour(fg), colour(bg));
        println!("{ratio:5.2}:1 (needs {min}) {fg} on {bg}: {what}");
        if ratio < *min {
            failures.push(format!("{fg} on {bg} ({what}): {ratio:.2}:1 < {min}:1"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Each person's avatar colour (`.hue-N` rules) under its white initial.
#[test]
fn every_persons_colour_carries_white_text() {
    let css = std::fs::read_to_string(format!("{ROOT}/assets/app.css")).unwrap();
    let white = palette()["--on-accent"];
    let mut hues = 0;
    for rule in css.split('}').filter(|r| r.contains(".avatar.hue-")) {
        let colour = rule
            .split("background:")
            .nth(1)
            .and_then(|v| hex(v.trim().trim_end_matches(';').trim()))
            .unwrap_or_else(|| panic!("a hue without a colour: {rule}"));
        let ratio = contrast(white, colour);
        let selector = rule.trim().lines().last().unwrap_or_default();
        let name = selector.split_whitespace().next().unwrap_or_default();
        println!("{ratio:5.2}:1 (needs {TEXT}) --on-accent on {name}");
        assert!(ratio >= TEXT, "{rule}: {ratio:.2}:1");
        hues += 1;
    }
    assert!(
        hues >= 2,
        "the stylesheet's person colours were found ({hues})"
    );
}

#[test]
fn contrast_is_computed_as_wcag_defines_it() {
    assert!((contrast([0, 0, 0], [255, 255, 255]) - 21.0).abs() < 1e-9);
    assert!((contrast([255, 255, 255], [255, 255, 255]) - 1.0).abs() < 1e-9);
    // #767676 on white is the well-known smallest grey that passes 4.5:1.
    assert!(contrast(hex("#767676").unwrap(), hex("#fff").unwrap()) >= 4.5);
    assert!(contrast(hex("#777777").unwrap(), hex("#ffffff").unwrap()) < 4.5);
}

/// axe-core on every kind of page, as the people who see them see them: the landing page,
/// the rooms list and a room page (its creator's view, full, with players muted, on camera
/// and live in it), the close confirmation, and error pages logged out, logged in and for
/// someone outside the server. Nothing serious or critical may be found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axe_finds_nothing_serious_on_the_pages_people_see() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let driver = Driver::start();
    let c = driver.window(1280, 800, true).await;

    c.open(&web.url("/")).await;
    c.shot("a11y-landing").await;
    assert_accessible(&c, "the landing page").await;
    // The check can fail: an unlabelled field and light-grey text are caught.
    c.execute(
        // Styled through the CSSOM: the site's CSP refuses inline style attributes.
        "const m = document.querySelector('main');
         m.append(document.createElement('input'));
         const p = document.createElement('p');
         p.textContent = 'faint';
         p.style.color = '#444';
         m.append(p);
         return true;",
        vec![],
    )
    .await
    .unwrap();
    let caught: Vec<String> = axe(&c)
        .await
        .into_iter()
        .filter(|v| v.blocks())
        .map(|v| v.id)
        .collect();
    assert!(
        caught.contains(&"label".to_owned()) && caught.contains(&"color-contrast".to_owned()),
        "axe runs and reports: {caught:?}"
    );
    c.open(&web.url("/no/such/page")).await;
    assert_accessible(&c, "a 404 page, logged out").await;

    c.log_in(web, "Ash").await;
    // A plain form post (no HTMX): the room page comes back.
    let form = c
        .form(Locator::Css(&format!("form[action='/g/{GUILD}/rooms']")))
        .await
        .expect("the create form");
    form.set_by_name("name", "Friday draft").await.unwrap();
    form.submit_direct().await.unwrap();
    let room = c.room_id().await;
    for (name, flags) in [
        ("bramble", json!({"self_mute": true})),
        ("cinder", json!({"self_video": true})),
        ("dusk", json!({"self_stream": true, "self_deaf": true})),
        // Full: the red count and "Room full" are checked too.
        ("ember", json!({})),
    ] {
        stack.seat(stack.user(name).await, room, flags).await;
    }
    // Rendered by the server with everyone in it.
    wait_for("the players on a fresh render of the room", || async {
        c.goto(&web.url(&format!("/g/{GUILD}/rooms/{room}")))
            .await
            .ok()?;
        let html = c.source().await.ok()?;
        ["Bramble", "Cinder", "Dusk", "Ember"]
            .iter()
            .all(|n| html.contains(n))
            .then_some(())
    })
    .await;
    c.appears("the invite link", "#invite-link").await;
    c.shot("a11y-room-creator").await;
    assert_accessible(&c, "a room page seen by its creator, with players").await;

    c.open(&web.url(&g("/rooms"))).await;
    c.shot("a11y-rooms").await;
    assert_accessible(&c, "the rooms list").await;
    c.open(&web.url(&format!("/g/{GUILD}/rooms/{room}/close")))
        .await;
    c.shot("a11y-close").await;
    assert_accessible(&c, "the close confirmation").await;
    c.open(&web.url("/no/such/page")).await;
    c.shot("a11y-404").await;
    assert_accessible(&c, "a 404 page, logged in").await;

    // Someone with a Discord account outside the server.
    let outsider = driver.window(390, 844, true).await;
    outsider.open(&web.url("/auth/login")).await;
    log_in_as_outsider(&outsider, "Iris").await;
    outsider.shot("a11y-not-member").await;
    assert_accessible(&outsider, "the communities page with none to pick").await;
    let _ = outsider.close().await;
    let _ = c.close().await;
}

/// Picks `name` on the sim's authorize page; someone outside the server ends on the
/// communities page, which has none for them and offers another account.
async fn log_in_as_outsider(c: &Page, name: &str) {
    c.pick(name).await;
    c.appears("the empty communities page", "[data-no-communities]")
        .await;
    c.appears("another account", "form[action='/auth/logout']")
        .await;
}
