//! Where a login comes back to: `return_to` normalised to one path on this site, or
//! `/rooms`.
//!
//! Owns the open-redirect defence. Depends on nothing else in `web`.

use url::Url;

/// Where a login goes when `return_to` is absent or refused.
const DEFAULT_RETURN_TO: &str = "/rooms";
/// The longest `return_to` kept: a login attempt stays small.
pub const MAX_RETURN_TO: usize = 2048;

/// `return_to` as one path on this site after normalisation, or `/rooms`.
///
/// Browsers read `//host` and `/\host` as another site, and resolve dot segments
/// (`/.//host`, `/a/..//host`, `/%2e//host`) before they look, so the verdict is taken on
/// the normalised value, never on the raw one. Refused outright: anything not starting
/// with `/`, backslashes and control characters whether raw or percent-encoded (an
/// encoded one can be decoded by a proxy or a later hop), values over
/// [`MAX_RETURN_TO`] bytes, and the login routes themselves (no loops).
pub fn safe_return_to(raw: Option<&str>) -> String {
    raw.and_then(normalised_return_to)
        .unwrap_or_else(|| DEFAULT_RETURN_TO.to_owned())
}

fn normalised_return_to(raw: &str) -> Option<String> {
    if raw.len() > MAX_RETURN_TO || !raw.starts_with('/') || hostile(raw) {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    if hostile(&decoded) {
        return None;
    }
    // The url crate resolves dot segments the way browsers do (`%2e` included).
    let base = Url::parse("http://coven.invalid/").ok()?;
    let url = base.join(raw).ok()?;
    if url.origin() != base.origin() {
        return None;
    }
    let out = &url[url::Position::BeforePath..];
    (out.starts_with('/')
        && !out.starts_with("//")
        && out.len() <= MAX_RETURN_TO
        && stays_on_site(url.path(), &base))
    .then(|| out.to_owned())
}

/// Whether a normalised path still names a path on this site for every hop that decodes
/// it again (a proxy, a framework, a browser reading `%2f`): decoded and re-normalised
/// level by level, it never turns into `//host`, a backslash or a control character, nor
/// into the login routes. Deeper encodings than a few levels are refused.
fn stays_on_site(path: &str, base: &Url) -> bool {
    let mut path = path.to_owned();
    for _ in 0..4 {
        let decoded = percent_encoding::percent_decode_str(&path)
            .decode_utf8_lossy()
            .into_owned();
        if hostile(&decoded) || decoded.starts_with("//") {
            return false;
        }
        let mut again = base.clone();
        again.set_path(&decoded);
        if again.path().starts_with("//") || again.path().starts_with("/auth/") {
            return false;
        }
        if decoded == path {
            return true;
        }
        path = decoded;
    }
    false
}

/// Characters no same-site path needs and browsers read in surprising ways.
fn hostile(s: &str) -> bool {
    s.chars().any(|c| c == '\\' || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::{MAX_RETURN_TO, safe_return_to};

    /// Every value an attacker might try, with what must come out.
    const CASES: &[(&str, &str)] = &[
        // Paths on this site stay as they are.
        ("/rooms/123", "/rooms/123"),
        ("/rooms?x=1#y", "/rooms?x=1#y"),
        ("/invite/abc.def", "/invite/abc.def"),
        ("/", "/"),
        ("/rooms//123", "/rooms//123"),
        ("/rooms%2f123", "/rooms%2f123"),
        (
            "/rooms?next=//elsewhere.example",
            "/rooms?next=//elsewhere.example",
        ),
        ("/rooms#//elsewhere.example", "/rooms#//elsewhere.example"),
        ("/javascript:alert(1)", "/javascript:alert(1)"),
        ("/r\u{e9}", "/r%C3%A9"),
        ("/\u{ff0f}elsewhere.example", "/%EF%BC%8Felsewhere.example"),
        // Dot segments resolve, and stay on the site.
        ("/a/../../b", "/b"),
        ("/a/./b/../c", "/a/c"),
        ("/%2e%2e/%2E%2e/rooms", "/rooms"),
        ("/a/%2e%2e/rooms", "/rooms"),
        ("/a/.%2e/rooms", "/rooms"),
        // Scheme-relative, before or after normalisation.
        ("//elsewhere.example", "/rooms"),
        ("//elsewhere.example/rooms", "/rooms"),
        ("///elsewhere.example", "/rooms"),
        ("////elsewhere.example", "/rooms"),
        ("/.//elsewhere.example", "/rooms"),
        ("/././/elsewhere.example", "/rooms"),
        ("/a/..//elsewhere.example", "/rooms"),
        ("/a/b/../..//elsewhere.example", "/rooms"),
        ("/%2e//elsewhere.example", "/rooms"),
        ("/%2E//elsewhere.example", "/rooms"),
        ("/a/%2e%2e//elsewhere.example", "/rooms"),
        ("/a/%2E%2E//elsewhere.example", "/rooms"),
        ("/..//elsewhere.example", "/rooms"),
        // Encoded slashes that decode to a scheme-relative path.
        ("/%2felsewhere.example", "/rooms"),
        ("/%2Felsewhere.example", "/rooms"),
        ("/%2f%2felsewhere.example", "/rooms"),
        ("/.%2f%2felsewhere.example", "/rooms"),
        ("/a/..%2f%2felsewhere.example", "/rooms"),
        // Encoded twice, for hops that decode twice.
        ("/%252f%252felsewhere.example", "/rooms"),
        ("/%252e%252e//elsewhere.example", "/rooms"),
        ("/%255c", "/rooms"),
        ("/%2509", "/rooms"),
        ("/%25252f%25252felsewhere.example", "/rooms"),
        ("/100%25", "/100%25"),
        // Backslashes, raw and encoded.
        ("/\\elsewhere.example", "/rooms"),
        ("\\\\elsewhere.example", "/rooms"),
        ("/%5celsewhere.example", "/rooms"),
        ("/%5Celsewhere.example", "/rooms"),
        ("/rooms/%5c", "/rooms"),
        ("/.%5c/elsewhere.example", "/rooms"),
        // Control characters, raw and encoded, anywhere.
        ("/\telsewhere", "/rooms"),
        ("/\t/elsewhere.example", "/rooms"),
        ("/\n/elsewhere.example", "/rooms"),
        ("/rooms\r\nSet-Cookie: x=1", "/rooms"),
        ("/%09/elsewhere.example", "/rooms"),
        ("/%0a/elsewhere.example", "/rooms"),
        ("/%0D%0A/elsewhere.example", "/rooms"),
        ("/rooms?x=%0d%0aSet-Cookie:%20x=1", "/rooms"),
        ("/rooms#%00", "/rooms"),
        ("/%7f", "/rooms"),
        ("/%c2%85", "/rooms"),
        ("/\u{85}", "/rooms"),
        ("/rooms\0", "/rooms"),
        // Other origins and schemes.
        ("https://elsewhere.example/", "/rooms"),
        ("http:elsewhere.example", "/rooms"),
        ("HTTPS://elsewhere.example/", "/rooms"),
        ("javascript:alert(1)", "/rooms"),
        ("JaVaScRiPt:alert(1)", "/rooms"),
        ("data:text/html,<script>alert(1)</script>", "/rooms"),
        (" /rooms", "/rooms"),
        ("rooms", "/rooms"),
        ("elsewhere.example", "/rooms"),
        ("", "/rooms"),
        ("?x=1", "/rooms"),
        ("#x", "/rooms"),
        // No loops through the login itself.
        ("/auth/login", "/rooms"),
        ("/auth/callback?code=x", "/rooms"),
        ("/rooms/../auth/login", "/rooms"),
        ("/%61uth/login", "/rooms"),
    ];

    #[test]
    fn return_to_is_one_normalised_path_on_this_site() {
        assert_eq!(safe_return_to(None), "/rooms");
        for (raw, want) in CASES {
            let got = safe_return_to(Some(raw));
            assert_eq!(got, *want, "{raw:?}");
            assert!(
                got.starts_with('/') && !got.starts_with("//") && !got.starts_with("/\\"),
                "{raw:?} gave {got:?}"
            );
        }
    }

    #[test]
    fn return_to_is_at_most_two_kib() {
        let longest = format!("/rooms/{}", "x".repeat(MAX_RETURN_TO - 7));
        assert_eq!(safe_return_to(Some(&longest)), longest);
        let over = format!("{longest}x");
        assert_eq!(safe_return_to(Some(&over)), "/rooms");
        let huge = format!("/{}", "a/".repeat(100_000));
        assert_eq!(safe_return_to(Some(&huge)), "/rooms");
        // Within the limit raw, over it once encoded: refused too.
        let grows = format!("/{}", "\u{e9}".repeat(MAX_RETURN_TO / 2 - 1));
        assert!(grows.len() <= MAX_RETURN_TO);
        assert_eq!(safe_return_to(Some(&grows)), "/rooms");
    }
}
