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
//! - **Event streams without hyper's buffers**: a connection whose first request is an
//!   `EventSource`'s is served by [`super::lean`] instead of hyper.
//!
//! Owns sockets and connection lifetimes. Must not look at what is requested (that is the
//! router's).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::io::{Deadline, Replay};
use super::lean;

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
pub struct ConnLimits {
    pub max_connections: usize,
    pub write_timeout: Duration,
    pub header_timeout: Duration,
}

impl ConnLimits {
    /// The limit that fits the process's open-file limit.
    pub fn for_descriptors(nofile: u64, write_timeout: Duration) -> Self {
        let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
        ConnLimits {
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

    /// Makes room for one more connection: `None` when every connection is busy. Also
    /// says how many are open with it (one lock for both).
    fn admit(&self, max: usize) -> Option<(u64, Arc<Conn>, usize)> {
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
        Some((id, conn, reg.open.len()))
    }

    /// Forgets a connection; says how many are still open.
    fn close(&self, id: u64) -> usize {
        let mut reg = self.lock();
        reg.open.remove(&id);
        reg.open.len()
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
    limits: ConnLimits,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    // On a worker of the runtime, not wherever the caller runs (`coven web` awaits this
    // in `block_on`, on the main thread): there every accept woke the main thread from
    // the worker that saw it ready, and every connection it spawned woke a worker back
    // through the runtime's shared queue. From a worker, connections are spawned onto
    // its own queue.
    let accepting = tokio::spawn(accept(listener, router, limits, shutdown, grace));
    match accepting.await {
        Ok(done) => done,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(io::Error::other(e)),
    }
}

async fn accept(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let open = Open::default();
    let tasks = TaskTracker::new();
    let gauge = metrics::gauge!("coven_web_connections");
    let lean = metrics::counter!("coven_web_lean_streams_total");
    let mut options = SocketOptions::on_listener(&listener);
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
        let Some((id, conn, count)) = open.admit(limits.max_connections) else {
            metrics::counter!("coven_web_connections_refused_total").increment(1);
            drop(tcp);
            continue;
        };
        options.apply(&tcp);
        gauge.set(count as f64);
        let router = router.clone();
        let open = open.clone();
        let stop = shutdown.clone();
        let gauge = gauge.clone();
        let lean = lean.clone();
        tasks.spawn(async move {
            one(tcp, peer, router, limits, &conn, &lean, stop).await;
            gauge.set(open.close(id) as f64);
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

/// Socket options every connection gets: TCP_NODELAY (without it, a small event written
/// while the previous one is unacknowledged waits for the browser's delayed ACK, up to
/// 40 ms on Linux: Nagle on a live stream) and the capped send buffer.
///
/// Linux gives an accepted socket the listener's options, so they are set once on the
/// listener rather than with two system calls per connection. A connection that was
/// already queued when they were set has not got them, so connections are looked at
/// until one shows them (then none is looked at again); each that lacks them gets them
/// itself, and after [`OPTIONS_LOOKS`] without, every connection does (another kernel).
enum SocketOptions {
    /// Set on the listener; not yet seen on a connection.
    Untold {
        send_buffer: usize,
        looked: usize,
    },
    Inherited,
    Each,
}

/// Connections looked at before concluding the kernel does not pass the listener's
/// options on: more than a full accept queue (`somaxconn` is 4096 by default).
const OPTIONS_LOOKS: usize = 8192;

impl SocketOptions {
    fn on_listener(listener: &TcpListener) -> Self {
        let socket = socket2::SockRef::from(listener);
        let set = socket.set_tcp_nodelay(true).and_then(|()| {
            socket.set_send_buffer_size(SEND_BUFFER)?;
            // What the kernel made of it (Linux doubles it), to compare with.
            socket.send_buffer_size()
        });
        match set {
            Ok(send_buffer) => SocketOptions::Untold {
                send_buffer,
                looked: 0,
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot set socket options on the listener");
                SocketOptions::Each
            }
        }
    }

    fn apply(&mut self, tcp: &TcpStream) {
        match self {
            SocketOptions::Inherited => {}
            SocketOptions::Each => prepare(tcp),
            SocketOptions::Untold {
                send_buffer,
                looked,
            } => {
                let socket = socket2::SockRef::from(tcp);
                let inherited = socket.tcp_nodelay().unwrap_or(false)
                    && socket.send_buffer_size().ok() == Some(*send_buffer);
                *looked += 1;
                if inherited {
                    tracing::debug!(looked, "connections get the listener's socket options");
                    *self = SocketOptions::Inherited;
                    return;
                }
                prepare(tcp);
                if *looked >= OPTIONS_LOOKS {
                    tracing::debug!("connections do not get the listener's socket options");
                    *self = SocketOptions::Each;
                }
            }
        }
    }
}

/// Sets the socket options on one connection.
fn prepare(tcp: &TcpStream) {
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
    limits: ConnLimits,
    conn: &Arc<Conn>,
    lean_streams: &metrics::Counter,
    shutdown: CancellationToken,
) {
    let mut io = Deadline::new(tcp, limits.write_timeout);
    let first = tokio::select! {
        read = tokio::time::timeout(limits.header_timeout, lean::first_head(&mut io)) => match read {
            Ok(Ok(first)) => first,
            // Silent past the header timeout (as hyper would close it), or gone.
            Ok(Err(_)) | Err(_) => return,
        },
        () = conn.evict.cancelled() => return,
        () = shutdown.cancelled() => return,
    };
    let read = match first {
        lean::First::EventStream(request) => {
            let busy = Busy::new(conn.clone());
            lean::event_stream(io, *request, peer, router, lean_streams, busy).await;
            return;
        }
        lean::First::Other(read) => read,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_evicts_the_oldest_idle_connection_and_refuses_when_all_are_busy() {
        let open = Open::default();
        let (a, first, _) = open.admit(2).unwrap();
        let (_, second, count) = open.admit(2).unwrap();
        assert_eq!(count, 2);
        first.busy.fetch_add(1, Ordering::AcqRel);
        // At the limit: the idle second goes, the busy first stays.
        let (_, third, _) = open.admit(2).unwrap();
        assert!(second.evict.is_cancelled());
        assert!(!first.evict.is_cancelled());
        assert_eq!(open.len(), 2);
        third.busy.fetch_add(1, Ordering::AcqRel);
        assert!(open.admit(2).is_none(), "everyone is busy: refused");
        assert_eq!(open.close(a), 1);
        assert!(open.admit(2).is_some());
    }

    // Linux passes a listener's options on to the sockets it accepts.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn connections_get_the_listeners_socket_options_or_their_own() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Queued before the listener has the options: it gets them itself.
        let _early = std::net::TcpStream::connect(addr).unwrap();
        let mut options = SocketOptions::on_listener(&listener);
        let _late = std::net::TcpStream::connect(addr).unwrap();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            options.apply(&tcp);
            assert!(tcp.nodelay().unwrap());
            let sent = socket2::SockRef::from(&tcp).send_buffer_size().unwrap();
            assert!(sent <= 2 * SEND_BUFFER, "{sent}");
        }
        assert!(
            matches!(options, SocketOptions::Inherited),
            "the second came with them"
        );
    }

    #[test]
    fn the_limit_keeps_headroom_below_the_descriptor_limit() {
        let l = ConnLimits::for_descriptors(1024, Duration::from_secs(30));
        assert_eq!(l.max_connections, 1024 - HEADROOM);
        assert_eq!(
            ConnLimits::for_descriptors(10, Duration::ZERO).max_connections,
            16
        );
    }
}
