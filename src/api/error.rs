//! The one place where an error becomes a status code, a history outcome
//! and an OpenAI-shaped body. Adding a variant forces a decision on each.
//!
//! Every error body has OpenAI's `{"error":{"message","type","code"}}`
//! shape and never carries a path or an OS error string.

use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde_json::json;

use super::json_response;
use crate::history::Outcome;
use crate::proxy::BoxBody;
use crate::scheduler::AcquireError;
use crate::supervisor::StartFailure;

/// Everything a request can fail with. Adding a variant forces a decision
/// on its status in [`ApiError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("model '{requested}' not found; available models: {}", available.join(", "))]
    UnknownModel {
        requested: String,
        available: Vec<String>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("no route for {method} {path}")]
    NotFound { method: Method, path: String },
    #[error("{0}")]
    Unavailable(AcquireError),
    #[error("the model process did not answer the request")]
    Upstream,
    #[error("history is not recorded on this server")]
    HistoryDisabled,
    #[error("the history database could not be read")]
    History,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel { .. } | ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(AcquireError::Unknown(_)) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream => StatusCode::BAD_GATEWAY,
            ApiError::HistoryDisabled => StatusCode::NOT_FOUND,
            ApiError::History => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// How a request refused with this error is recorded.
    pub fn outcome(&self) -> Outcome {
        match self {
            ApiError::BadRequest(_)
            | ApiError::UnknownModel { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::NotFound { .. }
            | ApiError::HistoryDisabled
            | ApiError::Unavailable(AcquireError::ShuttingDown | AcquireError::Unknown(_)) => {
                Outcome::Rejected
            }
            ApiError::Unavailable(AcquireError::StartFailed {
                reason: StartFailure::Timeout { .. },
                ..
            }) => Outcome::Timeout,
            ApiError::Unavailable(_) | ApiError::Upstream | ApiError::History => {
                Outcome::UpstreamError
            }
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            ApiError::UnknownModel { .. } | ApiError::Unavailable(AcquireError::Unknown(_)) => {
                ("invalid_request_error", "model_not_found")
            }
            ApiError::PayloadTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            ApiError::NotFound { .. } => ("invalid_request_error", "not_found"),
            ApiError::Unavailable(AcquireError::ShuttingDown) => ("server_error", "shutting_down"),
            ApiError::Unavailable(_) => ("server_error", "model_unavailable"),
            ApiError::Upstream => ("server_error", "upstream_error"),
            ApiError::HistoryDisabled => ("invalid_request_error", "history_disabled"),
            ApiError::History => ("server_error", "history_error"),
        }
    }

    pub fn into_response(self) -> Response<BoxBody> {
        let status = self.status();
        let (kind, code) = self.kind();
        let mut body = json!({"error": {"message": self.to_string(), "type": kind, "code": code}});
        if let ApiError::UnknownModel { available, .. } = &self {
            body["error"]["available_models"] = json!(available);
        }
        let mut resp = json_response(status, &body);
        if let ApiError::Unavailable(AcquireError::BackingOff { retry_after, .. }) = &self {
            let secs = retry_after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
