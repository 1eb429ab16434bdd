#!/bin/bash
# Runs inside the qemu guest of tests/systemd/run-qemu.sh (installed as
# /usr/local/sbin/claracore-qemu-test, started by claracore-qemu-test.service
# after multi-user.target). Installs the package (`apt-get install
# ./claracore_*.deb`, no network), puts the test config in place of the
# shipped one, then checks that claracore.service's MemoryMax= is enforced on
# its llama-server children without taking the daemon down.
#
# Writes PASS/FAIL/INFO lines to results.txt (and the console), ends with DONE
# when the scenario ran to its end, and puts results.txt plus logs as a tar
# archive on the results disk (virtio serial "results") for the host.
set -u

R=/run/claracore-qemu-results
mkdir -p "$R"
RES="$R/results.txt"
: >"$RES"
URL=http://127.0.0.1:5800
UNIT=claracore.service
CG=/sys/fs/cgroup/system.slice/claracore.service

say() { echo "$*" >>"$RES"; echo "claracore-qemu-test: $*"; }
pass() { say "PASS $*"; }
fail() { say "FAIL $*"; }
info() { say "INFO $*"; }
check() { # name command...: PASS if the command succeeds
    local name="$1"; shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

finish() {
    journalctl -b --no-pager -o short-monotonic >"$R/journal.log" 2>&1
    journalctl -b --no-pager -o short-monotonic -u "$UNIT" -u claracore.socket \
        -u claracore-local.socket >"$R/claracore.log" 2>&1
    journalctl -b -k --no-pager -o short-monotonic >"$R/kernel.log" 2>&1
    systemctl status --no-pager "$UNIT" >"$R/status.log" 2>&1
    local disk=/dev/disk/by-id/virtio-results
    [ -b "$disk" ] || disk=/dev/vdb
    tar -C "$R" -cf "$disk" . && sync
}
trap finish EXIT

prop() { systemctl show -P "$1" "$UNIT"; }

# chat MODEL: POST a chat completion; sets CODE and BODY.
chat() {
    local out
    out="$(curl -sS -m 240 -w '\n%{http_code}' "$URL/v1/chat/completions" \
        -H 'content-type: application/json' \
        -d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":8}" \
        2>>"$R/curl.log")"
    CODE="${out##*$'\n'}"
    BODY="${out%$'\n'*}"
}

# ps_field MODEL FIELD: a field of MODEL in GET /admin/ps.
ps_field() {
    curl -sS -m 30 --unix-socket /run/claracore/claracore.sock http://x/admin/ps 2>>"$R/curl.log" \
        | jq -r --arg m "$1" --arg f "$2" '.models[] | select(.name == $m) | .[$f] // empty'
}

oom_kills() { sed -n 's/^oom_kill \([0-9]*\)$/\1/p' "$CG/memory.events" 2>/dev/null || echo 0; }

rss_of() { # PID -> "VmRSS=… VmHWM=…"
    awk '/^(VmRSS|VmHWM):/ { printf "%s=%s%s ", $1, $2, $3 }' "/proc/$1/status" 2>/dev/null | sed 's/:=/=/g'
}

# --- boot -----------------------------------------------------------------------
mono_s() { awk -v us="$1" 'BEGIN { printf "%.1f", us / 1000000 }'; }
mu="$(systemctl show -P ActiveEnterTimestampMonotonic multi-user.target)"
ur="$(systemctl show -P UserspaceTimestampMonotonic)"
info "boot: userspace (switch from initrd) at $(mono_s "$ur")s, multi-user.target at $(mono_s "$mu")s after kernel start; test starts at $(cut -d' ' -f1 /proc/uptime)s uptime"
info "guest: $(uname -r), systemd $(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p'), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"

# --- the package -------------------------------------------------------------------
t0=$(date +%s)
rc=0
(cd /opt/claracore/deb && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./claracore_*.deb) \
    >"$R/apt.log" 2>&1 || rc=$?
info "apt-get install ./claracore_*.deb: exit $rc after $(($(date +%s) - t0))s; $(dpkg-query -W -f '${Package} ${Version} ${Status}' claracore 2>&1)"
check "apt-get install ./claracore_*.deb succeeds in the guest" test "$rc" = 0
[ "$rc" = 0 ] || tail -n 20 "$R/apt.log" | sed 's/^/    apt| /'
# An operator's edit of the conffile: the test models and llama-server.
cat /opt/claracore/config.toml >/etc/claracore/config.toml

# --- before the first request ---------------------------------------------------
check "the package enabled and started claracore.socket and claracore-local.socket" \
    bash -c 'systemctl is-active -q claracore.socket claracore-local.socket &&
             systemctl is-enabled -q claracore.socket claracore-local.socket'
state="$(systemctl is-active "$UNIT")"
check "claracore.service not started before the first connection (is $state)" \
    test "$state" = inactive
check "sysusers created the claracore user" id claracore

# --- 1. tiny: served, through socket activation -----------------------------------
chat tiny
check "tiny: first request served via socket activation (HTTP $CODE)" test "$CODE" = 200
[ "$CODE" = 200 ] || info "tiny body: $BODY"
pid0="$(prop MainPID)"
restarts0="$(prop NRestarts)"
info "claracore: MainPID=$pid0 NRestarts=$restarts0 $(rss_of "$pid0")"
mm="$(prop MemoryMax)"
cg_max="$(cat "$CG/memory.max" 2>/dev/null)"
info "claracore.service: MemoryMax=$mm MemorySwapMax=$(prop MemorySwapMax) MemoryCurrent=$(prop MemoryCurrent); cgroup memory.max=$cg_max memory.swap.max=$(cat "$CG/memory.swap.max" 2>/dev/null)"
check "memory.max of the service cgroup is MemoryMax= ($cg_max)" \
    test -n "$cg_max" -a "$cg_max" != max -a "$cg_max" = "$mm"
tiny_pid="$(ps_field tiny pid)"
info "tiny llama-server: pid=$tiny_pid $(rss_of "$tiny_pid"); cgroup memory.peak=$(cat "$CG/memory.peak" 2>/dev/null)"
ooms0="$(oom_kills)"
info "memory.events oom_kill before hog: $ooms0"

# --- 2. hog: OOM-killed, the daemon survives ------------------------------------
t0=$(date +%s)
chat hog
info "hog: HTTP $CODE after $(($(date +%s) - t0))s; error.message: $(jq -r '.error.message // .' <<<"$BODY" 2>/dev/null || echo "$BODY")"
check "hog: request fails instead of being served (HTTP $CODE)" test "$CODE" != 200

hog_state=""
for _ in $(seq 30); do
    hog_state="$(ps_field hog state)"
    [ "$hog_state" = failed ] && break
    sleep 1
done
last_error="$(ps_field hog last_error)"
info "/admin/ps hog: state=$hog_state last_error: $last_error"

ooms1="$(oom_kills)"
info "memory.events: $(tr '\n' ' ' <"$CG/memory.events" 2>/dev/null)"
killed="$(journalctl -b -k --no-pager -o cat | grep -E 'Killed process [0-9]+ \(' | tail -n 3)"
oomline="$(journalctl -b -k --no-pager -o cat | grep -E 'oom-kill:' | tail -n 1)"
info "kernel: $oomline"
info "kernel: $killed"
# memory.events starts over when the cgroup is made anew (a service restart),
# so the kernel log is the record that survives either way.
check "kernel OOM-killed llama-server in claracore.service's memcg (kernel log; memory.events oom_kill $ooms0 -> $ooms1)" \
    bash -c '[[ "$1" == *"(llama-server)"* && "$2" == *"task_memcg=/system.slice/claracore.service"* ]]' _ "$killed" "$oomline"

pid1="$(prop MainPID)"
restarts1="$(prop NRestarts)"
active1="$(prop ActiveState)"
info "claracore after hog: ActiveState=$active1 MainPID=$pid1 NRestarts=$restarts1 Result=$(prop Result)"
sd_oom="$(journalctl -b --no-pager -o cat -u "$UNIT" | grep -iE 'OOM killer|oom-kill' | tail -n 3 | tr '\n' '|')"
[ -z "$sd_oom" ] || info "systemd about the unit: $sd_oom"
check "claracore survived the OOM kill: active, same MainPID ($pid0 -> $pid1), NRestarts=$restarts1" \
    test "$active1" = active -a "$pid1" = "$pid0" -a "$restarts1" = 0

check "/admin/ps: hog is failed (state=$hog_state)" test "$hog_state" = failed
check "/admin/ps: hog has a last_error" test -n "$last_error"
if grep -qiE 'oom|out of memory|memory limit' <<<"$last_error"; then
    pass "last_error names the OOM kill / memory limit"
elif grep -qiE 'kill|signal 9|sigkill' <<<"$last_error"; then
    pass "last_error says the child was killed (but does not name OOM or the memory limit)"
else
    fail "last_error says why hog failed (got: $last_error)"
fi

# --- 3. tiny again: the next request is served ----------------------------------
chat tiny
check "tiny: next request after the OOM served (HTTP $CODE)" test "$CODE" = 200
[ "$CODE" = 200 ] || info "tiny body: $BODY"
pid2="$(prop MainPID)"
restarts2="$(prop NRestarts)"
check "still the same daemon after the next request (MainPID $pid2, NRestarts=$restarts2)" \
    test "$pid2" = "$pid0" -a "$restarts2" = 0
tiny_pid2="$(ps_field tiny pid)"
info "tiny llama-server pid $tiny_pid -> $tiny_pid2$([ "$tiny_pid" = "$tiny_pid2" ] && echo " (unchanged: the OOM kill took hog only)")"
info "final: $(systemctl show -p MemoryMax -p MemoryCurrent -p MemoryPeak -p NRestarts "$UNIT" | tr '\n' ' ')"
info "final: cgroup memory.peak=$(cat "$CG/memory.peak" 2>/dev/null)"
say DONE
