//! The lean path: an event stream served straight to its socket, without hyper.
//!
//! hyper keeps two 8 KiB buffers per connection for the requests and responses that may
//! follow; an event stream is one response that lasts, so they would sit unused for as
//! long as it does, which is most of what an open stream costs (measured: a stream in
//! about 5.5 KiB this way, 9.5+ KiB through hyper).
//!
//! The contract:
//! - Taken only by a connection's **first** request, when it is HTTP/1.1 `GET` with an
//!   `Accept` that names `text/event-stream` as a media type, no body (no
//!   `Content-Length` other than 0, no `Transfer-Encoding`), no `Expect`, no `Upgrade`,
//!   at most [`LEAN_HEADERS`] headers that parse cleanly, the whole head within
//!   [`LEAN_HEAD_MAX`] bytes and nothing after it in the first read (no pipelining).
//! - One response, answered by the same router as every other request, then the
//!   connection closes (`connection: close`): nothing is ever read after the head except
//!   to notice the client leaving.
//! - The head carries `Date` (RFC 9110 §6.6.1), the router's headers, and chunked
//!   framing; the frames of a burst go out in one `writev`.
//! - Everything else (another method or version, a body, `Expect`, `Upgrade`, a
//!   malformed or oversized head, any request after the first on a connection) goes to
//!   hyper with the bytes already read.
//!
//! Owns the lean framing. Must not look at what is requested beyond telling an event
//! stream's head (that is the router's).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Frame;
use tower::ServiceExt;

use super::io::Deadline;

/// The most a first request head may take on the lean path (more goes to hyper, which
/// applies its own limits).
pub const LEAN_HEAD_MAX: usize = 8 * 1024;
/// Request headers the lean path parses at most.
pub const LEAN_HEADERS: usize = 48;
/// Frames of a burst written together.
const BATCH: usize = 32;

/// A connection's first request, as read before choosing who serves it.
pub enum First {
    /// A plain GET for an event stream, parsed.
    EventStream(Box<Request<Body>>),
    /// Anything else: the bytes read so far, for hyper.
    Other(Bytes),
}

/// Reads the first request head (until its blank line, or `LEAN_HEAD_MAX` bytes, or a
/// first read that already holds more than a head) and tells which path serves it.
pub async fn first_head(io: &mut Deadline) -> io::Result<First> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = end + 4;
            // Bytes after the head (a body, a pipelined request) are hyper's to handle.
            if head == buf.len()
                && let Some(request) = lean_request(&buf)
            {
                return Ok(First::EventStream(Box::new(request)));
            }
            return Ok(First::Other(Bytes::from(buf)));
        }
        if buf.len() >= LEAN_HEAD_MAX {
            return Ok(First::Other(Bytes::from(buf)));
        }
    }
}

/// The request, when `head` is one the lean path serves: HTTP/1.1, GET, asking for
/// `text/event-stream`, no body, no `Expect` or `Upgrade`, headers that parse cleanly.
fn lean_request(head: &[u8]) -> Option<Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; LEAN_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len()) {
        return None;
    }
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let mut builder = Request::builder()
        .method(axum::http::Method::GET)
        .uri(parsed.path?)
        .version(axum::http::Version::HTTP_11);
    let mut wants_stream = false;
    for h in parsed.headers.iter() {
        let name = axum::http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if name == axum::http::header::CONTENT_LENGTH && h.value != b"0"
            || name == axum::http::header::TRANSFER_ENCODING
            || name == axum::http::header::EXPECT
            || name == axum::http::header::UPGRADE
        {
            return None;
        }
        if name == axum::http::header::ACCEPT {
            // A media range, its parameters after `;`; types compare case-insensitively.
            wants_stream |= h.value.split(|b| *b == b',').any(|range| {
                let media = range.split(|b| *b == b';').next().unwrap_or_default();
                media
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"text/event-stream")
            });
        }
        builder = builder.header(name, axum::http::HeaderValue::from_bytes(h.value).ok()?);
    }
    if !wants_stream {
        return None;
    }
    builder.body(Body::empty()).ok()
}

/// Serves an event stream on its own connection, without hyper: the router's answer is
/// written as it comes, and the connection closes when it ends or the client goes.
/// `served` counts the streams served this way.
pub async fn event_stream(
    io: Deadline,
    mut request: Request<Body>,
    peer: SocketAddr,
    router: Router,
    served: &metrics::Counter,
    // Held until the stream ends: the connection counts as busy meanwhile.
    _in_flight: impl Send,
) {
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn next_frame(
        body: &mut Body,
    ) -> impl Future<Output = Option<Result<Frame<Bytes>, axum::Error>>> + '_ {
        std::future::poll_fn(move |cx| Pin::new(&mut *body).poll_frame(cx))
    }

    /// Adds the frames that are ready now (a burst) to `out`; true when the body ended.
    fn take_ready(out: &mut Chunks, body: &mut Body, chunked: bool) -> bool {
        while out.frames < BATCH {
            match next_frame(body).now_or_never() {
                Some(Some(Ok(frame))) => out.push(frame.into_data().ok(), chunked),
                Some(_) => return true,
                None => return false,
            }
        }
        false
    }

    served.increment(1);
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, mut body) = response.into_parts();
    let length = body.size_hint().exact();
    let chunked = length.is_none();
    let mut out = Chunks::default();
    out.parts
        .push_back(Part::Shared(response_head(&parts, length)));
    // The head goes out with whatever the body has ready at once (a stream's `retry:`, an
    // error's text): one write and one segment where there were two.
    let mut ended = take_ready(&mut out, &mut body, chunked);
    let (mut from_client, mut to_client) = tokio::io::split(io);
    loop {
        if ended && chunked {
            out.parts
                .push_back(Part::Shared(Bytes::from_static(b"0\r\n\r\n")));
        }
        if to_client.write_all_buf(&mut out).await.is_err() {
            return;
        }
        out.frames = 0;
        if ended {
            break;
        }
        let mut probe = [0u8; 1];
        let first = tokio::select! {
            frame = next_frame(&mut body) => frame,
            // The client closed (or sent what a stream does not take): done.
            _ = from_client.read(&mut probe) => None,
        };
        match first {
            Some(Ok(frame)) => {
                out.push(frame.into_data().ok(), chunked);
                ended = take_ready(&mut out, &mut body, chunked);
            }
            // The body ended or failed: what was sent is closed off properly.
            Some(Err(_)) | None => ended = true,
        }
    }
    let _ = to_client.shutdown().await;
}

/// The status line and headers of a lean answer: the router's headers, `Date`, the
/// framing, and `connection: close`.
fn response_head(parts: &axum::http::response::Parts, length: Option<u64>) -> Bytes {
    use axum::http::header;
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        with_date(|date| head.extend_from_slice(date));
        head.extend_from_slice(b"\r\n");
    }
    match length {
        Some(n) => head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    Bytes::from(head)
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) is this long.
const DATE_LEN: usize = 29;

/// Calls `f` with the current `Date` value (RFC 9110 §6.6.1: an origin server with a
/// clock sends one). Formatted at most once a second per thread, as hyper does for its
/// own answers: a stream's head copies 29 bytes and formats nothing.
fn with_date(f: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    use std::io::Write;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        /// The second formatted (`u64::MAX`: none yet) and its text.
        static CACHED: RefCell<(u64, [u8; DATE_LEN])> = const { RefCell::new((u64::MAX, [0; DATE_LEN])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let mut text = [0u8; DATE_LEN];
            if write!(&mut text[..], "{}", httpdate::HttpDate::from(now)).is_ok() {
                *cached = (second, text);
            }
        }
        f(&cached.1);
    });
}

/// Body frames on their way out, with their chunk framing: written with one `writev`,
/// the frames never copied and the framing made without allocating.
#[derive(Default)]
struct Chunks {
    parts: std::collections::VecDeque<Part>,
    frames: usize,
}

/// A piece of the output: a frame (shared by every stream), or a chunk-size line kept
/// inline.
enum Part {
    Shared(Bytes),
    /// Up to 16 hex digits and CRLF, from `at` to `end`.
    Inline {
        bytes: [u8; 18],
        at: u8,
        end: u8,
    },
}

impl Part {
    /// `{len:x}\r\n`, the line before a chunk of `len` bytes.
    fn chunk_size(len: usize) -> Self {
        let mut bytes = [0u8; 18];
        let mut digits = [0u8; 16];
        let mut n = 0;
        let mut v = len;
        loop {
            digits[n] = b"0123456789abcdef"[v & 0xf];
            n += 1;
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        for i in 0..n {
            bytes[i] = digits[n - 1 - i];
        }
        bytes[n] = b'\r';
        bytes[n + 1] = b'\n';
        Part::Inline {
            bytes,
            at: 0,
            end: (n + 2) as u8,
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Part::Shared(b) => b,
            Part::Inline { bytes, at, end } => &bytes[usize::from(*at)..usize::from(*end)],
        }
    }
}

impl Chunks {
    fn push(&mut self, data: Option<Bytes>, chunked: bool) {
        let Some(data) = data.filter(|d| !d.is_empty()) else {
            return;
        };
        self.frames += 1;
        if chunked {
            self.parts.push_back(Part::chunk_size(data.len()));
            self.parts.push_back(Part::Shared(data));
            self.parts
                .push_back(Part::Shared(Bytes::from_static(b"\r\n")));
        } else {
            self.parts.push_back(Part::Shared(data));
        }
    }
}

impl hyper::body::Buf for Chunks {
    fn remaining(&self) -> usize {
        self.parts.iter().map(|p| p.as_slice().len()).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], Part::as_slice)
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(self.parts.iter()) {
            *slot = io::IoSlice::new(part.as_slice());
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            let len = front.as_slice().len();
            if cnt < len {
                match front {
                    Part::Shared(b) => hyper::body::Buf::advance(b, cnt),
                    // cnt < len <= 18
                    Part::Inline { at, .. } => *at += cnt as u8,
                }
                return;
            }
            cnt -= len;
            self.parts.pop_front();
        }
    }
}

#[cfg(test)]
mod lean_tests {
    use super::*;
    use hyper::body::Buf;

    #[test]
    fn only_a_plain_get_for_an_event_stream_takes_the_lean_path() {
        let head =
            |lines: &str| format!("GET /api/stream?room=1 HTTP/1.1\r\nHost: c\r\n{lines}\r\n");
        let stream = "Accept: text/event-stream\r\n";
        let lean = |h: &str| lean_request(h.as_bytes()).is_some();
        assert!(lean(&head(stream)));
        let request = lean_request(head(stream).as_bytes()).unwrap();
        assert_eq!(request.uri(), "/api/stream?room=1");
        assert!(lean(&head(
            "accept: text/html, text/event-stream;q=0.9\r\n"
        )));
        assert!(lean(&head(&format!("{stream}Content-Length: 0\r\n"))));
        for (what, h) in [
            ("no Accept", head("")),
            ("another type", head("Accept: text/html\r\n")),
            (
                "a type that only starts alike",
                head("Accept: text/event-streams-x\r\n").replace("streams-x", "streamx"),
            ),
            ("a body", head(&format!("{stream}Content-Length: 5\r\n"))),
            (
                "chunked",
                head(&format!("{stream}Transfer-Encoding: chunked\r\n")),
            ),
            ("Expect", head(&format!("{stream}Expect: 100-continue\r\n"))),
            ("Upgrade", head(&format!("{stream}Upgrade: websocket\r\n"))),
            ("HTTP/1.0", head(stream).replace("HTTP/1.1", "HTTP/1.0")),
            ("POST", head(stream).replace("GET", "POST")),
            ("HEAD", head(stream).replace("GET", "HEAD")),
            (
                "a bad header name",
                head(&format!("{stream}Bad Name: x\r\n")),
            ),
            (
                "a control byte in a value",
                head(&format!("{stream}X: a\u{1}b\r\n")),
            ),
            (
                "a bad target",
                head(stream).replace("/api/stream?room=1", "/a b"),
            ),
            (
                "an unfinished head",
                head(stream).trim_end_matches("\r\n").to_owned(),
            ),
            (
                "too many headers",
                head(&format!("{stream}{}", "X: y\r\n".repeat(LEAN_HEADERS))),
            ),
        ] {
            assert!(!lean(&h), "{what}: {h:?}");
        }
    }

    #[test]
    fn a_lean_head_is_dated_framed_and_closing() {
        let head = |response: axum::http::response::Builder, length| {
            let (parts, ()) = response.body(()).unwrap().into_parts();
            String::from_utf8(response_head(&parts, length).to_vec()).unwrap()
        };
        let stream = head(
            axum::http::Response::builder()
                .header("content-type", "text/event-stream")
                .header("connection", "keep-alive"),
            None,
        );
        assert!(
            stream.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ndate: "),
            "{stream}"
        );
        assert!(
            stream.ends_with("\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"),
            "{stream}"
        );
        let date = stream
            .split("\r\ndate: ")
            .nth(1)
            .and_then(|rest| rest.split("\r\n").next())
            .unwrap();
        assert_eq!(date.len(), DATE_LEN);
        let dated = httpdate::parse_http_date(date).unwrap();
        let off = std::time::SystemTime::now()
            .duration_since(dated)
            .unwrap_or_default();
        assert!(off < std::time::Duration::from_secs(5), "{date}");

        let refused = head(
            axum::http::Response::builder()
                .status(401)
                .header("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(13),
        );
        assert_eq!(
            refused,
            "HTTP/1.1 401 Unauthorized\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             content-length: 13\r\nconnection: close\r\n\r\n",
            "the router's own date stays, and only one"
        );
    }

    #[test]
    fn frames_go_out_chunked_and_whole_however_the_socket_takes_them() {
        let mut out = Chunks::default();
        out.push(Some(Bytes::from_static(b"id: 1\n\n")), true);
        out.push(Some(Bytes::from(vec![b'x'; 300])), true);
        out.push(Some(Bytes::new()), true);
        let mut want = b"7\r\nid: 1\n\n\r\n12c\r\n".to_vec();
        want.extend_from_slice(&[b'x'; 300]);
        want.extend_from_slice(b"\r\n");
        assert_eq!(out.frames, 2);
        assert_eq!(out.remaining(), want.len());
        // A socket that takes a few bytes at a time, splitting inside every part.
        let mut got = Vec::new();
        while out.has_remaining() {
            let take = out.chunk().len().min(2);
            got.extend_from_slice(&out.chunk()[..take]);
            out.advance(take);
        }
        assert_eq!(got, want);
        assert_eq!(Part::chunk_size(0).as_slice(), b"0\r\n");
        assert_eq!(
            Part::chunk_size(usize::MAX).as_slice(),
            b"ffffffffffffffff\r\n"
        );
    }
}
