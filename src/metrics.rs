//! Prometheus metrics, rendered in the text exposition format at
//! `/metrics`.
//!
//! Request, lifecycle and model-state figures come from the event bus
//! ([`Metrics`] is a [`Sink`]), fed by the same events that become history
//! rows, so the two agree. In-flight requests, history queue figures,
//! process figures and GPU readings are read when scraped; without GPU
//! readings no `claracore_gpu_*` family appears at all.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::events::{Event, ModelEvent, ModelEventKind, ModelState, RequestRecord, Sink};
use crate::gpu::Snapshot;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuInfoLabels {
    gpu: String,
    name: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The GPU families, in a registry of their own that is rendered only
/// when there is a snapshot. Filled afresh from it at each scrape.
struct GpuFamilies {
    registry: Registry,
    info: Family<GpuInfoLabels, Gauge>,
    memory_used: Family<GpuLabels, Gauge>,
    memory_total: Family<GpuLabels, Gauge>,
    utilization: Family<GpuLabels, FloatGauge>,
    temperature: Family<GpuLabels, Gauge>,
    power: Family<GpuLabels, FloatGauge>,
}

impl GpuFamilies {
    fn new() -> GpuFamilies {
        let mut registry = Registry::default();
        let info = Family::<GpuInfoLabels, Gauge>::default();
        registry.register(
            "claracore_gpu_info",
            "1 for each GPU, with its name",
            info.clone(),
        );
        let memory_used = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "claracore_gpu_memory_used_bytes",
            "GPU memory in use (NVML)",
            memory_used.clone(),
        );
        let memory_total = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "claracore_gpu_memory_total_bytes",
            "GPU memory installed (NVML)",
            memory_total.clone(),
        );
        let utilization = Family::<GpuLabels, FloatGauge>::default();
        registry.register(
            "claracore_gpu_utilization_ratio",
            "Share of the last sample period a kernel ran on the GPU, 0 to 1",
            utilization.clone(),
        );
        let temperature = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "claracore_gpu_temperature_celsius",
            "GPU die temperature",
            temperature.clone(),
        );
        let power = Family::<GpuLabels, FloatGauge>::default();
        registry.register("claracore_gpu_power_watts", "GPU power draw", power.clone());
        GpuFamilies {
            registry,
            info,
            memory_used,
            memory_total,
            utilization,
            temperature,
            power,
        }
    }

    /// Sets every series from `snapshot`; a reading the GPU does not give
    /// has no series.
    fn observe(&self, snapshot: &Snapshot) {
        self.info.clear();
        self.memory_used.clear();
        self.memory_total.clear();
        self.utilization.clear();
        self.temperature.clear();
        self.power.clear();
        for g in &snapshot.gpus {
            let gpu = GpuLabels {
                gpu: g.index.to_string(),
            };
            self.info
                .get_or_create(&GpuInfoLabels {
                    gpu: gpu.gpu.clone(),
                    name: g.name.clone(),
                })
                .set(1);
            self.memory_used
                .get_or_create(&gpu)
                .set(i64::try_from(g.used_bytes).unwrap_or(i64::MAX));
            self.memory_total
                .get_or_create(&gpu)
                .set(i64::try_from(g.total_bytes).unwrap_or(i64::MAX));
            if let Some(u) = g.utilization {
                self.utilization.get_or_create(&gpu).set(u);
            }
            if let Some(t) = g.temperature_c {
                self.temperature.get_or_create(&gpu).set(i64::from(t));
            }
            if let Some(w) = g.power_watts {
                self.power.get_or_create(&gpu).set(w);
            }
        }
    }
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
    /// Rendered after `registry`, only with a GPU snapshot; the lock
    /// orders concurrent scrapes (fill, then encode).
    gpus: std::sync::Mutex<GpuFamilies>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            duration: Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            ),
            ttft: Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            ),
            tokens: Family::default(),
            model_state: Family::default(),
            load_duration:
                Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                    load_histogram,
                ),
            starts: Family::default(),
            inflight: Gauge::default(),
            dropped: Counter::default(),
            dropped_seen: AtomicU64::new(0),
            queue_depth: Gauge::default(),
            rss: Gauge::default(),
            cpu: Gauge::<f64, std::sync::atomic::AtomicU64>::default(),
            fds: Gauge::default(),
            event_clients: Gauge::default(),
            event_clients_dropped: Counter::default(),
            queue_wait: Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            ),
            queue_waiting: Family::default(),
            model_vram: Family::default(),
            gpus: std::sync::Mutex::new(GpuFamilies::new()),
        };
        // The registry renders families in the order they were registered.
        metrics.register_request_families();
        metrics.register_daemon_families();
        metrics
    }

    /// Requests, tokens and model lifecycle.
    fn register_request_families(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "claracore_requests",
            "Requests on inference routes, by how they ended",
            self.requests.clone(),
        );
        registry.register(
            "claracore_request_duration_seconds",
            "Request received to last byte sent",
            self.duration.clone(),
        );
        registry.register(
            "claracore_time_to_first_token_seconds",
            "Request received to first generated token (streams)",
            self.ttft.clone(),
        );
        registry.register(
            "claracore_tokens",
            "Tokens processed, by kind (prompt, completion)",
            self.tokens.clone(),
        );
        registry.register(
            "claracore_model_state",
            "1 for the state each model is in",
            self.model_state.clone(),
        );
        registry.register(
            "claracore_model_load_duration_seconds",
            "Model process spawn to healthy",
            self.load_duration.clone(),
        );
        registry.register(
            "claracore_model_starts",
            "Model process starts, by result (ok, failed)",
            self.starts.clone(),
        );
        registry.register(
            "claracore_inflight_requests",
            "Requests holding a model right now",
            self.inflight.clone(),
        );
    }

    /// History, build, process, events-stream, queue and GPU-memory
    /// figures.
    fn register_daemon_families(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "claracore_history_rows_dropped",
            "History rows not written (queue full or disk failing)",
            self.dropped.clone(),
        );
        registry.register(
            "claracore_history_queue_depth",
            "History rows waiting for the writer",
            self.queue_depth.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("claracore_build_info", "Build information", build);
        registry.register(
            "claracore_process_resident_memory_bytes",
            "Daemon resident memory",
            self.rss.clone(),
        );
        registry.register(
            "claracore_process_cpu_seconds",
            "Daemon CPU time (user + system)",
            self.cpu.clone(),
        );
        registry.register(
            "claracore_process_open_fds",
            "Daemon open file descriptors",
            self.fds.clone(),
        );
        registry.register(
            "claracore_event_clients",
            "Clients connected to /admin/events",
            self.event_clients.clone(),
        );
        registry.register(
            "claracore_event_clients_dropped",
            "Event stream clients disconnected for falling behind",
            self.event_clients_dropped.clone(),
        );
        registry.register(
            "claracore_queue_wait_seconds",
            "Time a request waited for its model (start, swap, queue)",
            self.queue_wait.clone(),
        );
        registry.register(
            "claracore_queue_waiting",
            "Requests waiting for each model now",
            self.queue_waiting.clone(),
        );
        registry.register(
            "claracore_model_vram_bytes",
            "GPU memory used by each model's process tree, by GPU",
            self.model_vram.clone(),
        );
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
    /// `inflight` is the number of requests holding a model now, `gpus`
    /// the latest GPU readings (`None`: no GPU families at all).
    pub fn render(&self, inflight: usize, recorder: &Recorder, gpus: Option<&Snapshot>) -> String {
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
        if let Some(snapshot) = gpus {
            self.render_gpus(snapshot, &mut out);
        }
        out
    }

    /// Inserts the GPU families before the closing `# EOF` of `out`.
    fn render_gpus(&self, snapshot: &Snapshot, out: &mut String) {
        let families = match self.gpus.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        families.observe(snapshot);
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &families.registry).is_err() {
            return;
        }
        let Some(body) = text.strip_suffix("# EOF\n") else {
            return;
        };
        match out.strip_suffix("# EOF\n").map(str::len) {
            Some(end) => out.insert_str(end, body),
            None => out.push_str(body),
        }
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
        let text = m.render(2, &Recorder::disabled(), None);
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
        assert!(!text.contains("claracore_gpu"), "no GPU readings: {text}");
    }

    #[test]
    fn gpu_families_appear_with_readings_only() {
        use crate::gpu::GpuReading;
        let m = Metrics::new();
        let gpu = |index, name: &str, utilization, power_watts| GpuReading {
            index,
            name: name.into(),
            total_bytes: 8 << 30,
            used_bytes: 1 << 30,
            free_bytes: 7 << 30,
            utilization,
            temperature_c: Some(41),
            power_watts,
        };
        let snapshot = Snapshot {
            taken_at_ms: 1,
            gpus: vec![
                gpu(0, "NVIDIA \"Fast\" One", Some(0.25), Some(71.5)),
                gpu(1, "Slow", None, None),
            ],
            processes: vec![],
        };
        let text = m.render(0, &Recorder::disabled(), Some(&snapshot));
        for line in [
            "claracore_gpu_info{gpu=\"0\",name=\"NVIDIA \\\"Fast\\\" One\"} 1",
            "claracore_gpu_info{gpu=\"1\",name=\"Slow\"} 1",
            "claracore_gpu_memory_used_bytes{gpu=\"0\"} 1073741824",
            "claracore_gpu_memory_total_bytes{gpu=\"1\"} 8589934592",
            "claracore_gpu_utilization_ratio{gpu=\"0\"} 0.25",
            "claracore_gpu_temperature_celsius{gpu=\"1\"} 41",
            "claracore_gpu_power_watts{gpu=\"0\"} 71.5",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(
            !text.contains("claracore_gpu_utilization_ratio{gpu=\"1\"}"),
            "{text}"
        );
        assert!(
            !text.contains("claracore_gpu_power_watts{gpu=\"1\"}"),
            "{text}"
        );
        assert!(
            text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1,
            "{text}"
        );
        // The next scrape shows what the next snapshot says, nothing stale.
        let later = Snapshot {
            gpus: vec![gpu(1, "Slow", Some(1.0), None)],
            ..snapshot
        };
        let text = m.render(0, &Recorder::disabled(), Some(&later));
        assert!(!text.contains("gpu=\"0\""), "{text}");
        assert!(
            text.contains("claracore_gpu_utilization_ratio{gpu=\"1\"} 1.0"),
            "{text}"
        );
        let text = m.render(0, &Recorder::disabled(), None);
        assert!(!text.contains("claracore_gpu"), "{text}");
    }
}
