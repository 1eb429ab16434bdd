#!/usr/bin/env python3
"""Sends the same Ollama API requests to claracore's /api/* routes and to a
real Ollama serving the same GGUF, and prints every difference in the
answers' shape: keys only one side has, and values of different JSON types
(number, string, bool, null, object, array). Values themselves differ (the
model's text, digests, timings) and are not compared, except the status.

    eval "$(tests/tools/setup-test-deps.sh)"; eval "$(tests/tools/install-peers.sh)"
    $CLARACORE_TEST_PYTHON tests/tools/compare-ollama-api.py \\
        --claracore target/release/claracore --ollama "$CLARACORE_BENCH_OLLAMA" \\
        --llama-server "$CLARACORE_TEST_LLAMA_SERVER" --model "$CLARACORE_TEST_MODEL"

Both daemons run on loopback in a temporary directory and are stopped at the
end (their process groups, by pid). Only the standard library is used.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, method, path, body=None, stream=False):
    """(status, parsed JSON or list of NDJSON objects for a stream, raw text)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = json.dumps(body).encode() if body is not None else None
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    raw = r.read().decode("utf-8", "replace")
    c.close()
    if stream:
        lines = [json.loads(l) for l in raw.splitlines() if l.strip()]
        return r.status, lines, raw
    try:
        return r.status, json.loads(raw), raw
    except ValueError:
        return r.status, None, raw


def kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def diff(a, b, path, out):
    """Shape differences between a (claracore) and b (Ollama) under path."""
    ka, kb = kind(a), kind(b)
    if ka != kb:
        out.append(f"{path}: claracore {ka}, ollama {kb}")
        return
    if ka == "object":
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}"
            if k not in b:
                out.append(f"{p}: only claracore ({kind(a[k])})")
            elif k not in a:
                out.append(f"{p}: only ollama ({kind(b[k])})")
            else:
                diff(a[k], b[k], p, out)
    elif ka == "array" and a and b:
        diff(a[0], b[0], f"{path}[0]", out)
    elif ka == "array" and bool(a) != bool(b):
        out.append(f"{path}: claracore {len(a)} items, ollama {len(b)} items")


def start(cmd, log, env=None, cwd=None):
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )


def wait_http(port, path, proc, what):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited")
        try:
            if call(port, "GET", path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"{what} did not answer on {path}")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--claracore", required=True)
    ap.add_argument("--ollama", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="claracore-ollama-api-")
    procs = []
    try:
        # claracore: the chat model and the same GGUF with --embeddings
        # (llama-server serves embeddings only with that flag) and mean
        # pooling (its OpenAI endpoint refuses the GGUF's default, none).
        cc_port = free_port()
        args_chat = '["-c", "512", "-t", "1"]'
        config = (
            f'listen = ["127.0.0.1:{cc_port}"]\nstate_dir = {json.dumps(work + "/cc-state")}\n'
            f"llama_server = {json.dumps(args.llama_server)}\n"
            f'[models.tiny]\nmodel = {json.dumps(args.model)}\nargs = {args_chat}\n'
            f'[models.tiny-embed]\nmodel = {json.dumps(args.model)}\n'
            f'args = ["-c", "512", "-t", "1", "--embeddings", "--pooling", "mean"]\n'
        )
        with open(f"{work}/claracore.toml", "w") as f:
            f.write(config)
        cc = start([args.claracore, "serve", "--config", f"{work}/claracore.toml"],
                   open(f"{work}/claracore.log", "w"))
        procs.append(cc)

        # Ollama: its own home and store, loopback, models from the GGUF.
        ol_port = free_port()
        os.makedirs(f"{work}/home")
        env = {
            "PATH": "/usr/bin:/bin", "HOME": f"{work}/home",
            "OLLAMA_HOST": f"127.0.0.1:{ol_port}", "OLLAMA_MODELS": f"{work}/models",
            "OLLAMA_NO_CLOUD": "1", "OLLAMA_KEEP_ALIVE": "-1",
        }
        ol = start([args.ollama, "serve"], open(f"{work}/ollama.log", "w"), env=env)
        procs.append(ol)
        wait_http(cc_port, "/ready", cc, "claracore")
        wait_http(ol_port, "/", ol, "ollama")
        shutil.copy(args.model, f"{work}/tiny.gguf")
        with open(f"{work}/Modelfile", "w") as f:
            f.write("FROM ./tiny.gguf\nPARAMETER num_ctx 512\nPARAMETER num_thread 1\n")
        for name in ("tiny", "tiny-embed"):
            subprocess.run([args.ollama, "create", name, "-f", "Modelfile"], env=env,
                           cwd=work, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

        msgs = [{"role": "user", "content": "hi"}]
        opts = {"num_predict": 4, "seed": 1, "temperature": 0}
        cases = [
            ("GET /api/version", "GET", "/api/version", None, False),
            ("GET /api/tags", "GET", "/api/tags", None, False),
            ("POST /api/show", "POST", "/api/show", {"model": "tiny"}, False),
            ("POST /api/generate, model only (load)", "POST", "/api/generate",
             {"model": "tiny"}, False),
            ("GET /api/ps", "GET", "/api/ps", None, False),
            ("POST /api/chat", "POST", "/api/chat",
             {"model": "tiny", "messages": msgs, "stream": False, "options": opts}, False),
            ("POST /api/chat, streamed", "POST", "/api/chat",
             {"model": "tiny", "messages": msgs, "options": opts}, True),
            ("POST /api/generate", "POST", "/api/generate",
             {"model": "tiny", "prompt": "hi", "stream": False, "options": opts}, False),
            ("POST /api/generate, streamed", "POST", "/api/generate",
             {"model": "tiny", "prompt": "hi", "options": opts}, True),
            ("POST /api/generate, raw", "POST", "/api/generate",
             {"model": "tiny", "prompt": "hi", "raw": True, "stream": False,
              "options": opts}, False),
            ("POST /api/chat, format json", "POST", "/api/chat",
             {"model": "tiny", "messages": msgs, "stream": False, "format": "json",
              "options": opts}, False),
            ("POST /api/embed", "POST", "/api/embed",
             {"model": "tiny-embed", "input": "hello"}, False),
            ("POST /api/embed, list", "POST", "/api/embed",
             {"model": "tiny-embed", "input": ["hello", "world"]}, False),
            ("POST /api/embeddings", "POST", "/api/embeddings",
             {"model": "tiny-embed", "prompt": "hello"}, False),
            ("POST /api/chat, unknown model", "POST", "/api/chat",
             {"model": "no-such-model", "messages": msgs, "stream": False}, False),
            ("POST /api/chat, bad option type", "POST", "/api/chat",
             {"model": "tiny", "messages": msgs, "stream": False,
              "options": {"temperature": "hot"}}, False),
            ("POST /api/generate, keep_alive 0 (unload)", "POST", "/api/generate",
             {"model": "tiny", "keep_alive": 0}, False),
        ]
        total = 0
        for title, method, path, body, stream in cases:
            sa, a, ra = call(cc_port, method, path, body, stream)
            sb, b, rb = call(ol_port, method, path, body, stream)
            out = []
            if sa != sb:
                out.append(f"status: claracore {sa}, ollama {sb}")
            if stream and isinstance(a, list) and isinstance(b, list) and a and b:
                diff(a[0], b[0], "first line", out)
                diff(a[-1], b[-1], "last line", out)
                if len(a) > 1 and len(b) > 1:
                    diff(a[1], b[1], "second line", out)
            elif a is None or b is None:
                if (a is None) != (b is None):
                    out.append(f"body: claracore {ra[:80]!r}, ollama {rb[:80]!r}")
            else:
                diff(a, b, "body", out)
            total += len(out)
            print(f"## {title}: {'same keys and types' if not out else f'{len(out)} differences'}")
            for line in out:
                print(f"- {line}")
            if sa >= 400 or sb >= 400:
                print(f"  (claracore: {ra.strip()[:160]}; ollama: {rb.strip()[:160]})")
        print(f"\n{total} differences in {len(cases)} requests")
    finally:
        for p in procs:
            stop(p)
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
