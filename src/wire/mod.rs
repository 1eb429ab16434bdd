//! Wire formats read and written in more than one place, typed once: the
//! SSE line splitter ([`sse`]), the OpenAI-compatible request, answer and
//! stream-chunk shapes ([`openai`]) and query strings ([`query`]). A leaf: it knows nothing of the
//! daemon, so the history tap, the API's translations and the CLI share it.

pub mod openai;
pub mod query;
pub mod sse;
