//! Prometheus metrics, rendered in the text exposition format at
//! `/metrics`.
//!
//! Request, lifecycle and model-state figures come from the event bus
//! ([`Metrics`] is a [`Sink`]), fed by the same events that become history
//! rows, so the two agree. In-flight requests, history queue figures and
//! process figures are read when scraped.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::events::{Event, ModelEvent, ModelEventKind, ModelState, RequestRecord, Sink};
use crate::history::Recorder;
use crate::procfs::process_figures;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    endpoint: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    model: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VramLabels {
    model: String,
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    model: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StartLabels {
    model: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn load_histogram() -> Histogram {
    // 10 ms .. ~5 min
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    ttft: Family<ModelLabels, Histogram, fn() -> Histogram>,
    tokens: Family<TokenLabels, Counter>,
    model_state: Family<StateLabels, Gauge>,
    load_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    starts: Family<StartLabels, Counter>,
    inflight: Gauge,
    dropped: Counter,
    dropped_seen: AtomicU64,
    queue_depth: Gauge,
    rss: Gauge,
    cpu: Gauge<f64, std::sync::atomic::AtomicU64>,
    fds: Gauge,
    event_clients: Gauge,
    event_clients_dropped: Counter,
    queue_wait: Family<ModelLabels, Histogram, fn() -> Histogram>,
    queue_waiting: Family<ModelLabels, Gauge>,
    model_vram: Family<VramLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "claracore_requests",
            "Requests on inference routes, by how they ended",
            requests.clone(),
        );
        let duration = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "claracore_request_duration_seconds",
            "Request received to last byte sent",
            duration.clone(),
        );
        let ttft = Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "claracore_time_to_first_token_seconds",
            "Request received to first generated token (streams)",
            ttft.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "claracore_tokens",
            "Tokens processed, by kind (prompt, completion)",
            tokens.clone(),
        );
        let model_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "claracore_model_state",
            "1 for the state each model is in",
            model_state.clone(),
        );
        let load_duration =
            Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                load_histogram,
            );
        registry.register(
            "claracore_model_load_duration_seconds",
            "Model process spawn to healthy",
            load_duration.clone(),
        );
        let starts = Family::<StartLabels, Counter>::default();
        registry.register(
            "claracore_model_starts",
            "Model process starts, by result (ok, failed)",
            starts.clone(),
        );
        let inflight = Gauge::default();
        registry.register(
            "claracore_inflight_requests",
            "Requests holding a model right now",
            inflight.clone(),
        );
        let dropped = Counter::default();
        registry.register(
            "claracore_history_rows_dropped",
            "History rows not written (queue full or disk failing)",
            dropped.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "claracore_history_queue_depth",
            "History rows waiting for the writer",
            queue_depth.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("claracore_build_info", "Build information", build);
        let rss = Gauge::default();
        registry.register(
            "claracore_process_resident_memory_bytes",
            "Daemon resident memory",
            rss.clone(),
        );
        let cpu = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "claracore_process_cpu_seconds",
            "Daemon CPU time (user + system)",
            cpu.clone(),
        );
        let fds = Gauge::default();
        registry.register(
            "claracore_process_open_fds",
            "Daemon open file descriptors",
            fds.clone(),
        );
        let event_clients = Gauge::default();
        registry.register(
            "claracore_event_clients",
            "Clients connected to /admin/events",
            event_clients.clone(),
        );
        let event_clients_dropped = Counter::default();
        registry.register(
            "claracore_event_clients_dropped",
            "Event stream clients disconnected for falling behind",
            event_clients_dropped.clone(),
        );
        let queue_wait = Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "claracore_queue_wait_seconds",
            "Time a request waited for its model (start, swap, queue)",
            queue_wait.clone(),
        );
        let queue_waiting = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "claracore_queue_waiting",
            "Requests waiting for each model now",
            queue_waiting.clone(),
        );
        let model_vram = Family::<VramLabels, Gauge>::default();
        registry.register(
            "claracore_model_vram_bytes",
            "GPU memory used by each model's process tree, by GPU",
            model_vram.clone(),
        );
        Metrics {
            queue_wait,
            queue_waiting,
            model_vram,
            registry,
            requests,
            duration,
            ttft,
            tokens,
            model_state,
            load_duration,
            starts,
            inflight,
            dropped,
            dropped_seen: AtomicU64::new(0),
            queue_depth,
            rss,
            cpu,
            fds,
            event_clients,
            event_clients_dropped,
        }
    }

    /// An events-stream client connected (+1) or left (-1).
    pub fn event_clients_add(&self, delta: i64) {
        self.event_clients.inc_by(delta);
    }

    /// An events-stream client was cut off for falling behind.
    pub fn event_client_dropped(&self) {
        self.event_clients_dropped.inc();
    }

    /// A finished request, from the same record history stores.
    fn observe_request(&self, r: &RequestRecord) {
        let model = r.model.clone().unwrap_or_default();
        self.requests
            .get_or_create(&RequestLabels {
                model: model.clone(),
                endpoint: r.endpoint.clone(),
                outcome: r.outcome.as_str().into(),
            })
            .inc();
        self.duration
            .get_or_create(&EndpointLabels {
                model: model.clone(),
                endpoint: r.endpoint.clone(),
            })
            .observe(r.latency_ms / 1000.0);
        if let Some(wait) = r.queue_wait_ms {
            self.queue_wait
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .observe(wait / 1000.0);
        }
        if let Some(ttft) = r.ttft_ms {
            self.ttft
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .observe(ttft / 1000.0);
        }
        for (kind, n) in [
            ("prompt", r.usage.prompt_tokens),
            ("completion", r.usage.completion_tokens),
        ] {
            if let Some(n) = n.filter(|n| *n > 0) {
                self.tokens
                    .get_or_create(&TokenLabels {
                        model: model.clone(),
                        kind: kind.into(),
                    })
                    .inc_by(n as u64);
            }
        }
    }

    fn observe_start(&self, model: &str, ok: bool, load_seconds: Option<f64>) {
        self.starts
            .get_or_create(&StartLabels {
                model: model.into(),
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
        if let Some(s) = load_seconds {
            self.load_duration
                .get_or_create(&ModelLabels {
                    model: model.into(),
                })
                .observe(s);
        }
    }

    fn observe_state(&self, model: &str, now: ModelState) {
        for state in ModelState::ALL {
            self.model_state
                .get_or_create(&StateLabels {
                    model: model.into(),
                    state: state.as_str().into(),
                })
                .set(i64::from(state == now));
        }
    }

    fn observe_lifecycle(&self, e: &ModelEvent) {
        match e.event {
            ModelEventKind::Ready => {
                self.observe_start(&e.model, true, e.load_ms.map(|ms| ms / 1000.0))
            }
            ModelEventKind::StartFailed => self.observe_start(&e.model, false, None),
            ModelEventKind::StartRequested | ModelEventKind::Stopped | ModelEventKind::Crashed => {}
        }
    }

    /// Renders the exposition text, refreshing the figures read at scrape:
    /// `inflight` is the number of requests holding a model now.
    pub fn render(&self, inflight: usize, recorder: &Recorder) -> String {
        self.inflight.set(inflight as i64);
        let dropped = recorder.dropped();
        let seen = self.dropped_seen.swap(dropped, Ordering::Relaxed);
        self.dropped.inc_by(dropped.saturating_sub(seen));
        self.queue_depth.set(recorder.depth() as i64);
        if let Some((rss, cpu)) = process_figures() {
            self.rss.set(rss);
            self.cpu.set(cpu);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.fds.set(dir.count() as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Sink for Metrics {
    fn on_event(&self, event: &Event) {
        match event {
            Event::Request(r) => self.observe_request(r),
            Event::Model(e) => self.observe_lifecycle(e),
            Event::State { model, state } => self.observe_state(model, *state),
            Event::Queue { model, waiting } => {
                self.queue_waiting
                    .get_or_create(&ModelLabels {
                        model: model.to_string(),
                    })
                    .set(i64::try_from(*waiting).unwrap_or(i64::MAX));
            }
            Event::Vram { model, gpu, bytes } => {
                if let Some(gpu) = gpu {
                    self.model_vram
                        .get_or_create(&VramLabels {
                            model: model.to_string(),
                            gpu: gpu.to_string(),
                        })
                        .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
                }
            }
            Event::Progress(_)
            | Event::Removed { .. }
            | Event::Audit(_)
            | Event::RequestStarted(_)
            | Event::Reload(_)
            | Event::HistoryDrops { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Outcome, Usage};
    use std::sync::Arc;

    #[test]
    fn renders_request_counters_and_histograms() {
        let m = Metrics::new();
        let r = RequestRecord {
            request_id: "x".into(),
            started_at_ms: 0,
            finished_at_ms: 1,
            client: "c".into(),
            key_name: None,
            endpoint: "/v1/chat/completions".into(),
            model: Some("tiny".into()),
            status: 200,
            outcome: Outcome::Ok,
            error: None,
            latency_ms: 12.0,
            ttfb_ms: Some(3.0),
            ttft_ms: Some(4.0),
            usage: Usage {
                prompt_tokens: Some(29),
                completion_tokens: Some(8),
                ..Usage::default()
            },
            streamed: true,
            request_content: None,
            response_content: None,
            content_truncated: false,
            queue_wait_ms: None,
            gpu: None,
        };
        m.on_event(&Event::Request(Arc::new(r)));
        let mut ready = ModelEvent::new("tiny", ModelEventKind::Ready, 0);
        ready.load_ms = Some(150.0);
        m.on_event(&Event::Model(Arc::new(ready)));
        m.on_event(&Event::State {
            model: Arc::from("tiny"),
            state: ModelState::Ready,
        });
        let text = m.render(2, &Recorder::disabled());
        assert!(text.contains("claracore_requests_total{model=\"tiny\",endpoint=\"/v1/chat/completions\",outcome=\"ok\"} 1"), "{text}");
        assert!(
            text.contains("claracore_tokens_total{model=\"tiny\",kind=\"completion\"} 8"),
            "{text}"
        );
        assert!(
            text.contains("claracore_model_starts_total{model=\"tiny\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("claracore_time_to_first_token_seconds_count{model=\"tiny\"} 1"),
            "{text}"
        );
        assert!(text.contains("claracore_build_info{version="), "{text}");
        assert!(
            text.contains("claracore_model_state{model=\"tiny\",state=\"ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("claracore_model_state{model=\"tiny\",state=\"stopped\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("claracore_model_load_duration_seconds_count{model=\"tiny\"} 1"),
            "{text}"
        );
        assert!(text.contains("claracore_inflight_requests 2"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
