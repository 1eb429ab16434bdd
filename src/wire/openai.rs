//! The OpenAI-compatible shapes a child answers in, typed once: the chat
//! request `claracore run` sends, and [`Reply`], one answer or one stream
//! chunk, read by the history tap, the Ollama translation and the CLI.
//!
//! [`Reply`] is the union of what those readers need from the families a
//! child speaks, told apart by their fields:
//!
//! | API | text | counts |
//! |---|---|---|
//! | OpenAI chat/completions | `choices[0].message.content` / `.delta.content` / `.text` | `usage.prompt_tokens`, `completion_tokens` |
//! | llama.cpp `/completion`, `/infill` | `content` (a stream piece or the whole), `stop`, `stop_type` | `timings` |
//! | Anthropic messages | `content[].text`; stream: `content_block_delta` `delta.text` | `usage.input_tokens` (+ cache reads and writes), `output_tokens`; stream: `message_start` `message.usage`, `message_delta` `usage` |
//! | OpenAI Responses | `output[].content[]` `output_text`; stream: `response.output_text.delta` `delta` | `usage.input_tokens` (cached included), `output_tokens`; stream: `response.completed` `response.usage` |
//!
//! plus `count_tokens`' top-level `input_tokens`, and llama.cpp's
//! `timings` wherever they are. Unknown fields are skipped unparsed (the
//! upstreams add fields freely); a known field of the wrong type makes the
//! whole object unreadable, which each reader treats as "nothing here".
//! Strings borrow from the bytes read unless they contain escapes, so a
//! stream chunk is read without allocating for its text.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Number, Value};

/// A string read from JSON: borrowed from the bytes read unless it has
/// escapes. (serde borrows a bare `Cow` field, never one in an `Option`
/// or a list, hence this type.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text<'a>, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }

            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// Who says a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One plain-text chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
}

/// `POST /v1/chat/completions` as `claracore run` sends it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [ChatMessage],
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
}

/// One answer or one stream chunk (see the table above).
#[derive(Debug, Default, Deserialize)]
pub struct Reply<'a> {
    #[serde(default, borrow)]
    pub choices: Vec<Choice<'a>>,
    pub usage: Option<Usage>,
    pub timings: Option<Timings>,
    #[serde(borrow)]
    pub error: Option<ErrorBody<'a>>,
    /// A stream event's type (Anthropic, Responses).
    #[serde(rename = "type", borrow)]
    pub kind: Option<Text<'a>>,
    /// Anthropic's content blocks, or llama.cpp's own `/completion` and
    /// `/infill` text (whole, or a stream event's piece).
    #[serde(borrow)]
    pub content: Option<Content<'a>>,
    /// llama.cpp's own answers: whether generation stopped, and why
    /// (`limit`: the token budget ran out).
    pub stop: Option<bool>,
    #[serde(borrow)]
    pub stop_type: Option<Text<'a>>,
    /// The Responses API's output items.
    #[serde(default, borrow)]
    pub output: Vec<OutputItem<'a>>,
    /// A stream delta: Anthropic's object, the Responses API's string.
    #[serde(borrow)]
    pub delta: Option<Delta<'a>>,
    /// Anthropic's `message_start` message.
    pub message: Option<Nested>,
    /// The Responses API's `response.completed` response.
    pub response: Option<Nested>,
    /// count_tokens' answer.
    pub input_tokens: Option<i64>,
}

impl<'a> Reply<'a> {
    /// The first choice's text: `part` (message or delta) content, else the
    /// completions API's `text`.
    fn choice_text(
        &self,
        part: for<'c> fn(&'c Choice<'a>) -> Option<&'c Message<'a>>,
    ) -> Option<&str> {
        let first = self.choices.first()?;
        part(first)
            .and_then(|m| m.content.as_deref())
            .or(first.text.as_deref())
    }

    /// The text a stream chunk adds, in any of the families.
    pub fn stream_text(&self) -> Option<&str> {
        match (self.kind.as_deref(), &self.delta) {
            (Some("content_block_delta"), Some(Delta::Block { text })) => text.as_deref(),
            (Some("response.output_text.delta"), Some(Delta::Text(text))) => Some(text),
            _ => match &self.content {
                Some(Content::Text(text)) => Some(text),
                _ => self.choice_text(|c| c.delta.as_ref()),
            },
        }
    }

    /// A whole answer's text, in pieces, in any of the families.
    pub fn texts(&self) -> Vec<&str> {
        if let Some(text) = self.choice_text(|c| c.message.as_ref()) {
            return vec![text];
        }
        let blocks = match &self.content {
            Some(Content::Text(text)) => return vec![text],
            Some(Content::Blocks(blocks)) => blocks.as_slice(),
            None => &[],
        };
        let blocks = blocks.iter().filter(|b| b.kind.as_deref() == Some("text"));
        let outputs = self
            .output
            .iter()
            .flat_map(|o| &o.content)
            .filter(|b| b.kind.as_deref() == Some("output_text"));
        blocks
            .chain(outputs)
            .filter_map(|b| b.text.as_deref())
            .collect()
    }

    /// An OpenAI answer's (or chunk's) text: the first choice's message or
    /// delta content, else its completions `text`, else llama.cpp's own
    /// `content`.
    pub fn openai_text(&self) -> &str {
        let first = self.choices.first();
        first
            .and_then(|c| c.message.as_ref().or(c.delta.as_ref()))
            .and_then(|m| m.content.as_deref())
            .or_else(|| first.and_then(|c| c.text.as_deref()))
            .or(match &self.content {
                Some(Content::Text(text)) => Some(text),
                _ => None,
            })
            .unwrap_or("")
    }

    /// The first choice's message (answer) or delta (chunk).
    pub fn first_message(&self) -> Option<&Message<'a>> {
        let first = self.choices.first()?;
        first.message.as_ref().or(first.delta.as_ref())
    }

    /// Why generation ended, in OpenAI's words (`stop`, `length`, …), if
    /// this answer or chunk says; llama.cpp's own `stop_type` is mapped.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
            .or_else(|| {
                self.stop_type
                    .as_deref()
                    .map(|t| if t == "limit" { "length" } else { "stop" })
            })
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct Choice<'a> {
    #[serde(borrow)]
    pub message: Option<Message<'a>>,
    #[serde(borrow)]
    pub delta: Option<Message<'a>>,
    /// The completions API's text.
    #[serde(borrow)]
    pub text: Option<Text<'a>>,
    #[serde(borrow)]
    pub finish_reason: Option<Text<'a>>,
}

/// A choice's message, or a stream chunk's delta of one.
#[derive(Debug, Default, Deserialize)]
pub struct Message<'a> {
    #[serde(borrow)]
    pub content: Option<Text<'a>>,
    /// llama.cpp's thinking text, apart from the answer.
    #[serde(borrow)]
    pub reasoning_content: Option<Text<'a>>,
    #[serde(borrow)]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
}

/// A tool call, whole or (streamed) in pieces that share an `index`.
#[derive(Debug, Default, Deserialize)]
pub struct ToolCall<'a> {
    pub index: Option<u64>,
    #[serde(borrow)]
    pub function: Option<FunctionCall<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct FunctionCall<'a> {
    #[serde(borrow)]
    pub name: Option<Text<'a>>,
    #[serde(borrow)]
    pub arguments: Option<Arguments<'a>>,
}

/// A call's arguments: OpenAI's JSON text (or a streamed piece of it);
/// some servers send the object itself.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Arguments<'a> {
    Text(#[serde(borrow)] Text<'a>),
    Object(Map<String, Value>),
    Other(serde::de::IgnoredAny),
}

/// An Anthropic content block or a Responses content part.
#[derive(Debug, Deserialize)]
pub struct Block<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Text<'a>>,
    #[serde(borrow)]
    pub text: Option<Text<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content<'a> {
    Text(#[serde(borrow)] Text<'a>),
    Blocks(#[serde(borrow)] Vec<Block<'a>>),
}

#[derive(Debug, Deserialize)]
pub struct OutputItem<'a> {
    #[serde(default, borrow)]
    pub content: Vec<Block<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Delta<'a> {
    Text(#[serde(borrow)] Text<'a>),
    Block {
        #[serde(borrow)]
        text: Option<Text<'a>>,
    },
}

/// An object that carries `usage` one level down.
#[derive(Debug, Deserialize)]
pub struct Nested {
    pub usage: Option<Usage>,
}

/// Token counts in OpenAI's, Anthropic's and the Responses API's names.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct Usage {
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub prompt_tokens_details: Option<PromptDetails>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub input_tokens_details: Option<PromptDetails>,
    pub cache_read_input_tokens: Option<i64>,
    pub cache_creation_input_tokens: Option<i64>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct PromptDetails {
    pub cached_tokens: Option<i64>,
}

/// llama-server's own per-request figures.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct Timings {
    pub prompt_n: Option<i64>,
    pub cache_n: Option<i64>,
    pub predicted_n: Option<i64>,
    pub prompt_ms: Option<f64>,
    pub predicted_ms: Option<f64>,
    pub prompt_per_second: Option<f64>,
    pub predicted_per_second: Option<f64>,
}

/// An error answer or stream event's `error`: OpenAI's object with a
/// `message`, a bare string, or anything else.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ErrorBody<'a> {
    Object {
        #[serde(borrow)]
        message: Text<'a>,
    },
    Text(#[serde(borrow)] Text<'a>),
    Other(Value),
}

impl ErrorBody<'_> {
    /// The object's `message`.
    pub fn message(&self) -> Option<&str> {
        match self {
            ErrorBody::Object { message } => Some(message),
            _ => None,
        }
    }

    /// The message, or the bare string.
    pub fn text(&self) -> Option<&str> {
        match self {
            ErrorBody::Object { message } | ErrorBody::Text(message) => Some(message),
            ErrorBody::Other(_) => None,
        }
    }

    /// The message, else the error as the JSON it came as.
    pub fn describe(&self) -> String {
        match self {
            ErrorBody::Object { message } => message.to_string(),
            ErrorBody::Text(text) => Value::String(text.to_string()).to_string(),
            ErrorBody::Other(v) => v.to_string(),
        }
    }
}

/// An error answer: `{"error": …}`, other fields skipped.
#[derive(Debug, Deserialize)]
pub struct ErrorReply<'a> {
    #[serde(borrow)]
    pub error: Option<ErrorBody<'a>>,
}

/// `GET /v1/models`' answer, as `claracore list` reads it.
#[derive(Debug, Deserialize)]
pub struct ModelList {
    pub data: Vec<ModelEntry>,
}

/// One model of the list: OpenAI's `id`, and claracore's `aliases` and
/// `state` (`loading` while it starts).
#[derive(Debug, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub state: String,
    /// Where it was defined (absent from older daemons: `config`).
    #[serde(default)]
    pub source: SourceKind,
}

/// The `kind` of a model's `source` object (`config`, `folder`, `pulled`,
/// `ollama`); the rest of the object is for JSON readers.
#[derive(Debug, Deserialize)]
pub struct SourceKind {
    pub kind: String,
}

impl Default for SourceKind {
    fn default() -> SourceKind {
        SourceKind {
            kind: "config".into(),
        }
    }
}

/// `POST /v1/embeddings`' answer.
#[derive(Debug, Deserialize)]
pub struct Embeddings {
    pub data: Option<Vec<Embedding>>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
pub struct Embedding {
    pub index: Option<u64>,
    /// Numbers kept as sent (integer or float), since they are passed on.
    pub embedding: Option<Vec<Number>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_borrow_their_text_and_skip_unknown_fields() {
        let chunk = br#"{"id":"x","choices":[{"index":0,"delta":{"content":"hi","extra":[1]},"finish_reason":null}],"object":"chat.completion.chunk","new_field":{"a":1}}"#;
        let r: Reply<'_> = serde_json::from_slice(chunk).unwrap();
        assert_eq!(r.stream_text(), Some("hi"));
        assert!(matches!(
            r.choices[0].delta.as_ref().unwrap().content,
            Some(Text(Cow::Borrowed(_)))
        ));
        // Escapes make it owned.
        let r: Reply<'_> =
            serde_json::from_str(r#"{"choices":[{"delta":{"content":"a\nb"}}]}"#).unwrap();
        assert_eq!(r.stream_text(), Some("a\nb"));
        assert_eq!(r.finish_reason(), None);
    }

    #[test]
    fn llama_cpps_own_answers_say_why_they_stopped() {
        let r: Reply<'_> =
            serde_json::from_str(r#"{"content":"x","stop":true,"stop_type":"limit"}"#).unwrap();
        assert_eq!((r.openai_text(), r.stop), ("x", Some(true)));
        assert_eq!(r.finish_reason(), Some("length"));
    }

    #[test]
    fn errors_are_objects_strings_or_anything() {
        fn e(s: &str) -> Option<ErrorBody<'_>> {
            serde_json::from_str::<ErrorReply<'_>>(s).unwrap().error
        }
        let object = e(r#"{"error":{"message":"m","code":1}}"#).unwrap();
        assert_eq!(
            (object.message(), object.describe()),
            (Some("m"), "m".into())
        );
        let text = e(r#"{"error":"plain"}"#).unwrap();
        assert_eq!((text.message(), text.text()), (None, Some("plain")));
        assert_eq!(text.describe(), "\"plain\"");
        let other = e(r#"{"error":{"code":5}}"#).unwrap();
        assert_eq!(
            (other.text(), other.describe()),
            (None, r#"{"code":5}"#.into())
        );
    }

    #[test]
    fn the_chat_request_leaves_out_what_is_not_set() {
        let messages = [ChatMessage::new(Role::User, "hi")];
        let r = ChatRequest {
            model: "m",
            messages: &messages,
            stream: true,
            temperature: None,
            max_tokens: Some(4),
            seed: None,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                               "stream": true, "max_tokens": 4})
        );
    }
}
