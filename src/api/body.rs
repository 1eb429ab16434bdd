//! Reading a request body into memory, which the inference routes must do
//! to learn the model: bounded per request (`http.max_body_bytes`, 413),
//! bounded for the whole daemon (`http.body_memory_bytes`, a byte budget
//! every body in memory draws on; 503 with Retry-After when it stays
//! exhausted), and bounded in time (`http.body_read_timeout`, 408).
//!
//! Budget is taken before the bytes are: up front for a declared
//! `Content-Length`, frame by frame for a chunked body. The permit travels
//! with the bytes into the request sent upstream and is returned when that
//! body is dropped, i.e. once the child has it. A body that arrives in one
//! frame is kept as it came; a longer one fills one buffer. The body is
//! never collected twice.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::ApiError;
use crate::config::HttpConfig;

/// How long a body waits for budget before it is refused.
const BUDGET_WAIT: Duration = Duration::from_secs(2);
/// Budget is taken in steps of at least this much for chunked bodies, so a
/// body of many small frames does not ask once per frame.
const BUDGET_STEP: usize = 64 * 1024;

/// The daemon-wide budget of request-body bytes held in memory.
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    pub fn new(bytes: usize) -> BodyBudget {
        BodyBudget(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// Bytes not held by any body now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// `n` bytes of budget, waiting until `deadline` at most (no timer is
    /// armed when the budget has room: the common case).
    async fn take(&self, n: usize, deadline: Instant) -> Result<OwnedSemaphorePermit, ApiError> {
        let n = u32::try_from(n).map_err(|_| ApiError::Busy)?;
        if let Ok(permit) = self.0.clone().try_acquire_many_owned(n) {
            return Ok(permit);
        }
        let wait = tokio::time::timeout_at(deadline, self.0.clone().acquire_many_owned(n));
        match wait.await {
            Ok(Ok(permit)) => Ok(permit),
            // Closed never happens (the semaphore is never closed); both
            // mean "no room now".
            Ok(Err(_)) | Err(_) => Err(ApiError::Busy),
        }
    }
}

/// A body read whole, with the budget it holds.
pub struct Held {
    pub bytes: Bytes,
    pub permit: OwnedSemaphorePermit,
}

/// Reads `body` (declared length `declared`, if any) under the limits of
/// `http` and the `budget`.
pub async fn read(
    body: Incoming,
    declared: Option<u64>,
    http: &HttpConfig,
    budget: &BodyBudget,
) -> Result<Held, ApiError> {
    let limit = http.max_body_bytes;
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let started = Instant::now();
    let read_deadline = started + http.body_read_timeout;
    let budget_deadline = (started + BUDGET_WAIT).min(read_deadline);
    let reading = fill(body, declared, limit, budget, budget_deadline);
    match tokio::time::timeout_at(read_deadline, reading).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::BodyTimeout {
            after: http.body_read_timeout,
        }),
    }
}

async fn fill(
    mut body: Incoming,
    declared: Option<u64>,
    limit: usize,
    budget: &BodyBudget,
    budget_deadline: Instant,
) -> Result<Held, ApiError> {
    let declared = declared.and_then(|n| usize::try_from(n).ok());
    let mut permit = budget.take(declared.unwrap_or(0), budget_deadline).await?;
    // A body in one frame (most are) is kept as it came; only a second
    // frame starts a buffer.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::ClientGone)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let held_len = first.as_ref().map_or(buf.len(), Bytes::len);
        let len = held_len + data.len();
        if len > limit || declared.is_some_and(|d| len > d) {
            // More than declared is hyper's to refuse; more than the limit
            // is ours.
            return Err(ApiError::PayloadTooLarge {
                limit: limit as u64,
            });
        }
        let held = permit.num_permits();
        if len > held {
            let more = (len - held).max(BUDGET_STEP).min(limit - held);
            permit.merge(budget.take(more, budget_deadline).await?);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            earlier => {
                if buf.is_empty() {
                    buf.reserve(declared.unwrap_or(len).max(len));
                }
                if let Some(earlier) = earlier {
                    buf.extend_from_slice(&earlier);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(Held {
        bytes: first.unwrap_or_else(|| buf.freeze()),
        permit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_is_shared_and_a_full_budget_refuses_after_a_short_wait() {
        let budget = BodyBudget::new(100);
        let deadline = Instant::now() + BUDGET_WAIT;
        let a = budget.take(60, deadline).await.unwrap();
        assert_eq!(budget.available(), 40);
        let started = Instant::now();
        assert!(matches!(
            budget.take(60, deadline).await,
            Err(ApiError::Busy)
        ));
        assert_eq!(started.elapsed(), BUDGET_WAIT, "waited, then refused");
        drop(a);
        assert_eq!(budget.available(), 100, "returned with the permit");
        let deadline = Instant::now() + BUDGET_WAIT;
        assert!(budget.take(100, deadline).await.is_ok());
        assert!(matches!(
            budget.take(101, deadline).await,
            Err(ApiError::Busy)
        ));
    }
}
