//! The fast fake upstream: the bench binary itself, run as
//! `<bench-exe> --upstream --port N [--stream-chunks K] [--chunk-delay-ms D]`,
//! or with `--socket PATH` instead of `--port N` on a unix socket.
//!
//! `GET /health` is 200. `POST /v1/chat/completions` (or `/v1/completions`)
//! answers a small fixed JSON body at once, or, when the request body has
//! `"stream":true`, an SSE stream of K content chunks D ms apart, a usage
//! chunk and `[DONE]`. Nothing is logged per request, nothing is parsed
//! beyond a byte search, so the upstream costs as little CPU as hyper allows.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

type Body = BoxBody<Bytes, Infallible>;

const CHAT: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"fake","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
const CHUNK: &[u8] = b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}]}\n\n";
const HEALTH: &[u8] = br#"{"status":"ok"}"#;

#[derive(Clone, Copy)]
struct Opts {
    port: u16,
    /// Leaked once at start: Opts stays Copy for every connection.
    socket: Option<&'static str>,
    chunks: usize,
    delay: Duration,
}

fn parse(args: &[String]) -> Opts {
    let mut o = Opts {
        port: 0,
        socket: None,
        chunks: 8,
        delay: Duration::ZERO,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{a} needs a number"))
        };
        match a.as_str() {
            "--upstream" => {}
            "--socket" => {
                let path = it.next().expect("--socket needs a path").clone();
                o.socket = Some(Box::leak(path.into_boxed_str()));
            }
            "--port" => o.port = num() as u16,
            "--stream-chunks" => o.chunks = num() as usize,
            "--chunk-delay-ms" => o.delay = Duration::from_millis(num()),
            _ => {}
        }
    }
    assert!(
        o.port != 0 || o.socket.is_some(),
        "--upstream needs --port N or --socket PATH"
    );
    o
}

pub fn main(args: &[String]) -> ! {
    let opts = parse(args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        if let Some(path) = opts.socket {
            let listener = tokio::net::UnixListener::bind(path).unwrap_or_else(|e| {
                eprintln!("fake upstream: cannot bind {path}: {e}");
                std::process::exit(1)
            });
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(serve(stream, opts));
            }
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port))
            .await
            .unwrap_or_else(|e| {
                eprintln!("fake upstream: cannot bind port {}: {e}", opts.port);
                std::process::exit(1)
            });
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, opts));
        }
    })
}

async fn serve(stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin, opts: Opts) {
    let svc = service_fn(move |req| handle(req, opts));
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

fn full(status: StatusCode, ctype: &'static str, data: &'static [u8]) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(data)).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn handle(req: Request<Incoming>, o: Opts) -> Result<Response<Body>, Infallible> {
    let json = "application/json";
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => full(StatusCode::OK, json, HEALTH),
        (&Method::POST, "/v1/chat/completions" | "/v1/completions") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(full(StatusCode::BAD_REQUEST, json, b"{}")),
            };
            if contains(&body, b"\"stream\":true") {
                stream(o)
            } else {
                full(StatusCode::OK, json, CHAT)
            }
        }
        _ => full(StatusCode::NOT_FOUND, json, b"{}"),
    };
    Ok(resp)
}

fn stream(o: Opts) -> Response<Body> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(2);
    tokio::spawn(async move {
        for i in 0..o.chunks {
            if i > 0 && !o.delay.is_zero() {
                tokio::time::sleep(o.delay).await;
            }
            if tx.send_data(Bytes::from_static(CHUNK)).await.is_err() {
                return; // the client went away
            }
        }
        let tail = format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            o.chunks,
            o.chunks + 5
        );
        let _ = tx.send_data(Bytes::from(tail)).await;
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r
}
