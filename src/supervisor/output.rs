//! A child's output: each line copied into tracing (at the level llama.cpp
//! marks it with, under the model's name) and into the model's ring, the
//! last stderr lines kept for failure reports ([`Tail`]), and the lines
//! that say how its load is going sniffed on the way: the load fractions a
//! router's child prints (`Progress` events) and "model loaded" (probe
//! readiness at once).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::logs::{self, LogStream, ModelLogs};
use super::{oom, ChildEvent, ChildSpec};

/// How many stderr lines are kept for failure reports.
const TAIL_LINES: usize = 12;

/// The last lines a child wrote to stderr.
#[derive(Clone, Default)]
pub(super) struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            if lines.len() == TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    pub(super) fn text(&self) -> String {
        self.0
            .lock()
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    pub(super) fn mentions_port_in_use(&self) -> bool {
        let text = self.text().to_ascii_lowercase();
        text.contains("address already in use") || text.contains("couldn't bind")
    }

    /// Whether the output reports a failed (GPU) memory allocation.
    pub(super) fn mentions_out_of_memory(&self) -> bool {
        oom::mentions_out_of_memory(&self.text())
    }
}

/// The readers of a child's output and what they report back.
pub(super) struct Captured {
    /// The last stderr lines.
    pub tail: Tail,
    /// Signalled when the child's output says it has finished loading.
    pub loaded_hint: Arc<Notify>,
    /// The tasks copying stdout and stderr.
    pub readers: Vec<JoinHandle<()>>,
}

/// Starts copying the child's stdout and stderr (taken from `child`) line
/// by line, as [`copy_lines`] does.
pub(super) fn capture(
    child: &mut Child,
    spec: &ChildSpec,
    pid: u32,
    logs: &ModelLogs,
    events: &mpsc::UnboundedSender<ChildEvent>,
) -> Captured {
    let tail = Tail::default();
    let loaded_hint = Arc::new(Notify::new());
    let ring = logs.ring(&spec.model);
    let output = |stream, tail| Output {
        model: spec.model.clone(),
        instance: spec.instance,
        pid,
        tail,
        loaded_hint: loaded_hint.clone(),
        ring: ring.clone(),
        stream,
        events: events.clone(),
    };
    let mut readers = Vec::with_capacity(2);
    if let Some(out) = child.stdout.take() {
        let output = output(LogStream::Stdout, None);
        readers.push(tokio::spawn(copy_lines(out, output)));
    }
    if let Some(err) = child.stderr.take() {
        let output = output(LogStream::Stderr, Some(tail.clone()));
        readers.push(tokio::spawn(copy_lines(err, output)));
    }
    Captured {
        tail,
        loaded_hint,
        readers,
    }
}

/// Where a child's output stream goes.
struct Output {
    model: Arc<str>,
    instance: u64,
    pid: u32,
    /// Kept for failure reports (stderr only).
    tail: Option<Tail>,
    loaded_hint: Arc<Notify>,
    /// The model's ring, shared with its other children.
    ring: Arc<logs::Ring>,
    stream: LogStream,
    /// Where load progress goes.
    events: mpsc::UnboundedSender<ChildEvent>,
}

/// llama-server's log line once its model is loaded; `/health` turns 200
/// right after it.
const LOADED_MARKER: &str = "model loaded";

/// What llama-server prints, as a router's child, for each state change
/// (followed by one line of JSON); loading carries its fraction.
const ROUTER_STATE_MARKER: &str = "cmd_child_to_router:state:";

/// The load fraction of a llama-server state line such as
/// `cmd_child_to_router:state:{"state":"loading","payload":{"value":0.42}}`
/// (the fraction in `payload.value`, or `value` beside it in some
/// versions), clamped to 0.0..=1.0. Anything else: none.
pub fn parse_load_progress(line: &str) -> Option<f64> {
    let (_, json) = line.split_once(ROUTER_STATE_MARKER)?;
    let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
    if v.get("state")?.as_str()? != "loading" {
        return None;
    }
    let value = v
        .get("payload")
        .and_then(|p| p.get("value"))
        .or_else(|| v.get("value"))?
        .as_f64()?;
    value.is_finite().then(|| value.clamp(0.0, 1.0))
}

/// Copies a child's output into tracing and its model's ring line by line.
async fn copy_lines(stream: impl AsyncRead + Unpin, out: Output) {
    let Output {
        model,
        instance,
        pid,
        tail,
        loaded_hint,
        ring,
        stream: which,
        events,
    } = out;
    let mut lines = BufReader::new(stream).lines();
    // Non-UTF-8 output ends line mode; the pipe then closes and the child
    // gets EPIPE rather than blocking.
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        match child_level(line) {
            tracing::Level::ERROR => {
                tracing::error!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
            tracing::Level::WARN => {
                tracing::warn!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
            _ => {
                tracing::info!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
        }
        ring.push(crate::events::now_ms(), which, line);
        if line.contains(LOADED_MARKER) {
            loaded_hint.notify_one();
        }
        if let Some(fraction) = parse_load_progress(line) {
            let _ = events.send(ChildEvent::Progress {
                model: model.clone(),
                instance,
                fraction,
            });
        }
        if let Some(tail) = &tail {
            tail.push(line.to_string());
        }
    }
}

/// The level of a child's output line: llama.cpp writes `<time> <L> text`
/// with L one of D, I, W, E; anything else is info.
fn child_level(line: &str) -> tracing::Level {
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or("");
    let marker = if first.len() == 1 {
        Some(first)
    } else {
        words.next()
    };
    match marker {
        Some("E") => tracing::Level::ERROR,
        Some("W") => tracing::Level::WARN,
        Some("D") => tracing::Level::DEBUG,
        _ => tracing::Level::INFO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_server_load_progress_lines_are_parsed() {
        // As llama-server prints them when run by a router (captured from
        // llama.cpp's server-context load_progress_callback); the child's
        // pid prefix is how a router's own log shows them.
        let lines = [
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"stages":["text_model"],"current":"text_model","value":0.0}}"#, Some(0.0)),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"stages":["text_model","mmproj_model"],"current":"text_model","value":0.4375}}"#, Some(0.4375)),
            (r#"[39281] cmd_child_to_router:state:{"state":"loading","payload":{"current":"text_model","value":1.4}}"#, Some(1.0)),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"id":"m"},"value":0.25}"#, Some(0.25)),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"value":-0.2}}"#, Some(0.0)),
            (r#"cmd_child_to_router:state:{"state":"ready","payload":{"n_ctx":8192}}"#, None),
            (r#"cmd_child_to_router:state:{"state":"loading""#, None),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"value":"half"}}"#, None),
            ("0.00.102.822 I srv  llama_server: model loaded", None),
            ("0.00.047.132 I load_tensors: loading model tensors, this can take a while... (load_mode = none)", None),
            ("..................................................", None),
        ];
        for (line, want) in lines {
            assert_eq!(parse_load_progress(line), want, "{line}");
        }
    }

    #[test]
    fn llama_cpp_level_markers_map_to_levels() {
        assert_eq!(
            child_level("0.00.151.863 I slot print_timing: id 3"),
            tracing::Level::INFO
        );
        assert_eq!(
            child_level("0.00.167.645 W slot operator(): need to evaluate"),
            tracing::Level::WARN
        );
        assert_eq!(
            child_level("0.01.000.000 E main: failed to load model"),
            tracing::Level::ERROR
        );
        assert_eq!(
            child_level("0.01.000.000 D debug line"),
            tracing::Level::DEBUG
        );
        assert_eq!(child_level("main: plain line"), tracing::Level::INFO);
        assert_eq!(
            child_level("fake-upstream: listening"),
            tracing::Level::INFO
        );
    }
}
