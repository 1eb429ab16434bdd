//! Watching a proxied response pass by to fill in its history row: time to
//! first byte and first token, usage and llama.cpp timings, the response
//! text per the content policy, and how it ended.
//!
//! Streams are parsed line by line as the bytes go through, without
//! holding them: only `data:` lines that can carry what we need are parsed
//! as JSON. llama-server puts `timings` in a stream's last chunk even when
//! the client did not ask for `stream_options.include_usage`, so token
//! counts come from there (prompt = prompt_n + cache_n) and the client's
//! request and response stay exactly as sent. Non-streamed bodies are kept
//! up to [`MAX_JSON_BODY`] and parsed once at the end.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;

use super::{now_ms, ContentPolicy, Outcome, RequestRecord, Usage};
use crate::events::{Bus, Event};

/// Characters of prompt and response kept under the `truncated` policy.
pub const TRUNCATE_CHARS: usize = 1000;
/// Larger non-streamed bodies are not parsed for usage.
const MAX_JSON_BODY: usize = 4 * 1024 * 1024;

/// The part of a row known when the request arrives.
pub struct Pending {
    pub record: RequestRecord,
    pub started: Instant,
}

impl Pending {
    pub fn new(request_id: String, client: &str, endpoint: &str, started: Instant) -> Pending {
        Pending {
            record: RequestRecord {
                request_id,
                started_at_ms: now_ms(),
                finished_at_ms: 0,
                client: client.to_string(),
                key_name: None,
                endpoint: endpoint.to_string(),
                model: None,
                status: 0,
                outcome: Outcome::Ok,
                error: None,
                latency_ms: 0.0,
                ttfb_ms: None,
                ttft_ms: None,
                usage: Usage::default(),
                streamed: false,
                request_content: None,
                response_content: None,
                content_truncated: false,
            },
            started,
        }
    }

    /// Keeps the request body per the policy; binary bodies are omitted.
    pub fn set_request_content(&mut self, policy: ContentPolicy, body: &[u8]) {
        if let Ok(text) = std::str::from_utf8(body) {
            let (kept, cut) = keep(policy, text);
            self.record.request_content = kept;
            self.record.content_truncated |= cut;
        }
    }

    /// Finishes a request that never reached a model's response.
    pub fn finish(mut self, bus: &Bus, status: u16, outcome: Outcome, error: Option<String>) {
        self.record.status = status;
        self.record.outcome = outcome;
        self.record.error = error;
        self.record.finished_at_ms = now_ms();
        self.record.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        bus.emit(Event::Request(Arc::new(self.record)));
    }
}

fn keep(policy: ContentPolicy, text: &str) -> (Option<String>, bool) {
    match policy {
        ContentPolicy::None => (None, false),
        ContentPolicy::Full => (Some(text.to_string()), false),
        ContentPolicy::Truncated => match text.char_indices().nth(TRUNCATE_CHARS) {
            Some((cut, _)) => (Some(text[..cut].to_string()), true),
            None => (Some(text.to_string()), false),
        },
    }
}

/// Observes a response body; records the row when the body ends or is
/// dropped (a drop before the end is a client cancel).
pub struct Tap {
    pending: Option<Pending>,
    /// Where the finished row goes.
    bus: Bus,
    content: ContentPolicy,
    sse: bool,
    /// Unparsed tail of the SSE stream (an incomplete line).
    line: Vec<u8>,
    /// Non-streamed body, up to MAX_JSON_BODY.
    body: Vec<u8>,
    body_overflow: bool,
    text: String,
    text_full: bool,
    saw_usage: bool,
}

impl Tap {
    /// The row is emitted on `bus` once the body ends or is dropped.
    pub fn new(
        mut pending: Pending,
        bus: Bus,
        content: ContentPolicy,
        status: u16,
        sse: bool,
    ) -> Tap {
        pending.record.status = status;
        pending.record.streamed = sse;
        if status >= 400 {
            pending.record.outcome = if status >= 500 {
                Outcome::UpstreamError
            } else {
                Outcome::Rejected
            };
        }
        Tap {
            pending: Some(pending),
            bus,
            content,
            sse,
            line: Vec::new(),
            body: Vec::new(),
            body_overflow: false,
            text: String::new(),
            text_full: false,
            saw_usage: false,
        }
    }

    pub fn on_data(&mut self, data: &[u8]) {
        let Some(p) = &mut self.pending else { return };
        if p.record.ttfb_ms.is_none() {
            p.record.ttfb_ms = Some(p.started.elapsed().as_secs_f64() * 1000.0);
        }
        if !self.sse {
            if self.body.len() + data.len() <= MAX_JSON_BODY {
                self.body.extend_from_slice(data);
            } else {
                self.body_overflow = true;
            }
            return;
        }
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            if self.line.is_empty() {
                self.sse_line(head);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.sse_line(&line);
            }
            rest = &tail[1..];
        }
        if self.line.len() + rest.len() <= MAX_JSON_BODY {
            self.line.extend_from_slice(rest);
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Some(payload) = line.strip_prefix(b"data:") else {
            return;
        };
        let payload = payload.trim_ascii();
        if payload.is_empty() || payload == b"[DONE]" {
            return;
        }
        let wants_text = !self.text_full && self.content != ContentPolicy::None;
        let first_token = self
            .pending
            .as_ref()
            .is_some_and(|p| p.record.ttft_ms.is_none());
        let has_figures = contains(payload, b"\"usage\"") || contains(payload, b"\"timings\"");
        let has_content = contains(payload, b"\"content\"") || contains(payload, b"\"text\"");
        if !(has_figures || (has_content && (first_token || wants_text))) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Reply<'_>>(payload) else {
            return;
        };
        let delta = v.text(|c| c.delta.as_ref()).unwrap_or("");
        if !delta.is_empty() {
            if let Some(p) = &mut self.pending {
                if p.record.ttft_ms.is_none() {
                    p.record.ttft_ms = Some(p.started.elapsed().as_secs_f64() * 1000.0);
                }
            }
            if wants_text {
                self.push_text(delta);
            }
        }
        if has_figures {
            self.take_figures(&v);
        }
    }

    fn push_text(&mut self, s: &str) {
        match self.content {
            ContentPolicy::None => {}
            ContentPolicy::Full => self.text.push_str(s),
            ContentPolicy::Truncated => {
                let room = TRUNCATE_CHARS.saturating_sub(self.text.chars().count());
                let taken: String = s.chars().take(room).collect();
                if taken.len() < s.len() {
                    self.text_full = true;
                }
                self.text.push_str(&taken);
            }
        }
    }

    /// `usage` wins over `timings` for counts; `timings` gives the rates.
    fn take_figures(&mut self, v: &Reply<'_>) {
        let Some(p) = &mut self.pending else { return };
        let u = &mut p.record.usage;
        if let Some(usage) = &v.usage {
            self.saw_usage = true;
            u.prompt_tokens = usage.prompt_tokens.or(u.prompt_tokens);
            u.completion_tokens = usage.completion_tokens.or(u.completion_tokens);
            u.cached_tokens = usage
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .or(u.cached_tokens);
        }
        if let Some(t) = &v.timings {
            u.prompt_ms = t.prompt_ms;
            u.predicted_ms = t.predicted_ms;
            u.prompt_per_second = t.prompt_per_second;
            u.predicted_per_second = t.predicted_per_second;
            if !self.saw_usage {
                let cache = t.cache_n.unwrap_or(0);
                u.prompt_tokens = t.prompt_n.map(|n| n + cache);
                u.completion_tokens = t.predicted_n;
                u.cached_tokens = Some(cache);
            }
        }
    }

    /// The body ended: cleanly (`error` None) or with an upstream failure.
    pub fn on_end(&mut self, error: Option<String>) {
        if !self.sse && !self.body_overflow && !self.body.is_empty() {
            let body = std::mem::take(&mut self.body);
            if let Ok(v) = serde_json::from_slice::<Reply<'_>>(&body) {
                self.take_figures(&v);
                if let Some(text) = v.text(|c| c.message.as_ref()) {
                    self.push_text(text);
                }
                if let Some(p) = self.pending.as_mut().filter(|p| p.record.status >= 400) {
                    p.record.error = v.error.and_then(|e| e.message).map(Cow::into_owned);
                }
            }
        }
        if let Some(e) = error {
            if let Some(p) = &mut self.pending {
                p.record.outcome = Outcome::UpstreamError;
                p.record.error = Some(e);
            }
        }
        self.record();
    }

    fn record(&mut self) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        p.record.finished_at_ms = now_ms();
        p.record.latency_ms = p.started.elapsed().as_secs_f64() * 1000.0;
        if self.content != ContentPolicy::None && !self.text.is_empty() {
            p.record.response_content = Some(std::mem::take(&mut self.text));
            p.record.content_truncated |= self.text_full;
        }
        self.bus.emit(Event::Request(Arc::new(p.record)));
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(p) = &mut self.pending {
            p.record.outcome = Outcome::Cancelled;
            p.record.error =
                Some("client closed the connection before the response was complete".into());
        }
        self.record();
    }
}

/// The fields of an OpenAI-style response or stream chunk that history
/// keeps; everything else is skipped unparsed. Strings borrow from the body
/// unless they contain escapes.
#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    usage: Option<UsageFields>,
    timings: Option<Timings>,
    #[serde(borrow)]
    error: Option<ErrorFields<'a>>,
}

impl<'a> Reply<'a> {
    /// The first choice's text: `part` (message or delta) content, else the
    /// completions API's `text`.
    fn text(&self, part: for<'c> fn(&'c Choice<'a>) -> Option<&'c Message<'a>>) -> Option<&str> {
        let first = self.choices.first()?;
        part(first)
            .and_then(|m| m.content.as_deref())
            .or(first.text.as_deref())
    }
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    message: Option<Message<'a>>,
    #[serde(borrow)]
    delta: Option<Message<'a>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    cached_tokens: Option<i64>,
}

/// llama-server's own per-request figures.
#[derive(Deserialize)]
struct Timings {
    prompt_n: Option<i64>,
    cache_n: Option<i64>,
    predicted_n: Option<i64>,
    prompt_ms: Option<f64>,
    predicted_ms: Option<f64>,
    prompt_per_second: Option<f64>,
    predicted_per_second: Option<f64>,
}

#[derive(Deserialize)]
struct ErrorFields<'a> {
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the last finished row it is shown.
    #[derive(Default)]
    struct Last(std::sync::Mutex<Option<RequestRecord>>);

    impl crate::events::Sink for Last {
        fn on_event(&self, event: &Event) {
            if let Event::Request(r) = event {
                *self.0.lock().unwrap() = Some((**r).clone());
            }
        }
    }

    fn tap(sse: bool, policy: ContentPolicy) -> (Tap, Arc<Last>) {
        let seen = Arc::new(Last::default());
        let pending = Pending::new(
            "r1".into(),
            "127.0.0.1:1",
            "/v1/chat/completions",
            Instant::now(),
        );
        let t = Tap::new(pending, Bus::new(vec![seen.clone()]), policy, 200, sse);
        (t, seen)
    }

    #[test]
    fn stream_figures_come_from_timings_split_across_frames() {
        let (mut t, seen) = tap(true, ContentPolicy::Truncated);
        t.on_data(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n");
        t.on_data(b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: {\"choices\":[{\"finish_reason\":\"length\",\"delta\":{}}],\"timings\":{\"cache_n\":3,\"prompt_n\":26,");
        t.on_data(b"\"prompt_ms\":1.5,\"predicted_n\":2,\"predicted_ms\":0.5,\"prompt_per_second\":17000.0,\"predicted_per_second\":4000.0}}\n\ndata: [DONE]\n\n");
        t.on_end(None);
        let r = seen.0.lock().unwrap().clone().unwrap();
        assert_eq!(r.usage.prompt_tokens, Some(29));
        assert_eq!(r.usage.completion_tokens, Some(2));
        assert_eq!(r.usage.cached_tokens, Some(3));
        assert_eq!(r.usage.predicted_per_second, Some(4000.0));
        assert_eq!(r.response_content.as_deref(), Some("Hello"));
        assert!(r.ttft_ms.is_some() && r.ttfb_ms.is_some());
        assert!(r.streamed);
        assert_eq!(r.outcome, Outcome::Ok);
    }

    #[test]
    fn usage_wins_over_timings_for_counts() {
        let (mut t, seen) = tap(true, ContentPolicy::None);
        t.on_data(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":4,\"prompt_tokens_details\":{\"cached_tokens\":9}},\"timings\":{\"cache_n\":9,\"prompt_n\":1,\"predicted_n\":4}}\n\n");
        t.on_end(None);
        let r = seen.0.lock().unwrap().clone().unwrap();
        assert_eq!(
            (
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.cached_tokens
            ),
            (Some(10), Some(4), Some(9))
        );
        assert_eq!(r.response_content, None);
    }

    #[test]
    fn non_stream_body_is_parsed_at_the_end_and_truncated() {
        let (mut t, seen) = tap(false, ContentPolicy::Truncated);
        let long = "x".repeat(1500);
        let body = serde_json::json!({"choices":[{"message":{"content": long}}],"usage":{"prompt_tokens":5,"completion_tokens":7}}).to_string();
        let (a, b) = body.as_bytes().split_at(20);
        t.on_data(a);
        t.on_data(b);
        t.on_end(None);
        let r = seen.0.lock().unwrap().clone().unwrap();
        assert_eq!(r.usage.completion_tokens, Some(7));
        assert_eq!(r.response_content.unwrap().chars().count(), TRUNCATE_CHARS);
        assert!(r.content_truncated);
        assert_eq!(r.ttft_ms, None);
    }

    #[test]
    fn a_dropped_tap_is_a_cancel_and_an_upstream_failure_is_recorded() {
        let (mut t, seen) = tap(true, ContentPolicy::None);
        t.on_data(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        drop(t);
        assert_eq!(
            seen.0.lock().unwrap().clone().unwrap().outcome,
            Outcome::Cancelled
        );
        let (mut t, seen) = tap(true, ContentPolicy::None);
        t.on_end(Some("model process failed mid-response".into()));
        let r = seen.0.lock().unwrap().clone().unwrap();
        assert_eq!(r.outcome, Outcome::UpstreamError);
        assert!(r.error.unwrap().contains("mid-response"));
    }

    #[test]
    fn error_messages_completions_text_and_escapes_are_read() {
        let (mut t, seen) = tap(false, ContentPolicy::Full);
        t.pending.as_mut().unwrap().record.status = 400;
        t.on_data(br#"{"error":{"code":400,"message":"context \"too\" long","type":"x"}}"#);
        t.on_end(None);
        let r = seen.0.lock().unwrap().clone().unwrap();
        assert_eq!(r.error.as_deref(), Some("context \"too\" long"));

        let (mut t, seen) = tap(false, ContentPolicy::Full);
        t.on_data(br#"{"id":"c","choices":[{"text":"a\nb","index":0,"logprobs":null}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"extra":[1,{"deep":[true]}]}"#);
        t.on_end(None);
        let r = seen.0.lock().unwrap().clone().unwrap();
        assert_eq!(r.response_content.as_deref(), Some("a\nb"));
        assert_eq!(r.usage.completion_tokens, Some(2));
        assert_eq!(r.error, None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let text = "é".repeat(TRUNCATE_CHARS + 5);
        let (kept, cut) = keep(ContentPolicy::Truncated, &text);
        assert!(cut);
        assert_eq!(kept.unwrap().chars().count(), TRUNCATE_CHARS);
        assert_eq!(keep(ContentPolicy::None, "abc"), (None, false));
    }
}
