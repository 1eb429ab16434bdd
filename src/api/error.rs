//! The one place where an error becomes a status code, a history outcome
//! and a body. Adding a variant forces a decision on each.
//!
//! A body has the shape its route's clients parse ([`ErrorShape`]):
//! OpenAI's `{"error":{"message","type","code"}}` everywhere but the
//! Anthropic routes, which get `{"type":"error","error":{"type","message"}}`,
//! and Ollama's (`/api/*`), which get `{"error": "message"}`.
//! The status and headers come from one mapping whatever the shape. No
//! body carries a path or an OS error string.

use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde_json::json;

use super::json_response;
use crate::auth::Denied;
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
    #[error("model '{}' not found; available models: {}", cut(requested, NAME_ECHO), available.join(", "))]
    UnknownModel {
        requested: String,
        available: Vec<String>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("no route for {method} {}", cut(path, PATH_ECHO))]
    NotFound { method: Method, path: String },
    #[error(
        "{method} is not allowed on {}; use {}",
        cut(path, PATH_ECHO),
        names(allow)
    )]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: &'static [Method],
    },
    #[error("the request body did not arrive within {}", humantime::format_duration(*after))]
    BodyTimeout { after: std::time::Duration },
    /// The client closed the connection (or broke it) while sending the
    /// body; nobody reads the answer, but the row says what happened.
    #[error("client closed the connection while sending the request body")]
    ClientGone,
    /// The daemon-wide budget for request bodies in memory stayed
    /// exhausted.
    #[error("too many request bodies are being read right now; retry shortly")]
    Busy,
    #[error("{0}")]
    Unavailable(AcquireError),
    #[error("{0}")]
    Denied(Denied),
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
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            // nginx's "client closed request"; the client never sees it.
            ApiError::ClientGone => CLIENT_CLOSED,
            ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Denied(Denied::Unauthenticated(_) | Denied::Rejected(_)) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Denied(Denied::Forbidden { .. }) => StatusCode::FORBIDDEN,
            ApiError::Denied(Denied::Throttled { .. } | Denied::RateLimited { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
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
            | ApiError::MethodNotAllowed { .. }
            | ApiError::Busy
            | ApiError::Denied(_)
            | ApiError::HistoryDisabled
            | ApiError::Unavailable(
                AcquireError::ShuttingDown
                | AcquireError::Unknown(_)
                | AcquireError::Pinned { .. }
                | AcquireError::QueueFull { .. }
                | AcquireError::NoRoom { .. },
            ) => Outcome::Rejected,
            ApiError::Unavailable(AcquireError::StartFailed {
                reason: StartFailure::Timeout { .. },
                ..
            })
            | ApiError::BodyTimeout { .. } => Outcome::Timeout,
            ApiError::ClientGone => Outcome::Cancelled,
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
            ApiError::MethodNotAllowed { .. } => ("invalid_request_error", "method_not_allowed"),
            ApiError::BodyTimeout { .. } => ("invalid_request_error", "request_timeout"),
            ApiError::ClientGone => ("invalid_request_error", "client_closed"),
            ApiError::Busy => ("server_error", "overloaded"),
            ApiError::Denied(Denied::Unauthenticated(_) | Denied::Rejected(_)) => {
                ("authentication_error", "invalid_api_key")
            }
            ApiError::Denied(Denied::Forbidden { .. }) => {
                ("permission_error", "insufficient_scope")
            }
            ApiError::Denied(Denied::Throttled { .. }) => ("rate_limit_error", "too_many_failures"),
            ApiError::Denied(Denied::RateLimited { .. }) => ("rate_limit_error", "rate_limited"),
            ApiError::Unavailable(AcquireError::ShuttingDown) => ("server_error", "shutting_down"),
            // Nothing failed: the operator pinned what would have to go.
            ApiError::Unavailable(AcquireError::Pinned { .. }) => ("server_error", "model_pinned"),
            ApiError::Unavailable(AcquireError::QueueFull { .. }) => ("server_error", "queue_full"),
            // It can never fit as configured: the numbers say why.
            ApiError::Unavailable(AcquireError::NoRoom { .. }) => {
                ("server_error", "insufficient_gpu_memory")
            }
            ApiError::Unavailable(_) => ("server_error", "model_unavailable"),
            ApiError::Upstream => ("server_error", "upstream_error"),
            ApiError::HistoryDisabled => ("invalid_request_error", "history_disabled"),
            ApiError::History => ("server_error", "history_error"),
        }
    }

    /// Anthropic's error `type` for this error: by status, except that a
    /// server with no room now is `overloaded_error`.
    fn anthropic_kind(&self) -> &'static str {
        match self {
            ApiError::Busy
            | ApiError::Unavailable(
                AcquireError::BackingOff { .. } | AcquireError::QueueFull { .. },
            ) => "overloaded_error",
            _ => match self.status().as_u16() {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                400..=499 => "invalid_request_error",
                _ => "api_error",
            },
        }
    }

    /// The body in `shape`.
    fn body(&self, shape: ErrorShape) -> serde_json::Value {
        let mut body = match shape {
            ErrorShape::OpenAi => {
                let (kind, code) = self.kind();
                json!({"error": {"message": self.to_string(), "type": kind, "code": code}})
            }
            ErrorShape::Anthropic => json!({
                "type": "error",
                "error": {"type": self.anthropic_kind(), "message": self.to_string()},
            }),
            ErrorShape::Ollama => return json!({ "error": self.to_string() }),
        };
        if let ApiError::UnknownModel { available, .. } = self {
            body["error"]["available_models"] = json!(available);
        }
        body
    }

    /// The response in OpenAI's shape.
    pub fn into_response(self) -> Response<BoxBody> {
        self.into_response_shaped(ErrorShape::OpenAi)
    }

    /// The response with its body in `shape`; status and headers are the
    /// same in every shape.
    pub fn into_response_shaped(self, shape: ErrorShape) -> Response<BoxBody> {
        let status = self.status();
        let mut resp = json_response(status, &self.body(shape));
        let retry_after = match &self {
            ApiError::Unavailable(
                AcquireError::BackingOff { retry_after, .. }
                | AcquireError::QueueFull { retry_after, .. },
            ) => Some(retry_after.as_secs().max(1)),
            ApiError::Busy => Some(1),
            ApiError::Denied(
                Denied::Throttled { retry_after } | Denied::RateLimited { retry_after },
            ) => Some(retry_after.as_secs().max(1)),
            _ => None,
        };
        if let Some(v) = retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let ApiError::Denied(Denied::Unauthenticated(_) | Denied::Rejected(_)) = &self {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"claracore\""),
            );
        }
        if let ApiError::MethodNotAllowed { allow, .. } = &self {
            if let Ok(v) = HeaderValue::from_str(&names(allow)) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
        }
        if matches!(
            self,
            ApiError::BodyTimeout { .. } | ApiError::ClientGone | ApiError::Busy
        ) {
            // The rest of the body is not read: this connection is done.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Which API's error body a route answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
    Ollama,
}

impl ErrorShape {
    /// The shape for a request path, for errors raised before (or
    /// without) a route: Ollama's on `/` and `/api/*`, Anthropic's on
    /// `/v1/messages*`, else OpenAI's.
    pub fn for_path(path: &str) -> ErrorShape {
        if path == "/" || path.starts_with("/api/") {
            ErrorShape::Ollama
        } else if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            ErrorShape::Anthropic
        } else {
            ErrorShape::OpenAi
        }
    }
}

/// 499, nginx's "client closed request": what history records for a
/// request whose client left before it could be answered.
pub const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Characters of a requested model name echoed in an error.
const NAME_ECHO: usize = 64;
/// Characters of a request path echoed in an error.
const PATH_ECHO: usize = 200;

/// `text` cut to `max` characters, marked when cut: errors echo what the
/// client sent, and a client may send a lot.
pub(super) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text.to_string(),
    }
}

/// "GET, POST" for an `Allow` header.
fn names(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_names_and_paths_are_cut() {
        let long = "m".repeat(100_000);
        let e = ApiError::UnknownModel {
            requested: long.clone(),
            available: vec!["tiny".into()],
        };
        let text = e.to_string();
        assert!(text.len() < 200, "{} bytes", text.len());
        assert!(text.contains("… (100000 bytes)"), "{text}");
        let e = ApiError::NotFound {
            method: Method::GET,
            path: format!("/{long}"),
        };
        assert!(e.to_string().len() < 300);
        assert_eq!(cut("é".repeat(3).as_str(), 2), "éé… (6 bytes)");
        assert_eq!(cut("short", 64), "short");
    }

    #[test]
    fn anthropic_shape_keeps_status_and_headers_and_names_anthropics_types() {
        use std::time::Duration;
        let cases = [
            (
                ApiError::BadRequest("no model".into()),
                400,
                "invalid_request_error",
            ),
            (
                ApiError::UnknownModel {
                    requested: "x".into(),
                    available: vec!["tiny".into()],
                },
                404,
                "not_found_error",
            ),
            (
                ApiError::Denied(Denied::Unauthenticated("no key")),
                401,
                "authentication_error",
            ),
            (
                ApiError::Denied(Denied::RateLimited {
                    retry_after: Duration::from_secs(3),
                }),
                429,
                "rate_limit_error",
            ),
            (ApiError::Busy, 503, "overloaded_error"),
            (ApiError::Upstream, 502, "api_error"),
        ];
        for (e, status, kind) in cases {
            let text = e.to_string();
            let openai = e.body(ErrorShape::OpenAi);
            assert_eq!(openai["error"]["message"], text.as_str());
            assert!(openai["error"]["code"].is_string() && openai.get("type").is_none());
            let body = e.body(ErrorShape::Anthropic);
            assert_eq!(body["type"], "error", "{body}");
            assert_eq!(body["error"]["type"], kind, "{body}");
            assert_eq!(body["error"]["message"], text.as_str());
            let resp = e.into_response_shaped(ErrorShape::Anthropic);
            assert_eq!(resp.status().as_u16(), status, "{text}");
            if status == 401 {
                assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));
            }
            if status == 429 || status == 503 {
                assert!(resp.headers().contains_key(header::RETRY_AFTER), "{text}");
            }
        }
    }

    #[test]
    fn a_wrong_method_is_405_with_allow() {
        let e = ApiError::MethodNotAllowed {
            method: Method::GET,
            path: "/v1/chat/completions".into(),
            allow: &[Method::POST],
        };
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "POST");
    }
}
