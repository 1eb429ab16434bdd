//! Server-sent events, read line by line as the bytes arrive: [`Lines`]
//! cuts a byte stream into lines over chunks of any size, and [`data`]
//! picks out a `data:` line's payload. Every SSE reader in the crate (the
//! history tap, the Ollama translation, `claracore run`) uses these.
//!
//! Invariant of [`Lines`]: it holds at most one incomplete line (the bytes
//! after the last newline seen), never more than its limit; a line that
//! outgrows the limit is dropped whole, up to its newline, and the reader
//! is told. A line that fits in one chunk is handed out as a slice of that
//! chunk, uncopied; only a line split across chunks is joined in the
//! buffer, which is reused.

/// The payload that ends an OpenAI stream.
pub const DONE: &[u8] = b"[DONE]";

/// A byte stream cut into lines (without their `\n` or `\r\n`).
#[derive(Debug)]
pub struct Lines {
    /// The incomplete last line.
    partial: Vec<u8>,
    limit: usize,
    /// Inside a line that outgrew the limit: skip to its newline.
    skipping: bool,
    /// Some line outgrew the limit since the last [`Lines::take_overlong`].
    overlong: bool,
}

impl Default for Lines {
    /// Lines of up to 16 MiB.
    fn default() -> Lines {
        Lines::with_limit(16 * 1024 * 1024)
    }
}

impl Lines {
    /// Lines longer than `limit` bytes are dropped.
    pub fn with_limit(limit: usize) -> Lines {
        Lines {
            partial: Vec::new(),
            limit,
            skipping: false,
            overlong: false,
        }
    }

    /// The complete lines in `data` (after what earlier chunks left), one
    /// at a time; the rest waits for the next chunk.
    pub fn split<'a>(&'a mut self, data: &'a [u8]) -> Split<'a> {
        Split {
            lines: self,
            rest: data,
            joined: false,
        }
    }

    /// Calls `each` with every complete line in `data`.
    pub fn feed(&mut self, data: &[u8], mut each: impl FnMut(&[u8])) {
        let mut split = self.split(data);
        while let Some(line) = split.next_line() {
            each(line);
        }
    }

    /// The stream ended: its last line, if it had no newline.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let skipped = std::mem::take(&mut self.skipping);
        let last = std::mem::take(&mut self.partial);
        (!skipped && !last.is_empty()).then_some(last)
    }

    /// Whether a line outgrew the limit since the last call.
    pub fn take_overlong(&mut self) -> bool {
        std::mem::take(&mut self.overlong)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Keeps `tail` (no newline in it) for the next chunk.
    fn keep(&mut self, tail: &[u8]) {
        if self.skipping || tail.is_empty() {
            return;
        }
        if self.partial.len() + tail.len() > self.limit {
            self.partial.clear();
            self.skipping = true;
            self.overlong = true;
        } else {
            self.partial.extend_from_slice(tail);
        }
    }
}

/// The lines of one chunk; a lending iterator, since a line joined across
/// chunks lives in [`Lines`]' buffer. Dropping it keeps the chunk's
/// unfinished tail for the next one.
pub struct Split<'a> {
    lines: &'a mut Lines,
    rest: &'a [u8],
    /// The last line handed out was joined in the buffer (clear it first).
    joined: bool,
}

impl Split<'_> {
    /// The next complete line, without its `\n` or `\r\n`.
    pub fn next_line(&mut self) -> Option<&[u8]> {
        if std::mem::take(&mut self.joined) {
            self.lines.partial.clear();
        }
        loop {
            let nl = memchr::memchr(b'\n', self.rest)?;
            let (head, tail) = self.rest.split_at(nl);
            self.rest = &tail[1..];
            if std::mem::take(&mut self.lines.skipping) {
                continue;
            }
            let line = if self.lines.partial.is_empty() {
                head
            } else if self.lines.partial.len() + head.len() > self.lines.limit {
                self.lines.partial.clear();
                self.lines.overlong = true;
                continue;
            } else {
                self.lines.partial.extend_from_slice(head);
                self.joined = true;
                &self.lines.partial
            };
            return Some(line.strip_suffix(b"\r").unwrap_or(line));
        }
    }
}

impl Drop for Split<'_> {
    fn drop(&mut self) {
        if self.joined {
            self.lines.partial.clear();
        }
        let rest = std::mem::take(&mut self.rest);
        self.lines.keep(rest);
    }
}

/// A `data:` line's payload, trimmed of ASCII whitespace; `None` for any
/// other line (comments, `event:`, `id:`, blank lines).
pub fn data(line: &[u8]) -> Option<&[u8]> {
    line.strip_prefix(b"data:").map(<[u8]>::trim_ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(lines: &mut Lines, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        lines.feed(data, |l| out.push(String::from_utf8_lossy(l).into_owned()));
        out
    }

    #[test]
    fn lines_wait_for_their_end_across_frames() {
        let mut l = Lines::default();
        assert!(collect(&mut l, b"data: {\"a\"").is_empty());
        // A UTF-8 character split between frames.
        assert!(collect(&mut l, b": \"\xc3").is_empty());
        assert_eq!(
            collect(&mut l, b"\xa9\"}\r\n\ndata: [DO"),
            ["data: {\"a\": \"é\"}", ""]
        );
        assert_eq!(collect(&mut l, b"NE]\n"), ["data: [DONE]"]);
        assert_eq!(l.finish(), None);
    }

    #[test]
    fn a_line_in_one_chunk_is_not_copied_and_the_tail_waits() {
        let mut l = Lines::default();
        let chunk = b"a\nbc\nd";
        let mut split = l.split(chunk);
        let first = split.next_line().unwrap().as_ptr();
        assert_eq!(first, chunk.as_ptr());
        assert_eq!(split.next_line(), Some(&b"bc"[..]));
        assert_eq!(split.next_line(), None);
        drop(split);
        assert_eq!(l.finish().as_deref(), Some(&b"d"[..]));
    }

    #[test]
    fn an_overlong_line_is_dropped_whole_and_reported() {
        let mut l = Lines::with_limit(4);
        assert!(collect(&mut l, b"abc").is_empty());
        assert!(collect(&mut l, b"de").is_empty());
        assert!(l.take_overlong());
        assert!(!l.take_overlong());
        assert_eq!(collect(&mut l, b"fgh\nok\n"), ["ok"]);
        // Joined at its newline beyond the limit.
        assert!(collect(&mut l, b"xyz").is_empty());
        assert_eq!(collect(&mut l, b"zz\nok\n"), ["ok"]);
        assert!(l.take_overlong());
        assert!(collect(&mut l, b"abcdefgh").is_empty());
        assert_eq!(l.finish(), None);
    }

    #[test]
    fn data_payloads_are_trimmed() {
        assert_eq!(data(b"data: {\"a\":1} "), Some(&b"{\"a\":1}"[..]));
        assert_eq!(data(b"data:[DONE]"), Some(DONE));
        assert_eq!(data(b"data:"), Some(&b""[..]));
        assert_eq!(data(b"event: x"), None);
        assert_eq!(data(b": keep-alive"), None);
    }
}
