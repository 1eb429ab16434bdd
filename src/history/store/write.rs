//! The writer's side: one batch of rows per transaction, audit rows,
//! retention in small deletes, and routine maintenance.

use std::sync::Arc;

use rusqlite::{params, Connection};

use crate::history::{AuditRecord, ModelEvent, RequestRecord, Sample};

/// Writes one batch in one transaction.
pub fn write_batch(
    conn: &mut Connection,
    requests: &[Arc<RequestRecord>],
    events: &[Arc<ModelEvent>],
    samples: &[Sample],
    audits: &[Arc<AuditRecord>],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO requests (request_id, started_at_ms, finished_at_ms, client, key_name, endpoint, model,
                status, outcome, error, latency_ms, ttfb_ms, ttft_ms, prompt_tokens, completion_tokens,
                cached_tokens, prompt_ms, predicted_ms, prompt_per_second, predicted_per_second, streamed,
                request_content, response_content, content_truncated, queue_wait_ms, gpu,
                gpu_mem_before_bytes, gpu_mem_after_bytes, gpu_utilization)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
                ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29)",
        )?;
        for r in requests {
            let gpu = r.gpu.as_ref();
            stmt.execute(params![
                r.request_id,
                r.started_at_ms,
                r.finished_at_ms,
                r.client,
                r.key_name,
                r.endpoint,
                r.model,
                r.status,
                r.outcome.as_str(),
                r.error,
                r.latency_ms,
                r.ttfb_ms,
                r.ttft_ms,
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.cached_tokens,
                r.usage.prompt_ms,
                r.usage.predicted_ms,
                r.usage.prompt_per_second,
                r.usage.predicted_per_second,
                r.streamed,
                r.request_content,
                r.response_content,
                r.content_truncated,
                r.queue_wait_ms,
                gpu.map(|g| g.index),
                gpu.and_then(|g| g.mem_before_bytes).map(sql_int),
                gpu.and_then(|g| g.mem_after_bytes).map(sql_int),
                gpu.and_then(|g| g.utilization),
            ])?;
        }
        let mut stmt = tx.prepare_cached(
            "INSERT INTO model_events (at_ms, model, event, reason, load_ms, exit_status, pid, rss_bytes,
                gpu, vram_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for e in events {
            stmt.execute(params![
                e.at_ms,
                e.model,
                e.event.as_str(),
                e.reason.as_ref().map(|r| r.text()),
                e.load_ms,
                e.exit_status,
                e.pid,
                e.rss_bytes,
                e.gpu,
                e.vram_bytes.map(sql_int),
            ])?;
        }
        let mut stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO samples (at_ms, model, rss_bytes, cpu_seconds, inflight, vram_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for s in samples {
            stmt.execute(params![
                s.at_ms,
                s.model,
                s.rss_bytes,
                s.cpu_seconds,
                s.inflight,
                s.vram_bytes.map(sql_int),
            ])?;
        }
    }
    for a in audits {
        insert_audit(&tx, a)?;
    }
    tx.commit()
}

/// Writes one audit row (the writer's batches, and `claracore restore`,
/// which records itself in the database it puts in place).
pub fn insert_audit(conn: &Connection, a: &AuditRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, principal, action, target, result) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        a.at_ms,
        a.principal,
        a.action.as_str(),
        a.target,
        a.result
    ])?;
    Ok(())
}

/// Deletes rows older than the cut-offs in small batches, so the writer
/// never holds the database for long. Returns the rows deleted.
pub fn apply_retention(
    conn: &Connection,
    requests_before: i64,
    events_before: i64,
    samples_before: i64,
) -> rusqlite::Result<usize> {
    const BATCH: usize = 2000;
    let mut total = 0;
    for (sql, before) in [
        ("DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE started_at_ms < ?1 LIMIT ?2)", requests_before),
        ("DELETE FROM model_events WHERE id IN (SELECT id FROM model_events WHERE at_ms < ?1 LIMIT ?2)", events_before),
        ("DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_ms < ?1 LIMIT ?2)", events_before),
        ("DELETE FROM samples WHERE (at_ms, model) IN (SELECT at_ms, model FROM samples WHERE at_ms < ?1 LIMIT ?2)", samples_before),
    ] {
        loop {
            let n = conn.execute(sql, params![before, BATCH])?;
            total += n;
            if n < BATCH {
                break;
            }
        }
    }
    Ok(total)
}

/// `PRAGMA optimize` plus reclaiming free pages a little at a time.
pub fn maintain(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA optimize; PRAGMA incremental_vacuum(2000);")
}

/// A byte count as SQLite's INTEGER (i64), saturating.
fn sql_int(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::store::open_for_writing;
    use crate::history::ModelEventKind;

    #[test]
    fn retention_deletes_only_old_rows_from_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let sample = |at_ms| Sample {
            at_ms,
            model: String::new(),
            rss_bytes: Some(1),
            cpu_seconds: None,
            inflight: None,
            vram_bytes: None,
        };
        let event = |at_ms| Arc::new(ModelEvent::new("m", ModelEventKind::Ready, at_ms));
        write_batch(
            &mut conn,
            &[],
            &[event(10), event(5000)],
            &[sample(10), sample(5000)],
            &[],
        )
        .unwrap();
        assert_eq!(apply_retention(&conn, 100, 100, 100).unwrap(), 2);
        let left: i64 = conn
            .query_row(
                "SELECT (SELECT count(*) FROM model_events) + (SELECT count(*) FROM samples)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 2);
    }
}
