#!/usr/bin/env python3
"""Fake llama-server for claracore's fault-injection tests (stdlib only).

The daemon spawns it like a real llama-server, e.g.

    python3 tests/tools/fake_upstream.py --port 12345 --mode ok
    python3 tests/tools/fake_upstream.py --socket /run/x/f-1.sock

and polls ``GET /health`` until it answers 200. With ``--socket`` it listens
on that unix socket instead of 127.0.0.1:PORT (``--port`` is then ignored).

Endpoints
    GET  /health                 200 {"status":"ok"} (subject to --mode)
    POST /v1/chat/completions    OpenAI chat completion (with "tools": a call of
                                 the first tool, as a tool-capable model
                                 answers); "stream": true gives
    POST /v1/completions         SSE over chunked encoding, one chunk per token
                                 (max_tokens tokens, default 5), echoing "model"
    POST /v1/embeddings          a fixed 3-dimensional embedding
    GET|POST /echo, /echo-headers
                                 JSON of method, path, query, headers (lower-cased
                                 names) and the number of body bytes received
    GET  /slow?ms=N              sleeps N ms, then 200
    anything else                404 JSON

Modes (--mode)
    ok                     normal
    exit-on-start          after --start-delay-ms, print a model-load error to
                           stderr and exit 1 without ever listening
    never-healthy          listens, but /health is always 503 "Loading model"
    slow-start             /health is 503 until --start-delay-ms after start
    ignore-sigterm         SIGTERM is ignored (stop it with SIGKILL)
    hang-mid-stream        streams send 2 chunks (fewer if max_tokens < 2), then
                           hang without closing; /health still answers
    die-mid-stream         streams send 2 chunks (likewise), then the process
                           exits 3
    die-after-ready        the process exits 4 --die-after-ms after start
    unhealthy-after-ready  /health is 200 for --healthy-ms after start, then 500

Other fault hooks
    --port-in-use-first    the first run (no --marker file yet) creates the
                           marker and fails like llama-server on a taken port
    --drop-reused          a POST that arrives on a connection which already
                           answered a request is read, then the connection is
                           closed without an answer (a server closing an idle
                           keep-alive connection as a request goes out on it)
    X-Fake-Record: FILE    request header; appends "METHOD PATH" to FILE when
                           the request arrives, and "cancelled PATH" when the
                           client goes away during a streamed response, or
                           during a non-streamed one's --chunk-delay-ms per
                           token of "generation"

Times "after start" count from when this script begins running. The record
file's PATH is the request target as received, query string included.
SIGTERM exits 0 promptly (except in ignore-sigterm mode). Logs go to stderr,
one line per request; the start-up line is also printed to stdout.
"""

import argparse
import json
import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
MODES = (
    "ok",
    "exit-on-start",
    "never-healthy",
    "slow-start",
    "ignore-sigterm",
    "hang-mid-stream",
    "die-mid-stream",
    "die-after-ready",
    "unhealthy-after-ready",
)
# In the *-mid-stream modes the fault strikes after this many chunks.
STREAM_FAULT_AFTER_CHUNKS = 2
# Exit codes of the modes that make the process die.
EXIT_DIE_MID_STREAM = 3
EXIT_DIE_AFTER_READY = 4
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
ECHO_PATHS = ("/echo", "/echo-headers")
LOADING = {"error": {"code": 503, "message": "Loading model"}}
UNHEALTHY = {"error": {"code": 500, "message": "simulated failure after ready"}}

START = time.monotonic()
_record_lock = threading.Lock()


def log(message):
    sys.stderr.write(f"fake-upstream: {message}\n")
    sys.stderr.flush()


def elapsed_ms():
    return (time.monotonic() - START) * 1000


def write_pid_file(path):
    """Write our PID atomically, so a poller never reads a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def record(path, line):
    with _record_lock, open(path, "a") as f:
        f.write(line + "\n")


def to_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def usage(completion_tokens):
    return {
        "prompt_tokens": 3,
        "completion_tokens": completion_tokens,
        "total_tokens": completion_tokens + 3,
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-upstream"

    # --- plumbing -------------------------------------------------------

    def address_string(self):
        # A unix socket's peer has no address.
        return self.client_address[0] if self.client_address else "unix"

    def log_message(self, format, *args):
        log(f"{self.address_string()} {format % args}")

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def dispatch(self):
        url = urlsplit(self.path)
        record_file = self.headers.get("X-Fake-Record")
        if record_file:
            record(record_file, f"{self.command} {self.path}")
        # /echo counts the body itself; everything else reads it up front so
        # that keep-alive connections stay in sync whatever the route.
        body = b"" if url.path in ECHO_PATHS else b"".join(self.iter_body())
        answered = getattr(self, "answered", 0)
        self.answered = answered + 1
        if self.server.config.drop_reused and self.command == "POST" and answered > 0:
            log(f"dropping a {self.command} {self.path} on a reused connection")
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return

        if url.path in ECHO_PATHS:
            self.echo(url)
        elif self.command == "GET" and url.path == "/health":
            self.health()
        elif self.command == "GET" and url.path == "/slow":
            self.slow(url)
        elif self.command == "POST" and url.path in COMPLETION_PATHS:
            self.completion(body, record_file)
        elif self.command == "POST" and url.path == "/v1/embeddings":
            self.embeddings(body)
        else:
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found"}})

    def iter_body(self):
        """Yield the request body piece by piece (Content-Length or chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()  # CRLF after the chunk data
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            piece = self.rfile.read(min(remaining, 65536))
            if not piece:
                return
            remaining -= len(piece)
            yield piece

    def send_json(self, status, obj):
        data = to_json(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def parse_json(self, body):
        try:
            obj = json.loads(body or b"{}")
        except ValueError as e:
            self.send_json(400, {"error": {"code": 400, "message": f"invalid JSON: {e}"}})
            return None
        if not isinstance(obj, dict):
            self.send_json(400, {"error": {"code": 400, "message": "expected a JSON object"}})
            return None
        return obj

    # --- routes ---------------------------------------------------------

    def health(self):
        config = self.server.config
        if config.mode == "never-healthy" or (
            config.mode == "slow-start" and elapsed_ms() < config.start_delay_ms
        ):
            self.send_json(503, LOADING)
        elif config.mode == "unhealthy-after-ready" and elapsed_ms() >= config.healthy_ms:
            self.send_json(500, UNHEALTHY)
        else:
            self.send_json(200, {"status": "ok"})

    def slow(self, url):
        ms = int(parse_qs(url.query).get("ms", ["0"])[0])
        time.sleep(ms / 1000)
        self.send_json(200, {"slept_ms": ms})

    def echo(self, url):
        body_length = sum(len(piece) for piece in self.iter_body())
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.send_json(200, {
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": headers,
            "body_length": body_length,
        })

    def embeddings(self, body):
        request = self.parse_json(body)
        if request is None:
            return
        self.send_json(200, {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": request.get("model"),
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        })

    def completion(self, body, record_file):
        request = self.parse_json(body)
        if request is None:
            return
        model = request.get("model")
        n = request.get("max_tokens")
        n = 5 if n is None else int(n)
        if request.get("tools"):
            self.tool_call(model, request, bool(request.get("stream")))
            return
        if request.get("stream"):
            self.stream(model, n, record_file)
            return
        # Like llama-server, "generate" for --chunk-delay-ms per token and
        # stop early when the client has gone away meanwhile.
        delay = self.server.config.chunk_delay_ms / 1000
        for _ in range(n if delay else 0):
            if self.client_left_within(delay):
                self.close_connection = True
                log(f"completion of {self.path} cancelled: client went away")
                if record_file:
                    record(record_file, f"cancelled {self.path}")
                return
        self.send_json(200, {
            "id": "fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(f"tok{i}" for i in range(n))},
                "finish_reason": "length",
            }],
            "usage": usage(n),
        })

    def tool_call(self, model, request, stream):
        """What a tool-capable model does (the tiny random model cannot):
        think, then call the first tool with "Paris" for each required
        string parameter; streamed as llama-server streams it, the
        arguments in two pieces."""
        fn = request["tools"][0].get("function", {})
        params = fn.get("parameters", {})
        args = to_json({k: "Paris" for k in params.get("required", [])}).decode()
        name = fn.get("name", "")
        if not stream:
            self.send_json(200, {
                "id": "fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": "", "reasoning_content": "the user wants weather",
                    "tool_calls": [{"id": "call_1", "type": "function",
                                    "function": {"name": name, "arguments": args}}]}}],
                "usage": usage(3),
            })
            return
        def chunk(delta, finish=None, **extra):
            obj = {"id": "fake", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return b"data: " + to_json(obj) + b"\n\n"
        half = len(args) // 2
        events = [
            chunk({"role": "assistant", "reasoning_content": "the user wants weather"}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": name, "arguments": args[:half]}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[half:]}}]}),
            chunk({}, "tool_calls", usage=usage(3)),
            b"data: [DONE]\n\n",
        ]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for e in events:
            self.write_chunk(e)
        self.write_chunk(b"")

    def stream(self, model, n, record_file):
        def event(obj):
            return b"data: " + to_json(obj) + b"\n\n"

        def chunk(**fields):
            return event({"id": "fake", "object": "chat.completion.chunk", "model": model, **fields})

        events = [chunk(choices=[{"index": 0, "delta": {"content": f"tok{i} "}}]) for i in range(n)]
        events.append(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}], usage=usage(n)))
        events.append(b"data: [DONE]\n\n")

        mode = self.server.config.mode
        fault_at = min(STREAM_FAULT_AFTER_CHUNKS, n) if mode.endswith("-mid-stream") else None
        delay = self.server.config.chunk_delay_ms / 1000

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, data in enumerate(events):
                if i == fault_at:
                    if mode == "die-mid-stream":
                        log(f"die-mid-stream: exiting {EXIT_DIE_MID_STREAM} after {i} chunks")
                        os._exit(EXIT_DIE_MID_STREAM)
                    log(f"hang-mid-stream: hanging after {i} chunks")
                    self.wait_for_client_to_leave()
                    self.stream_cancelled(record_file, "client went away while we hung")
                    return
                if i and delay:
                    time.sleep(delay)
                self.write_chunk(data)
            self.write_chunk(b"")
        except ConnectionError as e:
            self.stream_cancelled(record_file, e)

    def stream_cancelled(self, record_file, reason):
        self.close_connection = True
        log(f"stream of {self.path} cancelled: {reason}")
        if record_file:
            record(record_file, f"cancelled {self.path}")

    def client_left_within(self, seconds):
        """Waits up to `seconds`; True as soon as the client closes."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], left)
            if not readable:
                return False
            try:
                if not self.connection.recv(1, socket.MSG_PEEK):
                    return True
            except ConnectionError:
                return True
            time.sleep(left)  # bytes of a next request: not ours to read yet
        return False

    def wait_for_client_to_leave(self):
        """Block, sending nothing, until the client closes the connection."""
        while True:
            readable, _, _ = select.select([self.connection], [], [], 1.0)
            if not readable:
                continue
            try:
                if not self.connection.recv(1, socket.MSG_PEEK):
                    return
            except ConnectionError:
                return
            time.sleep(1.0)  # client sent more bytes; they are not ours to read


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config):
        super().__init__((HOST, config.port), Handler)
        self.config = config


class FakeUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, config):
        super().__init__(config.socket, Handler)
        self.config = config


def parse_args():
    p = argparse.ArgumentParser(description="Fake llama-server for fault-injection tests.")
    p.add_argument("--port", type=int, help="port to listen on (127.0.0.1)")
    p.add_argument("--socket", help="unix socket to listen on instead of a port")
    p.add_argument("--mode", choices=MODES, default="ok", help="fault to inject (default: ok)")
    p.add_argument("--start-delay-ms", type=int, default=100,
                   help="exit-on-start: delay before exiting; slow-start: time until healthy (default: 100)")
    p.add_argument("--chunk-delay-ms", type=int, default=0,
                   help="sleep between streamed chunks (default: 0)")
    p.add_argument("--die-after-ms", type=int, default=1000,
                   help="die-after-ready: exit this long after start (default: 1000)")
    p.add_argument("--healthy-ms", type=int, default=1000,
                   help="unhealthy-after-ready: /health is 200 this long after start (default: 1000)")
    p.add_argument("--pid-file", help="write our PID here once listening (or just before exit-on-start exits)")
    p.add_argument("--port-in-use-first", action="store_true",
                   help="if --marker does not exist, create it and fail as if the port were taken")
    p.add_argument("--marker", help="marker file for --port-in-use-first")
    p.add_argument("--drop-reused", action="store_true",
                   help="close a reused connection instead of answering a POST on it")
    args = p.parse_args()
    if args.port_in_use_first and not args.marker:
        p.error("--port-in-use-first requires --marker")
    if args.port is None and args.socket is None:
        p.error("give --port or --socket")
    return args


def fail_bind(port):
    log(f"couldn't bind HTTP server socket, hostname: {HOST}, port: {port}")
    sys.exit(1)


def exit_on_sigterm(signum, frame):
    log("received SIGTERM, exiting")
    os._exit(0)


def die_after_ready(ms):
    log(f"die-after-ready: exiting {EXIT_DIE_AFTER_READY} after {ms} ms")
    os._exit(EXIT_DIE_AFTER_READY)


def main():
    args = parse_args()
    if args.mode == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, exit_on_sigterm)

    if args.mode == "exit-on-start":
        time.sleep(args.start_delay_ms / 1000)
        if args.pid_file:
            write_pid_file(args.pid_file)
        log("error: failed to load model 'x': simulated")
        sys.exit(1)

    if args.port_in_use_first and not os.path.exists(args.marker):
        open(args.marker, "w").close()
        fail_bind(args.port)

    try:
        server = FakeUnixServer(args) if args.socket else FakeServer(args)
    except OSError:
        fail_bind(args.socket or args.port)

    if args.pid_file:
        write_pid_file(args.pid_file)
    if args.mode == "die-after-ready":
        remaining_s = max(0.0, args.die_after_ms - elapsed_ms()) / 1000
        timer = threading.Timer(remaining_s, die_after_ready, args=(args.die_after_ms,))
        timer.daemon = True
        timer.start()

    where = f"unix:{args.socket}" if args.socket else f"{HOST}:{args.port}"
    banner = f"listening on {where} mode={args.mode}"
    log(banner)
    print(f"fake-upstream: {banner}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
