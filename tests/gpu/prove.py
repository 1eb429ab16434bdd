#!/usr/bin/env python3
"""The checks of the GPU proof (tests/gpu/prove.sh drives this; stdlib only).

Subcommands:
  gen ARGS...      run tests/tools/make-tiny-model.py with ARGS; where the
                   PyYAML package is missing (gguf-py imports it for model
                   cards, which the generator never writes) a stub stands in
  check --mode real|dry ...
                   run claracore against the models, NVML (the driver's, or
                   the fake's), llama-server; append one row per check to
                   OUTDIR/results.tsv
  row OUTDIR CHECK EXPECTED GOT STATUS
                   append one row (prove.sh's build and generation steps)
  summary OUTDIR   print the table, write summary.txt and summary.json;
                   exit 1 if any row failed or none passed

A row's status: PASS, FAIL, SKIP (not checked, the row says why) or INFO (a
figure recorded, no pass or fail).

The reference the readings are checked against: nvidia-smi (real), or the
fake NVML's state file, whose rules this script writes (dry).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import runpy
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

MIB = 1024 * 1024
MODELS = ("gpuproof-a", "gpuproof-b", "gpuproof-c")
HUGE = "gpuproof-huge"
# What the fake NVML charges each model's child (dry run), MiB.
FAKE_NEED_MIB = {"gpuproof-a": 1500, "gpuproof-b": 1500, "gpuproof-c": 1500, "gpuproof-direct": 900}
FAKE_TOTAL_MIB = 81920


# --------------------------------------------------------------------------
# results


def add_row(outdir: Path, check: str, expected: str, got: str, status: str) -> None:
    clean = [str(x).replace("\t", " ").replace("\n", " ") for x in (check, expected, got, status)]
    with open(outdir / "results.tsv", "a", encoding="utf-8") as f:
        f.write("\t".join(clean) + "\n")
    print(f"[{clean[3]}] {clean[0]}: expected {clean[1]}; got {clean[2]}", file=sys.stderr, flush=True)


class Results:
    def __init__(self, outdir: Path):
        self.outdir = outdir

    def row(self, check: str, expected, got, ok) -> bool:
        status = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
        add_row(self.outdir, check, str(expected), str(got), status)
        return status != "FAIL"

    def info(self, check: str, got, note: str = "recorded") -> None:
        self.row(check, note, got, "INFO")

    def skip(self, check: str, why: str) -> None:
        self.row(check, "-", why, "SKIP")


def summary(outdir: Path) -> int:
    path = outdir / "results.tsv"
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                rows.append(parts)
    heads = ["check", "expected", "got", "result"]
    cut = [60, 60, 70, 6]

    def clip(text: str, n: int) -> str:
        return text if len(text) <= n else text[: n - 1] + "…"

    widths = [min(max([len(h)] + [len(r[i]) for r in rows]), cut[i]) for i, h in enumerate(heads)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    for r in rows:
        lines.append(" | ".join(clip(c, w).ljust(w) for c, w in zip(r, widths)))
    counts = {s: sum(1 for r in rows if r[3] == s) for s in ("PASS", "FAIL", "SKIP", "INFO")}
    verdict = "PASS" if counts["FAIL"] == 0 and counts["PASS"] > 0 else "FAIL"
    lines.append("")
    lines.append(
        f"{verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, "
        f"{counts['SKIP']} not checked, {counts['INFO']} figures"
    )
    text = "\n".join(lines)
    print(text)
    (outdir / "summary.txt").write_text(text + "\n", encoding="utf-8")
    (outdir / "summary.json").write_text(
        json.dumps([dict(zip(heads, r)) for r in rows] + [{"verdict": verdict, **counts}], indent=1) + "\n",
        encoding="utf-8",
    )
    return 0 if verdict == "PASS" else 1


# --------------------------------------------------------------------------
# HTTP over TCP and over the daemon's unix socket


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def connection(target: str, timeout: float) -> http.client.HTTPConnection:
    if target.startswith("unix:"):
        return UnixConnection(target[5:], timeout)
    host, port = target.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def request(target: str, method: str, path: str, body=None, timeout: float = 60.0):
    """(status, parsed JSON or text) of one request on a fresh connection."""
    conn = connection(target, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    text = raw.decode("utf-8", "replace")
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def chat_body(model: str, max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say something about GPUs."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }


def stream_chat(target: str, model: str, max_tokens: int, timeout: float):
    """Streams one chat completion: (tokens, seconds from request to first
    token, seconds from first token to the end, server's decode tokens/s)."""
    conn = connection(target, timeout)
    try:
        began = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(chat_body(model, max_tokens, True)).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"stream {model} via {target}: HTTP {resp.status}: {resp.read()[:300]!r}")
        first = None
        chunks = 0
        timings = None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if event.get("timings"):
                timings = event["timings"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content") is not None:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
    finally:
        conn.close()
    tokens = int(timings["predicted_n"]) if timings and timings.get("predicted_n") else chunks
    decode = float(timings["predicted_per_second"]) if timings and timings.get("predicted_per_second") else None
    first = first or end
    return tokens, first - began, max(end - first, 1e-9), decode


# --------------------------------------------------------------------------
# the reference readings


class Reference:
    """What the GPUs hold, read apart from claracore."""

    def gpus(self) -> list[dict]:
        raise NotImplementedError

    def process_mib(self, pid: int):
        """MiB the process holds on the GPU, None where it is not listed."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError


class NvidiaSmi(Reference):
    def _query(self, what: str, fields: str) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def gpus(self) -> list[dict]:
        rows = self._query("gpu", "index,name,memory.total,memory.used,memory.free,temperature.gpu,power.draw,utilization.gpu")
        out = []
        for r in rows:
            out.append({
                "index": int(r[0]), "name": r[1], "total_mib": num(r[2]), "used_mib": num(r[3]),
                "free_mib": num(r[4]), "temp": num(r[5]), "power_w": num(r[6]), "util": num(r[7]),
            })
        return out

    def reserved_mib(self):
        try:
            return num(self._query("gpu", "memory.reserved")[0][0])
        except (subprocess.SubprocessError, IndexError, OSError):
            return None

    def _apps(self) -> dict[int, float]:
        apps = {}
        for r in self._query("compute-apps", "pid,used_memory"):
            try:
                apps[int(r[0])] = apps.get(int(r[0]), 0) + (num(r[1]) or 0)
            except ValueError:
                continue
        return apps

    def process_mib(self, pid: int):
        return self._apps().get(pid)

    def pids(self) -> list[int]:
        return sorted(self._apps())


class FakeState(Reference):
    """The fake NVML's state: one GPU; a rule charges each model's child by
    its model file and `--host` (a socket path for claracore's children,
    127.0.0.1 for the direct llama-server), which no process of another
    run has in its command line."""

    def __init__(self, path: Path, models: list[str]):
        self.path = path
        self.rules = [(f"{models[0]} --host 127.0.0.1 ", FAKE_NEED_MIB["gpuproof-direct"])]
        self.rules += [(f"{m} --host ", FAKE_NEED_MIB[n]) for n, m in zip(MODELS, models)]
        lines = [f"gpu 0 Fake-H100 total_mib={FAKE_TOTAL_MIB} used_mib=0 util=37 temp=45 power_mw=123456"]
        lines += [f"proc {mib} {needle}" for needle, mib in self.rules]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)

    def _matching(self) -> dict[int, float]:
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            for needle, mib in self.rules:
                if needle in cmd:
                    found[int(entry)] = float(mib)
                    break
        return found

    def gpus(self) -> list[dict]:
        used = sum(self._matching().values())
        return [{"index": 0, "name": "Fake-H100", "total_mib": float(FAKE_TOTAL_MIB), "used_mib": used,
                 "free_mib": FAKE_TOTAL_MIB - used, "temp": 45.0, "power_w": 123.456, "util": 37.0}]

    def reserved_mib(self):
        return 0.0

    def process_mib(self, pid: int):
        return self._matching().get(pid)

    def pids(self) -> list[int]:
        return sorted(self._matching())


def num(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------
# the GGUF estimate, worked out here from the file header


def gguf_header(path: Path) -> dict:
    """The scalar metadata of a GGUF (arrays skipped)."""
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF")
        _version, _tensors, nkv = struct.unpack("<IQQ", f.read(20))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        def value(t: int):
            if t in scalars:
                fmt = "<" + scalars[t]
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
            if t == 8:
                return string()
            if t == 9:
                sub, n = struct.unpack("<IQ", f.read(12))
                if sub in scalars:
                    f.seek(struct.calcsize("<" + scalars[sub]) * n, 1)
                else:
                    for _ in range(n):
                        value(sub)
                return None
            raise ValueError(f"GGUF value type {t}")

        out = {}
        for _ in range(nkv):
            key = string()
            (t,) = struct.unpack("<I", f.read(4))
            out[key] = value(t)
        return out


def expected_estimate(path: Path, ctx: int) -> int:
    """README's estimate with all layers offloaded: the file, the f16 KV
    cache of every layer for the context, 384 MiB of CUDA overhead."""
    h = gguf_header(path)
    arch = h["general.architecture"]
    layers = h[f"{arch}.block_count"]
    heads = h[f"{arch}.attention.head_count"]
    kv_heads = h.get(f"{arch}.attention.head_count_kv", heads)
    embd = h[f"{arch}.embedding_length"]
    key_len = h.get(f"{arch}.attention.key_length", embd // heads)
    value_len = h.get(f"{arch}.attention.value_length", key_len)
    kv = kv_heads * (key_len + value_len) * 2 * ctx * layers
    return path.stat().st_size + kv + 384 * MIB


# --------------------------------------------------------------------------
# the daemon under test


class Daemon:
    def __init__(self, args, ref: Reference, env: dict, phase: str, reserve_mb: int):
        self.args = args
        self.ref = ref
        self.work = Path(args.work)
        self.socket = self.work / "claracore.sock"
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = Path(args.outdir) / f"claracore-{phase}.log"
        self.config = self.work / f"config-{phase}.toml"
        self.config.write_text(self._config(reserve_mb))
        if self.socket.exists():
            self.socket.unlink()
        self.proc = subprocess.Popen(
            [args.claracore, "serve", "--config", str(self.config), "--log-target", "stderr"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),
            env=env, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"claracore exited with {self.proc.returncode} at start; see {self.log}")
            try:
                if request(self.addr, "GET", "/live", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"claracore not live within 30 s; see {self.log}")
            time.sleep(0.05)

    def _config(self, reserve_mb: int) -> str:
        a = self.args
        model_args = json.dumps(["-ngl", "99", "-c", str(a.ctx), "-t", str(a.threads), "--parallel", "1"])
        models = "".join(
            f'[models.{name}]\nmodel = "{path}"\nargs = {model_args}\n\n'
            for name, path in zip(MODELS, a.models)
        )
        # Never started: declared larger than the GPU, refused at once.
        models += f'[models.{HUGE}]\nmodel = "{a.models[0]}"\nargs = {model_args}\nvram_mb = {a.huge_mb}\n'
        return (
            f'listen = ["{self.addr}", "unix:{self.socket}"]\n'
            f'llama_server = "{a.llama_server}"\n'
            f'state_dir = "{self.work / "state"}"\n\n'
            "[scheduler]\nmax_loaded = 4\nidle_ttl = \"0\"\nstart_timeout = \"120s\"\n"
            "stop_grace = \"5s\"\nmax_wait_before_swap = \"0s\"\n"
            f"vram_reserve_mb = {reserve_mb}\n\n"
            "[history]\nbatch_window = \"10ms\"\n\n"
            "[gpu]\nsample_interval = \"200ms\"\n\n" + models
        )

    def admin(self, method: str, path: str, timeout: float = 60):
        return request(f"unix:{self.socket}", method, path, timeout=timeout)

    def ps(self) -> dict:
        status, body = self.admin("GET", "/admin/ps")
        if status != 200:
            raise RuntimeError(f"/admin/ps: {status} {body}")
        return {m["name"]: m for m in body["models"]}

    def metrics(self) -> str:
        # Over TCP /metrics needs a key with `read`; the local socket is admin.
        status, text = self.admin("GET", "/metrics", timeout=10)
        if status != 200:
            raise RuntimeError(f"/metrics: {status}")
        return text

    def metric(self, name: str, labels: dict):
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in self.metrics().splitlines():
            if line.startswith(name + "{"):
                lab, _, value = line.rpartition(" ")
                if lab[len(name) + 1:-1] == want:
                    return float(value)
        return None

    def chat(self, model: str, max_tokens: int = 4, timeout: float = 120):
        began = time.monotonic()
        status, body = request(self.addr, "POST", "/v1/chat/completions", chat_body(model, max_tokens), timeout)
        return status, body, time.monotonic() - began

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_model(self, name: str, what: str, done, within: float = 20):
        deadline = time.monotonic() + within
        while True:
            m = self.ps().get(name, {})
            if done(m):
                return m
            if time.monotonic() > deadline:
                raise Timeout(f"{name} never {what} within {within:.0f} s: {m}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


class Timeout(Exception):
    pass


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def mib(b) -> str:
    return "-" if b is None else f"{b / MIB:.0f} MiB"


def close(a, b, rel: float, floor_mib: float) -> bool:
    """Whether two byte counts agree within rel of the larger, or floor_mib."""
    if a is None or b is None:
        return False
    return abs(a - b) <= max(rel * max(a, b), floor_mib * MIB)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def wait_for(what: str, fn, within: float, every: float = 0.1):
    deadline = time.monotonic() + within
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"{what} not within {within:.0f} s")
        time.sleep(every)


# --------------------------------------------------------------------------
# the checks


class Proof:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.outdir)
        self.r = Results(self.out)
        self.work = Path(args.work)
        self.real = args.mode == "real"
        self.env = dict(os.environ)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            self.env.pop(var, None)
        self.env["CLARACORE_LOG"] = "info,claracore=debug"
        self.env["NO_COLOR"] = "1"
        if self.real:
            self.ref: Reference = NvidiaSmi()
        else:
            state = self.work / "fake-nvml.state"
            self.ref = FakeState(state, args.models)
            self.env["LD_LIBRARY_PATH"] = args.fake_nvml_dir + (
                ":" + self.env["LD_LIBRARY_PATH"] if self.env.get("LD_LIBRARY_PATH") else "")
            self.env["FAKE_NVML_STATE"] = str(state)
        self.learned: dict[str, int] = {}
        self.idle_used = 0.0

    # -- phase 1: readings, the estimate, the learned need, the benchmark --

    def readings(self, d: Daemon) -> None:
        r = self.r
        ref = self.ref.gpus()
        wait_for("GPU series in /metrics", lambda: d.metric("claracore_gpu_memory_total_bytes", {"gpu": "0"}) is not None, 15)
        text = d.metrics()
        names = sorted(re.findall(r'^claracore_gpu_info\{gpu="(\d+)",name="([^"]*)"\} 1$', text, re.M))
        r.row("GPU readings: GPUs and names (/metrics claracore_gpu_info)",
              ", ".join(f"{g['index']}: {g['name']}" for g in ref),
              ", ".join(f"{i}: {n}" for i, n in names) or "none",
              [(str(g["index"]), g["name"]) for g in ref] == names)
        logged = [e.get("message", "") for e in d.events() if "GPU readings" in e.get("message", "")]
        r.row("GPU readings: the start-up log line", "one line naming each GPU from NVML",
              logged[0] if logged else "none",
              len(logged) == 1 and "NVIDIA GPU readings from NVML" in logged[0]
              and all(g["name"] in logged[0] for g in ref))
        for g in ref:
            idx = {"gpu": str(g["index"])}
            total = d.metric("claracore_gpu_memory_total_bytes", idx)
            r.row(f"GPU {g['index']} total memory", f"{g['total_mib']:.0f} MiB (reference) ±1%", mib(total),
                  close(total, g["total_mib"] * MIB, 0.01, 1))
            used = d.metric("claracore_gpu_memory_used_bytes", idx)
            if g["index"] == 0:
                self.idle_used = used or 0
            r.row(f"GPU {g['index']} used memory, idle", f"{g['used_mib']:.0f} MiB (reference) ±5% or 256 MiB",
                  mib(used), close(used, g["used_mib"] * MIB, 0.05, 256))
            temp = d.metric("claracore_gpu_temperature_celsius", idx)
            power = d.metric("claracore_gpu_power_watts", idx)
            util = d.metric("claracore_gpu_utilization_ratio", idx)
            want = []
            ok = True
            for label, mine, theirs in (("temperature", temp, g["temp"]), ("power", power, g["power_w"]),
                                        ("utilization", util, g["util"])):
                if theirs is not None:
                    want.append(label)
                    ok = ok and mine is not None
            r.row(f"GPU {g['index']} temperature, power, utilization", ", ".join(want) + " present",
                  f"{temp} °C, {power} W, {util}", ok)
        if self.real:
            reserved = self.ref.reserved_mib()
            r.info("NVML memory reserved by the driver (the planner counts total - used)",
                   "-" if reserved is None else f"{reserved:.0f} MiB")

    def first_start(self, d: Daemon, name: str, path: Path) -> None:
        r = self.r
        want = expected_estimate(path, self.args.ctx)
        m = d.wait_model(name, "had its estimate", lambda m: m.get("vram_need_source") is not None, 20)
        r.row(f"{name}: need before its first run", "estimated (from the GGUF)", m.get("vram_need_source"),
              m.get("vram_need_source") == "estimated")
        r.row(f"{name}: the GGUF estimate", f"{want} bytes (file + f16 KV for -c {self.args.ctx} + 384 MiB)",
              m.get("vram_need_bytes"), m.get("vram_need_bytes") == want)
        status, body, took = d.chat(name)
        r.row(f"{name}: first request", "200", f"{status} in {took:.1f} s", status == 200)
        placing = [e for e in d.events() if e.get("message") == "placing model on GPU" and e.get("model") == name]
        got = f"gpu {placing[0].get('gpu')}, {placing[0].get('need_mib')} MiB, {placing[0].get('source')}" if placing else "no placement logged"
        r.row(f"{name}: first start placed by the estimate", f"gpu 0, {want // MIB} MiB, estimated", got,
              bool(placing) and placing[0].get("source") == "estimated" and placing[0].get("gpu") == 0)

    def per_process(self, d: Daemon, name: str) -> None:
        r = self.r
        m = d.wait_model(name, "showed GPU memory", lambda m: (m.get("vram_bytes") or 0) > 0 and m.get("pid"), 20)
        pid = m["pid"]
        state = {}

        def agree():
            m2 = d.ps()[name]
            theirs = self.ref.process_mib(pid)
            state.update(mine=m2.get("vram_bytes"), theirs=theirs)
            return theirs is not None and close(m2.get("vram_bytes"), theirs * MIB, 0.02, 8)

        try:
            wait_for("agreement", agree, 10, 0.25)
            ok = True
        except Timeout:
            ok = False
        if self.real:
            r.info("NVML lists the children's pids (same pid namespace)",
                   f"child pid {pid}; nvidia-smi compute apps: {self.ref.pids()}")
        theirs = state.get("theirs")
        r.row(f"{name}: GPU memory of its child (pid {pid})",
              f"{'-' if theirs is None else f'{theirs:.0f} MiB'} (reference) ±2%", mib(state.get("mine")), ok)
        r.row(f"{name}: placed on GPU", "0", m.get("gpu"), m.get("gpu") == 0)

    def learn(self, d: Daemon) -> None:
        """Stops the three models; each stop stores its run's peak."""
        r = self.r
        peaks = {}
        for name in MODELS:
            peaks[name] = d.ps()[name].get("vram_bytes")
            status, body = d.admin("POST", f"/admin/models/{name}/stop")
            if status != 200:
                raise RuntimeError(f"stop {name}: {status} {body}")
        for name in MODELS:
            d.wait_model(name, "stopped", lambda m: m.get("state") == "stopped" and not m.get("pid"), 30)
        db = sqlite3.connect(f"file:{self.work / 'state' / 'history.db'}?mode=ro", uri=True, timeout=10)
        try:
            for name in MODELS:
                def stored():
                    row = db.execute(
                        "SELECT gpu, vram_bytes FROM model_events WHERE model = ? AND event = 'stopped' "
                        "AND vram_bytes > 0 ORDER BY rowid DESC LIMIT 1", (name,)).fetchone()
                    return row
                try:
                    gpu, peak = wait_for(f"{name}'s stop event", stored, 10)
                except Timeout:
                    gpu, peak = None, None
                r.row(f"{name}: its run's peak stored with the stop (history.db model_events)",
                      f"gpu 0, ≥ {mib(peaks[name])} (last reading)", f"gpu {gpu}, {mib(peak)}",
                      gpu == 0 and peak is not None and peak >= (peaks[name] or 1))
                m = d.ps()[name]
                r.row(f"{name}: need after its run", f"measured, {mib(peak)}",
                      f"{m.get('vram_need_source')}, {mib(m.get('vram_need_bytes'))}",
                      m.get("vram_need_source") == "measured" and m.get("vram_need_bytes") == peak)
                if peak:
                    self.learned[name] = peak
        finally:
            db.close()
        est = expected_estimate(Path(self.args.models[0]), self.args.ctx)
        if MODELS[0] in self.learned:
            r.info("GGUF estimate against the measured need", f"estimate {mib(est)}, measured {mib(self.learned[MODELS[0]])} "
                   f"({self.learned[MODELS[0]] / est:.2f}x)")

    def bench(self, d: Daemon) -> None:
        """Tokens/s and added latency through claracore against the same
        llama-server build run directly, on loopback."""
        r = self.r
        a = self.args
        port = free_port()
        log = self.out / "llama-server-direct.log"
        argv = [a.llama_server, "-m", a.models[0], "--host", "127.0.0.1", "--port", str(port),
                "--alias", "gpuproof-direct", "-ngl", "99", "-c", str(a.ctx), "-t", str(a.threads),
                "--parallel", "1"]
        env = dict(self.env)
        env.pop("CLARACORE_LOG", None)
        direct = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
        target = f"127.0.0.1:{port}"
        try:
            def healthy():
                if direct.poll() is not None:
                    raise RuntimeError(f"llama-server (direct) exited with {direct.returncode}; see {log}")
                try:
                    return request(target, "GET", "/health", timeout=2)[0] == 200
                except OSError:
                    return False
            wait_for("llama-server (direct) healthy", healthy, 60)
            text = log.read_text(errors="replace")
            offload = re.search(r"offloaded (\d+)/(\d+) layers to GPU", text)
            if self.real:
                r.row("llama-server runs on the GPU (its log)", "offloaded N/N layers to GPU, CUDA0",
                      offload.group(0) if offload else "no offload line",
                      bool(offload) and offload.group(1) == offload.group(2) and "CUDA0" in text)
            # Warm both paths, then interleave.
            stream_chat(target, "gpuproof-direct", 8, 60)
            stream_chat(d.addr, MODELS[0], 8, 60)
            runs = {"direct": [], "claracore": []}
            for _ in range(a.bench_runs):
                runs["direct"].append(stream_chat(target, "gpuproof-direct", a.bench_tokens, 120))
                runs["claracore"].append(stream_chat(d.addr, MODELS[0], a.bench_tokens, 120))
            rates = {}
            for path, samples in runs.items():
                client = statistics.median(t / s for t, _, s, _ in samples)
                server = [x for *_, x in samples if x]
                ttft = statistics.median(f for _, f, _, _ in samples)
                rates[path] = client
                r.info(f"tokens/s streamed, {path} ({a.bench_tokens} tokens, median of {a.bench_runs})",
                       f"{client:.0f} tok/s at the client, {statistics.median(server) if server else 0:.0f} tok/s "
                       f"llama-server's decode, first token after {ttft * 1000:.1f} ms")
            r.info("tokens/s through claracore / direct", f"{rates['claracore'] / rates['direct']:.3f}")
            lat = {"direct": [], "claracore": []}
            for _ in range(a.latency_runs):
                for path, tgt, model in (("direct", target, "gpuproof-direct"), ("claracore", d.addr, MODELS[0])):
                    began = time.perf_counter()
                    status, _ = request(tgt, "POST", "/v1/chat/completions", chat_body(model, 1), 60)
                    if status != 200:
                        raise RuntimeError(f"latency request via {path}: HTTP {status}")
                    lat[path].append(time.perf_counter() - began)
            med = {p: statistics.median(v) * 1000 for p, v in lat.items()}
            p90 = {p: sorted(v)[int(0.9 * (len(v) - 1))] * 1000 for p, v in lat.items()}
            r.info(f"one-token request, median (p90) of {a.latency_runs}",
                   f"direct {med['direct']:.2f} ({p90['direct']:.2f}) ms, through claracore "
                   f"{med['claracore']:.2f} ({p90['claracore']:.2f}) ms")
            r.info("proxy's added latency (median difference)", f"{med['claracore'] - med['direct']:.2f} ms")
        finally:
            if direct.poll() is None:
                os.killpg(direct.pid, signal.SIGTERM)
                try:
                    direct.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(direct.pid, signal.SIGKILL)
                    direct.wait(timeout=5)

    # -- phase 2: placement under a reserve that leaves room for two --

    def calibrate(self, d: Daemon) -> int:
        """The reserve that leaves room for 2.5 of the largest need, from
        claracore's own reading (the planner counts total - used)."""
        total = d.metric("claracore_gpu_memory_total_bytes", {"gpu": "0"})
        used = None

        def back():
            nonlocal used
            used = d.metric("claracore_gpu_memory_used_bytes", {"gpu": "0"})
            return used is not None and used <= self.idle_used + 64 * MIB
        try:
            wait_for("the models' memory back", back, 15, 0.25)
        except Timeout:
            pass
        self.r.row("memory back after the stops", f"≤ {mib(self.idle_used)} (idle) + 64 MiB", mib(used),
                   used is not None and used <= self.idle_used + 64 * MIB)
        need = max(self.learned.values())
        free = total - used
        reserve = int((free - 2.5 * need) // MIB)
        self.r.info("reserve for two models and not three", f"{reserve} MiB: free {mib(free)} - 2.5 x {mib(need)}")
        if reserve < 0:
            raise RuntimeError(f"the GPU holds less than 2.5 x {mib(need)}")
        return reserve

    def placement(self, d: Daemon, reserve: int) -> None:
        r = self.r
        a, b, c = MODELS
        ps = d.ps()
        r.row("learned needs survive a restart", ", ".join(f"{n}: measured {mib(self.learned.get(n))}" for n in MODELS),
              ", ".join(f"{n}: {ps[n].get('vram_need_source')} {mib(ps[n].get('vram_need_bytes'))}" for n in MODELS),
              all(ps[n].get("vram_need_source") == "measured" and ps[n].get("vram_need_bytes") == self.learned.get(n)
                  for n in MODELS))
        for name in (a, b):
            status, _, took = d.chat(name)
            r.row(f"{name}: request under the reserve", "200", f"{status} in {took:.1f} s", status == 200)
            d.wait_model(name, "measured", lambda m: (m.get("vram_bytes") or 0) > 0, 20)
        ps = d.ps()
        r.row("two fit: both loaded, side by side", f"{a} and {b} ready on GPU 0",
              f"{a}: {ps[a]['state']}@{ps[a].get('gpu')}, {b}: {ps[b]['state']}@{ps[b].get('gpu')}",
              ps[a]["state"] == "ready" and ps[b]["state"] == "ready" and ps[a].get("gpu") == 0 and ps[b].get("gpu") == 0)
        status, _, took = d.chat(c)
        r.row(f"{c}: the third model's request", "200", f"{status} in {took:.1f} s", status == 200)
        ps = d.ps()
        evicted = [e for e in d.events() if e.get("message") == "evicting model to make room"]
        r.row("the third evicts the least recently used idle one",
              f"{a} evicted for {c}; {b} and {c} ready",
              f"evicted {[(e.get('model'), e.get('for_model')) for e in evicted]}; "
              f"{a} {ps[a]['state']}, {b} {ps[b]['state']}, {c} {ps[c]['state']}",
              [(e.get("model"), e.get("for_model")) for e in evicted] == [(a, c)]
              and ps[a]["state"] == "stopped" and ps[b]["state"] == "ready" and ps[c]["state"] == "ready")
        placing = [e for e in d.events() if e.get("message") == "placing model on GPU" and e.get("model") == c]
        r.row(f"{c}: placed by its learned need", f"measured, {mib(self.learned.get(c))}",
              f"{placing[-1].get('source')}, {placing[-1].get('need_mib')} MiB" if placing else "no placement logged",
              bool(placing) and placing[-1].get("source") == "measured"
              and placing[-1].get("need_mib") == self.learned.get(c, 0) // MIB)

        # Never fits: refused at once, with the numbers.
        total_mib = int(d.metric("claracore_gpu_memory_total_bytes", {"gpu": "0"}) // MIB)
        status, body, took = d.chat(HUGE, timeout=30)
        message = body.get("error", {}).get("message", "") if isinstance(body, dict) else str(body)
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        r.row(f"{HUGE}: never fits, refused at once",
              f"503 insufficient_gpu_memory in < 5 s, 'needs {self.args.huge_mb} MiB', 'GPU 0: {total_mib} MiB total, {reserve} MiB reserved'",
              f"{status} {code} in {took:.2f} s: {message}",
              status == 503 and code == "insufficient_gpu_memory" and took < 5
              and f"needs {self.args.huge_mb} MiB" in message
              and f"GPU 0: {total_mib} MiB total, {reserve} MiB reserved" in message)
        r.row(f"{HUGE}: never started", "0 starts", d.ps()[HUGE].get("starts"), d.ps()[HUGE].get("starts") == 0)

        # The figures: Ollama's /api/ps, /metrics, the history rows.
        ps = d.ps()
        # Its first answer hashes each loaded model's GGUF (cached after).
        began = time.monotonic()
        status, ops = d.admin("GET", "/api/ps", timeout=120)
        r.info("/api/ps, first call (it hashes the loaded GGUFs once)", f"HTTP {status} in {time.monotonic() - began:.1f} s")
        sizes = {m["name"]: m.get("size_vram") for m in (ops.get("models") if isinstance(ops, dict) else []) or []}
        for name in (b, c):
            mine = ps[name].get("vram_bytes")
            got = sizes.get(f"{name}:latest")
            r.row(f"/api/ps size_vram of {name}", f"{mib(mine)} (/admin/ps) ±2%", mib(got),
                  bool(got) and close(got, mine, 0.02, 8))
            series = d.metric("claracore_model_vram_bytes", {"model": name, "gpu": "0"})
            r.row(f'/metrics claracore_model_vram_bytes{{model="{name}",gpu="0"}}', f"{mib(mine)} ±2%", mib(series),
                  bool(series) and close(series, mine, 0.02, 8))
        gone = d.metric("claracore_model_vram_bytes", {"model": a, "gpu": "0"})
        r.row(f'/metrics claracore_model_vram_bytes of the evicted {a}', "0", gone, gone == 0)
        rows = self.history(d)
        keys = ("gpu", "gpu_mem_before_bytes", "gpu_mem_after_bytes", "gpu_utilization")
        ok_rows = [x for x in rows if x.get("model") in MODELS and x.get("outcome") == "ok"]
        bare = [f"#{x.get('id')} {x.get('model')}" for x in ok_rows
                if x.get("gpu") != 0 or not all(isinstance(x.get(k), (int, float)) for k in keys)]
        sample = next((x for x in ok_rows if x.get("model") == c), {})
        r.row("history rows: GPU figures on every answered request (claracore history --json)",
              f"all {len(ok_rows)} rows: gpu 0, memory before and after, utilization",
              f"without: {bare or 'none'}; {c}'s: {json.dumps({k: sample.get(k) for k in keys})}",
              bool(ok_rows) and not bare)
        refused = [x for x in rows if x.get("model") == HUGE]
        r.row(f"history row of {HUGE}", "outcome rejected", refused[0].get("outcome") if refused else "no row",
              bool(refused) and refused[0].get("outcome") == "rejected")

    def history(self, d: Daemon) -> list[dict]:
        def rows():
            out = subprocess.run([self.args.claracore, "history", "--json", "--limit", "100", "--host", f"unix:{d.socket}"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode != 0:
                raise RuntimeError(f"claracore history: {out.stderr.strip()}")
            page = json.loads(out.stdout)
            got = page.get("requests", page) if isinstance(page, dict) else page
            have = {x.get("model") for x in got}
            return got if {MODELS[2], HUGE} <= have else None
        got = wait_for("history rows", rows, 15, 0.25)
        (self.out / "history.json").write_text(json.dumps(got, indent=1))
        return got

    def sigkill(self, d: Daemon) -> None:
        """A child SIGKILLed: its memory is back before the next placement,
        which then needs no eviction."""
        r = self.r
        a, b, c = MODELS
        used_before = d.metric("claracore_gpu_memory_used_bytes", {"gpu": "0"})
        pid = d.ps()[c]["pid"]
        killed_at = len(d.events())
        os.kill(pid, signal.SIGKILL)
        status, _, took = d.chat(a)
        r.row(f"{a}: request right after {c}'s child (pid {pid}) was SIGKILLed", "200", f"{status} in {took:.1f} s",
              status == 200)
        ps = d.ps()
        later = [e for e in d.events()[killed_at:] if e.get("message") == "evicting model to make room"]
        r.row("the next placement sees the memory back: no eviction", f"{a} ready, {b} still ready, nothing evicted",
              f"{a} {ps[a]['state']}@{ps[a].get('gpu')}, {b} {ps[b]['state']}, {c} {ps[c]['state']}, "
              f"evicted {[e.get('model') for e in later]}",
              ps[a]["state"] == "ready" and ps[b]["state"] == "ready" and not later)
        d.wait_model(a, "measured", lambda m: (m.get("vram_bytes") or 0) > 0, 20)
        theirs = self.ref.process_mib(pid)
        used_after = None

        def settled():
            nonlocal used_after
            used_after = d.metric("claracore_gpu_memory_used_bytes", {"gpu": "0"})
            return used_after is not None and used_after - used_before <= 0.5 * self.learned[a]
        try:
            wait_for("used memory settled", settled, 10, 0.25)
            ok = True
        except Timeout:
            ok = False
        r.row(f"{c}'s memory returned (GPU used, {a} in its place)",
              f"≤ {mib(used_before)} + half a need; pid gone from NVML",
              f"{mib(used_after)}; pid {'listed' if theirs is not None else 'not listed'}, "
              f"alive: {pid_alive(pid)}", ok and theirs is None and not pid_alive(pid))

    def shutdown(self, d: Daemon, phase: str) -> None:
        pids = [m["pid"] for m in d.ps().values() if m.get("pid")]
        code = d.stop()
        alive = [p for p in pids if pid_alive(p)]
        self.r.row(f"claracore stops cleanly ({phase})", "exit 0, no child left", f"exit {code}, alive {alive}",
                   code == 0 and not alive)

    def hardened(self) -> None:
        """The CUDA llama-server under the service unit's sandboxing
        (systemd/claracore.service), as a transient unit: it loads model A
        on the GPU and answers on a unix socket in its RuntimeDirectory."""
        r = self.r
        check = "CUDA under the unit's systemd hardening"
        if not self.real:
            r.skip(check, "dry run: no GPU")
            return
        if not Path("/run/systemd/system").is_dir() or not shutil.which("systemd-run") or os.geteuid() != 0:
            r.skip(check, "not checked: no systemd as PID 1 (or not root) on this machine")
            return
        keep = ("CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges", "DevicePolicy", "DeviceAllow",
                "PrivateDevices", "PrivateTmp", "PrivateNetwork", "PrivateMounts", "ProtectSystem", "ProtectHome",
                "ProtectClock", "ProtectControlGroups", "ProtectHostname", "ProtectKernelLogs",
                "ProtectKernelModules", "ProtectKernelTunables", "ProtectProc", "RestrictAddressFamilies",
                "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
                "MemoryDenyWriteExecute", "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
                "UMask")
        unit_file = Path(__file__).resolve().parent.parent.parent / "systemd" / "claracore.service"
        props = [line.strip() for line in unit_file.read_text().splitlines()
                 if line.split("=", 1)[0].strip() in keep and "=" in line]
        # Outside /home, /root and /tmp, which the sandbox hides.
        stage = Path("/opt/claracore-gpu-proof")
        stage.mkdir(parents=True, exist_ok=True)
        server = stage / "llama-server"
        model = stage / "model.gguf"
        shutil.copy2(self.args.llama_server, server)
        shutil.copy2(self.args.models[0], model)
        unit = "claracore-gpu-proof-hardened"
        log = self.out / "llama-server-hardened.log"
        sock = "/run/claracore-gpu-proof/llama.sock"
        argv = ["systemd-run", f"--unit={unit}", "--collect", "--quiet",
                "-p", f"StandardOutput=file:{log}", "-p", f"StandardError=file:{log}",
                "-p", "RuntimeDirectory=claracore-gpu-proof", "-p", "RuntimeMaxSec=120",
                "-E", f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}"]
        for p in props:
            argv += ["-p", p]
        argv += ["--", str(server), "-m", str(model), "--host", sock, "--port", "8080", "-ngl", "99",
                 "-c", str(self.args.ctx), "--alias", "gpuproof-hardened", "--parallel", "1"]
        (self.out / "hardened-argv.json").write_text(json.dumps(argv, indent=1))
        try:
            subprocess.run(argv, check=True, timeout=30, capture_output=True, text=True)

            def healthy():
                active = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()
                if active not in ("active", "activating"):
                    raise RuntimeError(f"the unit is {active}; see {log}")
                try:
                    return request(f"unix:{sock}", "GET", "/health", timeout=2)[0] == 200
                except OSError:
                    return False
            wait_for("the hardened llama-server healthy", healthy, 60, 0.2)
            status, body = request(f"unix:{sock}", "POST", "/v1/chat/completions",
                                   chat_body("gpuproof-hardened", 16), 60)
            text = log.read_text(errors="replace")
            offload = re.search(r"offloaded (\d+)/(\d+) layers to GPU", text)
            r.row(check, f"{len(props)} sandboxing settings of the unit (PrivateNetwork and "
                  "MemoryDenyWriteExecute included; root without capabilities, not the claracore user): "
                  "all layers offloaded, a completion answers",
                  f"{offload.group(0) if offload else 'no offload line'}; completion HTTP {status}",
                  status == 200 and bool(offload) and offload.group(1) == offload.group(2))
        except (subprocess.SubprocessError, RuntimeError, Timeout, OSError) as e:
            tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
            r.row(check, "loads on the GPU and answers", f"{type(e).__name__}: {e} {tail}", False)
        finally:
            subprocess.run(["systemctl", "stop", unit], capture_output=True, timeout=30)
            shutil.rmtree(stage, ignore_errors=True)

    def run(self) -> None:
        a = self.args
        models = [Path(m) for m in a.models]
        d = Daemon(a, self.ref, self.env, "learn", 512)
        try:
            self.readings(d)
            self.first_start(d, MODELS[0], models[0])
            self.per_process(d, MODELS[0])
            if a.bench_runs > 0:
                self.bench(d)
            for name, path in zip(MODELS[1:], models[1:]):
                self.first_start(d, name, path)
                self.per_process(d, name)
            self.learn(d)
            reserve = self.calibrate(d)
        finally:
            self.shutdown(d, "after learning")
        d = Daemon(a, self.ref, self.env, "place", reserve)
        try:
            self.placement(d, reserve)
            self.sigkill(d)
        finally:
            self.shutdown(d, "after placement")
        self.hardened()
        self.r.skip("a model split across GPUs (--tensor-split)",
                    "not checked: the split path is not built yet (one GPU here anyway)")


def check(args) -> int:
    shutil.rmtree(args.work, ignore_errors=True)
    Path(args.work).mkdir(parents=True)
    proof = Proof(args)
    try:
        proof.run()
    except Exception as e:  # the table must say where it stopped
        where = [f"{f.name}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
        proof.r.row("the proof ran to its end", "no error", f"{type(e).__name__}: {e} (at {' < '.join(reversed(where))})",
                    False)
        return 1
    return 0


def gen(argv: list[str]) -> None:
    try:
        import yaml  # noqa: F401
    except ImportError:
        sys.modules["yaml"] = types.ModuleType("yaml")
    maker = Path(__file__).resolve().parent.parent / "tools" / "make-tiny-model.py"
    sys.argv = [str(maker)] + argv
    runpy.run_path(str(maker), run_name="__main__")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "gen":
        gen(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--mode", choices=["real", "dry"], required=True)
    c.add_argument("--outdir", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--claracore", required=True)
    c.add_argument("--llama-server", required=True)
    c.add_argument("--models", nargs=3, required=True)
    c.add_argument("--fake-nvml-dir", default="")
    c.add_argument("--ctx", type=int, default=4096)
    c.add_argument("--threads", type=int, default=4)
    c.add_argument("--huge-mb", type=int, default=200000)
    c.add_argument("--bench-tokens", type=int, default=256)
    c.add_argument("--bench-runs", type=int, default=3)
    c.add_argument("--latency-runs", type=int, default=20)
    rw = sub.add_parser("row")
    rw.add_argument("outdir")
    rw.add_argument("check")
    rw.add_argument("expected")
    rw.add_argument("got")
    rw.add_argument("status", choices=["PASS", "FAIL", "SKIP", "INFO"])
    s = sub.add_parser("summary")
    s.add_argument("outdir")
    args = ap.parse_args()
    if args.cmd == "check":
        return check(args)
    if args.cmd == "row":
        add_row(Path(args.outdir), args.check, args.expected, args.got, args.status)
        return 0
    return summary(Path(args.outdir))


if __name__ == "__main__":
    sys.exit(main())
