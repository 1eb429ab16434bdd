#!/usr/bin/env bash
# Checks the Nix packaging (flake.nix, flake.lock, nix/) on a machine without
# Nix builds or GitHub access, e.g. a fresh Debian bookworm CI runner:
#
#   1. every .nix file parses (`nix-instantiate --parse`, Debian's nix-bin);
#   2. drift: the service and socket settings in nix/module.nix against
#      systemd/claracore.service, claracore.socket, claracore-local.socket,
#      read as text (tests/nix/nixcheck.py static);
#   3. flake.lock pins nixpkgs to a full revision and narHash, and each
#      nix/tests/*.nix is one VM test (name, nodes, testScript);
#   4. only with NIXPKGS_LIB=DIR, a checkout of nixpkgs or of
#      nix-community/nixpkgs.lib (DIR/lib/default.nix):
#      - nix/module.nix evaluated with lib.evalModules for its scenarios
#        (tests/nix/eval-module.nix, against NixOS's option types and unit
#        checks as tests/nix/nixos-stubs.nix declares them) and compared
#        exactly with the units; the scenarios NixOS must refuse while
#        evaluating fail, each with its own error;
#      - flake.nix's outputs evaluated against a stub nixpkgs
#        (tests/nix/eval-flake.nix);
#      - every rendered config run through `claracore check-config`, as the
#        module does at build time, when a claracore binary is at hand
#        (CLARACORE_BIN, else target/release or target/debug).
#
# Installs nix-bin and python3 with apt when missing (root). Prints PASS/FAIL
# lines, then "N passed, M failed"; exits 1 if anything failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

passed=0
failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
skip() { echo "SKIP $*"; }

need=()
command -v nix-instantiate >/dev/null || need+=(nix-bin)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    if ! { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2; then
        fail "apt-get install ${need[*]}"
        echo "$passed passed, $failed failed"
        exit 1
    fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# nixcheck MODE [ARGS...]: run tests/nix/nixcheck.py and count its lines.
nixcheck() {
    local out="$tmp/nixcheck.out" rc=0
    python3 tests/nix/nixcheck.py "$@" >"$out" 2>&1 || rc=$?
    cat "$out"
    passed=$((passed + $(grep -c '^PASS ' "$out")))
    failed=$((failed + $(grep -c '^FAIL ' "$out")))
    if [ "$rc" != 0 ] && ! grep -q '^FAIL ' "$out"; then
        fail "nixcheck.py $1 exited $rc"
    fi
}

# --- 1. parse -------------------------------------------------------------------
while IFS= read -r file; do
    if err="$(nix-instantiate --parse "$file" 2>&1 >/dev/null)"; then
        pass "parse $file"
    else
        fail "parse $file: $err"
    fi
done < <(find . -name '*.nix' -not -path './target/*' -not -path './.git/*' | sort)

# --- 2. drift, read as text -----------------------------------------------------
nixcheck static

# --- 3. lock and VM test files --------------------------------------------------
nixcheck lock
nixcheck vmtests

# --- 4. evaluation with nixpkgs' lib ---------------------------------------------
if [ -z "${NIXPKGS_LIB:-}" ]; then
    skip "module and flake evaluation: set NIXPKGS_LIB to a nixpkgs or nixpkgs.lib checkout"
elif [ ! -f "$NIXPKGS_LIB/lib/default.nix" ]; then
    fail "NIXPKGS_LIB=$NIXPKGS_LIB has no lib/default.nix"
else
    export NIXPKGS_LIB
    lib="import $(cd "$NIXPKGS_LIB" && pwd)/lib"
    if nix-instantiate --eval --strict --json tests/nix/eval-module.nix --arg lib "$lib" -A scenarios \
        >"$tmp/module.json" 2>"$tmp/module.err"; then
        pass "eval nix/module.nix with lib.evalModules (tests/nix/eval-module.nix)"
        nixcheck eval "$tmp/module.json"
    else
        fail "eval nix/module.nix: $(cat "$tmp/module.err")"
    fi
    # Scenarios NixOS refuses while evaluating: each must fail, and with its
    # own message (not some other error).
    if nix-instantiate --eval --strict --json tests/nix/eval-module.nix --arg lib "$lib" -A expectedErrors \
        >"$tmp/errors.json" 2>"$tmp/errors.err"; then
        while IFS=$'\t' read -r scenario pieces; do
            rc=0
            nix-instantiate --eval --strict --json tests/nix/eval-module.nix --arg lib "$lib" \
                -A "failing.$scenario" >/dev/null 2>"$tmp/failing.err" || rc=$?
            missing="$(python3 -c 'import json, sys
err = open(sys.argv[1]).read()
print("; ".join(p for p in json.loads(sys.argv[2]) if p not in err))' "$tmp/failing.err" "$pieces")"
            if [ "$rc" = 0 ]; then
                fail "eval refuses the $scenario scenario: it evaluated"
            elif [ -n "$missing" ]; then
                fail "eval refuses the $scenario scenario with its error: missing '$missing' in: $(grep -v nixbld "$tmp/failing.err" | head -5)"
            else
                pass "eval refuses the $scenario scenario ($(python3 -c 'import json, sys; print(json.loads(sys.argv[1])[0])' "$pieces"))"
            fi
        done < <(python3 -c 'import json, sys
for name, pieces in json.load(open(sys.argv[1])).items():
    print(name + "\t" + json.dumps(pieces))' "$tmp/errors.json")
    else
        fail "eval the expected errors of tests/nix/eval-module.nix: $(cat "$tmp/errors.err")"
    fi
    if nix-instantiate --eval --strict --json tests/nix/eval-flake.nix \
        >"$tmp/flake.json" 2>"$tmp/flake.err"; then
        pass "eval flake.nix outputs against a stub nixpkgs (tests/nix/eval-flake.nix)"
        nixcheck flake "$tmp/flake.json"
    else
        fail "eval flake.nix: $(cat "$tmp/flake.err")"
    fi

    bin="${CLARACORE_BIN:-}"
    for candidate in target/release/claracore target/debug/claracore; do
        [ -n "$bin" ] || { [ -x "$candidate" ] && bin="$candidate"; }
    done
    if [ ! -s "$tmp/module.json" ]; then
        :
    elif [ -z "$bin" ]; then
        skip "claracore check-config of the rendered configs: no binary (set CLARACORE_BIN or cargo build)"
    else
        # Scenarios whose settings claracore must reject (the build would fail).
        rejected=" typo model-and-cmd exposed-no-key bad-listen source-no-dir "
        while IFS= read -r scenario; do
            rc=0
            out="$("$bin" check-config "$tmp/toml/$scenario.toml" 2>&1)" || rc=$?
            if [[ "$rejected" == *" $scenario "* ]]; then
                if [ "$rc" = 78 ]; then
                    pass "check-config rejects the $scenario scenario's config (exit 78)"
                else
                    fail "check-config accepted the $scenario scenario's config (exit $rc): $out"
                fi
            elif [ "$rc" = 0 ]; then
                pass "check-config accepts the $scenario scenario's config"
            else
                fail "check-config rejects the $scenario scenario's config (exit $rc): $out"
            fi
        done < <(python3 tests/nix/nixcheck.py toml "$tmp/module.json" "$tmp/toml")
    fi
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
