//! The HTTP(S) client behind `pull`: GET with redirects followed by hand,
//! so that the hub's token goes only to the hub's own host and never to a
//! redirect target (a CDN), as huggingface_hub does.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, LOCATION, RANGE, USER_AGENT};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::PullError;

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 5;
/// How long a request may take to answer with its head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client for one hub: its token is sent to `hub_authority` only.
#[derive(Clone)]
pub struct HubClient {
    client: Client<Https, Empty<Bytes>>,
    token: Option<String>,
    hub_authority: Option<String>,
}

impl HubClient {
    pub fn new(endpoint: &Uri, token: Option<String>) -> Result<HubClient, PullError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| PullError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(HubClient {
            client: Client::builder(TokioExecutor::new()).build(https),
            token,
            hub_authority: endpoint
                .authority()
                .map(|a| a.as_str().to_ascii_lowercase()),
        })
    }

    /// GETs `uri`, following redirects; `range_from` asks for the bytes
    /// from that offset on. Returns the final response and the commit id
    /// the hub named on the way (`X-Repo-Commit`, on its redirect).
    pub async fn get(
        &self,
        uri: Uri,
        range_from: Option<u64>,
    ) -> Result<(Response<Incoming>, Option<String>), PullError> {
        let mut uri = uri;
        let mut commit = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::get(uri.clone())
                .header(USER_AGENT, concat!("claracore/", env!("CARGO_PKG_VERSION")));
            if let Some(token) = self.token_for(&uri) {
                req = req.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            if let Some(from) = range_from.filter(|f| *f > 0) {
                req = req.header(RANGE, format!("bytes={from}-"));
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| PullError::Url(format!("{uri}: {e}")))?;
            let resp = tokio::time::timeout(HEAD_TIMEOUT, self.client.request(req))
                .await
                .map_err(|_| PullError::Network(format!("{uri}: no answer in {HEAD_TIMEOUT:?}")))?
                .map_err(|e| PullError::Network(format!("{uri}: {}", chain(&e))))?;
            commit = commit.or_else(|| {
                resp.headers()
                    .get("x-repo-commit")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            });
            if !resp.status().is_redirection() {
                return Ok((resp, commit));
            }
            uri = redirect_target(&uri, &resp)?;
        }
        Err(PullError::Network(format!(
            "{uri}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// The token, only for the hub's own host.
    fn token_for(&self, uri: &Uri) -> Option<&str> {
        let host = uri.authority()?.as_str().to_ascii_lowercase();
        (Some(host) == self.hub_authority)
            .then_some(self.token.as_deref())
            .flatten()
    }
}

/// Where a redirect points, resolved against the request's URI.
fn redirect_target(from: &Uri, resp: &Response<Incoming>) -> Result<Uri, PullError> {
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| PullError::Network(format!("{from}: redirect without a Location")))?;
    if location.starts_with('/') {
        let scheme = from.scheme_str().unwrap_or("https");
        let authority = from.authority().map(|a| a.as_str()).unwrap_or_default();
        return format!("{scheme}://{authority}{location}")
            .parse()
            .map_err(|e| PullError::Url(format!("{location}: {e}")));
    }
    let target: Uri = location
        .parse()
        .map_err(|e| PullError::Url(format!("{location}: {e}")))?;
    match target.scheme_str() {
        Some("https") | Some("http") => Ok(target),
        _ => Err(PullError::Url(format!(
            "{location}: not an http(s) redirect"
        ))),
    }
}

/// An error with its sources, for a log line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether a status means "try again later" rather than "this is wrong".
pub fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}
