//! The hub task: the one owner of the list of connected clients. It fans
//! out what the ring gained with `try_send`, lets clients join between two
//! fan-outs (so a replay and the live events meet without a gap or a
//! duplicate), and cuts the ones that fell behind. It never waits for a
//! client.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::frame;
use super::log::{EventLog, Join, Resume};
use super::{Disconnect, CLIENT_QUEUE};

/// A connected client, as the hub sees it.
struct Client {
    tx: mpsc::Sender<Bytes>,
    cut: Disconnect,
}

/// The one owner of the client list: fans out what the ring gained, lets
/// clients join between fan-outs, drops the ones that fell behind.
pub(super) async fn hub(
    log: Arc<EventLog>,
    mut joins: mpsc::UnboundedReceiver<Join>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let mut clients: Vec<Client> = Vec::new();
    // Everything up to here went to every client in `clients`.
    let mut sent = log.last_id();
    loop {
        tokio::select! {
            biased;
            _ = closing.wait_for(|c| *c) => break,
            join = joins.recv() => {
                let Some(join) = join else { break };
                sent = fan_out(&log, &mut clients, sent);
                admit(&log, &mut clients, sent, join);
            }
            _ = log.grew.notified() => sent = fan_out(&log, &mut clients, sent),
        }
    }
    joins.close();
    for c in clients {
        c.cut.cut();
    }
}

/// Offers every entry after `sent` to every client; returns the new
/// `sent`.
fn fan_out(log: &EventLog, clients: &mut Vec<Client>, sent: u64) -> u64 {
    let (fresh, complete) = log.since(sent, u64::MAX);
    let Some(&(newest, _)) = fresh.last() else {
        return sent;
    };
    if !complete {
        // The hub itself fell a whole ring behind: every client missed
        // events. Cut them all; each resumes with its last id and is told
        // to reset.
        tracing::warn!(
            clients = clients.len(),
            "events hub fell behind; disconnecting every events client"
        );
        for c in clients.drain(..) {
            log.metrics.event_client_dropped();
            c.cut.cut();
        }
        return newest;
    }
    clients.retain(|c| {
        for (_, message) in &fresh {
            match c.tx.try_send(message.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::info!(
                        queue = CLIENT_QUEUE,
                        "events client fell behind; disconnecting it"
                    );
                    log.metrics.event_client_dropped();
                    c.cut.cut();
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    });
    newest
}

/// Answers a join with its replay (everything up to `sent`) and, for a
/// live client, adds it to the fan-out from `sent` on.
fn admit(log: &EventLog, clients: &mut Vec<Client>, sent: u64, join: Join) {
    let reset = || frame::reset(sent);
    let replay = match join.resume {
        Resume::Now => Vec::new(),
        Resume::Invalid => vec![reset()],
        Resume::After(n) if n > sent => vec![reset()],
        Resume::After(n) => match log.since(n, sent) {
            (entries, true) => entries.into_iter().map(|(_, m)| m).collect(),
            (_, false) => vec![reset()],
        },
    };
    if join.reply.send(replay).is_err() {
        return; // the client left while waiting
    }
    if let Some((tx, cut)) = join.live {
        clients.push(Client { tx, cut });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::super::{EventLog, REPLAY};
    use super::*;
    use crate::events::{
        Bus, Event, ModelEvent, ModelEventKind, ModelState, Outcome, Reason, RequestRecord,
        RequestStart, Sink, Usage,
    };
    use crate::metrics::Metrics;

    fn started(id: &str) -> Event {
        Event::RequestStarted(Arc::new(RequestStart {
            request_id: id.into(),
            model: Some("tiny".into()),
            endpoint: "/v1/chat/completions".into(),
            key_name: None,
            client: "127.0.0.1:1".into(),
        }))
    }

    fn text(messages: &[Bytes]) -> String {
        messages
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }

    async fn join(log: &EventLog, resume: Resume) -> (Vec<Bytes>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let (reply, replay) = oneshot::channel();
        log.joins
            .send(Join {
                resume,
                live: Some((tx, Disconnect::default())),
                reply,
            })
            .unwrap();
        (replay.await.unwrap(), rx)
    }

    #[tokio::test]
    async fn ids_increase_and_resume_replays_exactly_what_was_missed() {
        let log = EventLog::start(Arc::new(Metrics::new()));
        for i in 0..10 {
            log.on_event(&started(&format!("r{i}")));
        }
        let (replay, _rx) = join(&log, Resume::After(7)).await;
        let t = text(&replay);
        assert!(
            t.starts_with("id: 8\nevent: request_started\ndata: {\"id\":\"r7\""),
            "{t}"
        );
        assert!(t.contains("id: 10\n") && !t.contains("id: 7\n"), "{t}");
        // The newest id: nothing missed, no reset.
        assert!(join(&log, Resume::After(10)).await.0.is_empty());
        let future = text(&join(&log, Resume::After(11)).await.0);
        assert_eq!(future, "id: 10\nevent: reset\ndata: {}\n\n");
        let bad = text(&join(&log, Resume::Invalid).await.0);
        assert!(bad.contains("event: reset"), "{bad}");
    }

    #[tokio::test]
    async fn an_id_older_than_the_ring_gets_a_reset_and_live_events_follow() {
        let log = EventLog::start(Arc::new(Metrics::new()));
        for i in 0..REPLAY + 5 {
            log.on_event(&started(&format!("r{i}")));
        }
        let (replay, mut rx) = join(&log, Resume::After(3)).await;
        assert_eq!(
            text(&replay),
            format!("id: {}\nevent: reset\ndata: {{}}\n\n", REPLAY + 5)
        );
        // The oldest kept is id 6: resuming from 5 misses nothing.
        let (replay, _) = join(&log, Resume::After(5)).await;
        assert_eq!(replay.len(), REPLAY);
        log.on_event(&started("next"));
        let live = String::from_utf8(rx.recv().await.unwrap().to_vec()).unwrap();
        assert!(live.starts_with(&format!("id: {}\n", REPLAY + 6)), "{live}");
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_is_cut_and_counted_and_others_keep_everything() {
        let metrics = Arc::new(Metrics::new());
        let log = EventLog::start(metrics.clone());
        let (tx, _stalled) = mpsc::channel(CLIENT_QUEUE);
        let cut = Disconnect::default();
        let (reply, replay) = oneshot::channel();
        log.joins
            .send(Join {
                resume: Resume::Now,
                live: Some((tx, cut.clone())),
                reply,
            })
            .unwrap();
        replay.await.unwrap();
        let (_, mut reader) = join(&log, Resume::Now).await;
        let n = CLIENT_QUEUE * 4;
        let reading = tokio::spawn(async move {
            let mut ids = Vec::new();
            while ids.len() < n {
                let m = reader.recv().await.unwrap();
                let t = String::from_utf8(m.to_vec()).unwrap();
                ids.push(t.lines().next().unwrap().to_string());
            }
            ids
        });
        for i in 0..n {
            log.on_event(&started(&format!("r{i}")));
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(Duration::from_secs(5), cut.requested())
            .await
            .expect("the stalled client is cut");
        let ids = reading.await.unwrap();
        let expected: Vec<String> = (1..=n).map(|i| format!("id: {i}")).collect();
        assert_eq!(ids, expected);
        let text = metrics.render(0, &crate::history::Recorder::disabled(), None);
        assert!(
            text.contains("claracore_event_clients_dropped_total 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn states_carry_the_reason_of_the_step_before_them_and_requests_no_content() {
        let log = EventLog::start(Arc::new(Metrics::new()));
        let bus = Bus::new(vec![log.clone() as Arc<dyn Sink>]);
        let step = |kind, reason| {
            let mut e = ModelEvent::new("tiny", kind, 0);
            e.reason = reason;
            Event::Model(Arc::new(e))
        };
        let state = |s| Event::State {
            model: Arc::from("tiny"),
            state: s,
        };
        bus.emit(step(ModelEventKind::StartRequested, None));
        bus.emit(state(ModelState::Starting));
        bus.emit(step(ModelEventKind::Ready, None));
        bus.emit(state(ModelState::Ready));
        bus.emit(step(ModelEventKind::Stopped, Some(Reason::Ttl)));
        bus.emit(state(ModelState::Stopped));
        bus.emit(Event::Request(Arc::new(RequestRecord {
            request_id: "r1".into(),
            started_at_ms: 0,
            finished_at_ms: 1,
            client: "c".into(),
            key_name: Some("k".into()),
            endpoint: "/v1/completions".into(),
            model: Some("tiny".into()),
            status: 200,
            outcome: Outcome::Ok,
            error: None,
            latency_ms: 2.5,
            ttfb_ms: None,
            ttft_ms: None,
            usage: Usage {
                prompt_tokens: Some(3),
                ..Usage::default()
            },
            streamed: false,
            request_content: Some("SECRET-PROMPT".into()),
            response_content: Some("SECRET-ANSWER".into()),
            content_truncated: false,
            queue_wait_ms: None,
            gpu: None,
        })));
        let (replay, _) = join(&log, Resume::After(0)).await;
        let t = text(&replay);
        let expected = "id: 1\nevent: state\ndata: {\"model\":\"tiny\",\"state\":\"starting\",\"reason\":\"requested\"}\n\n\
            id: 2\nevent: state\ndata: {\"model\":\"tiny\",\"state\":\"ready\"}\n\n\
            id: 3\nevent: state\ndata: {\"model\":\"tiny\",\"state\":\"stopped\",\"reason\":\"ttl\"}\n\n\
            id: 4\nevent: request\ndata: {\"id\":\"r1\",\"model\":\"tiny\",\"endpoint\":\"/v1/completions\",\"key_name\":\"k\",\"status\":200,\"outcome\":\"ok\",\"latency_ms\":2.5,\"prompt_tokens\":3}\n\n";
        assert_eq!(t, expected);
        assert!(!t.contains("SECRET"));
    }
}
