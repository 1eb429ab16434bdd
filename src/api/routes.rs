//! Every route the daemon answers, as data: [`parse`] maps (method, path) to
//! a [`Route`] without side effects and without slicing strings, so no
//! request can make it panic, and a new route is a new variant that every
//! `match` on it must handle.
//!
//! | route                                   | what                                |
//! |-----------------------------------------|-------------------------------------|
//! | POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/rerank | proxied by the body's `model` |
//! | POST /v1/messages, /v1/messages/count_tokens | Anthropic's, proxied by the body's `model`; errors in Anthropic's shape |
//! | POST /v1/responses                      | OpenAI Responses, by the body's `model` |
//! | POST /v1/audio/speech, /v1/images/generations | by the body's `model` (`cmd` models that serve them) |
//! | POST /v1/audio/transcriptions           | by the multipart form's `model` field |
//! | POST /infill                            | llama.cpp code infill, by the body's `model` |
//! | GET  /v1/models                         | configured models with their state  |
//! | GET  /v1/models/{id}                    | one of them, by name or alias       |
//! | ANY  /upstream/{model}/{path…}          | raw pass-through to a model's child |
//! | GET  /health, /live, /ready             | daemon health                       |
//! | GET  /metrics                           | Prometheus text format              |
//! | GET  /admin/ps                          | loaded models (pid, socket, idle…)  |
//! | POST /admin/models/{name}/stop          | drain and stop a model              |
//! | POST /admin/models/{name}/load          | start a model, answer once ready    |
//! | GET  /admin/history[/{id}], /admin/stats | request history, per-model figures |
//! | POST /admin/backup                      | a consistent copy of the history DB |
//! | GET  /admin/audit                       | admin actions and rejected keys     |
//! | GET  /ui, /ui/, /ui/login, /ui/*.js, *.css | the dashboard's pages and assets (open: they hold no data) |
//! | GET  /ui/session                        | the session's principal, scopes and CSRF token |
//! | POST /ui/login, /ui/logout              | start a session (password or key), end it (CSRF) |
//! | GET, HEAD /                             | Ollama's "Ollama is running" probe  |
//! | GET  /api/version                       | Ollama's version answer             |
//! | POST /api/chat, /api/generate, /api/embed, /api/embeddings | Ollama, translated to the child's OpenAI endpoints |
//! | GET  /api/tags, /api/ps; POST /api/show | Ollama's model lists and details    |
//! | /api/pull, push, create, copy, delete, blobs | an Ollama-shaped "declared in the config" error |
//!
//! `/api/*` is Ollama's ([`Ollama`]). [`Route::scopes`] says who may call
//! each: `inference` for the model routes, `read` for the read-only admin
//! routes and `/metrics`, `read` or `inference` for the model lists,
//! `admin` for stop, load, backup and the raw pass-through; the probes (and
//! Ollama's `/` and `/api/version`) are open.

use hyper::Method;

pub use super::error::ErrorShape;
use crate::config::Scope;

/// An inference endpoint whose body names the model: a JSON body's
/// top-level `model`, or the `model` field of a multipart form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inference {
    ChatCompletions,
    Completions,
    Embeddings,
    Rerank,
    /// Anthropic's Messages API.
    Messages,
    CountTokens,
    /// OpenAI's Responses API.
    Responses,
    Speech,
    /// multipart/form-data.
    Transcriptions,
    ImageGenerations,
    /// llama.cpp's code infill (editor plugins).
    Infill,
}

impl Inference {
    /// The path, as recorded in history and metrics.
    pub fn path(self) -> &'static str {
        match self {
            Inference::ChatCompletions => "/v1/chat/completions",
            Inference::Completions => "/v1/completions",
            Inference::Embeddings => "/v1/embeddings",
            Inference::Rerank => "/v1/rerank",
            Inference::Messages => "/v1/messages",
            Inference::CountTokens => "/v1/messages/count_tokens",
            Inference::Responses => "/v1/responses",
            Inference::Speech => "/v1/audio/speech",
            Inference::Transcriptions => "/v1/audio/transcriptions",
            Inference::ImageGenerations => "/v1/images/generations",
            Inference::Infill => "/infill",
        }
    }

    /// Every endpoint, for tests and tables.
    pub const ALL: [Inference; 11] = [
        Inference::ChatCompletions,
        Inference::Completions,
        Inference::Embeddings,
        Inference::Rerank,
        Inference::Messages,
        Inference::CountTokens,
        Inference::Responses,
        Inference::Speech,
        Inference::Transcriptions,
        Inference::ImageGenerations,
        Inference::Infill,
    ];

    /// Whether the body is a multipart form (else JSON).
    pub fn is_form(self) -> bool {
        self == Inference::Transcriptions
    }

    /// The shape this endpoint's clients expect errors in.
    pub fn error_shape(self) -> ErrorShape {
        match self {
            Inference::Messages | Inference::CountTokens => ErrorShape::Anthropic,
            _ => ErrorShape::OpenAi,
        }
    }
}

/// One of the dashboard's embedded files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UiAsset {
    /// `/ui/`: the app.
    Index,
    /// `/ui/login`.
    Login,
    AppJs,
    LoginJs,
    Css,
}

/// An Ollama route (`/api/*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ollama {
    Version,
    Tags,
    Ps,
    Show,
    Chat,
    Generate,
    Embed,
    Embeddings,
    /// pull, push, create, copy, delete, blobs: what the client asked for.
    Unsupported(&'static str),
}

impl Ollama {
    /// The inference endpoint (with a history row), if it is one.
    pub fn endpoint(self) -> Option<&'static str> {
        match self {
            Ollama::Chat => Some("/api/chat"),
            Ollama::Generate => Some("/api/generate"),
            Ollama::Embed => Some("/api/embed"),
            Ollama::Embeddings => Some("/api/embeddings"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Inference(Inference),
    /// `GET /` and `HEAD /`, which Ollama clients probe.
    OllamaRoot,
    Ollama(Ollama),
    Models,
    /// `GET /v1/models/{id}`: `id` percent-decoded, any slashes kept.
    Model {
        id: String,
    },
    /// `/upstream/{model}/{tail}`: `tail` without its leading slash.
    Upstream {
        model: String,
        tail: String,
    },
    Health,
    Live,
    Ready,
    Metrics,
    AdminPs,
    AdminStop {
        model: String,
    },
    AdminLoad {
        model: String,
    },
    AdminHistory,
    /// `id` as given; the handler says when it is not a number.
    AdminHistoryEntry {
        id: String,
    },
    AdminStats,
    AdminBackup,
    AdminAudit,
    /// `/ui` without the slash: a redirect to `/ui/`.
    UiRoot,
    UiAsset(UiAsset),
    /// `GET /ui/session`: the handler checks the cookie itself.
    UiSession,
    UiLogin,
    UiLogout,
}

impl Route {
    /// The dashboard's routes, whose every response carries its security
    /// headers.
    pub fn is_ui(&self) -> bool {
        matches!(
            self,
            Route::UiRoot | Route::UiAsset(_) | Route::UiSession | Route::UiLogin | Route::UiLogout
        )
    }

    /// The scopes of which a principal needs one; empty: open to all.
    /// `/metrics` is open only when the config says so.
    pub fn scopes(&self, metrics_public: bool) -> &'static [Scope] {
        const INFERENCE: &[Scope] = &[Scope::Inference];
        const LISTING: &[Scope] = &[Scope::Inference, Scope::Read];
        const READ: &[Scope] = &[Scope::Read];
        const ADMIN: &[Scope] = &[Scope::Admin];
        match self {
            Route::Inference(_) => INFERENCE,
            Route::Models | Route::Model { .. } => LISTING,
            Route::Health | Route::Live | Route::Ready => &[],
            // The assets hold no data, and the session routes check the
            // cookie (or the login) themselves.
            Route::UiRoot
            | Route::UiAsset(_)
            | Route::UiSession
            | Route::UiLogin
            | Route::UiLogout => &[],
            Route::OllamaRoot | Route::Ollama(Ollama::Version) => &[],
            Route::Ollama(Ollama::Chat | Ollama::Generate | Ollama::Embed | Ollama::Embeddings) => {
                INFERENCE
            }
            Route::Ollama(Ollama::Tags | Ollama::Ps | Ollama::Show | Ollama::Unsupported(_)) => {
                LISTING
            }
            Route::Metrics if metrics_public => &[],
            Route::Metrics
            | Route::AdminPs
            | Route::AdminHistory
            | Route::AdminHistoryEntry { .. }
            | Route::AdminStats => READ,
            // The pass-through reaches every llama-server endpoint.
            Route::Upstream { .. }
            | Route::AdminStop { .. }
            | Route::AdminLoad { .. }
            | Route::AdminBackup
            | Route::AdminAudit => ADMIN,
        }
    }
}

/// Why no route matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    NotFound,
    /// The path exists with other methods.
    WrongMethod {
        allow: &'static [Method],
    },
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
const HEAD_POST: &[Method] = &[Method::HEAD, Method::POST];
const DELETE: &[Method] = &[Method::DELETE];
const GET_POST: &[Method] = &[Method::GET, Method::POST];

/// The route for a request line. Pure and total.
pub fn parse(method: &Method, path: &str) -> Result<Route, NoRoute> {
    if let Some(rest) = path.strip_prefix("/upstream/") {
        let (model, tail) = rest.split_once('/').unwrap_or((rest, ""));
        return Ok(Route::Upstream {
            model: model.to_string(),
            tail: tail.to_string(),
        });
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(NoRoute::NotFound);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let (route, allow) = match segments.as_slice() {
        [""] => (Route::OllamaRoot, GET_HEAD),
        ["api", "version"] => (Route::Ollama(Ollama::Version), GET),
        ["api", "tags"] => (Route::Ollama(Ollama::Tags), GET),
        ["api", "ps"] => (Route::Ollama(Ollama::Ps), GET),
        ["api", "show"] => (Route::Ollama(Ollama::Show), POST),
        ["api", "chat"] => (Route::Ollama(Ollama::Chat), POST),
        ["api", "generate"] => (Route::Ollama(Ollama::Generate), POST),
        ["api", "embed"] => (Route::Ollama(Ollama::Embed), POST),
        ["api", "embeddings"] => (Route::Ollama(Ollama::Embeddings), POST),
        ["api", "pull"] => (Route::Ollama(Ollama::Unsupported("pull")), POST),
        ["api", "push"] => (Route::Ollama(Ollama::Unsupported("push")), POST),
        ["api", "create"] => (Route::Ollama(Ollama::Unsupported("create")), POST),
        ["api", "copy"] => (Route::Ollama(Ollama::Unsupported("copy")), POST),
        ["api", "delete"] => (Route::Ollama(Ollama::Unsupported("delete")), DELETE),
        ["api", "blobs", digest] if !digest.is_empty() => {
            (Route::Ollama(Ollama::Unsupported("blobs")), HEAD_POST)
        }
        ["v1", "chat", "completions"] => (Route::Inference(Inference::ChatCompletions), POST),
        ["v1", "completions"] => (Route::Inference(Inference::Completions), POST),
        ["v1", "embeddings"] => (Route::Inference(Inference::Embeddings), POST),
        ["v1", "rerank"] => (Route::Inference(Inference::Rerank), POST),
        ["v1", "messages"] => (Route::Inference(Inference::Messages), POST),
        ["v1", "messages", "count_tokens"] => (Route::Inference(Inference::CountTokens), POST),
        ["v1", "responses"] => (Route::Inference(Inference::Responses), POST),
        ["v1", "audio", "speech"] => (Route::Inference(Inference::Speech), POST),
        ["v1", "audio", "transcriptions"] => (Route::Inference(Inference::Transcriptions), POST),
        ["v1", "images", "generations"] => (Route::Inference(Inference::ImageGenerations), POST),
        ["infill"] => (Route::Inference(Inference::Infill), POST),
        ["v1", "models"] => (Route::Models, GET),
        ["v1", "models", id @ ..] => match model_id(id) {
            Some(id) => (Route::Model { id }, GET),
            None => return Err(NoRoute::NotFound),
        },
        ["health"] => (Route::Health, GET),
        ["live"] => (Route::Live, GET),
        ["ready"] => (Route::Ready, GET),
        ["metrics"] => (Route::Metrics, GET),
        ["admin", "ps"] => (Route::AdminPs, GET),
        ["admin", "models", model, "stop"] if !model.is_empty() => (
            Route::AdminStop {
                model: (*model).to_string(),
            },
            POST,
        ),
        ["admin", "models", model, "load"] if !model.is_empty() => (
            Route::AdminLoad {
                model: (*model).to_string(),
            },
            POST,
        ),
        ["admin", "history"] => (Route::AdminHistory, GET),
        ["admin", "history", id] if !id.is_empty() => (
            Route::AdminHistoryEntry {
                id: (*id).to_string(),
            },
            GET,
        ),
        ["admin", "stats"] => (Route::AdminStats, GET),
        ["admin", "backup"] => (Route::AdminBackup, POST),
        ["admin", "audit"] => (Route::AdminAudit, GET),
        ["ui"] => (Route::UiRoot, GET_HEAD),
        ["ui", ""] => (Route::UiAsset(UiAsset::Index), GET_HEAD),
        ["ui", "login"] => (Route::UiLogin, GET_POST),
        ["ui", "app.js"] => (Route::UiAsset(UiAsset::AppJs), GET_HEAD),
        ["ui", "login.js"] => (Route::UiAsset(UiAsset::LoginJs), GET_HEAD),
        ["ui", "app.css"] => (Route::UiAsset(UiAsset::Css), GET_HEAD),
        ["ui", "session"] => (Route::UiSession, GET),
        ["ui", "logout"] => (Route::UiLogout, POST),
        _ => return Err(NoRoute::NotFound),
    };
    if allow.contains(method) {
        Ok(route)
    } else {
        Err(NoRoute::WrongMethod { allow })
    }
}

/// A model id from the path segments after `/v1/models/`: rejoined (names
/// may hold slashes), percent-decoded; none when empty or not UTF-8.
fn model_id(segments: &[&str]) -> Option<String> {
    let joined = segments.join("/");
    let id = percent_encoding::percent_decode_str(&joined)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!id.is_empty() && segments.iter().all(|s| !s.is_empty())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: Method, path: &str) -> Route {
        match parse(&method, path) {
            Ok(r) => r,
            Err(e) => panic!("{method} {path}: {e:?}"),
        }
    }

    #[test]
    fn every_route_parses_with_its_method() {
        for e in Inference::ALL {
            assert_eq!(ok(Method::POST, e.path()), Route::Inference(e));
            assert_eq!(Route::Inference(e).scopes(false), [Scope::Inference]);
        }
        assert_eq!(ok(Method::GET, "/v1/models"), Route::Models);
        assert_eq!(
            ok(Method::GET, "/v1/models/tiny"),
            Route::Model { id: "tiny".into() }
        );
        assert_eq!(
            Route::Model { id: "x".into() }.scopes(false),
            [Scope::Inference, Scope::Read]
        );
        assert_eq!(ok(Method::GET, "/health"), Route::Health);
        assert_eq!(ok(Method::GET, "/live"), Route::Live);
        assert_eq!(ok(Method::GET, "/ready"), Route::Ready);
        assert_eq!(ok(Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(ok(Method::GET, "/admin/ps"), Route::AdminPs);
        assert_eq!(
            ok(Method::POST, "/admin/models/tiny-chat/stop"),
            Route::AdminStop {
                model: "tiny-chat".into()
            }
        );
        assert_eq!(
            ok(Method::POST, "/admin/models/tiny/load"),
            Route::AdminLoad {
                model: "tiny".into()
            }
        );
        assert_eq!(
            parse(&Method::GET, "/admin/models/tiny/load"),
            Err(NoRoute::WrongMethod { allow: POST })
        );
        assert_eq!(ok(Method::GET, "/admin/history"), Route::AdminHistory);
        assert_eq!(
            ok(Method::GET, "/admin/history/42"),
            Route::AdminHistoryEntry { id: "42".into() }
        );
        assert_eq!(ok(Method::GET, "/admin/stats"), Route::AdminStats);
        assert_eq!(ok(Method::POST, "/admin/backup"), Route::AdminBackup);
        assert_eq!(ok(Method::GET, "/admin/audit"), Route::AdminAudit);
        assert_eq!(ok(Method::GET, "/ui/"), Route::UiAsset(UiAsset::Index));
        assert_eq!(ok(Method::GET, "/ui"), Route::UiRoot);
        assert_eq!(
            ok(Method::GET, "/ui/app.js"),
            Route::UiAsset(UiAsset::AppJs)
        );
        assert_eq!(ok(Method::GET, "/ui/login"), Route::UiLogin);
        assert_eq!(ok(Method::POST, "/ui/login"), Route::UiLogin);
        assert_eq!(ok(Method::GET, "/ui/session"), Route::UiSession);
        assert_eq!(ok(Method::POST, "/ui/logout"), Route::UiLogout);
        assert_eq!(
            parse(&Method::GET, "/ui/logout"),
            Err(NoRoute::WrongMethod { allow: POST })
        );
        assert_eq!(parse(&Method::GET, "/ui/x"), Err(NoRoute::NotFound));
        assert!(Route::UiSession.scopes(false).is_empty() && Route::UiLogout.is_ui());
        assert_eq!(ok(Method::GET, "/"), Route::OllamaRoot);
        assert_eq!(ok(Method::HEAD, "/"), Route::OllamaRoot);
        for (m, path, r) in [
            (Method::GET, "/api/version", Ollama::Version),
            (Method::GET, "/api/tags", Ollama::Tags),
            (Method::GET, "/api/ps", Ollama::Ps),
            (Method::POST, "/api/show", Ollama::Show),
            (Method::POST, "/api/chat", Ollama::Chat),
            (Method::POST, "/api/generate", Ollama::Generate),
            (Method::POST, "/api/embed", Ollama::Embed),
            (Method::POST, "/api/embeddings", Ollama::Embeddings),
            (Method::POST, "/api/pull", Ollama::Unsupported("pull")),
            (Method::DELETE, "/api/delete", Ollama::Unsupported("delete")),
            (
                Method::HEAD,
                "/api/blobs/sha256:ab",
                Ollama::Unsupported("blobs"),
            ),
        ] {
            assert_eq!(ok(m, path), Route::Ollama(r), "{path}");
        }
        assert_eq!(Ollama::Chat.endpoint(), Some("/api/chat"));
        assert_eq!(Ollama::Tags.endpoint(), None);
    }

    #[test]
    fn upstream_takes_any_method_and_keeps_the_tail() {
        for m in [Method::GET, Method::POST, Method::DELETE] {
            assert_eq!(
                ok(m, "/upstream/tiny/props/x"),
                Route::Upstream {
                    model: "tiny".into(),
                    tail: "props/x".into()
                }
            );
        }
        assert_eq!(
            ok(Method::GET, "/upstream/tiny"),
            Route::Upstream {
                model: "tiny".into(),
                tail: String::new()
            }
        );
        assert_eq!(
            ok(Method::GET, "/upstream/"),
            Route::Upstream {
                model: String::new(),
                tail: String::new()
            }
        );
    }

    #[test]
    fn only_the_anthropic_routes_answer_errors_in_anthropics_shape_and_one_takes_a_form() {
        for e in Inference::ALL {
            let anthropic = e.path().starts_with("/v1/messages");
            assert_eq!(e.error_shape() == ErrorShape::Anthropic, anthropic, "{e:?}");
            assert_eq!(e.is_form(), e == Inference::Transcriptions, "{e:?}");
        }
    }

    #[test]
    fn model_ids_are_decoded_and_may_hold_slashes() {
        assert_eq!(
            ok(Method::GET, "/v1/models/org/m%20q"),
            Route::Model {
                id: "org/m q".into()
            }
        );
        assert_eq!(
            ok(Method::GET, "/v1/models/org%2Fm"),
            Route::Model { id: "org/m".into() }
        );
        for path in [
            "/v1/models/",
            "/v1/models/a//b",
            "/v1/models/%ff",
            "/v1/models/a/",
        ] {
            assert_eq!(parse(&Method::GET, path), Err(NoRoute::NotFound), "{path}");
        }
        assert_eq!(
            parse(&Method::POST, "/v1/models/tiny"),
            Err(NoRoute::WrongMethod { allow: GET })
        );
    }

    #[test]
    fn a_known_path_with_another_method_says_which_are_allowed() {
        assert_eq!(
            parse(&Method::GET, "/v1/chat/completions"),
            Err(NoRoute::WrongMethod { allow: POST })
        );
        assert_eq!(
            parse(&Method::DELETE, "/admin/ps"),
            Err(NoRoute::WrongMethod { allow: GET })
        );
    }

    #[test]
    fn near_misses_and_odd_paths_are_not_found_and_never_panic() {
        for path in [
            "",
            "//",
            "/admin/models/stop",
            "/admin/models//stop",
            "/admin/models//load",
            "/admin/models/a/b/load",
            "/admin/models/a/b/stop",
            "/admin/history/",
            "/admin/history/1/2",
            "/v1/chat/completions/",
            "/v1//models",
            "/api/models/stop",
            "/api/chat/",
            "/api/blobs/",
            "/api",
            "health",
            "/healthz",
            "/\u{00e9}/\u{1F600}",
        ] {
            for m in [Method::GET, Method::POST] {
                assert_eq!(parse(&m, path), Err(NoRoute::NotFound), "{m} {path:?}");
            }
        }
    }
}
