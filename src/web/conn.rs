//! Connections: the accept loop that serves the site over HTTP/1.1 with the limits a
//! public server needs.
//!
//! - **Request headers within 10 s.** hyper's `header_read_timeout` runs whenever a
//!   connection waits for a request head, so it also closes a keep-alive connection that
//!   stays idle between requests; a stream is a response in progress and is not affected.
//! - **A connection limit below the descriptor limit.** At the limit, a new connection
//!   evicts the oldest one that has no request in flight (idle keep-alive, or one that
//!   never sent anything), so health checks and new people still get in while someone
//!   holds a thousand silent sockets; only when every connection is busy is the newcomer
//!   refused at once.
//! - **A write deadline.** A socket that accepts nothing for `STREAM_WRITE_TIMEOUT` is
//!   cut (its stream reconnects and replays). The timer exists only while a write is
//!   stalled, never per connection.
//! - **A capped send buffer**, so a stalled reader pins a small, fixed amount of kernel
//!   memory instead of megabytes of autotuned buffer.
//! - **Event streams without hyper's buffers.** hyper keeps two 8 KiB buffers per
//!   connection for the requests and responses that may follow; an event stream is one
//!   response that lasts, so they would sit unused for as long as it does, which is most
//!   of what an open stream costs. A connection whose first request is a plain
//!   `GET` asking for `text/event-stream` (what `EventSource` sends) is read with a small
//!   buffer, answered by the same router, and written straight to the socket (chunked,
//!   the frames of a burst in one `writev`); it closes when the response ends. Every
//!   other request, and any stream asked for later on a kept-alive connection, goes
//!   through hyper with the bytes already read.
//!
//! Owns sockets and connection lifetimes. Must not look at what is requested (that is the
//! router's).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// A request's headers must arrive within this long; an idle keep-alive connection is
/// closed after it too.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the kernel may buffer for one connection's unsent bytes (Linux doubles the
/// value asked for): enough for a page or a burst of events, little for a reader that
/// stopped reading.
pub const SEND_BUFFER: usize = 32 * 1024;

/// Descriptors kept free beyond the connection limit: Redis, the metrics listener, logs,
/// and the moment an evicted socket takes to close.
pub const HEADROOM: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub write_timeout: Duration,
    pub header_timeout: Duration,
}

impl Limits {
    /// The limit that fits the process's open-file limit.
    pub fn for_descriptors(nofile: u64, write_timeout: Duration) -> Self {
        let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
        Limits {
            max_connections: nofile.saturating_sub(HEADROOM).max(16),
            write_timeout,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// One open connection, as the limit sees it.
struct Conn {
    /// Requests in flight (a stream stays in flight until it ends).
    busy: AtomicUsize,
    evict: CancellationToken,
}

#[derive(Default)]
struct Registry {
    next: u64,
    open: BTreeMap<u64, Arc<Conn>>,
}

#[derive(Clone, Default)]
struct Open(Arc<Mutex<Registry>>);

impl Open {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for one more connection: `None` when every connection is busy.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Conn>)> {
        let mut reg = self.lock();
        if reg.open.len() >= max {
            // Oldest first: the longest idle is the likeliest to be abandoned.
            let victim = reg
                .open
                .iter()
                .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(conn) = reg.open.remove(&victim) {
                conn.evict.cancel();
                metrics::counter!("coven_web_connections_evicted_total").increment(1);
            }
        }
        let id = reg.next;
        reg.next += 1;
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            evict: CancellationToken::new(),
        });
        reg.open.insert(id, conn.clone());
        Some((id, conn))
    }

    fn close(&self, id: u64) {
        self.lock().open.remove(&id);
    }

    fn len(&self) -> usize {
        self.lock().open.len()
    }
}

/// Accepts and serves until `shutdown`, then waits for the open connections (the stream
/// drain closes the streams) for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let open = Open::default();
    let tasks = TaskTracker::new();
    let gauge = metrics::gauge!("coven_web_connections");
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: wait a
                    // moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some((id, conn)) = open.admit(limits.max_connections) else {
            metrics::counter!("coven_web_connections_refused_total").increment(1);
            drop(tcp);
            continue;
        };
        prepare(&tcp);
        gauge.set(open.len() as f64);
        let router = router.clone();
        let open = open.clone();
        let stop = shutdown.clone();
        let gauge = gauge.clone();
        tasks.spawn(async move {
            one(tcp, peer, router, limits, &conn, stop).await;
            open.close(id);
            gauge.set(open.len() as f64);
        });
    }
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            connections = open.len(),
            "connections still open after the drain; closing them"
        );
    }
    Ok(())
}

/// Socket options every connection gets.
fn prepare(tcp: &TcpStream) {
    // Without TCP_NODELAY a small event written while the previous one is unacknowledged
    // waits for the browser's delayed ACK (up to 40 ms on Linux): Nagle on a live stream.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_send_buffer_size(SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot cap the send buffer");
    }
}

/// Serves one connection until it ends, is evicted, or the replica shuts down.
async fn one(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    conn: &Arc<Conn>,
    shutdown: CancellationToken,
) {
    let mut io = Deadline::new(tcp, limits.write_timeout);
    let first = tokio::select! {
        read = tokio::time::timeout(limits.header_timeout, first_head(&mut io)) => match read {
            Ok(Ok(first)) => first,
            // Silent past the header timeout (as hyper would close it), or gone.
            Ok(Err(_)) | Err(_) => return,
        },
        () = conn.evict.cancelled() => return,
        () = shutdown.cancelled() => return,
    };
    let read = match first {
        First::EventStream(request) => {
            event_stream(io, *request, peer, router, conn).await;
            return;
        }
        First::Other(read) => read,
    };
    let io = TokioIo::new(Replay {
        read: Some(read),
        io,
    });
    let state = conn.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let busy = Busy::new(state.clone());
        let call = router.clone().oneshot(req.map(Body::new));
        async move {
            let response = call.await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(Tracked {
                    inner: body,
                    _busy: busy,
                })
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        r = connection.as_mut() => Some(r),
        () = conn.evict.cancelled() => None,
        () = shutdown.cancelled() => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            // Idle connections close at once; one with a response in flight finishes it
            // (streams end through the drain).
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection ended");
    }
}

/// The most a first request head may take on the lean path (more goes to hyper, which
/// applies its own limits).
const LEAN_HEAD_MAX: usize = 8 * 1024;
/// Request headers the lean path parses at most.
const LEAN_HEADERS: usize = 48;
/// Frames of a burst written together.
const BATCH: usize = 32;

/// A connection's first request, as read before choosing who serves it.
enum First {
    /// A plain GET for an event stream, parsed.
    EventStream(Box<Request<Body>>),
    /// Anything else: the bytes read so far, for hyper.
    Other(Bytes),
}

/// Reads the first request head (until its blank line, or `LEAN_HEAD_MAX` bytes, or a
/// first read that already holds more than a head) and tells which path serves it.
async fn first_head(io: &mut Deadline) -> io::Result<First> {
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
async fn event_stream(
    io: Deadline,
    mut request: Request<Body>,
    peer: SocketAddr,
    router: Router,
    conn: &Arc<Conn>,
) {
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn next_frame(
        body: &mut Body,
    ) -> impl Future<Output = Option<Result<Frame<Bytes>, axum::Error>>> + '_ {
        std::future::poll_fn(move |cx| Pin::new(&mut *body).poll_frame(cx))
    }

    let _busy = Busy::new(conn.clone());
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, mut body) = response.into_parts();
    let length = body.size_hint().exact();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        if name == axum::http::header::CONTENT_LENGTH
            || name == axum::http::header::TRANSFER_ENCODING
            || name == axum::http::header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match length {
        Some(n) => head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    let (mut from_client, mut to_client) = tokio::io::split(io);
    if to_client.write_all(&head).await.is_err() {
        return;
    }
    drop(head);
    let chunked = length.is_none();
    let mut out = Chunks::default();
    loop {
        let mut probe = [0u8; 1];
        let first = tokio::select! {
            frame = next_frame(&mut body) => frame,
            // The client closed (or sent what a stream does not take): done.
            _ = from_client.read(&mut probe) => break,
        };
        let Some(Ok(frame)) = first else { break };
        let mut ended = false;
        out.push(frame.into_data().ok(), chunked);
        // A burst: whatever else is ready goes in the same write.
        while out.frames < BATCH {
            match next_frame(&mut body).now_or_never() {
                Some(Some(Ok(frame))) => out.push(frame.into_data().ok(), chunked),
                Some(_) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if to_client.write_all_buf(&mut out).await.is_err() {
            return;
        }
        out.frames = 0;
        if ended {
            break;
        }
    }
    if chunked {
        let _ = to_client.write_all(b"0\r\n\r\n").await;
    }
    let _ = to_client.shutdown().await;
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

/// The socket, with the bytes already read from it served first (to hyper).
struct Replay {
    read: Option<Bytes>,
    io: Deadline,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(read) = self.read.as_mut() {
            let n = read.len().min(buf.remaining());
            buf.put_slice(&read.split_to(n));
            if read.is_empty() {
                self.read = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts a request as in flight until its response body is done (or dropped).
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection counted as busy while it lives.
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket whose writes fail once it has accepted nothing for `timeout`. The timer is
/// made when a write stalls and dropped when one gets through.
struct Deadline {
    tcp: TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn new(tcp: TcpStream, timeout: Duration) -> Self {
        Deadline {
            tcp,
            timeout,
            stalled: None,
        }
    }

    /// Called when a write is pending: fails once the stall has lasted `timeout`.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            metrics::counter!("coven_web_write_timeouts_total").increment(1);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client accepted nothing for STREAM_WRITE_TIMEOUT",
            ));
        }
        Ok(())
    }

    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending => match self.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl AsyncRead for Deadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.written(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.written(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.tcp).poll_flush(cx);
        this.written(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = ready!(Pin::new(&mut self.tcp).poll_shutdown(cx));
        Poll::Ready(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_evicts_the_oldest_idle_connection_and_refuses_when_all_are_busy() {
        let open = Open::default();
        let (a, first) = open.admit(2).unwrap();
        let (_, second) = open.admit(2).unwrap();
        first.busy.fetch_add(1, Ordering::AcqRel);
        // At the limit: the idle second goes, the busy first stays.
        let (_, third) = open.admit(2).unwrap();
        assert!(second.evict.is_cancelled());
        assert!(!first.evict.is_cancelled());
        assert_eq!(open.len(), 2);
        third.busy.fetch_add(1, Ordering::AcqRel);
        assert!(open.admit(2).is_none(), "everyone is busy: refused");
        open.close(a);
        assert!(open.admit(2).is_some());
    }

    #[test]
    fn the_limit_keeps_headroom_below_the_descriptor_limit() {
        let l = Limits::for_descriptors(1024, Duration::from_secs(30));
        assert_eq!(l.max_connections, 1024 - HEADROOM);
        assert_eq!(
            Limits::for_descriptors(10, Duration::ZERO).max_connections,
            16
        );
    }
}
