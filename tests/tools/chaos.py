#!/usr/bin/env python3
"""The chaos soak (issue 17): steady mixed traffic against the real daemon
and real llama-server children while a chaos loop breaks things, then the
invariants, printed as figures. Run it through tests/tools/chaos.sh, which
prepares the dependencies, builds the daemon, mounts the small tmpfs for
the history disk and removes everything afterwards.

Python standard library only. Everything it starts it stops by PID; traffic
goes to loopback and the unix socket only, and stops by itself.

What it does:
- holds the daemon's sockets itself (TCP on 127.0.0.1:0 and the local unix
  socket) and passes them as fds 3 and 4 the way systemd's socket
  activation does, so a restarted daemon serves the same port and clients
  queue in the backlog while it is down, as under claracore.socket;
- runs CLIENTS threads of mixed requests, each with a unique x-request-id:
  chat and Ollama chat, streamed (with and without usage) and not, clients
  that leave mid-stream or before the answer, and bad requests;
- a chaos loop (seeded: --seed replays the schedule) that SIGKILLs a
  child, SIGSTOPs one past the health checks, reloads the config adding or
  removing a fourth model, fills the history tmpfs and frees it, and once
  SIGKILLs the daemon and starts it again;
- monitors /health, the daemon's RSS and every llama-server process that
  runs this soak's models;
- at the end SIGTERMs the daemon and checks, from the SQLite file, that
  every answer the clients saw has exactly one row with its status and
  token counts.
"""

import argparse
import errno
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

# The supervisor's health check (src/supervisor/mod.rs): a ready child is
# killed after HEALTH_FAILURES consecutive failed pings, each of which may
# wait PROBE_TIMEOUT_S, one every health_interval.
HEALTH_FAILURES = 3
PROBE_TIMEOUT_S = 5.0
HEALTH_INTERVAL_S = 1.0
# Worst case from SIGSTOP to the kill: a tick, then three probes that time
# out with an interval between them.
HEALTH_KILL_BOUND_S = HEALTH_FAILURES * (PROBE_TIMEOUT_S + HEALTH_INTERVAL_S) + 1.0
STOP_HOLD_S = HEALTH_KILL_BOUND_S + 5.0
BATCH_WINDOW_MS = 50
# Rows of requests that ended this long before the daemon's SIGKILL may be
# lost: the batch window plus the time a commit takes.
KILL_WINDOW_S = BATCH_WINDOW_MS / 1000.0 + 0.5
# A disk-full period may drop rows of requests that ended shortly before it
# (their batch fails) and after it (until the writer's next commit).
FULL_BEFORE_S = 1.0
FULL_AFTER_S = 2.0
# An unowned llama-server younger than this may be one whose daemon was
# just SIGKILLed and that PR_SET_PDEATHSIG is about to kill.
ORPHAN_GRACE_S = 3.0
CLIENT_TIMEOUT_S = 90.0
MODELS = ["a", "b", "c"]
EXTRA_MODEL = "d"


def log(msg):
    print(f"chaos: {msg}", file=sys.stderr, flush=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


# --- /proc -------------------------------------------------------------------


def proc_stat(pid):
    """(state, ppid) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return rest[0], int(rest[1])


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def soak_llama_servers(exe, marker):
    """{pid: (state, ppid, cmdline)} of llama-server processes running this
    soak's models (their argv names a file under the work directory; other
    sessions on the machine run the same binary)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.readlink(f"/proc/{pid}/exe") != exe:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker not in cmdline:
            continue
        st = proc_stat(pid)
        if st:
            found[pid] = (st[0], st[1], cmdline)
    return found


def model_of(cmdline, work):
    for m in MODELS + [EXTRA_MODEL]:
        if f"{work}/models/{m}.gguf" in cmdline:
            return m
    return "?"


# --- the daemon ----------------------------------------------------------------


class Daemon:
    """The daemon under test, socket-activated with sockets this process
    keeps across restarts."""

    def __init__(self, args, tcp, unix):
        self.args = args
        self.tcp = tcp
        self.unix = unix
        self.proc = None
        self.lives = []  # [pid, started, ended]
        self.lock = threading.Lock()

    @property
    def pid(self):
        p = self.proc
        return p.pid if p else None

    def start(self):
        n = len(self.lives)
        logf = open(os.path.join(self.args.work, f"daemon.{n}.log"), "wb")
        # Above any fd this process might have at 3 and 4, so the dup2s in
        # the child cannot clobber one another.
        hi_tcp = os.dup2(self.tcp.fileno(), 100, inheritable=False)
        hi_unix = os.dup2(self.unix.fileno(), 101, inheritable=False)

        def activate():
            os.dup2(hi_tcp, 3)
            os.dup2(hi_unix, 4)

        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LISTEN_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env.update(
            LISTEN_FDS="2",
            LISTEN_FDNAMES="http:local",
            RUNTIME_DIRECTORY=os.path.join(self.args.work, "run"),
            CLARACORE_LOG="info",
            NO_COLOR="1",
        )
        t0 = time.time()
        proc = subprocess.Popen(
            [self.args.bin, "serve", "--config", self.args.config],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            env=env,
            close_fds=False,
            preexec_fn=activate,
        )
        os.close(hi_tcp)
        os.close(hi_unix)
        logf.close()
        with self.lock:
            self.proc = proc
            self.lives.append([proc.pid, t0, None])
        with open(os.path.join(self.args.work, "daemon.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited at start ({proc.returncode}); see daemon.{n}.log")
            try:
                status, _ = self.admin("GET", "/live", timeout=2)
                if status == 200:
                    return time.time() - t0
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("daemon not live within 60 s")

    def admin(self, method, path, timeout=10):
        conn = UnixHTTPConnection(self.args.socket, timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def dropped(self):
        """claracore_history_rows_dropped_total, or None."""
        try:
            status, body = self.admin("GET", "/metrics", timeout=5)
        except OSError:
            return None
        if status != 200:
            return None
        for line in body.decode().splitlines():
            if line.startswith("claracore_history_rows_dropped_total "):
                return int(float(line.split()[1]))
        return None

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def mark_ended(self):
        with self.lock:
            if self.lives and self.lives[-1][2] is None:
                self.lives[-1][2] = time.time()


# --- traffic -------------------------------------------------------------------

KINDS = [
    ("chat", 26),
    ("stream_usage", 22),
    ("stream_plain", 8),
    ("stream_leave", 12),
    ("leave_early", 4),
    ("ollama_chat", 8),
    ("bad_json", 5),
    ("unknown_model", 5),
    ("bad_messages", 4),
    ("extra_model", 6),
]

WORDS = "the quick brown fox jumps over a lazy dog while seven cats watch quietly".split()


class Clients:
    def __init__(self, args, port, seed):
        self.args = args
        self.port = port
        self.seed = seed
        self.records = []
        self.stop = threading.Event()
        self.threads = []

    def run(self, n, max_per_client):
        for i in range(n):
            rng = random.Random(self.seed * 1000 + i + 1)
            t = threading.Thread(target=self.client, args=(i, rng, max_per_client), daemon=True)
            t.start()
            self.threads.append(t)

    def client(self, idx, rng, max_requests):
        names, weights = zip(*KINDS)
        for n in range(max_requests):
            if self.stop.is_set():
                return
            kind = rng.choices(names, weights)[0]
            rec = {
                "rid": f"chaos-{self.seed}-{idx}-{n}",
                "kind": kind,
                "status": None,
                "usage": None,
                "complete": False,
                "error": None,
                "left": kind in ("stream_leave", "leave_early"),
            }
            try:
                self.one(rng, rec)
            except Exception as e:  # noqa: BLE001 -- every failure is a figure
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["t_end"] = time.time()
            self.records.append(rec)
            time.sleep(rng.uniform(0, 0.15))

    def one(self, rng, rec):
        kind = rec["kind"]
        model = rng.choice(MODELS)
        if kind == "extra_model":
            model = EXTRA_MODEL
        rec["model"] = model
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        max_tokens = rng.randint(1, 24)
        path = "/v1/chat/completions"
        stream = kind.startswith("stream")
        if kind == "ollama_chat":
            path = "/api/chat"
            body = json.dumps(
                {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "stream": False,
                    "options": {"num_predict": max_tokens},
                }
            )
        elif kind == "bad_json":
            body = '{"model": "a", "messages": [}'
        elif kind == "unknown_model":
            model = rec["model"] = f"nope-{rng.randint(0, 99)}"
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]})
        elif kind == "bad_messages":
            body = json.dumps({"model": model, "messages": "not a list", "max_tokens": 2})
        else:
            req = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "stream": stream,
            }
            if kind in ("stream_usage", "stream_leave"):
                req["stream_options"] = {"include_usage": True}
            body = json.dumps(req)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)
        rec["t_start"] = time.time()
        try:
            conn.request(
                "POST",
                path,
                body=body.encode(),
                headers={"content-type": "application/json", "x-request-id": rec["rid"]},
            )
            if kind == "leave_early":
                # Gone before the answer: the daemon may be waiting for the
                # model or generating.
                time.sleep(rng.uniform(0, 0.3))
                return
            resp = conn.getresponse()
            rec["status"] = resp.status
            rec["t_status"] = time.time()
            echoed = resp.getheader("x-request-id")
            if echoed != rec["rid"]:
                rec["error"] = f"x-request-id echoed as {echoed!r}"
            if not stream or resp.status != 200:
                data = resp.read()
                rec["complete"] = True
                if resp.status == 200:
                    doc = json.loads(data)
                    if kind == "ollama_chat":
                        if "prompt_eval_count" in doc:
                            rec["usage"] = (doc.get("prompt_eval_count"), doc.get("eval_count"))
                    elif "usage" in doc:
                        rec["usage"] = (doc["usage"].get("prompt_tokens"), doc["usage"].get("completion_tokens"))
                return
            leave_after = rng.randint(1, 3) if kind == "stream_leave" else None
            events = 0
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    rec["complete"] = True
                    break
                events += 1
                try:
                    doc = json.loads(data)
                except ValueError:
                    continue
                if isinstance(doc.get("usage"), dict):
                    rec["usage"] = (doc["usage"].get("prompt_tokens"), doc["usage"].get("completion_tokens"))
                if leave_after is not None and events >= leave_after:
                    rec["left_after_events"] = events
                    return
        finally:
            conn.close()


# --- monitors ------------------------------------------------------------------


class Monitor:
    """/health every 200 ms over TCP; the daemon's RSS and the soak's
    llama-server processes every 500 ms."""

    def __init__(self, args, port, daemon):
        self.args = args
        self.port = port
        self.daemon = daemon
        self.stop = threading.Event()
        self.health_ok = []
        self.health_fail = 0
        self.rss = []  # (t, pid, kib)
        self.unowned_since = {}
        self.orphans = {}  # pid -> (first seen, cmdline, ppid)
        self.max_children = 0
        self.max_stopped = 0

    def start(self):
        for target in (self.health_loop, self.proc_loop):
            threading.Thread(target=target, daemon=True).start()

    def health_loop(self):
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.health_ok.append(time.time())
                else:
                    self.health_fail += 1
            except (OSError, http.client.HTTPException):
                self.health_fail += 1
            finally:
                conn.close()
            self.stop.wait(0.2)

    def proc_loop(self):
        while not self.stop.is_set():
            self.scan()
            self.stop.wait(0.5)

    def scan(self):
        pid = self.daemon.pid
        now = time.time()
        if pid:
            kib = rss_kib(pid)
            if kib:
                self.rss.append((now, pid, kib))
        procs = soak_llama_servers(self.args.llama_exe, self.args.marker)
        owned = [p for p, (_, ppid, _) in procs.items() if ppid == pid]
        self.max_children = max(self.max_children, len(owned))
        self.max_stopped = max(self.max_stopped, sum(1 for s, _, _ in procs.values() if s == "T"))
        for p, (state, ppid, cmdline) in procs.items():
            if ppid == pid:
                self.unowned_since.pop(p, None)
                continue
            first = self.unowned_since.setdefault(p, now)
            if now - first >= ORPHAN_GRACE_S and p not in self.orphans:
                self.orphans[p] = (first, cmdline, ppid, state)
                log(f"ORPHAN llama-server pid {p} (ppid {ppid}, state {state}) not owned by the daemon {pid}")
        for p in list(self.unowned_since):
            if p not in procs:
                del self.unowned_since[p]

    def longest_health_gap(self, t_from, t_to):
        times = [t_from] + [t for t in self.health_ok if t_from <= t <= t_to] + [t_to]
        best, at = 0.0, t_from
        for a, b in zip(times, times[1:]):
            if b - a > best:
                best, at = b - a, a
        return best, at


# --- chaos ---------------------------------------------------------------------


class Chaos:
    def __init__(self, args, daemon, rng, t0):
        self.args = args
        self.daemon = daemon
        self.rng = rng
        self.t0 = t0
        self.actions = []  # dicts
        self.extra_present = False
        self.full_periods = []  # (start, end)
        self.kills = []  # daemon SIGKILLs: dict
        self.dropped_before_kills = 0
        self.stopped = []  # dicts per SIGSTOP
        self.reloads = []  # dicts
        self.fill_bit = []  # per disk-full period: rows dropped meanwhile (None: unknown)
        self.last_truncated = None
        self.dropped_at_fill = None

    def rel(self, t):
        return t - self.t0

    def children(self, wait_s=8.0):
        deadline = time.time() + wait_s
        while True:
            pid = self.daemon.pid
            procs = soak_llama_servers(self.args.llama_exe, self.args.marker)
            owned = {p: v for p, v in procs.items() if v[1] == pid and v[0] != "T"}
            if owned or time.time() > deadline:
                return owned
            time.sleep(0.1)

    def run(self, schedule):
        for delay, action in schedule:
            time.sleep(delay)
            t = time.time()
            result = getattr(self, action)()
            result.update(action=action, at=self.rel(t))
            self.actions.append(result)
            log(f"{self.rel(t):6.1f}s {action}: {json.dumps({k: v for k, v in result.items() if k not in ('action', 'at')})}")

    def kill_child(self):
        procs = self.children()
        if not procs:
            return {"skipped": "no running child"}
        pid = self.rng.choice(sorted(procs))
        model = model_of(procs[pid][2], self.args.work)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return {"skipped": "child gone"}
        return {"pid": pid, "model": model}

    def ready_pids(self):
        try:
            status, body = self.daemon.admin("GET", "/admin/ps", timeout=5)
            if status == 200:
                return {m["pid"] for m in json.loads(body)["models"] if m.get("state") == "ready" and m.get("pid")}
        except (OSError, ValueError, KeyError):
            pass
        return set()

    def stop_child(self):
        # A ready child: the health checks watch those. One stopped while
        # it loads is bounded by start_timeout instead (60 s here).
        deadline = time.time() + 10
        while True:
            procs = self.children(wait_s=0)
            ready = self.ready_pids() & set(procs)
            if ready or time.time() > deadline:
                break
            time.sleep(0.1)
        if not ready:
            return {"skipped": "no ready child"}
        pid = self.rng.choice(sorted(ready))
        model = model_of(procs[pid][2], self.args.work)
        cmdline = procs[pid][2]
        t = time.time()
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return {"skipped": "child gone"}
        killed_after = None
        while time.time() - t < STOP_HOLD_S:
            st = proc_stat(pid)
            if st is None or st[0] == "Z":
                killed_after = time.time() - t
                break
            time.sleep(0.1)
        if killed_after is None:
            procs = soak_llama_servers(self.args.llama_exe, self.args.marker)
            # Only the process this loop stopped, never a reused pid.
            if pid in procs and procs[pid][2] == cmdline:
                os.kill(pid, signal.SIGCONT)
        r = {"pid": pid, "model": model, "killed_by_claracore_after_s": killed_after}
        self.stopped.append(r)
        return r

    def write_config(self, extra):
        text = self.args.config_base
        if extra:
            text += model_table(self.args, EXTRA_MODEL)
        tmp = self.args.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.args.config)

    def reload(self):
        want = not self.extra_present
        self.write_config(want)
        t = time.time()
        self.daemon.signal(signal.SIGHUP)
        applied = None
        while time.time() - t < 10:
            try:
                status, body = self.daemon.admin("GET", "/health", timeout=5)
                if status == 200 and (EXTRA_MODEL in json.loads(body)["models"]) == want:
                    applied = time.time() - t
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        self.extra_present = want
        r = {"model": EXTRA_MODEL, "added" if want else "removed": True, "applied_after_s": applied}
        self.reloads.append(r)
        return r

    def truncate_wal(self):
        """Checkpoints the database's WAL into it and truncates the WAL to
        zero bytes, as `sqlite3 history.db 'PRAGMA wal_checkpoint(TRUNCATE)'`
        would. Without it a full disk rarely bites: SQLite rewrites its WAL
        from the start after each checkpoint, in space it already holds, so
        only the first fills of a run made writes fail."""
        try:
            conn = sqlite3.connect(os.path.join(self.args.state, "history.db"), timeout=5)
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.close()
            return busy == 0
        except sqlite3.Error:
            return False

    def fill(self):
        """Fills the history tmpfs with a file; returns (start, MiB)."""
        filler = os.path.join(self.args.state, "filler")
        self.last_truncated = self.truncate_wal()
        self.dropped_at_fill = self.daemon.dropped()
        t = time.time()
        written = 0
        chunk = b"\0" * (1 << 20)
        with open(filler, "wb", buffering=0) as f:
            while True:
                try:
                    written += f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    # The last partial megabyte too.
                    try:
                        while True:
                            written += f.write(b"\0" * 4096)
                    except OSError:
                        pass
                    break
        return t, round(written / (1 << 20), 1)

    def free(self, t):
        os.unlink(os.path.join(self.args.state, "filler"))
        end = time.time()
        self.full_periods.append((t, end))
        # Whether writes failed meanwhile: the metric grew (one daemon life;
        # a kill in between resets it, so then it is unknown).
        time.sleep(0.5)
        after = self.daemon.dropped()
        before = self.dropped_at_fill
        self.fill_bit.append(None if before is None or after is None or after < before else after > before)
        return round(end - t, 1)

    def fill_disk(self):
        if not self.args.tmpfs:
            return {"skipped": "the history directory is not a tmpfs this run could mount (needs root)"}
        t, mib = self.fill()
        time.sleep(self.rng.uniform(3, 6))
        held = self.free(t)
        return {"filled_mib": mib, "held_s": held, "wal_truncated": self.last_truncated, "rows_dropped": self.fill_bit[-1]}

    def kill_daemon(self):
        # The smoke always, the full run by the seed's choice: the daemon is
        # killed, and starts again, while the history disk is full.
        full = self.args.tmpfs and (self.args.smoke or self.rng.random() < 0.5)
        dropped = self.daemon.dropped()
        if dropped is not None:
            self.dropped_before_kills += dropped
        if full:
            t_full, mib = self.fill()
        pid = self.daemon.pid
        kids = [p for p, v in soak_llama_servers(self.args.llama_exe, self.args.marker).items() if v[1] == pid]
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        self.daemon.proc.wait()
        self.daemon.mark_ended()
        gone_after = None
        while time.time() - t < 5:
            if all(proc_stat(k) is None or proc_stat(k)[0] == "Z" for k in kids):
                gone_after = time.time() - t
                break
            time.sleep(0.02)
        left = [k for k in kids if proc_stat(k) is not None and proc_stat(k)[0] != "Z"]
        start_error = None
        try:
            restart_s = self.daemon.start()
        except RuntimeError as e:
            # Recorded as a failure; the soak goes on with the disk freed.
            start_error = str(e)
            restart_s = None
        r = {
            "pid": pid,
            "disk_full": full,
            "children": len(kids),
            "children_gone_after_s": None if gone_after is None else round(gone_after, 3),
            "children_left": left,
            "restarted_in_s": None if restart_s is None else round(restart_s, 2),
            "start_error": start_error,
            "dropped_metric_before": dropped,
            "t": t,
        }
        if full:
            # The new life's metric starts at zero.
            self.dropped_at_fill = 0
            time.sleep(2)
            r["filled_mib"] = mib
            r["full_for_s"] = self.free(t_full)
        if start_error:
            t_retry = time.time()
            try:
                self.daemon.start()
            except RuntimeError as e:
                r["second_start_error"] = str(e)
            r["second_start_after_s"] = round(time.time() - t_retry, 2)
        self.kills.append(r)
        return r


def schedule_for(args, rng):
    """(delay, action) pairs. The smoke does each action once (two child
    kills, a reload each way) in a seeded order; the full run picks actions
    at random intervals and SIGKILLs the daemon once, in its middle third."""
    if args.smoke:
        acts = ["kill_child", "stop_child", "reload", "fill_disk", "kill_daemon", "reload", "kill_child"]
        rng.shuffle(acts)
        return [(rng.uniform(1.5, 4.0), a) for a in acts]
    plan, t = [], 0.0
    kill_at = rng.uniform(args.duration / 3, 2 * args.duration / 3)
    killed = False
    budget = args.duration - STOP_HOLD_S - 10
    choices = ["kill_child"] * 4 + ["stop_child"] + ["reload"] * 3 + ["fill_disk"] * 2
    while True:
        delay = rng.uniform(3, 12)
        t += delay
        if t > budget:
            break
        if not killed and t >= kill_at:
            plan.append((delay, "kill_daemon"))
            killed = True
            continue
        a = rng.choice(choices)
        plan.append((delay, a))
        t += STOP_HOLD_S if a == "stop_child" else 6 if a == "fill_disk" else 1
    if not killed:
        plan.append((1.0, "kill_daemon"))
    return plan


def model_table(args, name):
    return (
        f'\n[models.{name}]\nmodel = "{args.work}/models/{name}.gguf"\n'
        'args = ["-c", "512", "-t", "1"]\n'
    )


# --- the checks ----------------------------------------------------------------


class Checks:
    def __init__(self):
        self.results = []

    def check(self, ok, text):
        self.results.append((ok, text))
        print(f"{'PASS' if ok else 'FAIL'}  {text}", flush=True)

    def summary(self):
        passed = sum(1 for ok, _ in self.results if ok)
        failed = len(self.results) - passed
        print(f"{passed} passed, {failed} failed", flush=True)
        return failed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--llama-server", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tmpfs", action="store_true", help="the state directory is a tmpfs this run may fill")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-requests", type=int, default=None, help="per client")
    p.add_argument("--health-gap-s", type=float, default=5.0)
    p.add_argument("--rss-limit-mib", type=float, default=256)
    args = p.parse_args()
    if args.smoke and args.duration == 600:
        args.duration = 75
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1 << 31)
    if args.max_requests is None:
        args.max_requests = int(args.duration * 12)
    args.work = os.path.realpath(args.work)
    args.llama_exe = os.path.realpath(args.llama_server)
    args.marker = f"{args.work}/models/"
    args.state = os.path.join(args.work, "state")
    args.socket = os.path.join(args.work, "claracore.sock")
    args.config = os.path.join(args.work, "config.toml")
    os.makedirs(os.path.join(args.work, "models"), exist_ok=True)
    os.makedirs(os.path.join(args.work, "run"), mode=0o700, exist_ok=True)
    for m in MODELS + [EXTRA_MODEL]:
        link = os.path.join(args.work, "models", f"{m}.gguf")
        if not os.path.lexists(link):
            os.symlink(os.path.realpath(args.model), link)

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1024)
    port = tcp.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(args.socket)
    unix.listen(128)

    args.config_base = (
        f'listen = ["127.0.0.1:{port}", "unix:{args.socket}"]\n'
        f'llama_server = "{args.llama_server}"\n'
        f'state_dir = "{args.state}"\n'
        "[scheduler]\nmax_loaded = 2\nidle_ttl = \"1s\"\n"
        f'health_interval = "{int(HEALTH_INTERVAL_S)}s"\nstop_grace = "2s"\n'
        'shutdown_timeout = "15s"\nstart_timeout = "60s"\n'
        f'[history]\nbatch_window = "{BATCH_WINDOW_MS}ms"\n'
    ) + "".join(model_table(args, m) for m in MODELS)

    rng = random.Random(args.seed)
    schedule = schedule_for(args, rng)
    log(
        f"seed {args.seed} (--seed {args.seed} replays this schedule), "
        f"{'smoke, ' if args.smoke else ''}{args.duration:.0f} s of traffic, {args.clients} clients, "
        f"history on {'a tmpfs' if args.tmpfs else 'a plain directory (disk-full chaos skipped)'}, work {args.work}"
    )
    log("schedule: " + ", ".join(f"+{d:.1f}s {a}" for d, a in schedule))

    daemon = Daemon(args, tcp, unix)
    chaos = None
    monitor = None
    clients = None
    checks = Checks()
    exit_code = None
    final_left = None
    stop_s = None
    try:
        Chaos(args, daemon, rng, 0).write_config(False)
        daemon.start()
        t0 = time.time()
        monitor = Monitor(args, port, daemon)
        monitor.start()
        clients = Clients(args, port, args.seed)
        clients.run(args.clients, args.max_requests)
        chaos = Chaos(args, daemon, rng, t0)
        chaos_thread = threading.Thread(target=chaos.run, args=(schedule,), daemon=True)
        chaos_thread.start()
        # Traffic runs for the duration and at least until the chaos loop is
        # done, bounded either way.
        hard_end = t0 + args.duration + 120
        while time.time() < hard_end and (time.time() < t0 + args.duration or chaos_thread.is_alive()):
            time.sleep(0.5)
        clients.stop.set()
        for t in clients.threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)
        chaos_thread.join(timeout=STOP_HOLD_S + 30)
        # Let the last rows and TTL stops settle, then read the metric the
        # daemon's final life kept.
        time.sleep(2)
        dropped_last = daemon.dropped()
        t_term = time.time()
        monitor.stop.set()
        daemon.signal(signal.SIGTERM)
        try:
            exit_code = daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            exit_code = "did not exit within 30 s"
        stop_s = time.time() - t_term
        daemon.mark_ended()
        deadline = time.time() + 3
        while True:
            final_left = [
                p
                for p, v in soak_llama_servers(args.llama_exe, args.marker).items()
                if v[0] != "Z"
            ]
            if not final_left or time.time() > deadline:
                break
            time.sleep(0.05)
    finally:
        if clients:
            clients.stop.set()
        if monitor:
            monitor.stop.set()
        if daemon.proc and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()

    # --- figures and invariants ---
    recs = clients.records
    db_path = os.path.join(args.state, "history.db")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    integrity = conn.execute("PRAGMA integrity_check").fetchall()
    rows = {}
    for rid, status, outcome, pt, ct, fin in conn.execute(
        "SELECT request_id, status, outcome, prompt_tokens, completion_tokens, finished_at_ms FROM requests"
    ):
        rows.setdefault(rid, []).append((status, outcome, pt, ct, fin))
    events = conn.execute("SELECT event, reason, count(*) FROM model_events GROUP BY event, reason").fetchall()
    stop_reasons = {}
    for s in chaos.stopped:
        row = conn.execute(
            "SELECT event || '/' || coalesce(reason, '-') FROM model_events WHERE pid = ? AND event IN ('crashed', 'stopped') ORDER BY id DESC LIMIT 1",
            (s["pid"],),
        ).fetchone()
        stop_reasons[row[0] if row else "no event"] = stop_reasons.get(row[0] if row else "no event", 0) + 1
    conn.close()

    kill_t = [k["t"] for k in chaos.kills]

    def near_kill(r):
        # In flight at a daemon SIGKILL, or ended within the batch window
        # before it: its row may be lost.
        return any(r["t_start"] - 0.05 <= k and r["t_end"] >= k - KILL_WINDOW_S for k in kill_t) if "t_start" in r else False

    def while_full(r):
        return any(s - FULL_BEFORE_S <= r["t_end"] <= e + FULL_AFTER_S for s, e in chaos.full_periods)

    by_status = {}
    for r in recs:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    answered = [r for r in recs if r["status"] is not None]
    unanswered = [r for r in recs if r["status"] is None]
    left = [r for r in recs if r["kind"] == "leave_early"]
    cut = [r for r in answered if not r["complete"] and not r["left"]]
    print(
        f"chaos soak: seed {args.seed}, {time.time() - t0:.0f} s in all, {len(recs)} requests sent by "
        f"{args.clients} clients; statuses "
        + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items(), key=lambda kv: str(kv[0])))
        + f"; {len(cut)} answers cut short by the chaos, {sum(1 for r in recs if r['left'])} clients left on purpose"
    )
    counts = {}
    for a in chaos.actions:
        key = a["action"] + (" (skipped)" if "skipped" in a else "")
        counts[key] = counts.get(key, 0) + 1
    print("chaos actions: " + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items())))
    print("model events: " + ", ".join(f"{e}/{r or '-'} ×{n}" for e, r, n in events))

    # 1. Every answer the clients saw: exactly one row, same status, same
    # tokens where the client saw usage.
    exempt = [r for r in answered if near_kill(r)]
    checked = [r for r in answered if not near_kill(r)]
    missing = [r for r in checked if len(rows.get(r["rid"], [])) == 0]
    missing_full = [r for r in missing if while_full(r)]
    missing_unexplained = [r for r in missing if not while_full(r)]
    dupes = [r for r in recs if len(rows.get(r["rid"], [])) > 1]
    wrong_status = [
        r for r in answered if len(rows.get(r["rid"], [])) == 1 and rows[r["rid"]][0][0] != r["status"]
    ]
    with_usage = [r for r in answered if r["usage"] and len(rows.get(r["rid"], [])) == 1]
    wrong_tokens = [
        r for r in with_usage if (rows[r["rid"]][0][2], rows[r["rid"]][0][3]) != tuple(r["usage"])
    ]
    exempt_lost = [r for r in exempt if not rows.get(r["rid"])]
    checks.check(
        not missing_unexplained and not dupes,
        f"answered requests with exactly one row: {len(checked) - len(missing)}/{len(checked)}"
        f" (missing while the disk was full: {len(missing_full)}, missing otherwise: {len(missing_unexplained)},"
        f" duplicated: {len(dupes)}); near the daemon SIGKILL, counted apart: {len(exempt)},"
        f" of them {len(exempt_lost)} without a row",
    )
    for r in (missing_unexplained + dupes)[:10]:
        print(f"      {r['rid']} {r['kind']} {r.get('model')} status {r['status']} rows {rows.get(r['rid'])}")
    checks.check(
        not wrong_status,
        f"rows with the status the client saw: {len([r for r in answered if len(rows.get(r['rid'], [])) == 1]) - len(wrong_status)}"
        f"/{len([r for r in answered if len(rows.get(r['rid'], [])) == 1])}",
    )
    for r in wrong_status[:10]:
        print(f"      {r['rid']} {r['kind']} client {r['status']} row {rows[r['rid']][0]}")
    checks.check(
        not wrong_tokens,
        f"rows with the token counts the client saw: {len(with_usage) - len(wrong_tokens)}/{len(with_usage)}",
    )
    for r in wrong_tokens[:10]:
        print(f"      {r['rid']} {r['kind']} client {r['usage']} row {rows[r['rid']][0]}")

    # 2. Dropped rows are counted.
    dropped_total = chaos.dropped_before_kills + (dropped_last or 0)
    checks.check(
        dropped_last is not None and len(missing) <= dropped_total,
        f"request rows missing outside the SIGKILL window: {len(missing)} <= rows counted in "
        f"claracore_history_rows_dropped_total: {dropped_total}"
        f" ({len(chaos.full_periods)} disk-full periods)",
    )

    if args.tmpfs:
        bit = sum(1 for b in chaos.fill_bit if b)
        known = sum(1 for b in chaos.fill_bit if b is not None)
        checks.check(
            bit >= 1 or not chaos.full_periods,
            f"disk-full periods that made history writes fail (the chaos took effect): {bit}/{known}"
            f" ({len(chaos.full_periods)} in all)",
        )

    # Requests the client saw no answer to.
    un_kill = [r for r in unanswered if near_kill(r)]
    un_left = [r for r in unanswered if r["kind"] == "leave_early"]
    un_other = [r for r in unanswered if r not in un_kill and r not in un_left]
    checks.check(
        not un_other,
        f"requests without an answer: {len(unanswered)} ({len(un_left)} left before it on purpose,"
        f" {len(un_kill)} at the daemon SIGKILL, {len(un_other)} otherwise)",
    )
    for r in un_other[:10]:
        print(f"      {r['rid']} {r['kind']} {r.get('model')} {r['error']}")
    left_rows = [r for r in left if not near_kill(r) and not while_full(r)]
    left_ok = [r for r in left_rows if len(rows.get(r["rid"], [])) == 1]
    checks.check(
        len(left_ok) == len(left_rows),
        f"clients that left before the answer with exactly one row: {len(left_ok)}/{len(left_rows)}",
    )
    echo_bad = [r for r in recs if r["error"] and "echoed" in r["error"]]
    checks.check(not echo_bad, f"answers echoing the client's x-request-id: {len(answered) - len(echo_bad)}/{len(answered)}")
    known = {r["rid"] for r in recs}
    strays = [rid for rid in rows if rid not in known]
    checks.check(not strays, f"rows without a client request: {len(strays)}")

    # 3. Processes.
    checks.check(
        not monitor.orphans,
        f"llama-server processes not owned by the daemon for over {ORPHAN_GRACE_S:.0f} s: {len(monitor.orphans)}"
        f" (children at once, at most: {monitor.max_children})",
    )
    for k in chaos.kills:
        checks.check(
            not k["children_left"] and k["children_gone_after_s"] is not None,
            f"children gone after the daemon SIGKILL: {k['children']} in {k['children_gone_after_s']} s",
        )
        checks.check(
            k["start_error"] is None,
            f"daemon started again after its SIGKILL{' on a full history disk' if k['disk_full'] else ''}"
            f" in {k['restarted_in_s']} s" + (f": {k['start_error']}" if k["start_error"] else ""),
        )
    if not chaos.kills:
        checks.check(False, "the daemon SIGKILL happened")
    checks.check(
        not final_left and exit_code == 0,
        f"after the final SIGTERM: exit code {exit_code} in {stop_s:.1f} s, llama-server processes left: {len(final_left or [])}",
    )
    slow = [s for s in chaos.stopped if s["killed_by_claracore_after_s"] is None]
    checks.check(
        not slow,
        f"SIGSTOPped children killed by claracore within {STOP_HOLD_S:.0f} s: {len(chaos.stopped) - len(slow)}/{len(chaos.stopped)}"
        + (
            f" (slowest {max(s['killed_by_claracore_after_s'] for s in chaos.stopped if s['killed_by_claracore_after_s'] is not None):.1f} s)"
            if len(slow) < len(chaos.stopped)
            else ""
        )
        + (" by " + ", ".join(f"{k} ×{v}" for k, v in sorted(stop_reasons.items())) if stop_reasons else ""),
    )
    bad_reload = [r for r in chaos.reloads if r["applied_after_s"] is None]
    checks.check(not bad_reload, f"reloads applied within 10 s: {len(chaos.reloads) - len(bad_reload)}/{len(chaos.reloads)}")

    # 4. Liveness and memory.
    gap, at = monitor.longest_health_gap(t0, t_term)
    checks.check(
        gap <= args.health_gap_s,
        f"longest time without a /health answer: {gap:.2f} s at +{at - t0:.1f} s (limit {args.health_gap_s:.0f} s;"
        f" {len(monitor.health_ok)} answered, {monitor.health_fail} failed)",
    )
    max_rss = max((k for _, _, k in monitor.rss), default=0) / 1024
    lives = {}
    for t, pid, k in monitor.rss:
        lives.setdefault(pid, []).append((t, k))
    trend = []
    for pid, samples in lives.items():
        third = len(samples) // 3
        if third >= 5:
            first = max(k for _, k in samples[:third]) / 1024
            last = max(k for _, k in samples[-third:]) / 1024
            trend.append(f"pid {pid}: first third max {first:.0f} MiB, last third max {last:.0f} MiB")
    checks.check(
        0 < max_rss <= args.rss_limit_mib,
        f"daemon RSS at most {max_rss:.0f} MiB (limit {args.rss_limit_mib:.0f} MiB; " + "; ".join(trend) + ")",
    )
    checks.check(
        integrity == [("ok",)],
        f"PRAGMA integrity_check: {', '.join(str(r[0]) for r in integrity[:5])} ({sum(len(v) for v in rows.values())} request rows)",
    )
    with open(os.path.join(args.work, "records.json"), "w") as f:
        json.dump({"seed": args.seed, "t0": t0, "actions": chaos.actions, "records": recs}, f)
    print(f"seed {args.seed}: replay with --seed {args.seed}{' --smoke' if args.smoke else ''}")
    failed = checks.summary()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
