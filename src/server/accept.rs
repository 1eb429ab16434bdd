//! Accepting clients and serving each connection's HTTP/1.1.
//!
//! Each listener has an accept loop. It asks [`Connections`] for room
//! first: at the cap, or when accept runs out of fds, the connection idle
//! longest is closed to make room; with every connection busy, accepting
//! waits (the kernel's backlog holds new clients) instead of spinning on
//! the error, and the warnings about it are throttled. The local unix
//! socket is never held back. Each accepted connection gets a task that
//! waits for its first byte, then runs hyper until the client leaves, the
//! connection is cut or chosen to make room, or shutdown begins.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};

use super::connections::{Connections, Registered, Room, Tracked};
use crate::api::{self, AppState};
use crate::config::HttpConfig;
use crate::listen::{Conn, Listener, Peer};

/// How long a wait for room lasts before looking again: fds held outside
/// the connection table (children, the database) free up without a wake-up.
const ROOM_RECHECK: Duration = Duration::from_secs(1);
/// At most one warning per this long from each accept loop about having no
/// room, with the number held back.
const ROOM_WARN_PERIOD: Duration = Duration::from_secs(10);

pub(super) async fn accept_loop(
    listener: Listener,
    state: Arc<AppState>,
    conns: Arc<Connections>,
    done: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut throttle = Throttle::default();
    let describe = listener.describe();
    // The local socket is admin: like a database's reserved superuser
    // connections, it is never held back at the cap, so an operator can
    // always get in. Its connections still count, and an idle one can be
    // closed to make room.
    let local = listener.is_unix();
    loop {
        // Room first: a connection accepted past the cap would take fds
        // kept for the models and the database.
        let room = if local { Room::Free } else { conns.make_room() };
        if room != Room::Free {
            if room == Room::AllBusy {
                if let Some(held_back) = throttle.ready() {
                    tracing::warn!(listen = %describe, open = conns.open(), max_open_connections = conns.cap(), held_back,
                        "every connection has a request in flight; not accepting until one ends (http.max_open_connections)");
                }
            }
            if wait_for_room(&conns, room, &mut stop).await {
                continue;
            }
            return;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut stop) => return,
        };
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) if out_of_fds(&e) => {
                // The client stays in the backlog and the listener stays
                // readable: accepting again before an fd is free would
                // fail the same way at once.
                let room = conns.close_idle_longest();
                if let Some(held_back) = throttle.ready() {
                    tracing::warn!(listen = %describe, error = %e, open = conns.open(), held_back,
                        "out of file descriptors; closing the connection idle longest or waiting for one to close");
                }
                if wait_for_room(&conns, room, &mut stop).await {
                    continue;
                }
                return;
            }
            Err(e) => {
                // A client that reset before it was accepted, or similar:
                // about that client only. The pause keeps an error that
                // does repeat from spinning.
                if let Some(held_back) = throttle.ready() {
                    tracing::warn!(listen = %describe, error = %e, held_back, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let peer = Arc::new(peer);
        let http = state.config().http.clone();
        let registered = conns.register();
        conns.admitted(&registered);
        let (done, stop, state) = (done.clone(), stop.clone(), state.clone());
        match conn {
            Conn::Tcp(s) => tokio::spawn(serve_conn(http, s, state, peer, registered, done, stop)),
            Conn::Unix(s) => tokio::spawn(serve_conn(http, s, state, peer, registered, done, stop)),
        };
    }
}

/// Accept errors that mean the process (or system) has no fd or buffer
/// for the next connection, rather than anything about the client.
fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Lets one warning through per [`ROOM_WARN_PERIOD`].
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// `Some(warnings held back since the last one)` when one may be
    /// logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ROOM_WARN_PERIOD)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Waits until a connection may be accepted (`room` says why not now):
/// false if shutdown began meanwhile.
async fn wait_for_room(conns: &Connections, room: Room, stop: &mut watch::Receiver<bool>) -> bool {
    let (all_busy, recheck) = match room {
        Room::Young(wait) => (true, wait),
        _ => (room == Room::AllBusy, ROOM_RECHECK),
    };
    tokio::select! {
        _ = conns.wait(all_busy, recheck) => true,
        _ = stopped(stop) => false,
    }
}

fn builder(http: &HttpConfig) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(http.header_read_timeout)
        .keep_alive(true);
    b
}

/// An accepted stream, which can be waited on for its first byte.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves once the client sent something (or closed).
    fn first_byte(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_;
}

impl Stream for TcpStream {
    async fn first_byte(&self) -> std::io::Result<()> {
        // A peek, not `readable()`: tokio takes a freshly accepted stream
        // as readable without asking the kernel.
        self.peek(&mut [0u8; 1]).await.map(drop)
    }
}

impl Stream for UnixStream {
    async fn first_byte(&self) -> std::io::Result<()> {
        // tokio has no peek here; the unix socket is local (mode 0660), not
        // where idle connections pile up, so hyper just starts.
        Ok(())
    }
}

/// Serves one connection; on shutdown, finishes the request in flight and
/// closes instead of waiting for the next one. Chosen to make room, it
/// closes at once when idle (a half-sent head included) and after its
/// request otherwise.
async fn serve_conn<S: Stream>(
    http: HttpConfig,
    stream: S,
    state: Arc<AppState>,
    peer: Arc<Peer>,
    registered: Registered,
    _done: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let slot = registered.slot().clone();
    // hyper allocates its buffers (8 KiB each way) when it starts; a client
    // that has sent nothing yet gets none, so idle connections cost little.
    // The wait is bounded like a slow head: a client that never sends
    // anything is cut off after `header_read_timeout`, as hyper would.
    tokio::select! {
        // First: a connection chosen to make room before its task first ran
        // may have its request waiting already; that one is served.
        biased;
        first = tokio::time::timeout(http.header_read_timeout, stream.first_byte()) => {
            if !matches!(first, Ok(Ok(()))) {
                return;
            }
        }
        _ = slot.evicted() => return,
        _ = stopped(&mut stop) => return,
    }
    slot.reading();
    let requests = slot.clone();
    // How a handler closes this connection at once: the events stream cuts
    // a client that fell behind, whose connection may be stuck writing.
    let cut = api::event_stream::Disconnect::default();
    let cut_handle = cut.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(cut_handle.clone());
        let busy = requests.begin();
        let handled = api::handle(state.clone(), peer.clone(), req);
        async move {
            let resp = match handled.await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, busy)))
        }
    });
    let conn = builder(&http).serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = cut.requested() => return,
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                _ = cut.requested() => return,
            }
        }
        _ = slot.evicted() => {
            if slot.is_idle() {
                return;
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                _ = cut.requested() => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Resolves once shutdown has been signalled (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
