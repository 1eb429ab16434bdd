#!/usr/bin/env bash
# claracore's systemd integration, proven under a real PID-1 systemd.
#
# Boots a Debian trixie rootfs (systemd 257: Type=notify-reload needs >= 253,
# which the bookworm host's 252 lacks) with
#
#   systemd-nspawn -b --private-network --volatile=overlay --register=no --keep-unit
#
# bind-mounts the release .deb (tests/tools/release.sh), the real llama-server
# and the tiny test model into it read-only, installs the package the way an
# operator does (`apt-get install ./claracore_*.deb`: the units, sysusers and
# tmpfiles snippets, the conffile and the maintainer scripts, no file copied
# by hand; drop-ins only where a scenario needs one) and drives the
# container's systemd with `nsenter -t <its PID 1> -a systemctl ...`.
# All HTTP traffic stays on the container's own loopback (private network).
#
# Usage: tests/systemd/run-nspawn.sh [SCENARIO...]   (default: all of them)
#        scenarios: unit-files socket-activation ready-and-status reload
#                   watchdog journal-fields stop-with-stream bad-config-at-start
#                   restart-keeps-sockets private-network
#                   package-install package-upgrade package-remove package-purge
#        (the package-* ones install the package themselves and look at what
#        dpkg and the maintainer scripts did; the others start from a fresh
#        install with the test config written over the shipped one)
# Ends with the line "N passed, M failed"; exits non-zero if any failed.
#
# Needs root and Linux. Installs systemd-container and debootstrap with apt if
# they are missing. The debootstrapped rootfs (~1 min, ~240 MB) is cached in
# ${CLARACORE_CACHE:-~/.cache/claracore}/nspawn-rootfs-<suite>-<hash>, keyed by
# the suite, the package list and ROOTFS_LAYOUT; every container runs on a
# tmpfs overlay (--volatile=overlay), so the cached tree is never written.
#
# Env: CLARACORE_CACHE, CLARACORE_DEB (install this .deb instead of building
#      one with tests/tools/release.sh),
#      CLARACORE_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#      CLARACORE_NSPAWN_KEEP_GOING=0 to stop at the first failed scenario.
#
# Design: every scenario gets a freshly booted container (~1 s each). That
# makes them independent for free: their own journal, NRestarts counters,
# config, drop-ins and failed states, with no reset logic that could itself
# hide state leaking from one scenario into the next. The container gets a
# pure cgroup2 hierarchy (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 unless set); on
# this host it has no controllers, so MemoryMax= and the like are not enforced
# and are not tested here.
# shellcheck disable=SC2016  # jq programs and eval tests are single-quoted on purpose
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${CLARACORE_CACHE:-$HOME/.cache/claracore}"
SUITE=trixie
MIRROR="${CLARACORE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# libgomp1/libstdc++6: llama-server's shared libraries. python3: the fake
# upstream (http.server is not in python3-minimal). man-db: lets
# `systemd-analyze verify` check the units' Documentation=man: pages. udev:
# creates the render group (SupplementaryGroups=render video), as on a real host.
PACKAGES="systemd,systemd-sysv,dbus,udev,curl,jq,procps,python3,libgomp1,libstdc++6,man-db"
# Bump when the steps that make the cached rootfs change.
ROOTFS_LAYOUT=1
SECURITY_MAX=2.5

ALL_SCENARIOS=(unit-files socket-activation ready-and-status reload watchdog
    journal-fields stop-with-stream bad-config-at-start restart-keeps-sockets
    private-network package-install package-upgrade package-remove package-purge)

say() { printf '%s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
    say "run-nspawn: $*" >&2
    cleanup_all
    say "0 passed, 1 failed"
    exit 2
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# --- state of the running container (one at a time) -------------------------
RUN_ID="$$"
TMP=""
N_CONTAINERS=0
MACHINE=""
NSPAWN_PID=""
CPID=""          # host PID of the container's systemd (its PID 1)
CGROUP_NAME=""
CG_ROOTS=()
NSPAWN_RUN_EXISTED=0
[ -d /run/systemd/nspawn ] && NSPAWN_RUN_EXISTED=1

# --- host prerequisites --------------------------------------------------------
ensure_host_tools() {
    [ "$(id -u)" = 0 ] || die "must run as root (systemd-nspawn)"
    local need=()
    command -v systemd-nspawn >/dev/null || need+=(systemd-container)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v nsenter >/dev/null || need+=(util-linux)
    command -v flock >/dev/null || need+=(util-linux)
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]}"
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2 \
            || die "apt-get install ${need[*]} failed"
    fi
}

# The package under test, and a "previous build" of it for the upgrade
# scenario: the same package with a lower Version (X~prev), so that
# installing the real one over it takes dpkg's whole upgrade path (prerm
# upgrade, unpack, conffile check, postinst configure with the old version).
build_packages() {
    if [ -n "${CLARACORE_DEB:-}" ]; then
        DEB="$CLARACORE_DEB"
    else
        say "building the .deb (tests/tools/release.sh)"
        local dist
        dist="$("$REPO/tests/tools/release.sh")" || die "tests/tools/release.sh failed"
        DEB="$(ls "$dist"/claracore_*.deb)"
    fi
    [ -f "$DEB" ] || die "no .deb at $DEB"
    DEB="$(cd "$(dirname "$DEB")" && pwd)/$(basename "$DEB")"
    DEB_VERSION="$(dpkg-deb -f "$DEB" Version)"
    # Each one alone in a directory, so that ./claracore_*.deb names one.
    mkdir -p "$TMP/deb" "$TMP/deb-prev"
    chmod 0755 "$TMP" "$TMP/deb" "$TMP/deb-prev"
    cp "$DEB" "$TMP/deb/"
    local prev="$TMP/prev-tree"
    dpkg-deb -R "$DEB" "$prev" || die "dpkg-deb -R $DEB failed"
    sed -i "s/^Version: .*/Version: $DEB_VERSION~prev/" "$prev/DEBIAN/control"
    dpkg-deb --root-owner-group -b "$prev" "$TMP/deb-prev/claracore_${DEB_VERSION}~prev_$(dpkg-deb -f "$DEB" Architecture).deb" >/dev/null \
        || die "dpkg-deb -b of the previous package failed"
    rm -rf "$prev"
}

test_deps() {
    local exports
    exports="$("$REPO/tests/tools/setup-test-deps.sh")" || die "tests/tools/setup-test-deps.sh failed"
    eval "$exports"
    LLAMA_SERVER="$CLARACORE_TEST_LLAMA_SERVER"
    MODEL="$CLARACORE_TEST_MODEL"
    [ -x "$LLAMA_SERVER" ] || die "no llama-server at $LLAMA_SERVER"
    [ -f "$MODEL" ] || die "no model at $MODEL"
}

# The cached trixie tree: debootstrap once per key, under a lock.
ensure_rootfs() {
    mkdir -p "$CACHE" || die "cannot create $CACHE"
    local key
    key="$(printf '%s\n' "$ROOTFS_LAYOUT" "$SUITE" minbase "$PACKAGES" | sha256sum | cut -c1-12)"
    ROOTFS="$CACHE/nspawn-rootfs-$SUITE-$key"
    exec 8>"$CACHE/.nspawn-rootfs.lock"
    flock 8
    if [ ! -x "$ROOTFS/usr/lib/systemd/systemd" ]; then
        local tmp="$ROOTFS.tmp.$$" t0=$EPOCHREALTIME
        rm -rf "$tmp"
        say "debootstrap $SUITE into $ROOTFS (first run only, ~1 min)"
        if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$MIRROR" \
            >"$CACHE/nspawn-rootfs-$SUITE-$key.log" 2>&1; then
            tail -20 "$CACHE/nspawn-rootfs-$SUITE-$key.log" >&2
            rm -rf "$tmp"
            flock -u 8
            die "debootstrap failed (log: $CACHE/nspawn-rootfs-$SUITE-$key.log)"
        fi
        rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
        mv "$tmp" "$ROOTFS"
        say "debootstrap took $(elapsed "$t0") s"
    fi
    flock -u 8
    exec 8>&-
}

# --- cgroups ---------------------------------------------------------------------
# With --keep-unit --register=no nspawn makes its payload/ and supervisor/
# cgroups below the cgroup it was started in. Each container is started in a
# cgroup of its own, so those land there (not in /) and cleanup is one rmdir
# of that subtree.
detect_cgroups() {
    CG_ROOTS=()
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        CG_ROOTS=(/sys/fs/cgroup)
    else
        [ -f /sys/fs/cgroup/systemd/cgroup.procs ] && CG_ROOTS+=(/sys/fs/cgroup/systemd)
        [ -f /sys/fs/cgroup/unified/cgroup.procs ] && CG_ROOTS+=(/sys/fs/cgroup/unified)
    fi
    [ ${#CG_ROOTS[@]} -gt 0 ] || die "no usable cgroup hierarchy under /sys/fs/cgroup"
}

remove_cgroup() {
    [ -n "$CGROUP_NAME" ] || return 0
    local root
    for root in "${CG_ROOTS[@]}"; do
        [ -d "$root/$CGROUP_NAME" ] || continue
        find "$root/$CGROUP_NAME" -depth -type d -exec rmdir {} + 2>/dev/null \
            || say "warning: could not remove cgroup $root/$CGROUP_NAME" >&2
    done
    CGROUP_NAME=""
}

# --- the container ------------------------------------------------------------------
# Runs a command inside the container: all its namespaces, a clean env.
cx() {
    nsenter -t "$CPID" -a env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_COLORS=0 SYSTEMD_PAGER= SYSTEMD_LESS= "$@"
}

boot_container() {
    N_CONTAINERS=$((N_CONTAINERS + 1))
    MACHINE="cc-$RUN_ID-$N_CONTAINERS"
    CGROUP_NAME="claracore-nspawn-$RUN_ID-$N_CONTAINERS"
    local root
    for root in "${CG_ROOTS[@]}"; do
        mkdir "$root/$CGROUP_NAME" || { say "cannot create cgroup $root/$CGROUP_NAME"; return 1; }
    done
    local console="$TMP/$MACHINE.console" t0=$EPOCHREALTIME
    (
        for root in "${CG_ROOTS[@]}"; do echo "$BASHPID" >"$root/$CGROUP_NAME/cgroup.procs"; done
        export SYSTEMD_NSPAWN_LOCK=0 # several containers of one tree may run at once
        # A pure cgroup2 hierarchy in the container even on a hybrid (v1) host:
        # systemd 257 only tolerates v1 (taints "cgroupsv1"), 258 refuses it.
        export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="${SYSTEMD_NSPAWN_UNIFIED_HIERARCHY:-1}"
        exec systemd-nspawn -q -b -D "$ROOTFS" --machine="$MACHINE" \
            --register=no --keep-unit --console=pipe --private-network --volatile=overlay \
            --bind-ro="$TMP/deb:/opt/claracore/deb" \
            --bind-ro="$TMP/deb-prev:/opt/claracore/deb-prev" \
            --bind-ro="$LLAMA_SERVER:/opt/claracore/llama-server" \
            --bind-ro="$MODEL:/opt/claracore/tiny.gguf" \
            --bind-ro="$REPO/tests/tools/fake_upstream.py:/opt/claracore/fake_upstream.py"
    ) </dev/null >"$console" 2>&1 &
    NSPAWN_PID=$!
    CPID=""
    local i c
    for ((i = 0; i < 300; i++)); do
        kill -0 "$NSPAWN_PID" 2>/dev/null || break
        for c in $(cat /proc/"$NSPAWN_PID"/task/*/children 2>/dev/null); do
            [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ] && CPID="$c"
        done
        [ -n "$CPID" ] && break
        sleep 0.1
    done
    if [ -z "$CPID" ]; then
        say "  nspawn did not start the container's systemd; console:"
        tail -20 "$console" | sed 's/^/    /'
        return 1
    fi
    # Retry until its bus answers and boot is over.
    local state=""
    for ((i = 0; i < 300; i++)); do
        state="$(cx systemctl is-system-running --wait 2>/dev/null)"
        case "$state" in running | degraded) break ;; esac
        kill -0 "$NSPAWN_PID" 2>/dev/null || break
        sleep 0.1
    done
    case "$state" in
    running) ;;
    degraded)
        info "container is degraded; failed units:"
        cx systemctl --failed --no-legend | sed 's/^/      /'
        ;;
    *)
        say "  container did not finish booting (state '$state'); console:"
        tail -20 "$console" | sed 's/^/    /'
        return 1
        ;;
    esac
    BOOT_TIME="$(elapsed "$t0")"
    info "booted $MACHINE in ${BOOT_TIME} s (systemd $(cx systemctl --version | awk 'NR==1 {print $2}'), /sys/fs/cgroup: $(cx stat -fc %T /sys/fs/cgroup))"
}

stop_container() {
    if [ -n "$NSPAWN_PID" ]; then
        # SIGRTMIN+4 asks systemd for a poweroff; nspawn exits when PID 1 does.
        [ -n "$CPID" ] && kill -s RTMIN+4 "$CPID" 2>/dev/null
        local i
        for ((i = 0; i < 150; i++)); do
            kill -0 "$NSPAWN_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            say "  container did not power off in 15 s; killing it" >&2
            # Killing PID 1 of the container kills its whole PID namespace.
            [ -n "$CPID" ] && kill -KILL "$CPID" 2>/dev/null
            sleep 0.5
            kill -KILL "$NSPAWN_PID" 2>/dev/null
        fi
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    NSPAWN_PID=""
    CPID=""
    # nspawn leaves its propagation dir behind when /run is not a tmpfs.
    if [ -n "$MACHINE" ]; then
        rmdir "/run/systemd/nspawn/propagate/$MACHINE" 2>/dev/null
        MACHINE=""
    fi
    remove_cgroup
}

cleanup_all() {
    stop_container
    if [ "$NSPAWN_RUN_EXISTED" = 0 ]; then
        rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/locks /run/systemd/nspawn 2>/dev/null
    fi
    [ -n "$TMP" ] && rm -rf "$TMP"
    TMP=""
}

# --- claracore inside the container -------------------------------------------------
# apt_get ARGS...: apt-get in the container, no network (the package's
# dependencies are all in the rootfs), its output in $TMP/apt.log; shows the
# log's tail when it fails.
apt_get() {
    local rc=0
    cx env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" >"$TMP/apt.log" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        info "apt-get $*: exit $rc"
        tail -15 "$TMP/apt.log" | sed 's/^/      /'
    fi
    return "$rc"
}
# install_deb DIR: `apt-get install ./claracore_*.deb` in DIR, as an operator
# would (apt-get: apt's stable interface for scripts; same resolver).
install_deb() { # /opt/claracore/deb or /opt/claracore/deb-prev
    local rc=0
    cx sh -c "cd $1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./claracore_*.deb" >"$TMP/apt.log" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        info "apt-get install $1/claracore_*.deb: exit $rc"
        tail -15 "$TMP/apt.log" | sed 's/^/      /'
    fi
    return "$rc"
}

install_claracore() {
    install_deb /opt/claracore/deb || return 1
    write_config "$(base_config)"
}

base_config() {
    cat <<'EOF'
listen = ["127.0.0.1:5800", "unix:/run/claracore/claracore.sock"]
llama_server = "/opt/claracore/llama-server"
state_dir = "/var/lib/claracore"
[scheduler]
idle_ttl = "10m"
[models.tiny]
model = "/opt/claracore/tiny.gguf"
args = ["-c", "512", "-t", "1"]
EOF
}

# An unknown top-level key: the config loader denies unknown fields.
broken_config() {
    printf 'no_such_key = true\n'
    base_config
}

write_config() { printf '%s\n' "$1" | cx sh -c 'mkdir -p /etc/claracore && cat >/etc/claracore/config.toml'; }

add_dropin() { # NAME CONTENT
    printf '%s\n' "$2" | cx sh -c "mkdir -p /etc/systemd/system/claracore.service.d &&
        cat >/etc/systemd/system/claracore.service.d/$1.conf && systemctl daemon-reload"
}

prop() { cx systemctl show -p "$2" --value "$1"; }
# "P=V P=V ..." of claracore.service, in the order given.
props() {
    local p out=""
    for p in "$@"; do out+="$p=$(prop claracore.service "$p") "; done
    printf '%s' "${out% }"
}

# HTTP inside the container. Sets HTTP_CODE and HTTP_BODY.
http() { # curl args...
    local out
    out="$(cx curl -sS --max-time 120 -w '\n%{http_code}' "$@" 2>&1)"
    HTTP_CODE="${out##*$'\n'}"
    HTTP_BODY="${out%$'\n'*}"
}
get_models() { http http://127.0.0.1:5800/v1/models; }
chat() { # MODEL [extra json]
    http -H 'content-type: application/json' \
        -d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":8${2:-}}" \
        http://127.0.0.1:5800/v1/chat/completions
}
# The model ids in a /v1/models body, space-separated and sorted.
model_ids() { printf '%s' "$1" | cx jq -r '[.data[].id] | sort | join(" ")' 2>/dev/null; }

# Journal entries of the service as a JSON array (extra journalctl args).
journal_json() { cx sh -c 'journalctl -u claracore.service -o json --no-pager "$@" | jq -s .' sh "$@"; }
jq_in() { cx jq -r "$@"; }
jq_ok() { cx jq -e "$@" >/dev/null; } # exit status of a jq -e test on stdin

wait_for() { # SECONDS COMMAND... : retry every 0.2 s until it succeeds
    local deadline
    deadline="$(awk -v n="$EPOCHREALTIME" -v s="$1" 'BEGIN { printf "%.3f", n + s }')"
    shift
    while ! "$@"; do
        awk -v n="$EPOCHREALTIME" -v d="$deadline" 'BEGIN { exit !(n > d) }' && return 1
        sleep 0.2
    done
}

# --- assertions -------------------------------------------------------------------------
SCEN_FAILS=0
ok() { info "ok   $*"; }
bad() {
    info "FAIL $*"
    SCEN_FAILS=$((SCEN_FAILS + 1))
}
check() { # DESCRIPTION COMMAND...
    local d="$1"
    shift
    if "$@"; then ok "$d"; else bad "$d"; fi
}
is_eq() { [ "$1" = "$2" ]; }
contains() { [[ "$1" == *"$2"* ]]; }

diagnostics() {
    info "--- diagnostics"
    cx systemctl status --no-pager -l -n 0 claracore.service claracore.socket claracore-local.socket 2>&1 | sed 's/^/      /'
    info "--- journalctl -u claracore -n 50"
    cx journalctl -u claracore.service -u claracore.socket -u claracore-local.socket -n 50 --no-pager 2>&1 | sed 's/^/      /'
}

# --- scenarios ---------------------------------------------------------------------------

scenario_unit_files() {
    local u=/usr/lib/systemd/system out err rc
    # verify: needs the ExecStart binary (the package's /usr/bin/claracore).
    out="$(cx sh -c "systemd-analyze verify $u/claracore.service $u/claracore.socket $u/claracore-local.socket 2>/tmp/verify.err"; echo "rc=$?")"
    err="$(cx cat /tmp/verify.err)"
    rc="${out##*rc=}"
    out="${out%rc=*}"
    info "systemd-analyze verify: exit $rc; stdout: ${out:-(empty)}; stderr: ${err:-(empty)}"
    check "systemd-analyze verify exits 0" is_eq "$rc" 0
    check "systemd-analyze verify prints nothing on stderr" is_eq "$err" ""

    local sec score
    sec="$(cx systemd-analyze security --offline=yes --no-pager $u/claracore.service 2>&1)"
    score="$(printf '%s\n' "$sec" | sed -n 's/.*Overall exposure level for claracore.service: \([0-9.]*\).*/\1/p')"
    info "security exposure: ${score:-?} ($(printf '%s\n' "$sec" | grep 'Overall exposure' | sed 's/.*: //'))"
    info "top contributors (exposure, setting, description):"
    cx systemd-analyze security --offline=yes --json=short --no-pager $u/claracore.service 2>/dev/null |
        jq_in '[.[] | select(.set == false and .exposure != null)] | sort_by(-(.exposure | tonumber))
               | .[:10][] | "\(.exposure)  \(.name)  \(.description)"' | sed 's/^/      /'
    if [ -z "$score" ]; then
        bad "systemd-analyze security printed no overall exposure:"
        printf '%s\n' "$sec" | tail -5 | sed 's/^/      /'
    else
        check "security exposure $score <= $SECURITY_MAX" awk -v s="$score" -v m="$SECURITY_MAX" 'BEGIN { exit !(s <= m) }'
    fi
}

socket_activated_with() { # NAME: a socket-activated entry carries NAME in a field
    journal_json | jq_in --arg n "$1" -e '[.[] | select((.MESSAGE // "" | tostring) | test("socket-activated"))
        | [to_entries[] | select(.key | startswith("_") | not) | .value | tostring]
        | any(test("(^|[^a-z])" + $n + "([^a-z]|$)"))] | any' >/dev/null
}

scenario_socket_activation() {
    local rc=0
    cx systemctl start claracore.socket claracore-local.socket || rc=$?
    check "systemctl start claracore.socket claracore-local.socket" is_eq "$rc" 0
    check "sockets listening (claracore.socket: $(prop claracore.socket ActiveState), claracore-local.socket: $(prop claracore-local.socket ActiveState))" \
        is_eq "$(prop claracore.socket ActiveState)$(prop claracore-local.socket ActiveState)" activeactive
    local st
    st="$(prop claracore.service ActiveState)"
    check "service not started by the sockets alone (ActiveState=$st)" is_eq "$st" inactive

    local t0=$EPOCHREALTIME
    get_models
    info "first request over TCP: HTTP $HTTP_CODE in $(elapsed "$t0") s: ${HTTP_BODY:0:200}"
    check "first TCP request answered 200" is_eq "$HTTP_CODE" 200
    check "/v1/models lists tiny" contains "$(model_ids "$HTTP_BODY")" tiny
    st="$(prop claracore.service ActiveState)"
    check "the request started the service (ActiveState=$st)" is_eq "$st" active

    http --unix-socket /run/claracore/claracore.sock http://x/v1/models
    info "unix socket: HTTP $HTTP_CODE: ${HTTP_BODY:0:200}"
    check "unix socket answered 200" is_eq "$HTTP_CODE" 200
    check "unix socket /v1/models lists tiny" contains "$(model_ids "$HTTP_BODY")" tiny

    check "journal: socket-activated listener named http" wait_for 5 socket_activated_with http
    check "journal: socket-activated listener named local" wait_for 5 socket_activated_with local
    info "journal lines about listeners:"
    cx journalctl -u claracore.service --no-pager -o cat | grep -iE 'socket-activated|listen' | head -5 | sed 's/^/      /'

    # The service is running, so systemd has set up its RuntimeDirectory:
    # that chown must not have reached the socket or its directory.
    local_socket_owners "with the service running"
    local rc=0
    cx timeout 90 systemctl restart claracore.service || rc=$?
    check "systemctl restart claracore.service" is_eq "$rc" 0
    local_socket_owners "after a restart of the service"
}

# The local socket is root:claracore 0660 in /run/claracore (root's, 0755);
# the service owns only /run/claracore/daemon.
local_socket_owners() { # LABEL
    local dir sock own
    dir="$(cx stat -c '%a %U %G' /run/claracore)"
    sock="$(cx stat -c '%a %U %G' /run/claracore/claracore.sock)"
    own="$(cx stat -c '%a %U %G' /run/claracore/daemon)"
    check "$1: /run/claracore is 755 root root ($dir)" is_eq "$dir" "755 root root"
    check "$1: the local socket is 660 root claracore ($sock)" is_eq "$sock" "660 root claracore"
    check "$1: /run/claracore/daemon is 750 claracore claracore ($own)" is_eq "$own" "750 claracore claracore"
}

# From PID $1's network namespace: "ok" if 127.0.0.1:$2 accepts, else the error.
connect_from() {
    cx nsenter -t "$1" -n python3 -c "
import socket, sys
try:
    socket.create_connection(('127.0.0.1', $2), 2); print('ok')
except OSError as e:
    print(type(e).__name__)"
}

control_listener_up() { [ "$(connect_from 1 9099)" = ok ]; }

scenario_private_network() {
    local rc=0
    cx systemctl start claracore.socket claracore-local.socket || rc=$?
    check "systemctl start the sockets" is_eq "$rc" 0
    chat tiny
    check "chat through the activated TCP socket answered 200" is_eq "$HTTP_CODE" 200
    local mainpid child
    mainpid="$(prop claracore.service MainPID)"
    http --unix-socket /run/claracore/claracore.sock http://x/admin/ps
    child="$(printf '%s' "$HTTP_BODY" | jq_in '.models[] | select(.name == "tiny") | .pid // empty' 2>/dev/null)"
    info "MainPID $mainpid, llama-server $child"
    local own theirs
    own="$(cx readlink /proc/1/ns/net)"
    theirs="$(cx readlink "/proc/$mainpid/ns/net")"
    check "the service has a network namespace of its own ($theirs, not $own)" test -n "$theirs" -a "$theirs" != "$own"
    check "llama-server shares it" is_eq "$(cx readlink "/proc/${child:-0}/ns/net")" "$theirs"
    local ifaces
    ifaces="$(cx sh -c "tail -n +3 /proc/${child:-0}/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ' '")"
    check "only a loopback device in it (${ifaces})" is_eq "$ifaces" "lo "
    # A listener in the container's own namespace: reachable from there,
    # not from the model process's.
    local server
    server="$(cx sh -c 'python3 -m http.server 9099 --bind 127.0.0.1 >/dev/null 2>&1 & echo $!')"
    check "control: the container reaches its listener" wait_for 5 control_listener_up
    local out
    out="$(connect_from "${child:-0}" 9099)"
    check "llama-server cannot connect to it ($out)" is_eq "$out" ConnectionRefusedError
    [ -n "$server" ] && cx kill "$server" 2>/dev/null
    chat tiny
    check "requests are still served through the sockets" is_eq "$HTTP_CODE" 200
}

status_has_tiny() { contains "$(prop claracore.service StatusText)" tiny; }

scenario_ready_and_status() {
    local rc=0 t0=$EPOCHREALTIME
    cx systemctl start claracore || rc=$?
    info "systemctl start claracore: exit $rc after $(elapsed "$t0") s"
    check "systemctl start claracore succeeds" is_eq "$rc" 0
    local active sub status
    active="$(prop claracore.service ActiveState)"
    sub="$(prop claracore.service SubState)"
    status="$(prop claracore.service StatusText)"
    info "right after start: Type=$(prop claracore.service Type) ActiveState=$active SubState=$sub StatusText=$status"
    check "ActiveState=active right after start returned" is_eq "$active" active
    check "SubState=running right after start returned" is_eq "$sub" running
    check "StatusText non-empty right after start returned" test -n "$status"

    chat tiny
    info "chat: HTTP $HTTP_CODE: ${HTTP_BODY:0:200}"
    check "chat completion answered 200" is_eq "$HTTP_CODE" 200
    check "chat completion has choices" contains "$HTTP_BODY" '"choices"'
    check "StatusText mentions tiny after the request (within 5 s)" wait_for 5 status_has_tiny
    info "StatusText: $(prop claracore.service StatusText)"
}

status_has_reload_failed() { contains "$(prop claracore.service StatusText)" "reload failed"; }

scenario_reload() {
    local rc=0
    cx systemctl start claracore || rc=$?
    check "systemctl start claracore" is_eq "$rc" 0
    local pid0
    pid0="$(prop claracore.service MainPID)"
    info "MainPID $pid0"

    write_config "$(base_config)
[models.tiny2]
model = \"/opt/claracore/tiny.gguf\"
args = [\"-c\", \"512\", \"-t\", \"1\"]"
    local t0=$EPOCHREALTIME
    rc=0
    cx timeout 60 systemctl reload claracore || rc=$?
    info "systemctl reload: exit $rc after $(elapsed "$t0") s"
    check "systemctl reload claracore succeeds" is_eq "$rc" 0
    get_models
    local ids
    ids="$(model_ids "$HTTP_BODY")"
    info "/v1/models after reload: HTTP $HTTP_CODE, models: $ids"
    check "/v1/models lists tiny2 after reload" contains " $ids " " tiny2 "
    check "still active after reload" is_eq "$(prop claracore.service ActiveState)" active
    check "MainPID unchanged by reload" is_eq "$(prop claracore.service MainPID)" "$pid0"

    write_config "$(broken_config)"
    t0=$EPOCHREALTIME
    rc=0
    cx timeout 60 systemctl reload claracore || rc=$?
    info "systemctl reload with a broken config: exit $rc after $(elapsed "$t0") s (not asserted)"
    check "StatusText says reload failed (within 5 s)" wait_for 5 status_has_reload_failed
    info "StatusText: $(prop claracore.service StatusText)"
    check "still active after the failed reload" is_eq "$(prop claracore.service ActiveState)" active
    check "MainPID unchanged by the failed reload" is_eq "$(prop claracore.service MainPID)" "$pid0"
    get_models
    ids="$(model_ids "$HTTP_BODY")"
    info "/v1/models after the failed reload: HTTP $HTTP_CODE, models: $ids"
    check "/v1/models still answers with the previous models (tiny tiny2)" is_eq "$HTTP_CODE $ids" "200 tiny tiny2"
}

restarted_from() { # OLD_PID
    local pid st
    pid="$(prop claracore.service MainPID)"
    st="$(prop claracore.service ActiveState)"
    [ "$pid" != 0 ] && [ "$pid" != "$1" ] && [ "$st" = active ]
}
journal_has() { cx journalctl -u claracore.service --no-pager -o cat | grep -q -- "$1"; }

scenario_watchdog() {
    add_dropin watchdog '[Service]
WatchdogSec=2s'
    local rc=0
    cx systemctl start claracore || rc=$?
    check "systemctl start claracore (WatchdogSec=2s drop-in)" is_eq "$rc" 0
    check "WatchdogUSec=2s" is_eq "$(prop claracore.service WatchdogUSec)" 2s
    local pid0
    pid0="$(prop claracore.service MainPID)"
    # Three watchdog periods without a restart: the daemon pings.
    sleep 6
    check "alive 6 s later with WatchdogSec=2s: same MainPID, NRestarts=0 (pings arrive)" \
        is_eq "$(prop claracore.service MainPID) $(prop claracore.service NRestarts)" "$pid0 0"
    # Never signal 0 or 1: "kill 0" would stop our own process group.
    if ! [[ "$pid0" =~ ^[0-9]+$ ]] || [ "$pid0" -le 1 ]; then
        bad "no MainPID to stop (MainPID=$pid0)"
        return
    fi
    local t0=$EPOCHREALTIME
    cx kill -STOP "$pid0"
    info "SIGSTOP to MainPID $pid0"
    if wait_for 15 restarted_from "$pid0"; then
        ok "restarted with a new MainPID $(prop claracore.service MainPID) $(elapsed "$t0") s after SIGSTOP"
    else
        bad "no restart within 15 s of SIGSTOP (MainPID $(prop claracore.service MainPID), $(prop claracore.service ActiveState))"
    fi
    check "systemd logged a watchdog timeout" journal_has "Watchdog timeout"
    local n
    n="$(prop claracore.service NRestarts)"
    check "NRestarts=$n >= 1" test "${n:-0}" -ge 1
    cx journalctl -u claracore.service --no-pager -o cat | grep -iE 'watchdog|Scheduled restart|signal' | head -5 | sed 's/^/      /'
    # Informational: what the restart did to the listening sockets (PartOf=).
    info "socket units during the restart:"
    cx journalctl -u claracore.socket -u claracore-local.socket --no-pager -o cat | grep -E 'Closed|Listening|Failed|in use' | tail -8 | sed 's/^/      /'
}

model_tiny_entries() { [ "$(journal_json MODEL=tiny | jq_in 'length')" -gt 0 ] 2>/dev/null; }

scenario_journal_fields() {
    local rc=0
    cx systemctl start claracore || rc=$?
    check "systemctl start claracore" is_eq "$rc" 0
    chat tiny
    check "chat completion answered 200" is_eq "$HTTP_CODE" 200
    local mainpid child
    mainpid="$(prop claracore.service MainPID)"
    http --unix-socket /run/claracore/claracore.sock http://x/admin/ps
    child="$(printf '%s' "$HTTP_BODY" | jq_in '.models[] | select(.name == "tiny") | .pid // empty' 2>/dev/null)"
    info "MainPID $mainpid; /admin/ps llama-server pid for tiny: ${child:-none}"

    check "journalctl -u claracore MODEL=tiny has entries (within 5 s)" wait_for 5 model_tiny_entries
    local j
    j="$(journal_json MODEL=tiny)"
    info "MODEL=tiny: $(printf '%s' "$j" | jq_in '"\(length) entries, \([.[] | select(.PRIORITY)] | length) with PRIORITY, \([.[] | select(.CHILD_PID)] | length) with CHILD_PID"')"
    printf '%s' "$j" | jq_in '.[:3][] | "PRIORITY=\(.PRIORITY) CHILD_PID=\(.CHILD_PID) MESSAGE=\(.MESSAGE | tostring | .[:100])"' | sed 's/^/      /'
    check "every MODEL=tiny entry has PRIORITY" jq_ok 'length > 0 and all(.PRIORITY != null)' <<<"$j"
    check "some MODEL=tiny entry has a numeric CHILD_PID" jq_ok 'any((.CHILD_PID // "") | test("^[0-9]+$"))' <<<"$j"
    if [ -n "$child" ]; then
        check "CHILD_PID=$child (the llama-server of /admin/ps) appears" jq_ok --arg p "$child" 'any(.CHILD_PID == $p)' <<<"$j"
    else
        bad "/admin/ps shows no pid for tiny: ${HTTP_BODY:0:200}"
    fi
    local d
    d="$(journal_json _PID="$mainpid" PRIORITY=6 _TRANSPORT=journal)"
    info "daemon (PID $mainpid) entries at PRIORITY=6 via the native journal protocol: $(jq_in length <<<"$d")"
    jq_in '.[:2][] | "PRIORITY=\(.PRIORITY) MESSAGE=\(.MESSAGE | tostring | .[:100])"' <<<"$d" | sed 's/^/      /'
    check "the daemon logs info events as PRIORITY=6 journal entries" jq_ok 'length > 0' <<<"$d"
}

stream_started() { cx grep -q '^data: {' /run/cc-stream.out 2>/dev/null; }
stream_client_done() { case "$(prop cc-stream-client.service SubState)" in exited | failed | dead) return 0 ;; esac; return 1; }

scenario_stop_with_stream() {
    write_config "$(base_config | sed 's/^idle_ttl = .*/&\nmax_loaded = 2/')
[models.slow]
cmd = [\"python3\", \"/opt/claracore/fake_upstream.py\", \"--port\", \"{port}\", \"--chunk-delay-ms\", \"100\"]"
    local rc=0
    cx systemctl start claracore || rc=$?
    check "systemctl start claracore" is_eq "$rc" 0
    chat tiny
    check "tiny answered 200 (a llama-server child is running)" is_eq "$HTTP_CODE" 200
    # The streaming client runs as a transient unit of the container's systemd
    # (60 chunks, 100 ms apart: ~6 s).
    cx systemd-run --quiet --unit=cc-stream-client -p RemainAfterExit=yes \
        -p StandardOutput=file:/run/cc-stream.out -p StandardError=file:/run/cc-stream.err \
        curl -sS -N --max-time 120 -H 'content-type: application/json' \
        -d '{"model":"slow","messages":[{"role":"user","content":"hi"}],"max_tokens":60,"stream":true}' \
        http://127.0.0.1:5800/v1/chat/completions
    check "the stream began (within 30 s)" wait_for 30 stream_started
    local procs
    procs="$(cx pgrep -a 'llama-server|python3' | sed 's/^/        /')"
    info "children before stop:"
    printf '%s\n' "$procs"
    check "llama-server and the fake upstream both run before stop" \
        eval '[[ "$procs" == *llama-server* && "$procs" == *fake_upstream* ]]'
    local before
    before="$(cx grep -c '^data: ' /run/cc-stream.out)"
    check "the stream was not finished when stop began ($before data lines)" \
        eval '! cx grep -q "^data: \[DONE\]" /run/cc-stream.out'

    local t0=$EPOCHREALTIME
    rc=0
    cx timeout 90 systemctl stop claracore || rc=$?
    info "systemctl stop claracore: exit $rc after $(elapsed "$t0") s"
    check "systemctl stop claracore succeeds" is_eq "$rc" 0
    wait_for 30 stream_client_done
    local out after last crc
    out="$(cx cat /run/cc-stream.out)"
    after="$(printf '%s\n' "$out" | grep -c '^data: ')"
    last="$(printf '%s\n' "$out" | grep -v '^[[:space:]]*$' | tail -1)"
    crc="$(prop cc-stream-client.service ExecMainStatus)"
    info "stream: $before data lines at stop, $after at the end; last line: $last; curl exit $crc; stderr: $(cx cat /run/cc-stream.err)"
    check "the stream completed with data: [DONE]" is_eq "$last" "data: [DONE]"
    check "the stream went on during the stop ($before -> $after data lines)" test "$after" -gt "$before"
    check "curl exited 0" is_eq "$crc" 0
    procs="$(cx pgrep -a 'llama-server|python3')"
    check "no llama-server or fake upstream left${procs:+: $procs}" test -z "$procs"
    info "after stop: $(props ActiveState Result ExecMainCode ExecMainStatus)"
    check "Result=success" is_eq "$(prop claracore.service Result)" success
    check "ExecMainStatus=0" is_eq "$(prop claracore.service ExecMainStatus)" 0
}

# Not in the original list: a restart, by hand or by Restart=on-failure, must
# leave both listeners working (claracore.socket: "Keep connections queued
# while the service starts or restarts").
both_listeners_answer() { # LABEL
    local tcp unix
    tcp="$(prop claracore.socket ActiveState)"
    unix="$(prop claracore-local.socket ActiveState)"
    check "$1: claracore.socket active ($tcp)" is_eq "$tcp" active
    check "$1: claracore-local.socket active ($unix)" is_eq "$unix" active
    get_models
    check "$1: TCP 127.0.0.1:5800 answers (HTTP $HTTP_CODE)" is_eq "$HTTP_CODE" 200
    http --unix-socket /run/claracore/claracore.sock http://x/v1/models
    check "$1: unix socket answers (HTTP $HTTP_CODE)" is_eq "$HTTP_CODE" 200
}

scenario_restart_keeps_sockets() {
    local rc=0 pid0
    cx systemctl start claracore || rc=$?
    check "systemctl start claracore" is_eq "$rc" 0
    # A crash first (on a fresh service): Restart=on-failure brings it back
    # after RestartSec=2s.
    pid0="$(prop claracore.service MainPID)"
    if ! [[ "$pid0" =~ ^[0-9]+$ ]] || [ "$pid0" -le 1 ]; then
        bad "no MainPID to kill (MainPID=$pid0)"
        return
    fi
    cx kill -KILL "$pid0"
    if wait_for 15 restarted_from "$pid0"; then
        ok "restarted after SIGKILL (MainPID $pid0 -> $(prop claracore.service MainPID))"
    else
        bad "not restarted within 15 s of SIGKILL"
    fi
    both_listeners_answer "after a crash and Restart=on-failure"

    pid0="$(prop claracore.service MainPID)"
    rc=0
    cx timeout 90 systemctl restart claracore || rc=$?
    check "systemctl restart claracore succeeds" is_eq "$rc" 0
    check "new MainPID after restart" eval '[ "$(prop claracore.service MainPID)" != "$pid0" ]'
    both_listeners_answer "after systemctl restart"
    info "claracore.socket's journal:"
    cx journalctl -u claracore.socket --no-pager -o cat | grep -E 'Closed|Listening|Failed|in use' | sed 's/^/      /'
}

scenario_bad_config_at_start() {
    write_config "$(broken_config)"
    local rc=0
    cx systemctl start claracore 2>/dev/null || rc=$?
    info "systemctl start claracore with a broken config: exit $rc"
    check "systemctl start claracore fails" test "$rc" -ne 0
    check "ExecMainStatus=78" is_eq "$(prop claracore.service ExecMainStatus)" 78
    cx journalctl -u claracore.service --no-pager -o cat | grep -i 'claracore' | head -3 | sed 's/^/      /'
    sleep 10
    info "10 s later: $(props ActiveState SubState Result NRestarts ExecMainStatus)"
    check "NRestarts=0 10 s later (no restart loop)" is_eq "$(prop claracore.service NRestarts)" 0
    local st
    st="$(prop claracore.service ActiveState)"
    check "failed or inactive 10 s later (ActiveState=$st)" eval '[ "$st" = failed ] || [ "$st" = inactive ]'
    local starts
    starts="$(cx journalctl -u claracore.service --no-pager -o cat | grep -c 'Starting claracore')"
    check "started once ($starts 'Starting' lines)" is_eq "$starts" 1
}

# --- the package: install, upgrade, remove, purge -----------------------------------

# "MODE USER GROUP" of a path in the container.
stat_of() { cx stat -c '%a %U %G' "$1" 2>/dev/null; }
# dpkg's view of the package: "Status Version", e.g. "install ok installed 0.1.0-1".
pkg_status() { cx dpkg-query -W -f '${Status} ${Version}' claracore 2>/dev/null; }
exists() { cx test -e "$1"; }
absent() { ! cx test -e "$1"; }
# The request ids in the history, sorted, one line.
history_ids() {
    cx curl -sS --max-time 30 --unix-socket /run/claracore/claracore.sock 'http://x/admin/history?limit=1000' |
        jq_in '[.requests[].request_id] | sort | join(" ")' 2>/dev/null
}
history_has_rows() { [ -n "$(history_ids)" ]; }
claracore_procs() { cx pgrep -u claracore -a . 2>/dev/null; }
no_claracore_procs() { [ -z "$(claracore_procs)" ]; }

scenario_package_install() {
    local t0=$EPOCHREALTIME rc=0
    install_deb /opt/claracore/deb || rc=$?
    info "apt-get install ./claracore_*.deb: exit $rc after $(elapsed "$t0") s"
    sed -n '/Unpacking\|Setting up\|Created symlink\|Recommended\|NOTICE\|W:/p' "$TMP/apt.log" | sed 's/^/      /'
    check "apt-get install ./claracore_*.deb succeeds with no network" is_eq "$rc" 0
    check "dpkg: installed, version $DEB_VERSION ($(pkg_status))" is_eq "$(pkg_status)" "install ok installed $DEB_VERSION"
    local f
    for f in /usr/bin/claracore /usr/lib/systemd/system/claracore.service /usr/lib/systemd/system/claracore.socket \
        /usr/lib/systemd/system/claracore-local.socket /usr/lib/sysusers.d/claracore.conf \
        /usr/lib/tmpfiles.d/claracore.conf /usr/share/man/man1/claracore.1.gz \
        /usr/share/man/man1/claracore-serve.1.gz /usr/share/bash-completion/completions/claracore \
        /usr/share/zsh/vendor-completions/_claracore /usr/share/fish/vendor_completions.d/claracore.fish \
        /usr/share/doc/claracore/copyright; do
        check "installed: $f" exists "$f"
    done
    check "man finds claracore(1) ($(cx man -w claracore 2>&1))" is_eq "$(cx man -w claracore 2>&1)" /usr/share/man/man1/claracore.1.gz
    check "the example config is a conffile" contains "$(cx dpkg-query -W -f '${Conffiles}' claracore)" /etc/claracore/config.toml
    check "/etc/claracore/config.toml is 640 root claracore ($(stat_of /etc/claracore/config.toml))" \
        is_eq "$(stat_of /etc/claracore/config.toml)" "640 root claracore"
    check "it is the shipped example" eval 'cx grep -q "^# claracore configuration" /etc/claracore/config.toml'
    local pw
    pw="$(cx getent passwd claracore)"
    info "user: $pw"
    check "sysusers made the claracore system user (home /var/lib/claracore)" \
        eval '[[ "$pw" == claracore:x:*:*:*:/var/lib/claracore:* ]]'
    check "tmpfiles made /var/lib/claracore 750 claracore ($(stat_of /var/lib/claracore))" \
        is_eq "$(stat_of /var/lib/claracore)" "750 claracore claracore"
    check "and /var/lib/claracore/models ($(stat_of /var/lib/claracore/models))" \
        is_eq "$(stat_of /var/lib/claracore/models)" "750 claracore claracore"
    local en act
    en="$(cx systemctl is-enabled claracore.socket claracore-local.socket claracore.service | tr '\n' ' ')"
    act="$(cx systemctl is-active claracore.socket claracore-local.socket claracore.service | tr '\n' ' ')"
    info "is-enabled (socket, local socket, service): $en; is-active: $act"
    check "both sockets enabled, the service not (socket-activated)" is_eq "$en" "enabled enabled disabled "
    check "both sockets listening, the service not started" is_eq "$act" "active active inactive "
    rc=0
    cx claracore check-config /etc/claracore/config.toml >/dev/null 2>&1 || rc=$?
    check "claracore check-config accepts the shipped config" is_eq "$rc" 0

    # The shipped config as it is, through socket activation: the daemon
    # (user claracore) reads the 0640 root:claracore file.
    get_models
    info "first request over TCP with the shipped config: HTTP $HTTP_CODE: ${HTTP_BODY:0:160}"
    check "it answers /v1/models with the shipped config's models (tiny custom)" \
        is_eq "$HTTP_CODE $(model_ids "$HTTP_BODY")" "200 custom tiny"
    check "the request started claracore.service" is_eq "$(prop claracore.service ActiveState)" active
    local out
    out="$(cx claracore list 2>&1)"
    rc=$?
    info "claracore list (the CLI on the local socket): exit $rc: $(printf '%s' "$out" | head -3 | tr '\n' '|')"
    check "the CLI reaches the daemon on the local socket" eval '[ "$rc" = 0 ] && [[ "$out" == *tiny* ]]'
}

scenario_package_upgrade() {
    local rc=0
    install_deb /opt/claracore/deb-prev || rc=$?
    check "the previous build ($DEB_VERSION~prev) installs" is_eq "$rc" 0
    check "dpkg: $DEB_VERSION~prev installed" is_eq "$(pkg_status)" "install ok installed $DEB_VERSION~prev"
    # The operator edits the config (the test config, with a mark).
    write_config "# edited by the operator before the upgrade
$(base_config)"
    local conf0
    conf0="$(cx sha256sum /etc/claracore/config.toml)"
    chat tiny
    check "a request before the upgrade answered 200" is_eq "$HTTP_CODE" 200
    check "its history row is written (within 5 s)" wait_for 5 history_has_rows
    local ids0 pid0
    ids0="$(history_ids)"
    pid0="$(prop claracore.service MainPID)"
    info "before: MainPID $pid0, history request ids: $ids0"

    local t0=$EPOCHREALTIME
    rc=0
    install_deb /opt/claracore/deb || rc=$?
    info "apt-get install ./claracore_$DEB_VERSION*.deb over $DEB_VERSION~prev: exit $rc after $(elapsed "$t0") s"
    sed -n '/Preparing\|Unpacking\|Setting up\|onfiguration file/p' "$TMP/apt.log" | sed 's/^/      /'
    check "the upgrade succeeds" is_eq "$rc" 0
    check "dpkg: $DEB_VERSION installed" is_eq "$(pkg_status)" "install ok installed $DEB_VERSION"
    check "dpkg took the upgrade path (Unpacking ... over ...)" eval 'grep -q "over ($DEB_VERSION~prev)" "$TMP/apt.log"'
    check "the edited config is kept, byte for byte" is_eq "$(cx sha256sum /etc/claracore/config.toml)" "$conf0"
    local leftovers
    leftovers="$(cx sh -c 'ls /etc/claracore/*.dpkg-* 2>/dev/null')"
    check "no .dpkg-new/.dpkg-dist beside it${leftovers:+: $leftovers}" test -z "$leftovers"
    check "still 640 root claracore ($(stat_of /etc/claracore/config.toml))" \
        is_eq "$(stat_of /etc/claracore/config.toml)" "640 root claracore"
    local pid1
    pid1="$(prop claracore.service MainPID)"
    info "after: MainPID $pid1, $(props ActiveState SubState NRestarts)"
    check "the service was restarted on the new package (MainPID $pid0 -> $pid1) and is active" \
        eval '[ "$pid1" != 0 ] && [ "$pid1" != "$pid0" ] && [ "$(prop claracore.service ActiveState)" = active ]'
    check "both sockets still enabled and listening" \
        is_eq "$(cx systemctl is-enabled claracore.socket claracore-local.socket | tr '\n' ' ')$(cx systemctl is-active claracore.socket claracore-local.socket | tr '\n' ' ')" \
        "enabled enabled active active "
    local ids1
    ids1="$(history_ids)"
    info "history request ids after the upgrade: $ids1"
    check "the history database kept the rows from before the upgrade" eval '[ -n "$ids0" ] && [[ " $ids1 " == *" $ids0 "* ]]'
    chat tiny
    check "a request after the upgrade answered 200" is_eq "$HTTP_CODE" 200
}

# A used install: the test config, one request (service and llama-server up,
# a history row written).
used_install() {
    install_claracore || { bad "installing the package failed"; return 1; }
    chat tiny
    check "a request answered 200" is_eq "$HTTP_CODE" 200
    check "its history row is written (within 5 s)" wait_for 5 history_has_rows
    info "running as claracore: $(claracore_procs | awk '{print $1, $2}' | tr '\n' ' ')"
}

scenario_package_remove() {
    used_install || return
    local conf0 ids0
    conf0="$(cx sha256sum /etc/claracore/config.toml)"
    ids0="$(history_ids)"
    local t0=$EPOCHREALTIME rc=0
    apt_get remove claracore || rc=$?
    info "apt-get remove claracore: exit $rc after $(elapsed "$t0") s"
    check "apt-get remove succeeds" is_eq "$rc" 0
    check "dpkg: removed, config files kept ($(pkg_status))" eval '[[ "$(pkg_status)" == "deinstall ok config-files "* ]]'
    local act
    act="$(cx systemctl is-active claracore.service claracore.socket claracore-local.socket | tr '\n' ' ')"
    check "the service and both sockets are stopped ($act)" is_eq "$act" "inactive inactive inactive "
    check "no process of user claracore is left (daemon, llama-server)" wait_for 10 no_claracore_procs
    http http://127.0.0.1:5800/v1/models
    check "nothing listens on 127.0.0.1:5800 (curl: ${HTTP_BODY:0:80})" is_eq "$HTTP_CODE" 000
    check "the binary is gone" absent /usr/bin/claracore
    check "the units are gone" absent /usr/lib/systemd/system/claracore.service
    check "state kept: /var/lib/claracore/history.db" exists /var/lib/claracore/history.db
    check "config kept, unchanged" is_eq "$(cx sha256sum /etc/claracore/config.toml)" "$conf0"
    check "the claracore user stays" eval 'cx getent passwd claracore >/dev/null'
    # And back: the kept state is served again.
    rc=0
    install_deb /opt/claracore/deb || rc=$?
    check "reinstalling succeeds" is_eq "$rc" 0
    check "the kept history answers again after the reinstall" wait_for 10 history_has_rows
    local ids1
    ids1="$(history_ids)"
    check "with the rows from before the removal ($ids0 -> $ids1)" eval '[ -n "$ids0" ] && [[ " $ids1 " == *" $ids0 "* ]]'
}

scenario_package_purge() {
    used_install || return
    local t0=$EPOCHREALTIME rc=0
    apt_get purge claracore || rc=$?
    info "apt-get purge claracore: exit $rc after $(elapsed "$t0") s"
    check "apt-get purge succeeds" is_eq "$rc" 0
    local st
    st="$(pkg_status)"
    check "dpkg no longer knows the package (${st:-nothing})" eval '[ -z "$st" ] || [[ "$st" == "unknown ok not-installed"* ]]'
    check "the service and sockets are stopped" \
        is_eq "$(cx systemctl is-active claracore.service claracore.socket claracore-local.socket | tr '\n' ' ')" "inactive inactive inactive "
    check "no process of user claracore is left" wait_for 10 no_claracore_procs
    check "state dropped: /var/lib/claracore is gone" absent /var/lib/claracore
    check "config dropped: /etc/claracore is gone" absent /etc/claracore
    check "no statoverride left" eval '! cx dpkg-statoverride --list /etc/claracore/config.toml >/dev/null'
    local links
    links="$(cx sh -c 'ls /etc/systemd/system/*.wants/claracore* 2>/dev/null')"
    check "no enablement symlinks left${links:+: $links}" test -z "$links"
}

# --- driver ------------------------------------------------------------------------------
PASSED=0
FAILED=0
SUMMARY=()

record() { # NAME RESULT TIME
    SUMMARY+=("$(printf '%-22s %-4s %6s s' "$1" "$2" "$3")")
    if [ "$2" = PASS ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}

run_scenario() {
    local name="$1" fn="scenario_${1//-/_}"
    SCEN_FAILS=0
    say "=== $name"
    local t_all=$EPOCHREALTIME t0
    BOOT_TIME="-"
    if boot_container; then
        # The package-* scenarios install (and remove) the package themselves.
        if [[ "$name" == package-* ]] || install_claracore; then
            t0=$EPOCHREALTIME
            "$fn"
            info "scenario took $(elapsed "$t0") s (boot ${BOOT_TIME} s)"
        else
            bad "installing claracore into the container failed"
        fi
        [ "$SCEN_FAILS" -eq 0 ] || diagnostics
    else
        bad "the container did not boot"
    fi
    stop_container
    local r=PASS
    [ "$SCEN_FAILS" -eq 0 ] || r=FAIL
    record "$name" "$r" "$(elapsed "$t_all")"
    say "--- $name: $r"
}

main() {
    local scenarios=("$@") s
    [ ${#scenarios[@]} -gt 0 ] || scenarios=("${ALL_SCENARIOS[@]}")
    for s in "${scenarios[@]}"; do
        declare -F "scenario_${s//-/_}" >/dev/null || { say "unknown scenario: $s (have: ${ALL_SCENARIOS[*]})"; exit 2; }
    done
    local t_start=$EPOCHREALTIME
    ensure_host_tools
    detect_cgroups
    trap 'cleanup_all' EXIT
    trap 'exit 130' INT TERM
    TMP="$(mktemp -d /tmp/claracore-nspawn.XXXXXX)"
    build_packages
    test_deps
    ensure_rootfs
    say "claracore: $DEB ($DEB_VERSION; $(git -C "$REPO" log -1 --format=%h 2>/dev/null) + worktree), previous build $DEB_VERSION~prev"
    say "rootfs: $ROOTFS; host $(systemd-nspawn --version | head -1)"
    say "setup took $(elapsed "$t_start") s"
    for s in "${scenarios[@]}"; do
        run_scenario "$s"
        if [ "${CLARACORE_NSPAWN_KEEP_GOING:-1}" = 0 ] && [ "$FAILED" -gt 0 ]; then break; fi
    done
    cleanup_all
    trap - EXIT
    say ""
    say "scenario               result   time"
    printf '%s\n' "${SUMMARY[@]}"
    say "total $(elapsed "$t_start") s"
    say "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}

main "$@"
