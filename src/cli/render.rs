//! Tables for the client commands' answers: each reads the daemon's JSON
//! into the daemon's own answer types (or says it could not), then lays
//! it out.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::api::{AuditAnswer, HistoryAnswer, LoadAnswer, PsAnswer, StatsAnswer, StopAnswer};
use crate::scheduler::ModelStatus;
use crate::wire::openai::ModelList;

/// The daemon's answer to `what` as `T`.
fn read<'a, T: Deserialize<'a>>(value: &'a Value, what: &str) -> Result<T, String> {
    T::deserialize(value)
        .map_err(|e| format!("the daemon's answer to {what} is not as expected: {e}"))
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(
        || "-".into(),
        |s| humantime::format_duration(Duration::from_secs(s as u64)).to_string(),
    )
}

fn opt(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A child's port, or `unix` for one on a unix socket (the path is in
/// `/admin/ps`'s `socket`).
fn port_or_unix(m: &ModelStatus) -> String {
    if m.socket.is_some() {
        "unix".into()
    } else {
        opt(m.port)
    }
}

/// Milliseconds as seconds with one decimal: `1.2s`.
fn tenths(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// The LOAD column: while starting, `42% 1.2s/2.9s` (the fraction and the
/// expected time when known, else the time so far); otherwise the last
/// load time; `-` when none is known.
fn load_column(m: &ModelStatus) -> String {
    if let Some(p) = &m.progress {
        let time = match p.expected_ms {
            Some(expected) => format!("{}/{}", tenths(p.elapsed_ms), tenths(expected)),
            None => tenths(p.elapsed_ms),
        };
        return match p.fraction {
            Some(f) => format!("{:.0}% {time}", (f * 100.0).clamp(0.0, 100.0).floor()),
            None => time,
        };
    }
    m.load_ms.map_or_else(|| "-".into(), tenths)
}

/// `5000M` or `-`.
fn mebibytes(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |b| format!("{:.0}M", b as f64 / 1048576.0))
}

/// The GPU memory column: `5000M@1` (on GPU 1), or `-`.
fn vram_column(m: &ModelStatus) -> String {
    match (m.vram_bytes, m.gpu) {
        (Some(_), Some(gpu)) => format!("{}@{gpu}", mebibytes(m.vram_bytes)),
        (Some(_), None) => mebibytes(m.vram_bytes),
        _ => "-".into(),
    }
}

/// Renders `/admin/ps`: models that hold a process or have requests
/// waiting for them.
pub fn format_ps(value: &Value) -> Result<String, String> {
    let answer: PsAnswer = read(value, "/admin/ps")?;
    let mut out = format!(
        "{:<24} {:<10} {:>8} {:>6} {:>8} {:>10} {:>8} {:>8} {:>10} {:>10} {:>15}\n",
        "NAME",
        "STATE",
        "PID",
        "PORT",
        "MEM",
        "VRAM",
        "INFLIGHT",
        "WAITING",
        "IDLE",
        "UPTIME",
        "LOAD"
    );
    for m in answer
        .models
        .iter()
        .filter(|m| m.pid.is_some() || m.waiting > 0)
    {
        out.push_str(&format!(
            "{:<24} {:<10} {:>8} {:>6} {:>8} {:>10} {:>8} {:>8} {:>10} {:>10} {:>15}\n",
            m.name,
            m.state.as_str(),
            opt(m.pid),
            port_or_unix(m),
            mebibytes(m.rss_bytes),
            vram_column(m),
            m.inflight,
            m.waiting,
            secs(m.idle_s),
            secs(m.uptime_s),
            load_column(m),
        ));
    }
    Ok(out)
}

/// Renders `/v1/models`.
pub fn format_list(value: &Value) -> Result<String, String> {
    let list: ModelList = read(value, "/v1/models")?;
    let mut out = format!(
        "{:<24} {:<10} {:<8} {}\n",
        "NAME", "STATE", "SOURCE", "ALIASES"
    );
    for m in &list.data {
        out.push_str(&format!(
            "{:<24} {:<10} {:<8} {}\n",
            m.id,
            m.state,
            m.source.kind,
            m.aliases.join(", ")
        ));
    }
    Ok(out)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |m| format!("{m:.0}ms"))
}

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |r| format!("{r:.0}"))
}

/// Renders `/admin/history` as a table, newest first.
pub fn format_history(value: &Value) -> Result<String, String> {
    let answer: HistoryAnswer = read(value, "/admin/history")?;
    let mut out = format!(
        "{:>7} {:<19} {:<16} {:<22} {:>6} {:<14} {:>9} {:>8} {:>11}\n",
        "ID",
        "STARTED (UTC)",
        "MODEL",
        "ENDPOINT",
        "STATUS",
        "OUTCOME",
        "LATENCY",
        "TTFT",
        "TOKENS IN/OUT"
    );
    for row in &answer.requests {
        let r = &row.record;
        out.push_str(&format!(
            "{:>7} {:<19} {:<16} {:<22} {:>6} {:<14} {:>9} {:>8} {:>11}\n",
            row.id.to_string(),
            utc(r.started_at_ms),
            r.model.as_deref().unwrap_or("-"),
            r.endpoint,
            r.status.to_string(),
            r.outcome.as_str(),
            ms(Some(r.latency_ms)),
            ms(r.ttft_ms),
            format!(
                "{}/{}",
                opt(r.usage.prompt_tokens),
                opt(r.usage.completion_tokens)
            ),
        ));
        if let Some(e) = &r.error {
            out.push_str(&format!("{:>7} error: {e}\n", ""));
        }
    }
    Ok(out)
}

/// Renders `/admin/stats`.
pub fn format_stats(value: &Value) -> Result<String, String> {
    let answer: StatsAnswer = read(value, "/admin/stats")?;
    let mut out = format!(
        "{:<16} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>9}\n",
        "MODEL",
        "REQUESTS",
        "ERRORS",
        "LAT P50",
        "LAT P95",
        "TTFT P50",
        "TTFT P95",
        "PROMPT t/s",
        "GEN t/s",
        "LOADS",
        "LOAD P50"
    );
    for m in &answer.models {
        out.push_str(&format!(
            "{:<16} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>9}\n",
            m.model,
            m.requests.to_string(),
            m.errors.to_string(),
            ms(m.latency_p50_ms),
            ms(m.latency_p95_ms),
            ms(m.ttft_p50_ms),
            ms(m.ttft_p95_ms),
            rate(m.prompt_tokens_per_second),
            rate(m.generation_tokens_per_second),
            m.loads.to_string(),
            ms(m.load_p50_ms),
        ));
    }
    if answer.history_rows_dropped > 0 {
        out.push_str(&format!(
            "({} history rows were dropped)\n",
            answer.history_rows_dropped
        ));
    }
    Ok(out)
}

/// Renders the answer of `POST /admin/models/{name}/stop`.
pub fn format_stop(value: &Value) -> Result<String, String> {
    let answer: StopAnswer = read(value, "stop")?;
    Ok(format!(
        "{}: {}\n",
        answer.model,
        if answer.stopping {
            "stopping"
        } else {
            "not running"
        }
    ))
}

/// Renders the answer of `POST /admin/models/{name}/load`: `tiny ready in
/// 412 ms`.
pub fn format_load(value: &Value) -> Result<String, String> {
    let answer: LoadAnswer = read(value, "load")?;
    Ok(format!(
        "{} {} in {} ms\n",
        answer.model,
        answer.state.as_str(),
        answer.load_ms
    ))
}

/// `table`, or with `--json` the answer itself, pretty-printed.
/// Unix milliseconds as "2026-12-01 20:16:26" (UTC).
fn utc(ms: i64) -> String {
    u64::try_from(ms)
        .map(|t| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(t))
                .to_string()
        })
        .map(|t| t.trim_end_matches('Z').replace('T', " "))
        .unwrap_or_default()
}

/// `claracore audit`: admin actions and rejected keys, newest first.
pub fn format_audit(value: &Value) -> Result<String, String> {
    let answer: AuditAnswer = read(value, "/admin/audit")?;
    let mut out = format!(
        "{:>6} {:<19} {:<22} {:<13} {:<30} {}\n",
        "ID", "AT (UTC)", "PRINCIPAL", "ACTION", "TARGET", "RESULT"
    );
    for a in &answer.audit {
        out.push_str(&format!(
            "{:>6} {:<19} {:<22} {:<13} {:<30} {}\n",
            a.id.to_string(),
            utc(a.at_ms),
            a.principal,
            a.action,
            a.target.as_deref().unwrap_or("-"),
            a.result,
        ));
    }
    Ok(out)
}

/// A table renderer.
pub type Table = fn(&Value) -> Result<String, String>;

pub fn json_or(json: bool, table: Table) -> impl Fn(&Value) -> Result<String, String> {
    move |v| {
        if json {
            Ok(format!("{v:#}\n"))
        } else {
            table(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_reads_the_servers_rows_with_their_usage_and_errors() {
        let row = |id: i64, outcome: &str, error: Value| {
            serde_json::json!({
                "id": id, "request_id": format!("r{id}"), "started_at_ms": 0, "finished_at_ms": 5,
                "client": "127.0.0.1:1", "key_name": null, "endpoint": "/v1/completions",
                "model": "tiny", "status": 502, "outcome": outcome, "error": error,
                "latency_ms": 5.0, "ttfb_ms": null, "ttft_ms": 3.0, "prompt_tokens": 7,
                "completion_tokens": null, "cached_tokens": null, "prompt_ms": null,
                "predicted_ms": null, "prompt_per_second": null, "predicted_per_second": null,
                "streamed": false, "request_content": null, "response_content": null,
                "content_truncated": false, "queue_wait_ms": null, "gpu": null,
                "gpu_mem_before_bytes": null, "gpu_mem_after_bytes": null, "gpu_utilization": null
            })
        };
        let v = serde_json::json!({
            "requests": [row(2, "upstream_error", "refused".into()), row(1, "ok", Value::Null)],
            "next_cursor": null
        });
        let t = format_history(&v).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].trim_start().starts_with("2 "), "{t}");
        assert!(lines[1].contains(" upstream_error "), "{t}");
        assert!(lines[1].ends_with(" 7/-"), "{t}");
        assert!(lines[2].ends_with("error: refused"), "{t}");
        assert!(lines[3].contains(" ok "), "{t}");
    }

    #[test]
    fn load_answer_reads_as_a_sentence() {
        let v = serde_json::json!({"model": "tiny", "state": "ready", "load_ms": 412});
        assert_eq!(format_load(&v).unwrap(), "tiny ready in 412 ms\n");
    }

    #[test]
    fn ps_load_column_shows_progress_while_starting_and_the_last_load_after() {
        let v = serde_json::json!({"models": [
            {"name": "a", "state": "starting", "pid": 12, "inflight": 0,
             "progress": {"elapsed_ms": 1234, "expected_ms": 2900, "fraction": 0.4255}, "load_ms": 2900},
            {"name": "b", "state": "starting", "pid": 13, "inflight": 0,
             "progress": {"elapsed_ms": 800}},
            {"name": "c", "state": "ready", "pid": 14, "inflight": 0, "load_ms": 412},
            {"name": "d", "state": "ready", "pid": 15, "inflight": 0}
        ]});
        let t = format_ps(&v).unwrap();
        let line = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in {t}"))
                .to_string()
        };
        assert!(t.lines().next().unwrap().ends_with(" LOAD"), "{t}");
        assert!(line("a").ends_with(" 42% 1.2s/2.9s"), "{t}");
        assert!(line("b").ends_with(" 0.8s"), "{t}");
        assert!(line("c").ends_with(" 0.4s"), "{t}");
        assert!(line("d").ends_with(" -"), "{t}");
    }

    #[test]
    fn ps_table_lists_only_models_with_a_process() {
        let v = serde_json::json!({"models": [
            {"name": "a", "state": "ready", "pid": 12, "port": 3456, "socket": null, "inflight": 1, "idle_s": null, "uptime_s": 75.0, "rss_bytes": 41943040},
            {"name": "b", "state": "stopped", "pid": null, "port": null, "socket": null, "inflight": 0, "idle_s": null, "uptime_s": null},
            {"name": "c", "state": "ready", "pid": 13, "port": null, "socket": "/run/claracore/claracore.x/c-2.sock", "inflight": 0, "idle_s": 3.0, "uptime_s": 5.0}
        ]});
        let t = format_ps(&v).unwrap();
        assert!(
            t.contains("a ") && t.contains("3456") && t.contains("1m 15s") && t.contains(" 40M "),
            "{t}"
        );
        assert!(!t.contains("\nb "), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("c ") && l.contains(" unix ")),
            "{t}"
        );
    }

    #[test]
    fn ps_shows_gpu_memory_by_gpu_and_models_with_requests_waiting() {
        let v = serde_json::json!({"models": [
            {"name": "g", "state": "ready", "pid": 12, "inflight": 2, "waiting": 0, "gpu": 1, "vram_bytes": 5242880000u64},
            {"name": "q", "state": "stopped", "pid": null, "inflight": 0, "waiting": 3},
            {"name": "idle", "state": "stopped", "pid": null, "inflight": 0, "waiting": 0}
        ]});
        let t = format_ps(&v).unwrap();
        let g = t.lines().find(|l| l.starts_with("g ")).unwrap_or_default();
        assert!(g.contains(" 5000M@1 "), "{t}");
        let q = t.lines().find(|l| l.starts_with("q ")).unwrap_or_default();
        let cols: Vec<&str> = q.split_whitespace().collect();
        assert_eq!(cols.get(7), Some(&"3"), "the WAITING column: {t}");
        assert!(!t.contains("\nidle "), "{t}");
    }
}
