//! The read queries: request rows and pages of them, audit rows, per-model
//! statistics, and the newest load times and GPU peaks of each model.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::events::{GpuUse, Outcome, RequestRecord, Usage};

/// One `audit` row as `/admin/audit` returns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub principal: String,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
}

/// Audit rows newest first, below `cursor` (an id) if given.
pub fn list_audit(
    conn: &Connection,
    limit: usize,
    cursor: Option<i64>,
) -> rusqlite::Result<Vec<AuditRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, principal, action, target, result FROM audit
         WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![cursor.unwrap_or(i64::MAX), limit as i64], |r| {
        Ok(AuditRow {
            id: r.get(0)?,
            at_ms: r.get(1)?,
            principal: r.get(2)?,
            action: r.get(3)?,
            target: r.get(4)?,
            result: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// A `requests` row as `/admin/history` answers it: the row id, then the
/// writer's own [`RequestRecord`] under the same keys beside it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestRow {
    pub id: i64,
    #[serde(flatten)]
    pub record: RequestRecord,
}

const ROW_COLUMNS: &str = "id, request_id, started_at_ms, finished_at_ms, client, key_name, endpoint, model, status,
    outcome, error, latency_ms, ttfb_ms, ttft_ms, prompt_tokens, completion_tokens, cached_tokens, prompt_ms,
    predicted_ms, prompt_per_second, predicted_per_second, streamed, request_content, response_content,
    content_truncated, queue_wait_ms, gpu, gpu_mem_before_bytes, gpu_mem_after_bytes, gpu_utilization";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRow> {
    let record = RequestRecord {
        request_id: r.get(1)?,
        started_at_ms: r.get(2)?,
        finished_at_ms: r.get(3)?,
        client: r.get(4)?,
        key_name: r.get(5)?,
        endpoint: r.get(6)?,
        model: r.get(7)?,
        status: r.get(8)?,
        outcome: outcome(r, 9)?,
        error: r.get(10)?,
        latency_ms: r.get(11)?,
        ttfb_ms: r.get(12)?,
        ttft_ms: r.get(13)?,
        usage: Usage {
            prompt_tokens: r.get(14)?,
            completion_tokens: r.get(15)?,
            cached_tokens: r.get(16)?,
            prompt_ms: r.get(17)?,
            predicted_ms: r.get(18)?,
            prompt_per_second: r.get(19)?,
            predicted_per_second: r.get(20)?,
        },
        streamed: r.get(21)?,
        request_content: r.get(22)?,
        response_content: r.get(23)?,
        content_truncated: r.get(24)?,
        queue_wait_ms: r.get(25)?,
        gpu: gpu(r, 26)?,
    };
    Ok(RequestRow {
        id: r.get(0)?,
        record,
    })
}

/// The four GPU columns from `i` on; the writer sets the figures only
/// with an index.
fn gpu(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<GpuUse>> {
    // Stored saturated into SQLite's i64; never negative.
    let bytes = |b: Option<i64>| b.map(|b| u64::try_from(b).unwrap_or(0));
    let Some(index) = r.get::<_, Option<u32>>(i)? else {
        return Ok(None);
    };
    Ok(Some(GpuUse {
        index,
        mem_before_bytes: bytes(r.get(i + 1)?),
        mem_after_bytes: bytes(r.get(i + 2)?),
        utilization: r.get(i + 3)?,
    }))
}

/// The `outcome` column as the typed [`Outcome`] the writer recorded.
fn outcome(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Outcome> {
    let text: String = r.get(i)?;
    Outcome::parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("{text:?} is not an outcome").into(),
        )
    })
}

/// Filters for [`list_requests`]; `cursor` is the last id of the previous
/// page (keyset pagination, newest first).
#[derive(Debug, Default)]
pub struct RequestQuery {
    pub model: Option<String>,
    pub outcome: Option<Outcome>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: usize,
    pub cursor: Option<i64>,
}

pub fn list_requests(conn: &Connection, q: &RequestQuery) -> rusqlite::Result<Vec<RequestRow>> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM requests
         WHERE (?1 IS NULL OR model = ?1) AND (?2 IS NULL OR outcome = ?2)
           AND (?3 IS NULL OR started_at_ms >= ?3) AND (?4 IS NULL OR started_at_ms < ?4)
           AND (?5 IS NULL OR id < ?5)
         ORDER BY id DESC LIMIT ?6"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![
            q.model,
            q.outcome.map(Outcome::as_str),
            q.since_ms,
            q.until_ms,
            q.cursor,
            q.limit as i64
        ],
        row,
    )?;
    rows.collect()
}

pub fn get_request(conn: &Connection, id: i64) -> rusqlite::Result<Option<RequestRow>> {
    conn.query_row(
        &format!("SELECT {ROW_COLUMNS} FROM requests WHERE id = ?1"),
        [id],
        row,
    )
    .optional()
}

/// Per-model figures over a window, for `/admin/stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelStats {
    pub model: String,
    pub requests: i64,
    pub errors: i64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub prompt_tokens_per_second: Option<f64>,
    pub generation_tokens_per_second: Option<f64>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub loads: i64,
    pub load_p50_ms: Option<f64>,
}

pub fn stats(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<ModelStats>> {
    let mut out = Vec::new();
    let mut models = conn.prepare(
        "SELECT model FROM requests WHERE started_at_ms >= ?1 AND model IS NOT NULL
         UNION SELECT model FROM model_events WHERE at_ms >= ?1 ORDER BY 1",
    )?;
    let names: Vec<String> = models
        .query_map([since_ms], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for model in names {
        // The prompt-rate numerator counts the tokens llama.cpp processed
        // (prompt minus cache), as llama.cpp itself reports them, over the
        // rows that carry timings.
        type Sums = (i64, i64, i64, i64, f64, f64, i64);
        let (requests, errors, prompt_tokens, completion_tokens, prompt_ms, predicted_ms, processed_prompt): Sums =
            conn.query_row(
                "SELECT count(*), coalesce(sum(outcome != 'ok'), 0), coalesce(sum(prompt_tokens), 0),
                        coalesce(sum(completion_tokens), 0), coalesce(sum(prompt_ms), 0), coalesce(sum(predicted_ms), 0),
                        coalesce(sum(CASE WHEN prompt_ms IS NOT NULL
                                          THEN prompt_tokens - coalesce(cached_tokens, 0) END), 0)
                 FROM requests WHERE model = ?1 AND started_at_ms >= ?2",
                params![model, since_ms],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )?;
        let latencies = column(conn, "SELECT latency_ms FROM requests WHERE model = ?1 AND started_at_ms >= ?2 AND outcome = 'ok' ORDER BY 1", &model, since_ms)?;
        let ttfts = column(conn, "SELECT ttft_ms FROM requests WHERE model = ?1 AND started_at_ms >= ?2 AND ttft_ms IS NOT NULL ORDER BY 1", &model, since_ms)?;
        let loads = column(conn, "SELECT load_ms FROM model_events WHERE model = ?1 AND at_ms >= ?2 AND event = 'ready' ORDER BY 1", &model, since_ms)?;
        let rate = |tokens: i64, ms: f64| (ms > 0.0).then(|| tokens as f64 / (ms / 1000.0));
        out.push(ModelStats {
            model,
            requests,
            errors,
            latency_p50_ms: percentile(&latencies, 0.50),
            latency_p95_ms: percentile(&latencies, 0.95),
            ttft_p50_ms: percentile(&ttfts, 0.50),
            ttft_p95_ms: percentile(&ttfts, 0.95),
            prompt_tokens_per_second: rate(processed_prompt, prompt_ms),
            generation_tokens_per_second: rate(completion_tokens, predicted_ms),
            prompt_tokens,
            completion_tokens,
            loads: loads.len() as i64,
            load_p50_ms: percentile(&loads, 0.50),
        });
    }
    Ok(out)
}

/// Each model's last `per_model` successful load times in milliseconds,
/// oldest first, from its `ready` events.
pub fn recent_load_times(
    conn: &Connection,
    per_model: usize,
) -> rusqlite::Result<Vec<(String, Vec<f64>)>> {
    newest_per_model(conn, "load_ms", "event = 'ready'", per_model)
}

/// The peak GPU memory of each model's last `per_model` runs (from its
/// stop and crash events), oldest first.
pub fn recent_vram_peaks(
    conn: &Connection,
    per_model: usize,
) -> rusqlite::Result<Vec<(String, Vec<u64>)>> {
    let rows = newest_per_model::<i64>(conn, "vram_bytes", "vram_bytes > 0", per_model)?;
    Ok(rows
        .into_iter()
        .map(|(model, peaks)| {
            let peaks = peaks.into_iter().map(|b| u64::try_from(b).unwrap_or(0));
            (model, peaks.collect())
        })
        .collect())
}

/// The `column` of each model's newest `per_model` `model_events` rows
/// where it is set and `filter` holds, grouped by model (in name order),
/// oldest first. `column` and `filter` are this module's own SQL, never a
/// caller's input.
fn newest_per_model<T: rusqlite::types::FromSql>(
    conn: &Connection,
    column: &str,
    filter: &str,
    per_model: usize,
) -> rusqlite::Result<Vec<(String, Vec<T>)>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT model, {column} FROM (
             SELECT model, {column}, at_ms, id,
                    row_number() OVER (PARTITION BY model ORDER BY at_ms DESC, id DESC) AS newest
             FROM model_events WHERE {column} IS NOT NULL AND {filter})
         WHERE newest <= ?1 ORDER BY model, at_ms, id"
    ))?;
    let limit = i64::try_from(per_model).unwrap_or(i64::MAX);
    let rows = stmt.query_map([limit], |r| Ok((r.get::<_, String>(0)?, r.get::<_, T>(1)?)))?;
    let mut out: Vec<(String, Vec<T>)> = Vec::new();
    for row in rows {
        let (model, value) = row?;
        match out.last_mut() {
            Some((m, values)) if *m == model => values.push(value),
            _ => out.push((model, vec![value])),
        }
    }
    Ok(out)
}

fn column(conn: &Connection, sql: &str, model: &str, since_ms: i64) -> rusqlite::Result<Vec<f64>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let values = stmt.query_map(params![model, since_ms], |r| r.get::<_, f64>(0))?;
    values.collect()
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::store::{open_for_writing, write_batch};
    use crate::history::{ModelEvent, ModelEventKind};
    use std::sync::Arc;

    fn record(request_id: &str, gpu: Option<GpuUse>) -> RequestRecord {
        RequestRecord {
            request_id: request_id.into(),
            started_at_ms: 1000,
            finished_at_ms: 1250,
            client: "127.0.0.1:5000".into(),
            key_name: Some("ci".into()),
            endpoint: "/v1/chat/completions".into(),
            model: Some("tiny".into()),
            status: 200,
            outcome: Outcome::Ok,
            error: None,
            latency_ms: 250.5,
            ttfb_ms: Some(10.0),
            ttft_ms: Some(12.5),
            usage: Usage {
                prompt_tokens: Some(29),
                completion_tokens: Some(2),
                cached_tokens: None,
                prompt_ms: Some(3.5),
                predicted_ms: Some(4.0),
                prompt_per_second: Some(8285.7),
                predicted_per_second: Some(500.0),
            },
            streamed: true,
            request_content: Some("hello".into()),
            response_content: None,
            content_truncated: false,
            queue_wait_ms: Some(0.25),
            gpu,
        }
    }

    #[test]
    fn a_stored_row_answers_under_its_column_names_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let gpu = GpuUse {
            index: 1,
            mem_before_bytes: Some(5 << 30),
            mem_after_bytes: None,
            utilization: Some(0.5),
        };
        let rows = [record("r1", Some(gpu)), record("r2", None)].map(Arc::new);
        write_batch(&mut conn, &rows, &[], &[], &[]).unwrap();
        let first = serde_json::to_value(get_request(&conn, 1).unwrap().unwrap()).unwrap();
        assert_eq!(
            first,
            serde_json::json!({
                "id": 1, "request_id": "r1", "started_at_ms": 1000, "finished_at_ms": 1250,
                "client": "127.0.0.1:5000", "key_name": "ci", "endpoint": "/v1/chat/completions",
                "model": "tiny", "status": 200, "outcome": "ok", "error": null, "latency_ms": 250.5,
                "ttfb_ms": 10.0, "ttft_ms": 12.5, "prompt_tokens": 29, "completion_tokens": 2,
                "cached_tokens": null, "prompt_ms": 3.5, "predicted_ms": 4.0,
                "prompt_per_second": 8285.7, "predicted_per_second": 500.0, "streamed": true,
                "request_content": "hello", "response_content": null, "content_truncated": false,
                "queue_wait_ms": 0.25, "gpu": 1, "gpu_mem_before_bytes": 5u64 << 30,
                "gpu_mem_after_bytes": null, "gpu_utilization": 0.5
            })
        );
        let second = serde_json::to_value(get_request(&conn, 2).unwrap().unwrap()).unwrap();
        for key in [
            "gpu",
            "gpu_mem_before_bytes",
            "gpu_mem_after_bytes",
            "gpu_utilization",
        ] {
            assert!(second[key].is_null(), "{key} in {second}");
        }
        assert_eq!(second.as_object().unwrap().len(), 30, "{second}");
        // The CLI reads the same type back.
        for v in [first, second] {
            let back: RequestRow = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(serde_json::to_value(back).unwrap(), v);
        }
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.95), Some(95.0));
        assert_eq!(percentile(&[7.0], 0.95), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn recent_load_times_are_the_last_ready_events_per_model_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let event = |model: &str, kind, at_ms, load_ms| {
            let mut e = ModelEvent::new(model, kind, at_ms);
            e.load_ms = load_ms;
            Arc::new(e)
        };
        let mut events = Vec::new();
        for i in 0..8 {
            events.push(event(
                "a",
                ModelEventKind::Ready,
                1000 + i,
                Some(i as f64 * 10.0),
            ));
        }
        events.push(event("a", ModelEventKind::StartFailed, 5000, None));
        events.push(event("b", ModelEventKind::Ready, 10, Some(7.5)));
        events.push(event("b", ModelEventKind::Stopped, 20, None));
        events.push(event("c", ModelEventKind::StartRequested, 20, None));
        write_batch(&mut conn, &[], &events, &[], &[]).unwrap();
        let loads = recent_load_times(&conn, 3).unwrap();
        assert_eq!(
            loads,
            [
                ("a".to_string(), vec![50.0, 60.0, 70.0]),
                ("b".to_string(), vec![7.5])
            ]
        );
    }

    #[test]
    fn recent_vram_peaks_are_the_last_runs_per_model_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let event = |model: &str, kind, at_ms, vram: Option<u64>| {
            let mut e = ModelEvent::new(model, kind, at_ms);
            e.vram_bytes = vram;
            e.gpu = vram.map(|_| 1);
            Arc::new(e)
        };
        let mut events = Vec::new();
        for i in 0..4u64 {
            events.push(event(
                "a",
                ModelEventKind::Stopped,
                1000 + i as i64,
                Some(i << 30),
            ));
        }
        events.push(event("a", ModelEventKind::Crashed, 2000, Some(9 << 30)));
        events.push(event("a", ModelEventKind::Ready, 3000, None));
        events.push(event("b", ModelEventKind::Stopped, 10, None));
        write_batch(&mut conn, &[], &events, &[], &[]).unwrap();
        assert_eq!(
            recent_vram_peaks(&conn, 3).unwrap(),
            [("a".to_string(), vec![2 << 30, 3 << 30, 9 << 30])],
            "the newest three with a figure (a run of 0 bytes says nothing)"
        );
        let gpu: i64 = conn
            .query_row("SELECT gpu FROM model_events WHERE at_ms = 2000", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(gpu, 1);
    }
}
