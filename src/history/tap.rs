//! Watching a proxied response pass by to fill in its history row: time to
//! first byte and first token, usage and llama.cpp timings, the response
//! text per the content policy, and how it ended.
//!
//! Streams are parsed line by line as the bytes go through, without
//! holding them ([`crate::wire::sse::Lines`]): only `data:` lines that can
//! carry what we need are parsed, into [`crate::wire::openai::Reply`]
//! (whose table lists the OpenAI, Anthropic and Responses shapes read; an
//! SSE `event:` line repeats the payload's `type`, so only `data:` is
//! read). llama-server puts `timings` in a stream's last chunk even when
//! the client did not ask for `stream_options.include_usage`, so token
//! counts come from there (prompt = prompt_n + cache_n) and the client's
//! request and response stay exactly as sent. Non-streamed bodies are kept
//! up to [`MAX_JSON_BODY`] and parsed once at the end. A successful
//! response whose counts could not be read says so in its row's `error`
//! (outcome stays `ok`): no usage or timings, not JSON, or too large to
//! parse.

use std::sync::Arc;
use std::time::Instant;

use memchr::memmem;

use super::{now_ms, ContentPolicy, Outcome, RequestRecord, Usage};
use crate::events::{Bus, Event};
use crate::wire::openai::Reply;
use crate::wire::sse::{self, Lines};

/// Characters of prompt and response kept under the `truncated` policy.
pub const TRUNCATE_CHARS: usize = 1000;
/// Larger non-streamed bodies are not parsed for usage.
const MAX_JSON_BODY: usize = 4 * 1024 * 1024;

/// What fills in a row's last figures as it is recorded (the GPU memory
/// after the request).
pub type Seal = Box<dyn FnOnce(&mut RequestRecord) + Send + Sync>;

/// The part of a row known when the request arrives.
pub struct Pending {
    pub record: RequestRecord,
    pub started: Instant,
    /// Run once, just before the row goes out.
    pub seal: Option<Seal>,
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
                queue_wait_ms: None,
                gpu: None,
            },
            started,
            seal: None,
        }
    }

    /// Ends the row: its finish time, latency and the seal's figures.
    fn close(&mut self) {
        self.record.finished_at_ms = now_ms();
        self.record.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        if let Some(seal) = self.seal.take() {
            seal(&mut self.record);
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
        self.close();
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
    /// The SSE stream cut into lines.
    lines: Lines,
    /// Non-streamed body, up to MAX_JSON_BODY.
    body: Vec<u8>,
    body_overflow: bool,
    text: String,
    text_full: bool,
    saw_usage: bool,
    saw_timings: bool,
    /// A non-streamed body that was not JSON of a known shape.
    unreadable: bool,
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
            lines: Lines::with_limit(MAX_JSON_BODY),
            body: Vec::new(),
            body_overflow: false,
            text: String::new(),
            text_full: false,
            saw_usage: false,
            saw_timings: false,
            unreadable: false,
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
        // Moved out for the loop (a pointer move, no copy) so that each
        // line can update the rest of the tap.
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(data, |line| self.sse_line(line));
        self.lines = lines;
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Some(payload) = sse::data(line) else {
            return;
        };
        if payload.is_empty() || payload == sse::DONE {
            return;
        }
        let wants_text = !self.text_full && self.content != ContentPolicy::None;
        let first_token = self
            .pending
            .as_ref()
            .is_some_and(|p| p.record.ttft_ms.is_none());
        let has_figures = contains(payload, b"\"usage\"") || contains(payload, b"\"timings\"");
        let has_content = contains(payload, b"\"content\"")
            || contains(payload, b"\"text\"")
            || contains(payload, b"\"delta\"");
        if !(has_figures || (has_content && (first_token || wants_text))) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Reply<'_>>(payload) else {
            return;
        };
        let delta = v.stream_text().unwrap_or("");
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
        let nested = [&v.message, &v.response];
        let usages = std::iter::once(&v.usage)
            .chain(nested.into_iter().flatten().map(|n| &n.usage))
            .flatten();
        for usage in usages {
            self.saw_usage = true;
            let cache_read = usage.cache_read_input_tokens;
            // Anthropic counts cache reads and writes apart from
            // input_tokens; OpenAI's prompt_tokens and the Responses
            // API's input_tokens include them.
            let prompt = usage.prompt_tokens.or_else(|| {
                usage.input_tokens.map(|n| {
                    n + cache_read.unwrap_or(0) + usage.cache_creation_input_tokens.unwrap_or(0)
                })
            });
            u.prompt_tokens = prompt.or(u.prompt_tokens);
            u.completion_tokens = usage
                .completion_tokens
                .or(usage.output_tokens)
                .or(u.completion_tokens);
            u.cached_tokens = [&usage.prompt_tokens_details, &usage.input_tokens_details]
                .into_iter()
                .flatten()
                .find_map(|d| d.cached_tokens)
                .or(cache_read)
                .or(u.cached_tokens);
        }
        if let Some(n) = v.input_tokens {
            // count_tokens: only a prompt.
            self.saw_usage = true;
            u.prompt_tokens = Some(n);
        }
        if let Some(t) = &v.timings {
            self.saw_timings = true;
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
        let had_body = !self.body.is_empty() || self.body_overflow;
        if !self.sse && !self.body_overflow && !self.body.is_empty() {
            let body = std::mem::take(&mut self.body);
            match serde_json::from_slice::<Reply<'_>>(&body) {
                Ok(v) => {
                    self.take_figures(&v);
                    for text in v.texts() {
                        self.push_text(text);
                    }
                    if let Some(p) = self.pending.as_mut().filter(|p| p.record.status >= 400) {
                        p.record.error = v
                            .error
                            .as_ref()
                            .and_then(|e| e.message())
                            .map(str::to_string);
                    }
                }
                Err(_) => self.unreadable = true,
            }
        }
        let note = if self.saw_usage || self.saw_timings {
            None
        } else if self.body_overflow {
            Some("usage not recorded: the response was too large to read")
        } else if self.unreadable {
            Some("usage not recorded: the response is not JSON of a known shape")
        } else if self.sse || had_body {
            Some("usage not recorded: the response carried no usage or timings")
        } else {
            None
        };
        if let Some(p) = &mut self.pending {
            match error {
                Some(e) => {
                    p.record.outcome = Outcome::UpstreamError;
                    p.record.error = Some(e);
                }
                None if p.record.status < 400 && p.record.error.is_none() => {
                    p.record.error = note.map(str::to_string);
                }
                None => {}
            }
        }
        self.record();
    }

    fn record(&mut self) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        p.close();
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

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memmem::find(hay, needle).is_some()
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

    fn row(sse: bool, parts: &[&str]) -> RequestRecord {
        let (mut t, seen) = tap(sse, ContentPolicy::Full);
        for part in parts {
            t.on_data(part.as_bytes());
        }
        t.on_end(None);
        let row = seen.0.lock().unwrap().clone();
        row.unwrap()
    }

    // Captured from llama-server (llama.cpp b11434) with the tiny test model.
    const ANTHROPIC: &str = r#"{"id":"chatcmpl-CS7Q","type":"message","role":"assistant","content":[{"type":"text","text":" instantiate августаmannschaft"}],"model":"tiny","stop_reason":"max_tokens","stop_sequence":null,"usage":{"cache_read_input_tokens":28,"input_tokens":1,"output_tokens":3}}"#;
    const ANTHROPIC_STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"chatcmpl-1S14\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"tiny\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"cache_read_input_tokens\":28,\"input_tokens\":1,\"output_tokens\":0}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ด\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" sports\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    const RESPONSES: &str = r#"{"completed_at":1796162312,"created_at":1796162312,"id":"resp_1gDD","model":"tiny","object":"response","output":[{"content":[{"type":"output_text","annotations":[],"logprobs":[],"text":" bufDownloadtern"}],"id":"msg_mNJ3","role":"assistant","status":"completed","type":"message"}],"status":"completed","usage":{"input_tokens":29,"output_tokens":3,"total_tokens":32,"input_tokens_details":{"cached_tokens":28}}}"#;
    const RESPONSES_STREAM: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_fYYe\",\"object\":\"response\",\"status\":\"in_progress\"}}\n\nevent: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"item\":{\"content\":[],\"id\":\"msg_7sGS\",\"role\":\"assistant\",\"status\":\"in_progress\",\"type\":\"message\"}}\n\nevent: response.content_part.added\ndata: {\"type\":\"response.content_part.added\",\"item_id\":\"msg_7sGS\",\"part\":{\"type\":\"output_text\",\"text\":\"\"}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_7sGS\",\"delta\":\" rough\"}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_7sGS\",\"delta\":\" Altri\"}\n\nevent: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"item_id\":\"msg_7sGS\",\"text\":\" rough Altri\"}\n\nevent: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"item\":{\"type\":\"message\",\"status\":\"completed\",\"id\":\"msg_7sGS\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\" rough Altri\"}],\"role\":\"assistant\"}}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_fYYe\",\"object\":\"response\",\"created_at\":1796162312,\"status\":\"completed\",\"model\":\"tiny\",\"output\":[{\"type\":\"message\",\"status\":\"completed\",\"id\":\"msg_7sGS\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\" rough Altri\"}],\"role\":\"assistant\"}],\"usage\":{\"input_tokens\":29,\"output_tokens\":2,\"total_tokens\":31,\"input_tokens_details\":{\"cached_tokens\":28}}},\"timings\":{\"cache_n\":28,\"prompt_n\":1,\"prompt_ms\":4.335,\"predicted_n\":2,\"predicted_ms\":4.132,\"prompt_per_second\":230.68,\"predicted_per_second\":484.03}}\n\n";

    #[test]
    fn anthropic_messages_are_read_whole_and_streamed() {
        let r = row(false, &[ANTHROPIC]);
        assert_eq!(r.usage.prompt_tokens, Some(29), "input + cache reads");
        assert_eq!(r.usage.cached_tokens, Some(28));
        assert_eq!(r.usage.completion_tokens, Some(3));
        assert_eq!(
            r.response_content.as_deref(),
            Some(" instantiate августаmannschaft")
        );
        assert_eq!(r.error, None);
        // Split mid-line and mid-character, as the network may.
        let bytes = ANTHROPIC_STREAM.as_bytes();
        let cut = ANTHROPIC_STREAM.find('ด').unwrap() + 1;
        let (a, b) = bytes.split_at(cut);
        let (mut t, seen) = tap(true, ContentPolicy::Full);
        t.on_data(a);
        t.on_data(b);
        t.on_end(None);
        let r = seen.0.lock().unwrap().clone().unwrap();
        assert_eq!(r.usage.prompt_tokens, Some(29));
        assert_eq!(r.usage.completion_tokens, Some(2), "message_delta's count");
        assert_eq!(r.response_content.as_deref(), Some("ด sports"));
        assert!(r.ttft_ms.is_some());
        assert_eq!(r.error, None);
    }

    #[test]
    fn responses_are_read_whole_and_streamed_without_counting_text_twice() {
        let r = row(false, &[RESPONSES]);
        assert_eq!(
            (
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.cached_tokens
            ),
            (Some(29), Some(3), Some(28))
        );
        assert_eq!(r.response_content.as_deref(), Some(" bufDownloadtern"));
        let r = row(true, &[RESPONSES_STREAM]);
        assert_eq!(
            (
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.cached_tokens
            ),
            (Some(29), Some(2), Some(28))
        );
        assert_eq!(r.usage.predicted_per_second, Some(484.03), "timings");
        assert_eq!(r.response_content.as_deref(), Some(" rough Altri"));
        assert!(r.ttft_ms.is_some());
    }

    #[test]
    fn count_tokens_and_llama_cpps_own_shapes_are_read() {
        let r = row(false, &[r#"{"input_tokens":29}"#]);
        assert_eq!(r.usage.prompt_tokens, Some(29));
        assert_eq!(r.error, None);
        let r = row(
            false,
            &[
                r#"{"index":0,"content":" DI}_","stop":true,"model":"tiny","tokens_predicted":2,"timings":{"cache_n":0,"prompt_n":2,"predicted_n":2,"predicted_ms":1.0}}"#,
            ],
        );
        assert_eq!(r.response_content.as_deref(), Some(" DI}_"));
        assert_eq!(r.usage.completion_tokens, Some(2));
        let r = row(
            true,
            &["data: {\"index\":0,\"content\":\"ąc\",\"stop\":false}\n\n",
              "data: {\"index\":0,\"content\":\"\",\"stop\":true,\"timings\":{\"cache_n\":0,\"prompt_n\":2,\"predicted_n\":2}}\n\n"],
        );
        assert_eq!(r.response_content.as_deref(), Some("ąc"));
        assert_eq!(r.usage.prompt_tokens, Some(2));
    }

    #[test]
    fn a_success_whose_counts_cannot_be_read_says_so() {
        for (sse, body, says) in [
            (false, "RIFF....WAVEfmt ", "not JSON"),
            (false, r#"{"content":42}"#, "not JSON of a known shape"),
            (false, r#"{"data":[{"url":"x"}]}"#, "no usage or timings"),
            (
                true,
                "data: {\"type\":\"message_stop\"}\n\n",
                "no usage or timings",
            ),
        ] {
            let r = row(sse, &[body]);
            assert_eq!(r.outcome, Outcome::Ok);
            assert!(
                r.error.as_deref().is_some_and(|e| e.contains(says)),
                "{body}: {:?}",
                r.error
            );
            assert_eq!(r.usage.prompt_tokens, None);
        }
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
