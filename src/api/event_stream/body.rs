//! One client's response body: its replay, then its live queue, batched
//! into frames, with a keep-alive while idle. Counted in
//! `claracore_event_clients` while it exists.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use super::frame::KEEP_ALIVE_FRAME;
use super::KEEP_ALIVE;
use crate::metrics::Metrics;

/// Queued messages one poll of a body takes at most, as one frame.
const FRAME_BATCH: usize = 16;

/// One client's stream: its replay, then its queue, with keep-alives.
/// Counted in `claracore_event_clients` while it exists.
pub struct EventBody {
    replay: VecDeque<Bytes>,
    /// None: replay only, or the hub let go of it (shutdown, fell behind).
    live: Option<mpsc::Receiver<Bytes>>,
    keep_alive: tokio::time::Interval,
    metrics: Arc<Metrics>,
}

impl EventBody {
    pub(super) fn new(
        replay: Vec<Bytes>,
        live: Option<mpsc::Receiver<Bytes>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.event_clients_add(1);
        let start = tokio::time::Instant::now() + KEEP_ALIVE;
        EventBody {
            replay: replay.into(),
            live,
            keep_alive: tokio::time::interval_at(start, KEEP_ALIVE),
            metrics,
        }
    }
}

impl Drop for EventBody {
    fn drop(&mut self) {
        self.metrics.event_clients_add(-1);
    }
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let mut frame = BytesMut::new();
            for message in this.replay.drain(..this.replay.len().min(FRAME_BATCH)) {
                frame.extend_from_slice(&message);
            }
            return Poll::Ready(Some(Ok(Frame::data(frame.freeze()))));
        }
        let Some(live) = this.live.as_mut() else {
            return Poll::Ready(None);
        };
        match live.poll_recv(cx) {
            Poll::Ready(Some(first)) => {
                let mut frame = BytesMut::from(&first[..]);
                for _ in 1..FRAME_BATCH {
                    match live.try_recv() {
                        Ok(m) => frame.extend_from_slice(&m),
                        Err(_) => break,
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(frame.freeze()))));
            }
            Poll::Ready(None) => {
                this.live = None;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        match this.keep_alive.poll_tick(cx) {
            Poll::Ready(_) => {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEP_ALIVE_FRAME)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.replay.is_empty() && self.live.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_sends_a_keep_alive_every_fifteen_seconds() {
        let (_tx, rx) = mpsc::channel(1);
        let mut body = EventBody::new(Vec::new(), Some(rx), Arc::new(Metrics::new()));
        let next = tokio::time::timeout(KEEP_ALIVE - Duration::from_millis(10), body.frame()).await;
        assert!(next.is_err(), "nothing before 15 s");
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&frame[..], b": keep-alive\n\n");
    }
}
