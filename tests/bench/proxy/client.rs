//! A minimal blocking HTTP/1.1 client over one keep-alive connection (TCP
//! on loopback, or a unix socket: a llama-server child of claracore has
//! only that): the request is pre-encoded bytes, the response is read with
//! one buffer (Content-Length, chunked, or to EOF). It adds as little as
//! possible to what is measured, and records when the first response byte
//! arrived.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where a contender listens.
#[derive(Clone, Debug)]
pub enum Addr {
    /// A port on 127.0.0.1.
    Tcp(u16),
    Unix(PathBuf),
}

impl From<u16> for Addr {
    fn from(port: u16) -> Addr {
        Addr::Tcp(port)
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(p) => write!(f, "127.0.0.1:{p}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
    /// When the request was written (after connecting).
    pub sent: Instant,
    /// When the first response byte was read.
    pub first_byte: Instant,
    /// When the last body byte was read.
    pub end: Instant,
    /// When the bytes read first held the connection's mark (see
    /// [`Conn::with_mark`]): a stream's first token, for time to first token.
    pub marked: Option<Instant>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Encodes one request; `Connection: close` when `close`.
pub fn request(method: &str, path: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut r =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: claracore-bench\r\n");
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

pub struct Conn {
    addr: Addr,
    stream: Option<Stream>,
    raw: Vec<u8>,
    timeout: Duration,
    mark: Option<Vec<u8>>,
}

impl Conn {
    pub fn new(addr: impl Into<Addr>) -> Conn {
        Conn {
            addr: addr.into(),
            stream: None,
            raw: Vec::with_capacity(64 * 1024),
            timeout: Duration::from_secs(60),
            mark: None,
        }
    }

    /// Records in [`Resp::marked`] when the response first contains `mark`
    /// (searched in the raw bytes as they arrive, chunk framing included).
    pub fn with_mark(mut self, mark: &[u8]) -> Conn {
        self.mark = Some(mark.to_vec());
        self
    }

    pub fn with_timeout(mut self, t: Duration) -> Conn {
        self.timeout = t;
        self
    }

    fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            self.stream = Some(match &self.addr {
                Addr::Tcp(port) => {
                    let s = TcpStream::connect(("127.0.0.1", *port))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(self.timeout))?;
                    Stream::Tcp(s)
                }
                Addr::Unix(path) => {
                    let s = UnixStream::connect(path)?;
                    s.set_read_timeout(Some(self.timeout))?;
                    Stream::Unix(s)
                }
            });
        }
        Ok(())
    }

    /// Sends `req` and reads the whole response. A reused connection that
    /// the server closed while idle is reopened once.
    pub fn send(&mut self, req: &[u8]) -> io::Result<Resp> {
        let reused = self.stream.is_some();
        match self.try_send(req) {
            Err(e) if reused && self.raw.is_empty() => {
                let _ = e;
                self.stream = None;
                self.try_send(req)
            }
            other => other,
        }
    }

    fn try_send(&mut self, req: &[u8]) -> io::Result<Resp> {
        self.connect()?;
        let result = self.exchange(req);
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn exchange(&mut self, req: &[u8]) -> io::Result<Resp> {
        let stream = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
        self.raw.clear();
        let sent = Instant::now();
        stream.write_all(req)?;
        let mut tmp = [0u8; 64 * 1024];
        let mut first_byte = None;
        let mut marked = None;
        let mark = self.mark.as_deref();
        let mut read = |raw: &mut Vec<u8>, first: &mut Option<Instant>| -> io::Result<usize> {
            let n = stream.read(&mut tmp)?;
            if first.is_none() && n > 0 {
                *first = Some(Instant::now());
            }
            let from = raw.len();
            raw.extend_from_slice(&tmp[..n]);
            if let (None, Some(m)) = (marked, mark) {
                // Search the new bytes and the few before them a mark may straddle.
                if find(&raw[from.saturating_sub(m.len())..], m).is_some() {
                    marked = Some(Instant::now());
                }
            }
            Ok(n)
        };
        // Head.
        let head_end = loop {
            if let Some(i) = find(&self.raw, b"\r\n\r\n") {
                break i + 4;
            }
            if read(&mut self.raw, &mut first_byte)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let head = std::str::from_utf8(&self.raw[..head_end])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad head"))?
            .to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
        let header = |name: &str| {
            head.split("\r\n")
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let length: Option<usize> = header("content-length:").and_then(|v| v.parse().ok());
        let chunked = header("transfer-encoding:").is_some_and(|v| v.contains("chunked"));
        let close = header("connection:").is_some_and(|v| v.contains("close"));
        let mut body = Vec::new();
        if chunked {
            let mut pos = head_end;
            loop {
                let Some(line) = find(&self.raw[pos..], b"\r\n") else {
                    if read(&mut self.raw, &mut first_byte)? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    continue;
                };
                let size_text = std::str::from_utf8(&self.raw[pos..pos + line]).unwrap_or("");
                let size_text = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                let data = pos + line + 2;
                if size == 0 {
                    // No trailers expected: wait for the final CRLF.
                    while self.raw.len() < data + 2 {
                        if read(&mut self.raw, &mut first_byte)? == 0 {
                            break;
                        }
                    }
                    break;
                }
                while self.raw.len() < data + size + 2 {
                    if read(&mut self.raw, &mut first_byte)? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                body.extend_from_slice(&self.raw[data..data + size]);
                pos = data + size + 2;
            }
        } else if let Some(len) = length {
            while self.raw.len() < head_end + len {
                if read(&mut self.raw, &mut first_byte)? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            body.extend_from_slice(&self.raw[head_end..head_end + len]);
        } else if status != 204 && status != 304 {
            while read(&mut self.raw, &mut first_byte)? > 0 {}
            body.extend_from_slice(&self.raw[head_end..]);
        }
        let end = Instant::now();
        if close || (length.is_none() && !chunked) {
            self.stream = None;
        }
        self.raw.clear();
        Ok(Resp {
            status,
            body,
            sent,
            first_byte: first_byte.unwrap_or(end),
            end,
            marked,
        })
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request on a fresh connection.
pub fn once(port: u16, method: &str, path: &str, body: &[u8]) -> io::Result<Resp> {
    Conn::new(port)
        .with_timeout(Duration::from_secs(30))
        .send(&request(method, path, body, true))
}

/// One request on the daemon's local socket (the admin and read routes
/// need it when no key is configured); read to EOF.
pub fn once_unix(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> io::Result<Resp> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let sent = Instant::now();
    s.write_all(&request(method, path, body, true))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = Instant::now();
    let head_end = find(&raw, b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no response head"))?
        + 4;
    let status: u16 = std::str::from_utf8(&raw[..head_end])
        .ok()
        .and_then(|h| h.get(9..12))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    Ok(Resp {
        status,
        body: raw[head_end..].to_vec(),
        sent,
        first_byte: end,
        end,
        marked: None,
    })
}

/// Status of `GET path`, or None if nothing answers; short timeouts, for
/// polling readiness.
pub fn probe(port: u16, path: &str) -> Option<u16> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(&request("GET", path, b"", true)).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
