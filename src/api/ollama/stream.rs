//! A child's OpenAI SSE stream, translated chunk by chunk into Ollama's
//! NDJSON as it passes: each `data:` event becomes at most one line, sent
//! in the same poll that brought the event, so nothing is held back beyond
//! an incomplete line. The last line carries `done: true` and the figures.
//!
//! The body under this one is the proxy's leased body (with the history
//! tap, which reads the SSE before translation), so the lease, the row and
//! cancellation work as for `/v1/*`: dropping this body drops the upstream
//! request.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use serde_json::{json, Value};

use super::convert::{self, Figures, Shape, Times};
use crate::proxy::{BoxBody, BoxError};
use crate::wire::openai::{Arguments, Reply, ToolCall};
use crate::wire::sse::{self, Lines};

/// A tool call assembled from stream deltas.
#[derive(Debug, Default)]
struct PartialCall {
    name: String,
    arguments: String,
}

/// The translation state of one stream.
pub struct Translator {
    shape: Shape,
    model: String,
    started: Instant,
    load: Duration,
    clock: fn() -> String,
    /// The child's SSE cut into lines; beyond its limit a line is not
    /// translated (no child sends one).
    lines: Lines,
    figures: Figures,
    finish: Option<String>,
    calls: Vec<PartialCall>,
    /// The last line (done or error) is out.
    done: bool,
}

impl Translator {
    pub fn new(
        shape: Shape,
        model: String,
        started: Instant,
        load: Duration,
        clock: fn() -> String,
    ) -> Translator {
        Translator {
            shape,
            model,
            started,
            load,
            clock,
            lines: Lines::default(),
            figures: Figures::default(),
            finish: None,
            calls: Vec::new(),
            done: false,
        }
    }

    /// Translates the complete lines in `data`; appends NDJSON to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        // Moved out for the loop (a pointer move, no copy) so that each
        // line can update the rest of the state.
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(data, |line| self.event_line(line, out));
        self.lines = lines;
    }

    /// The stream ended: the final line, unless it is already out.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        if let Some(line) = self.lines.finish() {
            self.event_line(&line, out);
        }
        self.finish_line(out);
    }

    fn event_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        let Some(payload) = sse::data(line) else {
            return;
        };
        if payload.is_empty() {
            return;
        }
        if payload == sse::DONE {
            self.finish_line(out);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Reply<'_>>(payload) else {
            return;
        };
        if let Some(e) = &v.error {
            let message = e.text().unwrap_or("the model process failed");
            write_line(out, &json!({ "error": message }));
            self.done = true;
            return;
        }
        self.figures.take(&v);
        if let Some(f) = v.choices.first().and_then(|c| c.finish_reason.as_deref()) {
            self.finish = Some(f.to_string());
        }
        // llama.cpp's native /infill stream: `{"content": …, "stop": …}`.
        if v.stop == Some(true) {
            let limit = v.stop_type.as_deref() == Some("limit");
            self.finish = Some(if limit { "length" } else { "stop" }.into());
        }
        let delta = v.first_message();
        if let Some(calls) = delta.and_then(|d| d.tool_calls.as_deref()) {
            self.add_calls(calls);
        }
        let text = v.openai_text();
        let thinking = delta
            .and_then(|d| d.reasoning_content.as_deref())
            .filter(|t| !t.is_empty());
        if text.is_empty() && thinking.is_none() {
            return;
        }
        let mut obj = convert::head(&self.model, &(self.clock)(), false);
        convert::body_fields(&mut obj, self.shape, text, thinking, None);
        write_line(out, &Value::Object(obj));
    }

    fn add_calls(&mut self, deltas: &[ToolCall<'_>]) {
        for d in deltas {
            let index = d
                .index
                .map_or(self.calls.len().saturating_sub(1), |i| {
                    usize::try_from(i).unwrap_or(usize::MAX)
                })
                .min(1024);
            while self.calls.len() <= index {
                self.calls.push(PartialCall::default());
            }
            let call = &mut self.calls[index];
            if let Some(f) = &d.function {
                if let Some(n) = &f.name {
                    call.name.push_str(n);
                }
                if let Some(Arguments::Text(a)) = &f.arguments {
                    call.arguments.push_str(a);
                }
            }
        }
    }

    fn finish_line(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.done = true;
        let created = (self.clock)();
        let calls: Vec<Value> = std::mem::take(&mut self.calls)
            .into_iter()
            .filter(|c| !c.name.is_empty())
            .map(|c| convert::tool_call(&c.name, convert::arguments(&c.arguments)))
            .collect();
        if !calls.is_empty() {
            let mut obj = convert::head(&self.model, &created, false);
            convert::body_fields(&mut obj, self.shape, "", None, Some(calls));
            write_line(out, &Value::Object(obj));
        }
        let mut last = convert::head(&self.model, &created, true);
        convert::body_fields(&mut last, self.shape, "", None, None);
        last.insert(
            "done_reason".into(),
            json!(convert::done_reason(self.finish.as_deref())),
        );
        let times = Times {
            total: self.started.elapsed(),
            load: self.load,
        };
        convert::finish_fields(&mut last, &self.figures, times);
        write_line(out, &Value::Object(last));
    }
}

fn write_line(out: &mut Vec<u8>, v: &Value) {
    // A Value always serializes.
    if serde_json::to_writer(&mut *out, v).is_ok() {
        out.push(b'\n');
    }
}

pin_project_lite::pin_project! {
    /// An SSE body translated to NDJSON as it streams.
    pub struct Ndjson {
        #[pin]
        inner: BoxBody,
        translator: Translator,
        ended: bool,
    }
}

impl Ndjson {
    pub fn new(inner: BoxBody, translator: Translator) -> Ndjson {
        Ndjson {
            inner,
            translator,
            ended: false,
        }
    }
}

impl Body for Ndjson {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.ended {
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.translator.feed(&data, &mut out);
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    *this.ended = true;
                    this.translator.end(&mut out);
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[u8]) -> Vec<Value> {
        out.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    fn translator(shape: Shape) -> Translator {
        Translator::new(
            shape,
            "tiny:latest".into(),
            Instant::now(),
            Duration::from_millis(2),
            || "T".to_string(),
        )
    }

    /// Captured from the real llama-server (chat, 3 tokens), split at
    /// awkward places.
    const CHAT: &str = concat!(
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\" isol\"}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"tasks\"}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],\"object\":\"chat.completion.chunk\",\"timings\":{\"cache_n\":0,\"prompt_n\":29,\"prompt_ms\":7.561,\"predicted_n\":2,\"predicted_ms\":3.779}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn each_event_becomes_one_line_as_it_arrives() {
        let mut t = translator(Shape::Chat);
        let mut out = Vec::new();
        let bytes = CHAT.as_bytes();
        // The first content event, cut mid-line: nothing until its newline.
        let first_end = CHAT.find(" isol").unwrap() + 10;
        t.feed(&bytes[..first_end], &mut out);
        assert!(out.is_empty());
        let second_start = CHAT.find("data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"tasks").unwrap();
        t.feed(&bytes[first_end..second_start], &mut out);
        let got = lines(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["message"]["content"], " isol");
        assert_eq!(got[0]["done"], false);
        assert_eq!(got[0]["model"], "tiny:latest");
        assert_eq!(got[0]["created_at"], "T");
        out.clear();
        t.feed(&bytes[second_start..], &mut out);
        let got = lines(&out);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["message"]["content"], "tasks");
        let last = &got[1];
        assert_eq!(last["done"], true);
        assert_eq!(last["done_reason"], "length");
        assert_eq!(last["message"]["content"], "");
        assert_eq!(last["prompt_eval_count"], 29);
        assert_eq!(last["prompt_eval_duration"], 7_561_000);
        assert_eq!(last["eval_count"], 2);
        assert_eq!(last["eval_duration"], 3_779_000);
        assert_eq!(last["load_duration"], 2_000_000);
        assert!(last["total_duration"].as_u64().is_some());
        // Nothing after the last line.
        out.clear();
        t.end(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn completions_text_becomes_response_and_a_missing_done_still_ends() {
        let mut t = translator(Shape::Generate);
        let mut out = Vec::new();
        t.feed(
            b"data: {\"choices\":[{\"text\":\"adr\",\"index\":0,\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"text\":\"\",\"finish_reason\":\"stop\"}],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":2}}\n\n",
            &mut out,
        );
        t.end(&mut out);
        let got = lines(&out);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["response"], "adr");
        assert_eq!(got[1]["done"], true);
        assert_eq!(got[1]["response"], "");
        assert_eq!(got[1]["done_reason"], "stop");
        assert_eq!(got[1]["eval_count"], 2);
    }

    #[test]
    fn tool_call_deltas_are_assembled() {
        let mut t = translator(Shape::Chat);
        let mut out = Vec::new();
        t.feed(
            concat!(
                "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"ci\"}}]}}]}\n",
                "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"ty\\\":\\\"Paris\\\"}\"}}]}}]}\n",
                "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n",
                "data: [DONE]\n"
            )
            .as_bytes(),
            &mut out,
        );
        let got = lines(&out);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0]["message"]["tool_calls"],
            json!([{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
        );
        assert_eq!(got[1]["done"], true);
        assert_eq!(got[1]["done_reason"], "stop");
    }

    #[test]
    fn an_error_event_becomes_an_error_line_and_ends_the_stream() {
        let mut t = translator(Shape::Chat);
        let mut out = Vec::new();
        t.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"the model process failed while streaming the response\",\"code\":502}}\n\n", &mut out);
        t.end(&mut out);
        let got = lines(&out);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            json!({"error": "the model process failed while streaming the response"})
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut t = translator(Shape::Chat);
        let mut out = Vec::new();
        for chunk in [
            &b"data: {not json\n"[..],
            b"data: []\n",
            b"data: {\"choices\":7}\n",
            b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":99999999999}]}}]}\n",
            b": comment\nevent: x\n\n",
            b"\xff\xfe\n",
        ] {
            t.feed(chunk, &mut out);
        }
        t.end(&mut out);
        let got = lines(&out);
        assert_eq!(got.last().unwrap()["done"], true);
    }
}
