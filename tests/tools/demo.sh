#!/usr/bin/env bash
# Runs claracore on a generated demo config: the tiny test model served by
# the cached llama-server, on 127.0.0.1:5800. Builds llama-server on first
# use (~15 min on 2 cores). Extra arguments go to `claracore serve`.
#
# The demo's directory holds its config, the history database (prompts and
# answers, per `[history] content`) and the unix socket. By default it is a
# fresh `mktemp -d` (0700) under $XDG_RUNTIME_DIR, or $TMPDIR, or /tmp. A
# CLARACORE_DEMO_DIR is used only when it is a real directory (not a
# symlink) owned by the current user and writable by no one else, and when
# none of config.toml, state and claracore.sock in it is a symlink: in a
# directory another user can write (sticky bit or not), they can plant
# those names as symlinks before the demo writes, and the demo, perhaps
# run as root, would write through them. These checks run before the slow
# setup, so a refusal is immediate.
set -euo pipefail

refuse() {
    echo "demo.sh: refusing CLARACORE_DEMO_DIR=$CLARACORE_DEMO_DIR: $*" >&2
    exit 1
}

if [ -n "${CLARACORE_DEMO_DIR:-}" ]; then
    dir=$CLARACORE_DEMO_DIR
    case $dir in /*) ;; *) dir=$PWD/$dir ;; esac
    if [ ! -e "$dir" ] && [ ! -L "$dir" ]; then
        # Not `mkdir -p` for the directory itself: if another user makes
        # it first, this fails and the checks below judge theirs.
        { mkdir -p -- "$(dirname -- "$dir")" && mkdir -m 0700 -- "$dir"; } ||
            [ -e "$dir" ] || refuse "cannot create it"
    fi
    if [ -L "$dir" ]; then
        refuse "it is a symlink (to $(readlink -- "$dir")); name the directory itself"
    fi
    [ -d "$dir" ] || refuse "it is not a directory"
    if [ ! -O "$dir" ]; then
        refuse "it is owned by $(stat -c %U -- "$dir"), not by $(id -un)"
    fi
    mode=$(stat -c %a -- "$dir")
    if (((8#$mode & 8#022) != 0)); then
        refuse "other users can write to it (mode $mode); chmod go-w it, or leave CLARACORE_DEMO_DIR unset for a private one"
    fi
    for name in config.toml state claracore.sock; do
        if [ -L "$dir/$name" ]; then
            refuse "$dir/$name is a symlink (to $(readlink -- "$dir/$name")); the demo does not write through one"
        fi
    done
else
    base=${TMPDIR:-/tmp}
    # Only a runtime directory of this user's own (`su` keeps another's).
    if [ -n "${XDG_RUNTIME_DIR:-}" ] && [ -d "$XDG_RUNTIME_DIR" ] && [ -O "$XDG_RUNTIME_DIR" ]; then
        base=$XDG_RUNTIME_DIR
    fi
    dir=$(mktemp -d "$base/claracore-demo.XXXXXX")
    fresh=1
fi
echo "demo: directory $dir" >&2

cd "$(dirname "$0")/../.."
eval "$(tests/tools/setup-test-deps.sh)"

# Written beside and renamed into place: a rename replaces whatever name is
# there and never writes through it.
tmp=$(mktemp "$dir/.config.toml.XXXXXX")
cat >"$tmp" <<TOML
listen = ["127.0.0.1:5800", "unix:$dir/claracore.sock"]
llama_server = "$CLARACORE_TEST_LLAMA_SERVER"
state_dir = "$dir/state"

[scheduler]
max_loaded = 1
idle_ttl = "5m"

[models.tiny]
model = "$CLARACORE_TEST_MODEL"
args = ["-c", "2048"]
aliases = ["tiny-chat"]

[models.tiny-embed]
model = "$CLARACORE_TEST_MODEL"
args = ["-c", "512", "--embeddings", "--pooling", "mean"]
TOML
mv -T -- "$tmp" "$dir/config.toml"
cat >&2 <<EOF
demo: config  $dir/config.toml
demo: state   $dir/state (history.db: every request, prompts and answers cut to 1000 characters; files 0600)
demo: socket  $dir/claracore.sock (0660: admin, no key) and http://127.0.0.1:5800 (inference, no key)
demo: for ps, stop, history from another shell: export CLARACORE_HOST=unix:$dir/claracore.sock
EOF
if [ -n "${fresh:-}" ]; then
    echo "demo: a fresh directory each run; remove it when done: rm -r $dir" >&2
fi
exec cargo run --release -- serve --config "$dir/config.toml" "$@"
