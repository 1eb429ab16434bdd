#!/usr/bin/env python3
"""A loopback fake of a Hugging Face hub, for the pull tests (stdlib only).

It implements the endpoints claracore's pull uses, as the hub documents them:

  GET /api/models/USER/REPO/tree/REV?recursive=true
      a JSON list of {type, oid, size, path, lfs: {oid (sha256), size,
      pointerSize}}; 404 for an unknown repository
  GET /USER/REPO/resolve/REV/PATH
      302 to a second listener (the "CDN") with X-Repo-Commit,
      X-Linked-Etag (the sha256) and X-Linked-Size; 404 for an unknown file

and on the CDN listener GET /blob/SHA256 with Range (206 + Content-Range).

Repositories are folders: ROOT/USER/REPO/**. A repository folder may hold
  _gated           the repository needs `Authorization: Bearer TOKEN`
                   (401 without one, 403 with a wrong one)
  _extra.json      extra listing entries (e.g. a path-traversal name)
  _lie.json        {path: sha256} advertised instead of the real hash

Faults, set at start or by POST /_control with a JSON object:
  cut_after, cut_times   the CDN closes the connection after cut_after
                         bytes of a body, for the next cut_times bodies
  page_size              the listing is paged with Link rel="next"
  rate                   the CDN sends at most this many bytes a second

GET /_stats on the hub answers the counters the tests check:
  hub_requests, cdn_requests, cdn_bytes, cdn_auth_seen (how many CDN
  requests carried an Authorization header: must stay 0), ranges (the
  Range headers the CDN saw).

  fake_hub.py --root DIR --token TOKEN --ready-file FILE [--cut-after N
              --cut-times M]
writes "HUB_URL CDN_URL" to FILE once both listen (127.0.0.1, free ports),
and serves until killed.
"""
import argparse
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit, parse_qs

COMMIT = "c0ffee" + "0" * 34
STATE = {
    "cut_after": 0,
    "cut_times": 0,
    "page_size": 0,
    "rate": 0,
    "hub_requests": 0,
    "cdn_requests": 0,
    "cdn_bytes": 0,
    "cdn_auth_seen": 0,
    "ranges": [],
}
LOCK = threading.Lock()
HASHES = {}  # real path -> (sha256, size)
BLOBS = {}  # sha256 -> real path


def digest(path):
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        HASHES[key] = h.hexdigest()
    sha = HASHES[key]
    BLOBS[sha] = path
    return sha, st.st_size


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-hub"

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status, obj, headers=()):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class Hub(Handler):
    root = ""
    token = ""
    cdn = ""

    def do_POST(self):
        if self.path == "/_control":
            n = int(self.headers.get("Content-Length", "0"))
            with LOCK:
                STATE.update(json.loads(self.rfile.read(n) or b"{}"))
            return self.send_json(200, {"ok": True})
        self.send_json(404, {"error": "not found"})

    def do_GET(self):
        with LOCK:
            STATE["hub_requests"] += 1
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts == ["_stats"]:
            with LOCK:
                return self.send_json(200, dict(STATE))
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
            return self.tree(parts[2], parts[3], parse_qs(url.query))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(parts[0], parts[1], "/".join(parts[4:]))
        self.send_json(404, {"error": "not found"})

    def repo_dir(self, user, repo):
        d = os.path.join(self.root, user, repo)
        if ".." in (user, repo) or not os.path.isdir(d):
            self.send_json(404, {"error": "Repository not found"},
                           [("X-Error-Code", "RepoNotFound")])
            return None
        if os.path.exists(os.path.join(d, "_gated")):
            auth = self.headers.get("Authorization", "")
            if not auth:
                self.send_json(401, {"error": "Access to this repository is restricted"},
                               [("X-Error-Code", "GatedRepo")])
                return None
            if auth != "Bearer " + self.token:
                self.send_json(403, {"error": "Invalid token"})
                return None
        return d

    def tree(self, user, repo, query):
        d = self.repo_dir(user, repo)
        if d is None:
            return
        lies = {}
        lie_file = os.path.join(d, "_lie.json")
        if os.path.exists(lie_file):
            lies = json.load(open(lie_file))
        entries = []
        for base, _, files in os.walk(d):
            for f in sorted(files):
                if f.startswith("_"):
                    continue
                full = os.path.join(base, f)
                rel = os.path.relpath(full, d)
                sha, size = digest(full)
                entries.append({
                    "type": "file", "oid": hashlib.sha1(rel.encode()).hexdigest(),
                    "size": 134, "path": rel,
                    "lfs": {"oid": lies.get(rel, sha), "size": size, "pointerSize": 134},
                })
        extra = os.path.join(d, "_extra.json")
        if os.path.exists(extra):
            entries += json.load(open(extra))
        entries.sort(key=lambda e: e["path"])
        page_size = STATE["page_size"]
        start = int(query.get("cursor", ["0"])[0])
        headers = []
        if page_size:
            end = start + page_size
            if end < len(entries):
                host = self.headers.get("Host")
                nxt = f"http://{host}{urlsplit(self.path).path}?recursive=true&cursor={end}"
                headers.append(("Link", f'<{nxt}>; rel="next"'))
            entries = entries[start:end]
        self.send_json(200, entries, headers)

    def resolve(self, user, repo, rel):
        d = self.repo_dir(user, repo)
        if d is None:
            return
        full = os.path.normpath(os.path.join(d, rel))
        if not full.startswith(d + os.sep) or not os.path.isfile(full):
            return self.send_json(404, {"error": "Entry not found"},
                                  [("X-Error-Code", "EntryNotFound")])
        sha, size = digest(full)
        self.send_response(302)
        self.send_header("Location", f"{self.cdn}/blob/{sha}")
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(size))
        self.send_header("Content-Length", "0")
        self.end_headers()


class Cdn(Handler):
    def do_GET(self):
        with LOCK:
            STATE["cdn_requests"] += 1
            if self.headers.get("Authorization"):
                STATE["cdn_auth_seen"] += 1
        parts = self.path.split("/")
        path = BLOBS.get(parts[-1]) if len(parts) == 3 and parts[1] == "blob" else None
        if path is None:
            return self.send_json(404, {"error": "no such blob"})
        size = os.path.getsize(path)
        start = 0
        rng = self.headers.get("Range")
        if rng:
            with LOCK:
                STATE["ranges"].append(rng)
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("ETag", f'"{parts[-1]}"')
        self.end_headers()
        with LOCK:
            cut = STATE["cut_after"] if STATE["cut_times"] > 0 else 0
            if cut:
                STATE["cut_times"] -= 1
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                if cut and sent + len(chunk) >= cut:
                    self.wfile.write(chunk[: cut - sent])
                    self.wfile.flush()
                    with LOCK:
                        STATE["cdn_bytes"] += cut - sent
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                if STATE["rate"]:
                    time.sleep(len(chunk) / STATE["rate"])
                with LOCK:
                    STATE["cdn_bytes"] += len(chunk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--token", default="hf_test_token")
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--cut-after", type=int, default=0)
    ap.add_argument("--cut-times", type=int, default=0)
    args = ap.parse_args()
    STATE["cut_after"], STATE["cut_times"] = args.cut_after, args.cut_times
    cdn = ThreadingHTTPServer(("127.0.0.1", 0), Cdn)
    Hub.root = os.path.abspath(args.root)
    Hub.token = args.token
    Hub.cdn = f"http://127.0.0.1:{cdn.server_address[1]}"
    hub = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    for s in (cdn, hub):
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"http://127.0.0.1:{hub.server_address[1]} {Hub.cdn}\n")
    os.rename(tmp, args.ready_file)
    threading.Event().wait()


if __name__ == "__main__":
    main()
