//! The daemon's run loop: accept on every listener, serve HTTP/1.1, and shut
//! down in order.
//!
//! [`serve`] takes its listeners and a shutdown future as arguments, so tests
//! and the binary drive it the same way. Shutdown order: stop accepting
//! (unix socket files are removed), let in-flight requests finish up to
//! `shutdown_timeout`, stop every child, return.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use crate::api::{self, AppState};
use crate::config::{Config, HttpConfig};
use crate::listen::{Conn, Listener};
use crate::proxy;
use crate::scheduler::Scheduler;

/// How the drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request finished.
    Clean,
    /// `shutdown_timeout` passed with requests still open; they were cut.
    TimedOut { open: usize },
}

/// Serves until `shutdown` resolves, then drains and stops children.
pub async fn serve(
    config: Config,
    listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()>,
) -> Drained {
    let config = Arc::new(config);
    let state = Arc::new(AppState {
        scheduler: Scheduler::start(&config),
        client: proxy::client(),
        started: Instant::now(),
        accepting: AtomicBool::new(true),
        config: config.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; `recv` returns None once all
    // are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accept_tasks = Vec::with_capacity(listeners.len());
    for listener in listeners {
        tracing::info!(listen = %listener.describe(), "listening");
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            state.clone(),
            done_tx.clone(),
            stop_rx.clone(),
        )));
    }

    shutdown.await;
    state.accepting.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for task in accept_tasks {
        let _ = task.await; // drops the listener
    }
    let open = done_tx.strong_count() - 1;
    drop(done_tx);
    tracing::info!(
        open_connections = open,
        timeout_s = config.scheduler.shutdown_timeout.as_secs_f64(),
        "draining in-flight requests"
    );
    let drained =
        match tokio::time::timeout(config.scheduler.shutdown_timeout, done_rx.recv()).await {
            Ok(_) => Drained::Clean,
            Err(_) => Drained::TimedOut { open },
        };
    if let Drained::TimedOut { open } = drained {
        tracing::warn!(
            open_connections = open,
            "shutdown timeout reached; cutting open requests"
        );
    }
    state.scheduler.shutdown().await;
    tracing::info!("all model processes stopped");
    drained
}

async fn accept_loop(
    listener: Listener,
    state: Arc<AppState>,
    done: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let http = &state.config.http;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut stop) => return,
        };
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of fds or similar: back off briefly instead of spinning.
                tracing::warn!(listen = %listener.describe(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer: Arc<str> = peer.into();
        let (builder, done, stop, state) =
            (builder(http), done.clone(), stop.clone(), state.clone());
        match conn {
            Conn::Tcp(s) => tokio::spawn(serve_conn(builder, s, state, peer, done, stop)),
            Conn::Unix(s) => tokio::spawn(serve_conn(builder, s, state, peer, done, stop)),
        };
    }
}

/// Serves one connection; on shutdown, finishes the request in flight and
/// closes instead of waiting for the next one.
async fn serve_conn<S>(
    builder: http1::Builder,
    stream: S,
    state: Arc<AppState>,
    peer: Arc<str>,
    _done: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| api::handle(state.clone(), peer.clone(), req));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

fn builder(http: &HttpConfig) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(http.header_read_timeout)
        .keep_alive(true);
    b
}

/// Resolves once shutdown has been signalled (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
