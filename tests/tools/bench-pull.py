#!/usr/bin/env python3
"""`claracore pull` against curl: one file from the same loopback fake hub.

  python3 tests/tools/bench-pull.py [--bin target/release/claracore]
                                    [--size-mb 2048] [--runs 3]

Makes a random file of --size-mb (GGUF magic first) in a fake hub
(tests/tools/fake_hub.py), then alternates, --runs times each:
  curl     `curl -sSL -o FILE URL` of the file's resolve URL (it follows the
           CDN redirect), writing to the same disk;
  claracore `claracore pull hf.co/bench/big-GGUF --dir DIR`, which also
           checks the SHA-256 and renames into place.
Reports the median wall time and throughput of each, their ratio (target:
claracore >= 0.9x curl) and claracore's peak RSS (VmHWM; target: <= 64 MB,
since the file is streamed to disk, never held). Loopback only; everything
is removed at the end.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def start_hub(root):
    ready = os.path.join(root, "ready")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_hub.py"),
                             "--root", root, "--ready-file", ready])
    deadline = time.time() + 30
    while not os.path.exists(ready):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            sys.exit("the fake hub did not start")
        time.sleep(0.05)
    return proc, open(ready).read().split()[0]


def peak_rss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(cmd, env=None):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, peak_rss_kb(proc.pid))
        time.sleep(0.02)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {proc.stderr.read().decode()}")
    return took, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(HERE, "../../target/release/claracore"))
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="claracore-bench-pull.")
    hub = None
    try:
        repo = os.path.join(work, "hub", "bench", "big-GGUF")
        os.makedirs(repo)
        size = args.size_mb << 20
        with open(os.path.join(repo, "big-Q4_K_M.gguf"), "wb") as f:
            f.write(b"GGUF")
            left = size - 4
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                f.write(chunk)
                left -= len(chunk)
        hub, url = start_hub(os.path.join(work, "hub"))
        resolve = f"{url}/bench/big-GGUF/resolve/main/big-Q4_K_M.gguf"
        # The hub hashes the file once, on its first listing.
        subprocess.run(["curl", "-sS", "-o", os.devnull, f"{url}/api/models/bench/big-GGUF/tree/main"], check=True)
        env = dict(os.environ, HF_ENDPOINT=url)
        env.pop("HF_TOKEN", None)
        curl, pull, rss = [], [], []
        for _ in range(args.runs):
            out = os.path.join(work, "curl.gguf")
            took, _ = timed(["curl", "-sSL", "-o", out, resolve])
            curl.append(took)
            os.remove(out)
            dest = os.path.join(work, "models")
            took, peak = timed([args.bin, "pull", "hf.co/bench/big-GGUF", "--dir", dest], env)
            pull.append(took)
            rss.append(peak)
            shutil.rmtree(dest)
        c, p = statistics.median(curl), statistics.median(pull)
        mib = size / (1 << 20)
        print(f"file: {args.size_mb} MiB, {args.runs} runs each, loopback fake hub (CDN redirect)")
        print(f"curl      median {c:.2f} s  {mib / c:.0f} MiB/s  runs {', '.join(f'{t:.2f}' for t in curl)}")
        print(f"claracore median {p:.2f} s  {mib / p:.0f} MiB/s  runs {', '.join(f'{t:.2f}' for t in pull)}"
              f"  (includes the SHA-256 check and the rename)")
        ratio = c / p
        peak_mb = max(rss) / 1024
        print(f"throughput: {ratio:.2f}x curl (target >= 0.9x): {'met' if ratio >= 0.9 else 'MISSED'}")
        print(f"claracore peak RSS: {peak_mb:.1f} MB (target <= 64 MB): {'met' if peak_mb <= 64 else 'MISSED'}")
    finally:
        if hub is not None:
            hub.kill()
            hub.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
