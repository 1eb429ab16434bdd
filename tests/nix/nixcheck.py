#!/usr/bin/env python3
"""The checks behind tests/nix/check.sh (Nix packaging, without building).

    nixcheck.py static              nix/module.nix read as text vs systemd/ units
    nixcheck.py lock                flake.lock pins nixpkgs; flake.nix agrees
    nixcheck.py vmtests             each nix/tests/*.nix is one VM test (needs nix-instantiate)
    nixcheck.py eval EVAL.json      the module as evaluated by tests/nix/eval-module.nix
    nixcheck.py flake FLAKE.json    flake outputs as evaluated by tests/nix/eval-flake.nix
    nixcheck.py toml EVAL.json DIR  write each scenario's settings as DIR/NAME.toml

`static` compares the keys and values written between the `drift:` markers
of nix/module.nix with [Service] of systemd/claracore.service and [Socket] of
systemd/claracore.socket and claracore-local.socket: every key on one side
must be on the other (or in the documented exceptions below) with the same
value after normalisation (yes/true, 60s/1min, list order where it does not
matter). `cfg.NAME` values are resolved to the option's literal default; the
GPU device classes and groups are compared as the union over all
accelerations, since the repository's unit cannot know the GPU.

`eval` makes the same comparison on the evaluated unit settings, exactly,
for the CPU build and each GPU build, and checks what each scenario of
eval-module.nix expects (assertions, sockets, firewall, triggers, ...).

Prints one `PASS name` or `FAIL name: why` line per check; exits 1 if any
check failed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "nix/module.nix"
SERVICE = ROOT / "systemd/claracore.service"
SOCKET_HTTP = ROOT / "systemd/claracore.socket"
SOCKET_LOCAL = ROOT / "systemd/claracore-local.socket"
TMPFILES = ROOT / "systemd/claracore.tmpfiles"

# [Service] keys of the unit file the module deliberately does not set.
UNIT_ONLY: dict[str, str] = {}
# Keys the module sets outside the drift block (eval mode sees them).
MODULE_ONLY = {
    "Sockets": "lets switch-to-configuration restart both socket units instead of the service",
    "EnvironmentFile": "services.claracore.environmentFile",
    "LoadCredential": "services.claracore.credentials",
    "ReadWritePaths": "a settings.state_dir outside the StateDirectory",
    "ReadOnlyPaths": "models folders and the Ollama store outside the state directory",
    "BindReadOnlyPaths": "models folders and the Ollama store under /home, /root or /run/user",
}
# Chosen by services.claracore.acceleration; the unit file allows every GPU.
GPU_KEYS = {"DeviceAllow", "SupplementaryGroups", "PrivateDevices"}
# One assignment is one entry (the value may contain spaces).
ENTRY_KEYS = {"DeviceAllow", "ListenStream", "ExecStart", "Environment", "LoadCredential"}
# Where the order of the entries matters.
ORDERED_KEYS = {"SystemCallFilter", "ExecStart", "ListenStream"}
# Where an empty assignment means something other than leaving the key out.
EMPTY_MEANS_NONE = {"CapabilityBoundingSet"}
BOOL_WORDS = {"yes": "yes", "true": "yes", "on": "yes", "no": "no", "false": "no", "off": "no"}

results: list[tuple[bool, str]] = []


def check(ok: bool, name: str, why: str = "") -> bool:
    results.append((ok, name))
    print(f"PASS {name}" if ok else f"FAIL {name}: {why}")
    return ok


# --- unit files -------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> list of assignments (an empty one resets)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise SystemExit(f"{path}: cannot parse {raw!r}")
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if value == "":
            current[key] = []  # reset (kept, so that `Key=` alone is seen)
        else:
            current.setdefault(key, []).append(value)
    return sections


def time_span(text: str) -> str:
    """systemd time span -> seconds, as a string ("1min" -> "60")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    total = 0.0
    rest = text.replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", rest):
        return f"{float(rest):g}"
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", rest):
        if unit not in units:
            return text
        total += float(number) * units[unit]
    return f"{total:g}"


def normalize(key: str, values: list[str]) -> list[str] | None:
    """Assignments -> comparable tokens; None = the key is effectively unset."""
    if key in ENTRY_KEYS:
        tokens = [" ".join(v.split()) for v in values]
    else:
        tokens = [t for v in values for t in v.split()]
    if not tokens:
        return [] if key in EMPTY_MEANS_NONE else None
    if len(tokens) == 1 and tokens[0].lower() in BOOL_WORDS:
        tokens = [BOOL_WORDS[tokens[0].lower()]]
    if key.endswith("Sec"):
        tokens = [time_span(t) for t in tokens]
    return tokens if key in ORDERED_KEYS else sorted(set(tokens))


def unit_settings(section: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {}
    for key, values in section.items():
        norm = normalize(key, values)
        if norm is not None:
            out[key] = norm
    return out


def nix_value_to_assignments(value) -> list[str]:
    """A JSON value of NixOS's serviceConfig -> unit-file assignments."""
    items = value if isinstance(value, list) else [value]
    out = [("yes" if item else "no") if isinstance(item, bool) else str(item) for item in items]
    return [v for v in out if v != ""]


def module_settings(config: dict) -> dict[str, list[str]]:
    out = {}
    for key, value in config.items():
        norm = normalize(key, nix_value_to_assignments(value))
        if norm is not None:
            out[key] = norm
    return out


def exec_args(tokens: list[str]) -> list[str]:
    """ExecStart without its program path (the store path differs)."""
    argv = tokens[0].split()
    return [os.path.basename(argv[0])] + argv[1:]


def compare(name: str, unit: dict, module: dict, skip: set[str], unit_only: dict, module_only: dict) -> None:
    for key in sorted(set(unit) | set(module)):
        if key in skip:
            continue
        if key not in module:
            if key in unit_only:
                continue
            check(False, f"{name}: {key}", f"the unit sets {key}={' '.join(unit[key])}, the module does not")
            continue
        if key not in unit:
            if key in module_only:
                continue
            check(False, f"{name}: {key}", f"the module sets {key}={' '.join(module[key])}, the unit does not")
            continue
        u, m = unit[key], module[key]
        if key == "ExecStart":
            u, m = exec_args(u), exec_args(m)
        check(u == m, f"{name}: {key}", f"unit {u} != module {m}")


# --- static: nix/module.nix as text -------------------------------------------


def block(text: str, name: str) -> str:
    m = re.search(rf"# drift:{name}-begin\n(.*?)# drift:{name}-end", text, re.S)
    if not m:
        raise SystemExit(f"{MODULE}: no `# drift:{name}-begin/-end` block")
    return m.group(1)


def strip_comments(text: str) -> str:
    out, in_str = [], False
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"' and (i == 0 or text[i - 1] != "\\"):
            in_str = not in_str
        if c == "#" and not in_str:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def assignments(text: str) -> list[tuple[str, str]]:
    """`name = expr;` pairs at the top level of `text`."""
    text = strip_comments(text)
    pairs, i = [], 0
    while True:
        m = re.compile(r"\s*([A-Za-z_][\w'-]*(?:\.[A-Za-z_][\w'-]*)*)\s*=\s*").match(text, i)
        if not m:
            break
        j, depth, in_str = m.end(), 0, False
        while j < len(text):
            c = text[j]
            if c == '"' and text[j - 1] != "\\":
                in_str = not in_str
            elif not in_str:
                if c in "[({":
                    depth += 1
                elif c in "])}":
                    depth -= 1
                elif c == ";" and depth == 0:
                    break
            j += 1
        pairs.append((m.group(1), text[m.end() : j].strip()))
        i = j + 1
    return pairs


STRING = r'"((?:[^"\\]|\\.)*)"'


def literal(expr: str):
    """A Nix literal -> Python value; raises ValueError for anything else."""
    expr = expr.strip()
    if re.fullmatch(STRING, expr):
        body = re.fullmatch(STRING, expr).group(1)
        if "${" in body:
            raise ValueError(expr)
        return body.replace('\\"', '"')
    if expr in ("true", "false"):
        return expr == "true"
    if expr == "null":
        return None
    if re.fullmatch(r"-?\d+", expr):
        return int(expr)
    if expr.startswith("[") and expr.endswith("]"):
        inner = expr[1:-1].strip()
        items = re.findall(STRING, inner)
        if re.sub(STRING, "", inner).strip():
            raise ValueError(expr)
        return [s.replace('\\"', '"') for s in items]
    raise ValueError(expr)


def braced(text: str, start: int) -> str:
    """The text from `start` (just after a `{`) to its matching `}`."""
    depth, j = 1, start
    while depth and j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[start : j - 1]


def option_default(text: str, path: list[str]):
    """The literal `default` of services.claracore.<path> in the module."""
    m = re.search(r"options\.services\.claracore\s*=\s*\{", text)
    if not m:
        raise ValueError("no `options.services.claracore = {` block")
    scope, top = braced(text, m.end()), True
    for name in path:
        found = None
        for m in re.finditer(rf"\b{re.escape(name)}\s*=\s*mkOption\s*\{{", scope):
            depth = scope[: m.start()].count("{") - scope[: m.start()].count("}")
            if not top or depth == 0:
                found = m
                break
        if not found:
            raise ValueError(f"no option {'.'.join(path)}")
        scope, top = braced(scope, found.end()), False
    for key, expr in assignments(scope):
        if key == "default":
            return literal(expr)
    raise ValueError(f"option {'.'.join(path)} has no default")


def resolve(text: str, key: str, expr: str):
    """A drift-block value -> Python value, or raise ValueError."""
    try:
        return literal(expr)
    except ValueError:
        pass
    m = re.fullmatch(r"(?:optionalSetting\s+)?cfg\.([\w.]+)", expr)
    if m:
        return option_default(text, m.group(1).split("."))
    body = re.fullmatch(STRING, expr)
    if key == "ExecStart" and body and body.group(1).startswith("${lib.getExe cfg.package} "):
        # meta.mainProgram of nix/package.nix
        return "/bin/claracore" + body.group(1)[len("${lib.getExe cfg.package}") :]
    raise ValueError(expr)


def static() -> None:
    text = MODULE.read_text()
    service = unit_settings(parse_unit(SERVICE)["Service"])

    gpu = dict(assignments(block(text, "gpu")))
    devices = set(re.findall(STRING, gpu.get("gpuDevices", "")))
    groups = set(re.findall(STRING, gpu.get("gpuGroups", "")))
    check(devices == set(service.get("DeviceAllow", [])), "static service: DeviceAllow = union of gpuDevices",
          f"unit {sorted(service.get('DeviceAllow', []))} != module {sorted(devices)}")
    check(groups == set(service.get("SupplementaryGroups", [])), "static service: SupplementaryGroups = union of gpuGroups",
          f"unit {sorted(service.get('SupplementaryGroups', []))} != module {sorted(groups)}")

    def module_block(name: str, skip: set[str]) -> dict:
        out = {}
        for key, expr in assignments(block(text, name)):
            if key in skip:
                out[key] = None
                continue
            try:
                value = resolve(text, key, expr)
            except ValueError:
                check(False, f"static {name}: {key}", f"cannot read `{expr}` without evaluating; keep it literal or `cfg.<option>` with a literal default")
                continue
            norm = None if value is None else normalize(key, nix_value_to_assignments(value))
            if norm is not None:
                out[key] = norm
        return out

    module = module_block("service", GPU_KEYS)
    for key in GPU_KEYS:
        check(key in module, f"static service: {key} set (from acceleration)", "missing from the drift block")
    compare("static service", service, {k: v for k, v in module.items() if v is not None}, GPU_KEYS, UNIT_ONLY, {})

    listen = option_default(text, ["settings", "listen"])
    tcp = [a for a in listen if not a.startswith("unix:")]
    unix = [a[len("unix:") :] for a in listen if a.startswith("unix:")]
    for path, name, streams in ((SOCKET_HTTP, "socket-http", tcp), (SOCKET_LOCAL, "socket-local", unix)):
        unit = unit_settings(parse_unit(path)["Socket"])
        check(unit.get("ListenStream") == streams, f"static {name}: ListenStream = default settings.listen",
              f"unit {unit.get('ListenStream')} != module {streams}")
        compare(f"static {name}", unit, module_block(name, set()), {"ListenStream"}, {}, {})


# --- eval: the evaluated module -----------------------------------------------


def eval_checks(path: str) -> None:
    data = json.loads(Path(path).read_text())
    unit = parse_unit(SERVICE)
    service = unit_settings(unit["Service"])

    for scenario in ("default", "cuda", "rocm", "vulkan"):
        cfg = data[scenario]["service"]["serviceConfig"]
        module = module_settings(cfg)
        compare(f"eval {scenario}: service", service, module, GPU_KEYS, UNIT_ONLY, MODULE_ONLY)
        if scenario == "default":
            check(module.get("PrivateDevices") == ["yes"], "eval default: CPU build has PrivateDevices=yes", str(module.get("PrivateDevices")))
            check("DeviceAllow" not in module, "eval default: CPU build allows no device class", str(module.get("DeviceAllow")))
        else:
            check(module.get("PrivateDevices") == ["no"], f"eval {scenario}: PrivateDevices=no", str(module.get("PrivateDevices")))
    for key in ("DeviceAllow", "SupplementaryGroups"):
        union = set()
        for scenario in ("cuda", "rocm", "vulkan"):
            union |= set(module_settings(data[scenario]["service"]["serviceConfig"]).get(key, []))
        check(union == set(service.get(key, [])), f"eval: {key} over cuda/rocm/vulkan = the unit's",
              f"unit {sorted(service.get(key, []))} != module {sorted(union)}")

    d = data["default"]
    svc = d["service"]
    check(svc["description"] == unit["Unit"]["Description"][0], "eval default: Description", svc["description"])
    check(set(svc["after"]) == set(normalize("After", unit["Unit"]["After"])), "eval default: After", str(svc["after"]))
    check(set(svc["wants"]) == set(normalize("Wants", unit["Unit"]["Wants"])), "eval default: Wants", str(svc["wants"]))
    check(svc["wantedBy"] == [], "eval default: socket-activated service is not started at boot", str(svc["wantedBy"]))
    check(data["no-socket"]["service"]["wantedBy"] == unit["Install"]["WantedBy"],
          "eval no-socket: WantedBy = the unit's", str(data["no-socket"]["service"]["wantedBy"]))

    for name, path in (("claracore", SOCKET_HTTP), ("claracore-local", SOCKET_LOCAL)):
        sock_unit = parse_unit(path)
        sock = d["sockets"].get(name)
        if not check(sock is not None, f"eval default: {name}.socket exists", "missing"):
            continue
        module = module_settings(sock["socketConfig"])
        module["ListenStream"] = sock["listenStreams"]
        compare(f"eval default: {name}.socket", unit_settings(sock_unit["Socket"]), module, set(), {}, {})
        check(sock["wantedBy"] == sock_unit["Install"]["WantedBy"], f"eval default: {name}.socket WantedBy", str(sock["wantedBy"]))
        check(sock["description"] == sock_unit["Unit"]["Description"][0], f"eval default: {name}.socket Description", sock["description"])

    scenario_checks(data)


def scenario_checks(data: dict) -> None:
    def cfg(name):
        return data[name]["service"]["serviceConfig"]

    bad_listen = ["localhost:5800", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "256.0.0.1:5800", "01.2.3.4:5800",
                  "[::1:5800", "[1::2::3]:5800", "[1:2:3:4:5:6:7:8:9]:5800", "[::1]", "[fe80::1%eth0]:5800", "unix:run/claracore.sock"]
    expected_failures = {
        "model-and-cmd": ["models.bad"],
        "exposed-no-key": ["beyond loopback and no API key"],
        "cuda-not-unfree": ['acceleration = "cuda" needs CUDA, which is unfree'],
        "bad-listen": [f"listen: {json.dumps(a)} is not an address" for a in bad_listen],
        "socket-in-service-dir": ["unix:/run/claracore/daemon/claracore.sock is inside a directory that claracore.service owns"],
        "source-no-dir": ["models.qwen: set exactly one of", "models.qwen.source needs services.claracore.modelsDir"],
        "source-split": ["models.big.source.file: big-q4_k_m-00001-of-00002.gguf is one part of a split model"],
    }
    for name, result in sorted(data.items()):
        want = expected_failures.get(name)
        if want:
            msgs = " ".join(result["failedAssertions"])
            check(all(w in msgs for w in want) and len(result["failedAssertions"]) == len(want),
                  f"eval {name}: assertions fail for {', '.join(want)}", str(result["failedAssertions"]))
        else:
            check(result["failedAssertions"] == [], f"eval {name}: no failed assertion", str(result["failedAssertions"]))

    d = data["default"]
    s = d["settings"]
    check(s["llama_server"] == d["stubs"]["llamaCpp"] + "/bin/llama-server", "eval default: llama_server is llama-cpp's bin/llama-server", s["llama_server"])
    check(s["models"] == {"tiny": {"model": "/var/lib/claracore/models/tiny.gguf", "args": ["-c", "512"], "aliases": ["tiny-chat"], "ttl": "5m", "group": "small"}},
          "eval default: models.tiny rendered without empty keys", json.dumps(s["models"]))
    check(s["state_dir"] == "/var/lib/claracore" and s["listen"] == ["127.0.0.1:5800", "unix:/run/claracore/claracore.sock"],
          "eval default: state_dir and listen defaults", json.dumps(s))
    check(d["configCheck"] is not None and d["configCheck"].startswith(d["stubs"]["package"] + "/bin/claracore check-config /") and "--strict" not in d["configCheck"],
          "eval default: the package's check-config runs at build time (not --strict: model outside the store)", str(d["configCheck"]))
    check("--strict" in (data["store-model"]["configCheck"] or ""), "eval store-model: --strict when every model is a derivation", str(data["store-model"]["configCheck"]))
    check("--strict" in (data["path-model"]["configCheck"] or ""), "eval path-model: --strict for a path literal (copied into the store)", str(data["path-model"]["configCheck"]))
    check("--strict" in (data["store-context-model"]["configCheck"] or ""), "eval store-context-model: --strict for a store path string with its context", str(data["store-context-model"]["configCheck"]))
    ssm = data["store-string-model"]
    check(ssm["configCheck"] is not None and "--strict" not in ssm["configCheck"] and ssm["settings"]["models"]["tiny"]["model"].startswith("/nix/store/"),
          "eval store-string-model: no --strict for a /nix/store string without context (not an input of the check)", str(ssm["configCheck"]))
    cross = data["cross"]
    check(cross["configCheck"] is None and cross["configFile"].endswith("-claracore.toml") and cross["failedAssertions"] == [],
          "eval cross: no build-time check when the build machine cannot run the host's claracore", str(cross["configFile"]))
    check(data["store-model"]["settings"]["models"]["tiny"]["model"] == d["stubs"]["storeModel"], "eval store-model: a derivation renders as its store path",
          data["store-model"]["settings"]["models"]["tiny"]["model"])
    check(d["service"]["reloadTriggers"] == [d["configFile"]], "eval default: the checked config file is the reload trigger", str(d["service"]["reloadTriggers"]))
    check(cfg("default")["ExecStart"].endswith(" serve --config /etc/claracore/config.toml"), "eval default: ExecStart reads /etc/claracore/config.toml", cfg("default")["ExecStart"])
    # Reload, not restart, on a model change; restart on a listener change.
    check(d["configFile"] != data["store-model"]["configFile"] and cfg("default")["ExecStart"] == cfg("store-model")["ExecStart"]
          and d["service"]["restartTriggers"] == data["store-model"]["service"]["restartTriggers"],
          "eval: a model change changes only the reload trigger", "")
    check(d["service"]["restartTriggers"] != data["firewall"]["service"]["restartTriggers"], "eval: a listen change changes the restart trigger", "")
    check(d["users"].get("claracore", {}).get("isSystemUser") is True and d["users"]["claracore"]["group"] == "claracore" and d["groups"] == ["claracore"],
          "eval default: static claracore user and group", json.dumps(d["users"]))
    for name, user, group in (("custom-user", "llm", "llm-users"), ("custom-group", "claracore", "llm")):
        r = data[name]
        svc = r["service"]["serviceConfig"]
        check(list(r["users"]) == [user] and r["users"][user]["isSystemUser"] and r["users"][user]["group"] == group and r["groups"] == [group]
              and svc["User"] == user and svc["Group"] == group and r["sockets"]["claracore-local"]["socketConfig"]["SocketGroup"] == group,
              f"eval {name}: user {user} and group {group} are both created and used by the service and the local socket",
              json.dumps({"users": r["users"], "groups": r["groups"]}))

    # The local socket: root's, in a directory of root's that the service
    # does not own (its runtime directory is below it).
    local = d["sockets"]["claracore-local"]["socketConfig"]
    check(local["SocketUser"] == "root" and cfg("default")["RuntimeDirectory"] == "claracore/daemon"
          and all(not s.startswith("/run/claracore/daemon/") for s in d["sockets"]["claracore-local"]["listenStreams"]),
          "eval default: the local socket is root's and outside the service's RuntimeDirectory", json.dumps(local))
    tmpfiles = [line for line in TMPFILES.read_text().splitlines() if line and not line.startswith("#")]
    check(d["tmpfiles"] == ["d /run/claracore 0755 root root -"] and all(r in tmpfiles for r in d["tmpfiles"]),
          "eval default: /run/claracore is root's (tmpfiles rule, as in systemd/claracore.tmpfiles)", str(d["tmpfiles"]))
    check(data["no-socket"]["tmpfiles"] == [] and cfg("no-socket")["RuntimeDirectory"] == ["claracore/daemon", "claracore"],
          "eval no-socket: the daemon binds the unix socket itself and owns /run/claracore (claracore/daemon stays $RUNTIME_DIRECTORY)",
          json.dumps(cfg("no-socket")["RuntimeDirectory"]))

    # Sockets outlive restarts, also those of a rebuild.
    svc = d["service"]
    check(svc["stopIfChanged"] is False and svc["restartIfChanged"] is True and svc["reloadIfChanged"] is False,
          "eval default: stopIfChanged = false (a rebuild restarts the service alone, not its socket units)",
          json.dumps({k: svc[k] for k in ("stopIfChanged", "restartIfChanged", "reloadIfChanged")}))
    check(d["systemPackages"] == [cfg("default")["ExecStart"].split("/bin/")[0]], "eval default: the CLI is installed", str(d["systemPackages"]))
    check(cfg("default")["Sockets"] == ["claracore.socket", "claracore-local.socket"], "eval default: Sockets= names both socket units", str(cfg("default")["Sockets"]))

    check(data["cuda"]["settings"]["llama_server"].endswith("-llama-cpp-cudaSupport/bin/llama-server"), "eval cuda: llama-cpp.override { cudaSupport = true; }", data["cuda"]["settings"]["llama_server"])
    check(data["rocm"]["settings"]["llama_server"].endswith("-llama-cpp-rocmSupport/bin/llama-server"), "eval rocm: llama-cpp.override { rocmSupport = true; }", data["rocm"]["settings"]["llama_server"])
    check(data["vulkan"]["settings"]["llama_server"].endswith("-llama-cpp-vulkanSupport/bin/llama-server"), "eval vulkan: llama-cpp.override { vulkanSupport = true; }", data["vulkan"]["settings"]["llama_server"])
    check("/dev/dxg" in cfg("cuda")["DeviceAllow"], "eval cuda: /dev/dxg for CUDA under WSL2", json.dumps(cfg("cuda")["DeviceAllow"]))
    check(data["cuda-unfree-predicate"]["failedAssertions"] == [], "eval cuda-unfree-predicate: an allowUnfreePredicate is enough", "")
    cpu = data["cpu-forced"]
    check(cpu["settings"]["llama_server"].endswith("-llama-cpp-no-cudaSupport-no-rocmSupport/bin/llama-server")
          and cfg("cpu-forced")["PrivateDevices"] is True and cfg("cpu-forced")["DeviceAllow"] == [],
          "eval cpu-forced: acceleration = false is a CPU build without devices despite nixpkgs.config.cudaSupport", cpu["settings"]["llama_server"])
    gl = data["good-listen"]
    check(gl["sockets"]["claracore"]["listenStreams"] == [a for a in gl["settings"]["listen"] if not a.startswith("unix:")] and gl["firewall"] == [],
          "eval good-listen: every address ListenAddr::parse takes is accepted", json.dumps(gl["sockets"]["claracore"]["listenStreams"]))
    nc = cfg("nixpkgs-cuda")
    check(nc["PrivateDevices"] is False and "char-nvidiactl" in nc["DeviceAllow"] and data["nixpkgs-cuda"]["settings"]["llama_server"] == s["llama_server"],
          "eval nixpkgs-cuda: acceleration = null follows nixpkgs.config.cudaSupport for devices", json.dumps(nc["DeviceAllow"]))

    ns = data["no-socket"]
    check(ns["sockets"] == {} and ns["service"]["serviceConfig"]["Sockets"] == [] and ns["service"]["after"] == ["network.target"] and ns["service"]["wants"] == [],
          "eval no-socket: no socket units, the daemon binds listen itself", json.dumps(ns["sockets"]))
    tcp = data["tcp-only"]
    check(sorted(tcp["sockets"]) == ["claracore"] and tcp["service"]["serviceConfig"]["Sockets"] == ["claracore.socket"],
          "eval tcp-only: only claracore.socket", str(sorted(tcp["sockets"])))
    fw = data["firewall"]
    check(fw["settings"].get("auth", {}).get("keys") == {"lan": {"hash": "sha256:18fdf5a0a968df83bcbe43255e56234f270b03b5e479f70adc4a8db3edb9fd58", "scopes": ["inference"], "rate": 60}},
          "eval firewall: apiKeys render into settings.auth.keys without empty fields", json.dumps(fw["settings"].get("auth")))
    check(fw["firewall"] == [5800, 5801] and fw["sockets"]["claracore"]["listenStreams"] == ["0.0.0.0:5800", "[::]:5801"] and fw["warnings"] == [],
          "eval firewall: TCP ports of listen opened, v6 included", str(fw["firewall"]))
    check(d["firewall"] == [], "eval default: firewall closed unless openFirewall", str(d["firewall"]))
    qg = data["queue-gpu"]["settings"]
    check(qg["scheduler"]["max_queue"] == 64 and qg["scheduler"]["max_wait_before_swap"] == "2s"
          and qg["scheduler"]["vram_reserve_mb"] == 1024 and qg["gpu"] == {"enabled": True, "sample_interval": "500ms"}
          and {k: qg["models"]["tiny"][k] for k in ("vram_mb", "gpus", "priority")} == {"vram_mb": 1200, "gpus": [0], "priority": 5}
          and qg["auth"]["keys"]["batch"]["priority"] == -10,
          "eval queue-gpu: queue, GPU, model and key settings render as the daemon reads them", json.dumps(qg))
    check(all(k not in d["settings"]["models"].get(m, {}) for m in d["settings"].get("models", {}) for k in ("vram_mb", "gpus", "priority")),
          "eval default: unset vram_mb, gpus and priority stay out of the file", json.dumps(d["settings"].get("models")))
    check(len(data["firewall-loopback"]["warnings"]) == 1, "eval firewall-loopback: warns that openFirewall has no effect", str(data["firewall-loopback"]["warnings"]))

    sec = cfg("secrets")
    check(sec.get("EnvironmentFile") == "/run/secrets/claracore.env" and sec["LoadCredential"] == ["api-keys:/run/secrets/claracore-keys"],
          "eval secrets: EnvironmentFile and LoadCredential", json.dumps({k: sec.get(k) for k in ("EnvironmentFile", "LoadCredential")}))
    check("EnvironmentFile" not in cfg("default") and cfg("default")["LoadCredential"] == [], "eval default: no secrets unless given", "")
    cm = data["cmd-model"]["settings"]["models"]["custom"]
    check(cm == {"cmd": ["/opt/bin/server", "--port", "{port}"], "env": {"OMP_NUM_THREADS": "4"}}, "eval cmd-model: cmd model rendered without args/model", json.dumps(cm))
    lim = cfg("limits")
    check(all(k not in lim for k in ("MemoryMax", "MemoryHigh", "TasksMax")) and lim.get("CPUQuota") == "200%",
          "eval limits: null leaves MemoryMax/MemoryHigh/TasksMax out; cpuQuota sets CPUQuota", json.dumps({k: lim.get(k) for k in ("MemoryMax", "MemoryHigh", "TasksMax", "CPUQuota")}))
    check(cfg("state-dir")["ReadWritePaths"] == ["/srv/claracore"] and cfg("default")["ReadWritePaths"] == [], "eval state-dir: another state_dir becomes writable", "")
    ff = data["freeform"]["settings"]
    check(ff.get("log_format") == "json" and set(ff["models"]) == {"tiny", "qwen2.5"}, "eval freeform: free-form settings and settings.models merge with models", json.dumps(ff["models"]))
    models_checks(data)
    dis = data["disabled"]
    check(dis["service"] is None and dis["sockets"] == {} and dis["users"] == {} and dis["configFile"] is None, "eval disabled: enable = false sets nothing", "")


def models_checks(data: dict) -> None:
    """Models folders, the Ollama store, [models_defaults], fetched models."""
    d = data["default"]
    check(all(k not in d["settings"] for k in ("models_dir", "ollama_models", "models_defaults")) and d["fetchUnits"] == {},
          "eval default: no models folder, store or defaults in the file, no fetch unit", json.dumps(sorted(d["settings"])))
    check(all(k not in d["service"]["serviceConfig"] for k in ("ReadOnlyPaths", "BindReadOnlyPaths")) and d["service"]["serviceConfig"]["ProtectHome"] is True,
          "eval default: no model paths opened, ProtectHome=true", "")

    mf = data["models-folder"]
    s, svc = mf["settings"], mf["service"]["serviceConfig"]
    check(sorted(s["models_dir"]) == ["/srv/gguf", "/var/lib/claracore/models"] and s["ollama_models"] == "/home/alice/.ollama/models"
          and s["models_defaults"] == {"args": ["-c", "4096"], "ttl": "10m"},
          "eval models-folder: modelsDir joins settings.models_dir; ollamaModels and models_defaults render (unset group left out)",
          json.dumps({k: s.get(k) for k in ("models_dir", "ollama_models", "models_defaults")}))
    check(s["models"]["qwen"] == {"model": "/var/lib/claracore/models/qwen2.5-0.5b-instruct-q4_k_m.gguf", "args": ["-c", "8192"],
                                  "aliases": ["qwen2.5-0.5b-instruct-q4_k_m"]},
          "eval models-folder: a sourced model serves modelsDir/FILE, with the folder scan's name as an alias (no `source` key)",
          json.dumps(s["models"]["qwen"]))
    check(svc.get("ReadOnlyPaths") == ["-/srv/gguf"] and svc.get("BindReadOnlyPaths") == ["-/home/alice/.ollama/models"] and svc["ProtectHome"] == "tmpfs",
          "eval models-folder: the daemon reads /srv/gguf (ReadOnlyPaths) and the store in /home (bound read-only, ProtectHome=tmpfs); the state dir needs nothing",
          json.dumps({k: svc.get(k) for k in ("ReadOnlyPaths", "BindReadOnlyPaths", "ProtectHome", "ReadWritePaths")}))
    check("ReadWritePaths" not in svc or svc["ReadWritePaths"] == [], "eval models-folder: the daemon gets no write access to the models", json.dumps(svc.get("ReadWritePaths")))
    check(mf["tmpfiles"] == ["d /run/claracore 0755 root root -"], "eval models-folder: a models folder in the state directory needs no tmpfiles rule", str(mf["tmpfiles"]))

    fu = mf["fetchUnits"].get("claracore-fetch-qwen")
    if not check(fu is not None and list(mf["fetchUnits"]) == ["claracore-fetch-qwen"], "eval models-folder: one claracore-fetch-NAME unit per sourced model", str(list(mf["fetchUnits"]))):
        return
    fc = fu["serviceConfig"]
    check(fu["wantedBy"] == ["multi-user.target"] and "network-online.target" in fu["after"] and "network-online.target" in fu["wants"],
          "eval models-folder: the fetch unit starts at boot, after the network is online", json.dumps({k: fu[k] for k in ("wantedBy", "after", "wants")}))
    daemon = mf["service"]
    check("claracore.service" not in fu["before"] + fu["requiredBy"] + fu["wantedBy"]
          and not any(u.startswith("claracore-fetch-") for u in daemon["after"] + daemon["wants"]),
          "eval models-folder: the daemon neither requires nor waits for the fetch (a rebuild restarts only the fetch unit)", json.dumps(daemon["after"]))
    check(fc["Type"] == "oneshot" and fc["RemainAfterExit"] is True and fc["Restart"] == "on-failure" and fc["RestartSec"] == "30s"
          and fc["RestartPreventExitStatus"] == 65 and fu["unitConfig"].get("StartLimitIntervalSec") == 0,
          "eval models-folder: a oneshot retried every 30 s, except when the file is not the declared one (65)", json.dumps(fc))
    check(fc["User"] == "claracore" and fc["Group"] == "claracore" and fc["PrivateNetwork"] is False and fc["PrivateDevices"] is True
          and fc["StateDirectory"] == "claracore" and "ReadWritePaths" not in fc,
          "eval models-folder: runs as the service user, with network, writing only the state directory", json.dumps(fc))
    shared = module_settings(svc)
    mine = module_settings(fc)
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectKernelTunables", "SystemCallFilter", "RestrictNamespaces", "MemoryDenyWriteExecute", "UMask", "CapabilityBoundingSet"):
        check(mine.get(key) == shared.get(key), f"eval models-folder: the fetch unit shares the daemon's {key}", f"{mine.get(key)} != {shared.get(key)}")
    check(fc["Environment"] == ["HF_ENDPOINT=http://127.0.0.1:8088"] and fc["LoadCredential"] == ["hf_token:/run/secrets/hf-token"],
          "eval models-folder: hfEndpoint and hfTokenFile reach the fetch unit", json.dumps({k: fc[k] for k in ("Environment", "LoadCredential")}))
    # lib.escapeShellArg quotes only what needs it (newer nixpkgs): compare unquoted.
    script = (fu["script"] or "").replace("'", "")
    check(" pull hf.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf" in script
          and "--dir /var/lib/claracore/models --revision main" in script
          and "echo 74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db  /var/lib/claracore/models/qwen2.5-0.5b-instruct-q4_k_m.gguf |" in script
          and "/bin/sha256sum -c -" in script and "exit 65" in script
          and "/var/lib/claracore/models/.qwen2.5-0.5b-instruct-q4_k_m.gguf.source" in script,
          "eval models-folder: the fetch script pulls hf.co/REPO/FILE into modelsDir at the revision, then sha256sum -c", script)

    el = data["models-dir-elsewhere"]
    efc = el["fetchUnits"]["claracore-fetch-tiny"]["serviceConfig"]
    check(el["tmpfiles"][-1] == "d /srv/models 0750 claracore claracore -" and efc.get("ReadWritePaths") == ["/srv/models"] and "StateDirectory" not in efc,
          "eval models-dir-elsewhere: a models folder elsewhere is made by tmpfiles and writable for the fetch unit only",
          json.dumps({"tmpfiles": el["tmpfiles"], "fetch": efc.get("ReadWritePaths")}))
    esvc = el["service"]["serviceConfig"]
    check(esvc.get("ReadOnlyPaths") == ["-/srv/models"] and esvc.get("ReadWritePaths") == [],
          "eval models-dir-elsewhere: the daemon reads it only", json.dumps({k: esvc.get(k) for k in ("ReadOnlyPaths", "ReadWritePaths")}))
    escript = (el["fetchUnits"]["claracore-fetch-tiny"]["script"] or "").replace("'", "")
    check("hf.co/ggml-org/models/tinyllamas/stories260K.gguf" in escript and "--revision 0123456789abcdef0123456789abcdef01234567" in escript
          and "/srv/models/stories260K.gguf" in escript
          and el["settings"]["models"]["tiny"] == {"model": "/srv/models/stories260K.gguf", "aliases": ["stories260k"]},
          "eval models-dir-elsewhere: a file in a repository subfolder lands as modelsDir/BASENAME, served under the model's name",
          json.dumps(el["settings"]["models"]["tiny"]))


# --- toml: settings as files for `claracore check-config` ----------------------


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def to_toml(table: dict, prefix: tuple[str, ...] = ()) -> str:
    lines, subtables = [], []
    for key, value in table.items():
        # [section] and [models.NAME] are tables; deeper ones (env) inline.
        if isinstance(value, dict) and len(prefix) < 2:
            subtables.append((key, value))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    out = ""
    if prefix and (lines or not subtables):
        out += "[" + ".".join(toml_key(p) for p in prefix) + "]\n"
    out += "".join(line + "\n" for line in lines)
    for key, value in subtables:
        out += "\n" + to_toml(value, prefix + (key,))
    return out


def write_toml(path: str, outdir: str) -> None:
    data = json.loads(Path(path).read_text())
    Path(outdir).mkdir(parents=True, exist_ok=True)
    for name, result in sorted(data.items()):
        if result["settings"] is not None:
            (Path(outdir) / f"{name}.toml").write_text(to_toml(result["settings"]))
            print(name)


# --- lock, vmtests, flake -------------------------------------------------------


def lock_checks() -> None:
    lock = json.loads((ROOT / "flake.lock").read_text())
    flake = (ROOT / "flake.nix").read_text()
    check(lock.get("version") == 7 and lock.get("root") == "root", "lock: flake.lock version 7", str(lock.get("version")))
    check(lock["nodes"]["root"].get("inputs") == {"nixpkgs": "nixpkgs"}, "lock: nixpkgs is the only input", str(lock["nodes"]["root"].get("inputs")))
    node = lock["nodes"].get("nixpkgs", {})
    locked, original = node.get("locked", {}), node.get("original", {})
    check(locked.get("type") == "github" and locked.get("owner") == "NixOS" and locked.get("repo") == "nixpkgs",
          "lock: nixpkgs from github:NixOS/nixpkgs", json.dumps(locked))
    check(bool(re.fullmatch(r"[0-9a-f]{40}", locked.get("rev", ""))), "lock: a full 40-hex revision", locked.get("rev", ""))
    check(bool(re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked.get("narHash", ""))), "lock: an SRI sha256 narHash", locked.get("narHash", ""))
    check(isinstance(locked.get("lastModified"), int), "lock: lastModified", str(locked.get("lastModified")))
    url = re.search(r'nixpkgs\.url\s*=\s*"([^"]+)"', flake)
    want = f"github:{original.get('owner')}/{original.get('repo')}/{original.get('ref')}"
    check(url is not None and url.group(1) == want, "lock: original matches flake.nix's nixpkgs.url", f"{url and url.group(1)} != {want}")


def nix_eval_json(expr: str):
    import subprocess

    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(out.stderr.strip())
    return json.loads(out.stdout)


def vm_test_files() -> list[Path]:
    return sorted(p for p in (ROOT / "nix/tests").glob("*.nix") if p.name != "default.nix")


def vmtests_checks() -> None:
    files = vm_test_files()
    check(len(files) >= 7, "vmtests: one file per scenario in nix/tests/", str([p.name for p in files]))
    for path in files:
        name = f"vmtests: nix/tests/{path.name}"
        try:
            attrs = nix_eval_json(f"let t = import ./nix/tests/{path.name}; in {{ names = builtins.attrNames t; name = t.name; }}")
        except ValueError as e:
            check(False, name, str(e))
            continue
        check({"name", "nodes", "testScript"} <= set(attrs["names"]), f"{name} has name, nodes, testScript", str(attrs["names"]))
        check(attrs["name"] == f"claracore-{path.stem}", f"{name} is named claracore-{path.stem}", attrs["name"])
        try:
            script = nix_eval_json(
                f"let t = import ./nix/tests/{path.name}; in "
                "if builtins.isFunction t.testScript "
                'then t.testScript { nodes.machine.system.build.toplevel = "/nix/store/00000000000000000000000000000000-nixos-system"; } '
                "else t.testScript"
            )
            problems = python_problems(script)
        except (ValueError, SyntaxError) as e:
            problems = [str(e)]
        check(not problems, f"{name}: testScript is valid Python using only the driver's names", "; ".join(problems))


# What the NixOS test driver puts in a test script's globals (single machine).
DRIVER_GLOBALS = {"machine", "machines", "start_all", "subtest", "driver", "log", "test_script", "retry", "serial_stdout_on", "serial_stdout_off"}


def python_problems(script: str) -> list[str]:
    """Syntax errors and names a test script uses but never defines."""
    import ast
    import builtins

    tree = ast.parse(script)
    defined = set(DRIVER_GLOBALS) | set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return sorted({f"undefined name {n.id!r} (line {n.lineno})" for n in ast.walk(tree)
                   if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in defined})


def flake_checks(path: str) -> None:
    f = json.loads(Path(path).read_text())
    systems = ["aarch64-linux", "x86_64-linux"]
    check(f["inputs"] == ["nixpkgs"], "flake: inputs are nixpkgs only", str(f["inputs"]))
    for output in ("apps", "checks", "devShells", "formatter", "nixosModules", "overlays", "packages"):
        check(output in f["outputs"], f"flake: has {output}", str(f["outputs"]))
    for output, got in sorted(f["systems"].items()):
        check(got == systems, f"flake: {output} for {' and '.join(systems)}", str(got))
    check(f["packages"] == ["claracore", "default"] and f["sameDefault"], "flake: packages.default is packages.claracore", str(f["packages"]))
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]
    pkg = f["package"]
    check(pkg["pname"] == "claracore" and pkg["version"] == cargo["version"] and pkg["mainProgram"] == "claracore",
          "flake: package name, version from Cargo.toml, mainProgram", json.dumps({k: pkg[k] for k in ("pname", "version", "mainProgram")}))
    check(pkg["cargoLock"] == ["Cargo.lock"], "flake: cargoLock.lockFile = ./Cargo.lock", str(pkg["cargoLock"]))
    check(pkg["sourceDirs"] == ["Cargo.lock", "Cargo.toml", "migrations", "src", "systemd", "tests"],
          "flake: source is Cargo.toml, Cargo.lock, src, migrations, tests, systemd only", str(pkg["sourceDirs"]))
    check(pkg["cargoTestFlags"] == ["--lib", "--bins"], "flake: the Nix build runs the unit tests only", str(pkg["cargoTestFlags"]))
    check("x86_64-linux" in pkg["platforms"] and "aarch64-linux" in pkg["platforms"], "flake: package platforms include both systems", "")
    check(f["overlay"] == ["claracore"], "flake: overlays.default adds claracore", str(f["overlay"]))
    check(f["app"]["type"] == "app" and f["app"]["program"].endswith("/bin/claracore"), "flake: apps.default runs bin/claracore", json.dumps(f["app"]))
    check(f["nixosModules"] == ["claracore", "default"] and f["moduleImports"] == ["nix/module.nix"],
          "flake: nixosModules.{default,claracore} import nix/module.nix", str(f["moduleImports"]))
    check(f["modulePackage"] == f["flakePackage"] and f["modulePackagePriority"] == 1000,
          "flake: nixosModules.default defaults services.claracore.package to the flake's own package (mkDefault)",
          json.dumps({k: f[k] for k in ("modulePackage", "flakePackage", "modulePackagePriority")}))
    check(f["modulePackageOverride"] == "override", "flake: an explicit services.claracore.package wins over the flake's", f["modulePackageOverride"])
    for name in ("package", "clippy", "fmt", "unit-drift"):
        check(name in f["checks"], f"flake: checks.{name}", str(f["checks"]))
    want_vm = {f"vm-{p.stem}" for p in vm_test_files()}
    got_vm = {c for c in f["checks"] if c.startswith("vm-")}
    check(got_vm == want_vm, "flake: every nix/tests/*.nix is a check (vm-NAME), picked up automatically", f"{sorted(got_vm)} != {sorted(want_vm)}")
    for check_name, t in sorted(f["vmTests"].items()):
        check(t["testName"] == "claracore-" + check_name[3:] and t["globalTimeout"] > 0
              and t["defaults"] == ["nix/module.nix", "nix/tests/lib/machine.nix"] and t["specialArgs"] == ["tinyModel"],
              f"flake: {check_name} wrapped once with runNixOSTest, globalTimeout, the module and the tiny model", json.dumps(t))
    check("cargo clippy --all-targets" in f["clippy"]["buildPhase"] and "-D warnings" in f["clippy"]["buildPhase"] and "clippy.toml" in f["clippy"]["sourceDirs"],
          "flake: clippy check denies warnings with clippy.toml", json.dumps(f["clippy"]))
    check("nixcheck.py static" in f["unitDrift"], "flake: unit-drift check runs the static drift check", f["unitDrift"])
    shell = f["devShell"]
    for tool in ("cargo", "clippy", "rustfmt", "rust-analyzer", "llama-cpp", "sqlite", "python3-with-packages"):
        check(tool in shell["packages"], f"flake: devShell has {tool}", str(shell["packages"]))
    check(set(shell["python"]) == {"gguf", "numpy", "prometheus-client"}, "flake: devShell python has gguf, numpy, prometheus-client", str(shell["python"]))
    env = shell["env"]
    check(env.get("CLARACORE_TEST_LLAMA_SERVER", "").endswith("/bin/llama-server") and env.get("CLARACORE_TEST_MODEL", "").endswith("-claracore-tiny-model.gguf"),
          "flake: devShell points the integration tests at llama-cpp and the tiny model", json.dumps(env))
    check(f["formatter"] == "nixfmt-tree", "flake: formatter is nixfmt-tree (`nix fmt` without paths formats the tree)", f["formatter"])


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "static":
        static()
    elif mode == "lock":
        lock_checks()
    elif mode == "vmtests":
        vmtests_checks()
    elif mode == "eval" and len(sys.argv) == 3:
        eval_checks(sys.argv[2])
    elif mode == "flake" and len(sys.argv) == 3:
        flake_checks(sys.argv[2])
    elif mode == "toml" and len(sys.argv) == 4:
        write_toml(sys.argv[2], sys.argv[3])
        return
    else:
        raise SystemExit(__doc__)
    failed = sum(1 for ok, _ in results if not ok)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
