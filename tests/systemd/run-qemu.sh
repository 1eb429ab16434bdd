#!/usr/bin/env bash
# Boots a Debian trixie guest (systemd 257) in a qemu VM under TCG software
# emulation, installs the release .deb in it as an operator does (`apt-get
# install ./claracore_*.deb` inside the guest: units, sysusers, tmpfiles and
# maintainer scripts from the package) and checks what only a real systemd
# with enforced cgroup limits can show (nspawn does not enforce them):
#
#   MemoryMax= is enforced: a model whose llama-server child exceeds it is
#   OOM-killed by the kernel, claracore survives (same MainPID, NRestarts=0),
#   /admin/ps marks the model failed with a reason, and the next request to a
#   model that fits is served.
#
# The scenario runs inside the guest (qemu/guest-test.sh, started by
# qemu/claracore-qemu-test.service after multi-user.target); its results come
# back on a second virtio disk as a tar archive. The last line printed is
# "N passed, M failed"; the exit status is non-zero on any failure.
#
# Slow steps are cached under ${CLARACORE_CACHE:-~/.cache/claracore}:
#   qemu-trixie-<hash>/  the guest OS (rootfs tarball, kernel, initrd), keyed by
#                        a hash of the recipe below (build_image + packages)
# Each run then builds a fresh ext4 root image from that tarball plus the
# per-run files (the .deb, llama-server, model, config, the memory drop-in,
# the test).
#
# Needs root (debootstrap, file ownership in the image) and a Debian host;
# installs qemu-system-x86 (bookworm-backports on bookworm), debootstrap,
# e2fsprogs, zstd when missing.
#
# Never uses KVM: -accel tcg only. The guest has no network device.
#
# Env:
#   CLARACORE_CACHE          cache directory (default ~/.cache/claracore)
#   CLARACORE_DEB            the .deb to test (default: built by
#                            tests/tools/release.sh)
#   CLARACORE_QEMU_TIMEOUT   seconds the VM may run (default 480)
#   CLARACORE_QEMU_MEM       guest memory in MiB (default 1536)
#   CLARACORE_QEMU_MEMORY_MAX  MemoryMax= for claracore.service (default 128M)
#   CLARACORE_QEMU_DROPIN_EXTRA  extra lines for the [Service] drop-in (for
#                            experiments only, e.g. "OOMPolicy=continue")
#   CLARACORE_QEMU_KEEP=1    keep the per-run work directory
#   CLARACORE_QEMU_ARTIFACTS  on failure, copy the guest's logs (journal, kernel
#                            log, serial console) into this directory
#   CLARACORE_DEBIAN_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#
# Usage: tests/systemd/run-qemu.sh [--image-only]
#   --image-only  build (or find) the cached guest image, print its directory, exit
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${CLARACORE_CACHE:-$HOME/.cache/claracore}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
export CLARACORE_CACHE="$cache"
mirror="${CLARACORE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
vm_timeout="${CLARACORE_QEMU_TIMEOUT:-480}"
vm_mem="${CLARACORE_QEMU_MEM:-1536}"
memory_max="${CLARACORE_QEMU_MEMORY_MAX:-128M}"

t_start=$(date +%s)
log() { printf 'run-qemu: %s\n' "$*" >&2; }
die() { log "error: $*"; echo "0 passed, 1 failed"; exit 1; }

# --- privileges ---------------------------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo -E --preserve-env=PATH "$0" "$@"
    fi
    die "needs root (debootstrap, image file ownership)"
fi

# --- host tools ---------------------------------------------------------------
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then apt-get update -qq >&2; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

ensure_host_tools() {
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    command -v zstd >/dev/null || need+=(zstd)
    command -v flock >/dev/null || need+=(util-linux)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
    [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

    if ! command -v qemu-system-x86_64 >/dev/null; then
        # shellcheck source=/dev/null
        local codename; codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
        if [ "$codename" = bookworm ]; then
            # qemu-utils on these machines comes from bookworm-backports, and
            # qemu-system-x86 must match it.
            if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
                log "adding bookworm-backports to apt sources"
                echo "deb http://deb.debian.org/debian bookworm-backports main" \
                    >/etc/apt/sources.list.d/claracore-bookworm-backports.list
                apt_updated=0
            fi
            apt_install -t bookworm-backports qemu-system-x86 qemu-utils
        else
            apt_install qemu-system-x86 qemu-utils
        fi
    fi
}

# --- guest OS image (cached) ------------------------------------------------
guest_suite=trixie
guest_packages="systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,zstd,curl,jq,procps,libgomp1,libstdc++6"

# Builds the guest OS into $1: rootfs.tar.zst, vmlinuz, initrd.img. The text of
# this function is part of the cache key.
build_image() (
    set -euo pipefail
    dest="$1"
    tmp="$(mktemp -d "$cache/.qemu-build.XXXXXX")"
    root="$tmp/root"
    # debootstrap mounts /proc etc. inside the tree; make sure they go.
    trap 'umount -R "$root/proc" "$root/sys" "$root/dev" 2>/dev/null || true; rm -rf "$tmp"' EXIT
    log "debootstrap $guest_suite into $root (a few minutes)"
    debootstrap --variant=minbase --include="$guest_packages" \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$guest_suite" "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
        || { tail -n 40 "$tmp/debootstrap.log" >&2; exit 1; }

    # Kernel and initrd (initramfs-tools, MODULES=most: virtio_blk and ext4).
    vmlinuz="$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)"
    initrd="$(ls "$root"/boot/initrd.img-* | sort -V | tail -n 1)"
    [ -f "$vmlinuz" ] && [ -f "$initrd" ] || { log "no kernel/initrd in the guest tree"; exit 1; }
    cp "$vmlinuz" "$tmp/vmlinuz"
    cp "$initrd" "$tmp/initrd.img"
    rm -f "$root"/boot/initrd.img-* "$root"/boot/vmlinuz-*

    # Minimal, quiet, fast boot.
    echo claracore-vm >"$root/etc/hostname"
    printf '/dev/vda / ext4 rw,noatime 0 0\n' >"$root/etc/fstab"
    chroot "$root" passwd -d root >/dev/null
    for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
        e2scrub_all.timer e2scrub_reap.service fstrim.timer \
        systemd-firstboot.service getty@tty1.service serial-getty@ttyS0.service \
        systemd-timesyncd.service; do
        ln -sfn /dev/null "$root/etc/systemd/system/$u"
    done
    mkdir -p "$root/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/50-vm.conf"
    # No host state in the image: a machine-id is made at first boot.
    : >"$root/etc/machine-id"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
    # Kernel modules the guest cannot use (no network, sound, GPU, wireless).
    for kdir in "$root"/lib/modules/*/kernel; do
        rm -rf "$kdir"/sound "$kdir"/drivers/gpu "$kdir"/drivers/net/wireless \
            "$kdir"/drivers/net/ethernet "$kdir"/drivers/media "$kdir"/drivers/infiniband \
            "$kdir"/drivers/staging "$kdir"/net/wireless "$kdir"/net/mac80211 \
            "$kdir"/drivers/bluetooth "$kdir"/net/bluetooth "$kdir"/drivers/iio
    done
    rm -rf "$root"/usr/lib/firmware/* 2>/dev/null || true

    umount -R "$root/proc" "$root/sys" "$root/dev" 2>/dev/null || true
    log "packing guest rootfs"
    tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -cf - . \
        | zstd -q -T0 -3 -o "$tmp/rootfs.tar.zst"
    chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$tmp/packages.txt"
    rm -rf "$dest"
    mkdir -p "$dest"
    mv "$tmp/rootfs.tar.zst" "$tmp/vmlinuz" "$tmp/initrd.img" "$tmp/packages.txt" "$dest/"
    touch "$dest/.complete"
)

image_key="$( { echo "recipe-v1 $guest_suite $mirror $guest_packages"; declare -f build_image; } \
    | sha256sum | cut -c1-16)"
image_dir="$cache/qemu-$guest_suite-$image_key"

# --- results ----------------------------------------------------------------
passed=0
failed=0
result() { # PASS|FAIL name [detail]
    local verdict="$1"; shift
    echo "$verdict $*"
    if [ "$verdict" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

work=""
qemu_pid=""
cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        sleep 1
        kill -9 "$qemu_pid" 2>/dev/null || true
    fi
    if [ -n "$work" ] && [ -d "$work" ]; then
        if [ "${CLARACORE_QEMU_KEEP:-0}" = 1 ]; then
            log "kept $work"
        else
            rm -rf "$work"
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_host_tools

exec 8>"$cache/.qemu-image.lock"
flock 8
if [ ! -f "$image_dir/.complete" ]; then
    t_img=$(date +%s)
    # In the background so that set -e holds inside build_image.
    build_image "$image_dir" &
    wait $! || die "building the guest image failed"
    log "guest image built in $(($(date +%s) - t_img))s: $image_dir"
else
    log "guest image cached: $image_dir"
fi
flock -u 8
if [ "${1:-}" = --image-only ]; then
    echo "$image_dir"
    exit 0
fi

# --- inputs -----------------------------------------------------------------
log "test dependencies (llama-server, tiny model)"
eval "$("$repo/tests/tools/setup-test-deps.sh")"
if [ -n "${CLARACORE_DEB:-}" ]; then
    deb="$CLARACORE_DEB"
else
    log "building the .deb (tests/tools/release.sh)"
    dist="$("$repo/tests/tools/release.sh")"
    deb="$(ls "$dist"/claracore_*.deb)"
fi
[ -f "$deb" ] || die "no .deb at $deb"

# --- per-run root image -------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/claracore-qemu.XXXXXX")"
root="$work/root"
mkdir -p "$root" "$work/results"
t_prep=$(date +%s)
zstd -q -dc "$image_dir/rootfs.tar.zst" \
    | tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xf -

# The package, installed by the guest test itself with apt-get.
install -D -m 0644 "$deb" "$root/opt/claracore/deb/$(basename "$deb")"
install -D -m 0755 "$CLARACORE_TEST_LLAMA_SERVER" "$root/opt/claracore/llama-server"
install -D -m 0644 "$CLARACORE_TEST_MODEL" "$root/opt/claracore/tiny.gguf"
# The limit under test, a drop-in for the packaged unit. No swap in the guest
# either, so the cgroup OOMs.
mkdir -p "$root/etc/systemd/system/claracore.service.d"
{
    echo "# run-qemu.sh: the memory limit under test"
    echo "[Service]"
    echo "MemoryMax=$memory_max"
    echo "MemorySwapMax=0"
    if [ -n "${CLARACORE_QEMU_DROPIN_EXTRA:-}" ]; then
        printf '%s\n' "$CLARACORE_QEMU_DROPIN_EXTRA"
    fi
} >"$root/etc/systemd/system/claracore.service.d/50-qemu-test.conf"
# Written over the package's conffile by the guest test after the install,
# as an operator edits it.
install -D -m 0644 "$here/qemu/config.toml" "$root/opt/claracore/config.toml"
# The scenario, run once after multi-user.target; it powers the VM off.
install -D -m 0755 "$here/qemu/guest-test.sh" "$root/usr/local/sbin/claracore-qemu-test"
install -D -m 0644 "$here/qemu/claracore-qemu-test.service" \
    "$root/etc/systemd/system/claracore-qemu-test.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sfn /etc/systemd/system/claracore-qemu-test.service \
    "$root/etc/systemd/system/multi-user.target.wants/claracore-qemu-test.service"

used_mb=$(du -sm "$root" | cut -f1)
img_mb=$((used_mb + 512))
truncate -s "${img_mb}M" "$work/root.img"
mkfs.ext4 -q -F -L claracore-root -d "$root" "$work/root.img" >&2
rm -rf "$root"
truncate -s 64M "$work/results.img"
log "root image ${img_mb} MiB prepared in $(($(date +%s) - t_prep))s"

# --- boot -------------------------------------------------------------------
cmdline="console=ttyS0 root=/dev/vda rw rootfstype=ext4 panic=-1 mitigations=off"
cmdline+=" random.trust_cpu=on loglevel=4 systemd.show_status=auto systemd.firstboot=off"
serial="$work/serial.log"
log "booting the guest (qemu -accel tcg, ${vm_mem} MiB, 2 vCPUs; limit ${vm_timeout}s)"
t_boot=$(date +%s)
qemu-system-x86_64 \
    -accel tcg,thread=multi -machine q35 -cpu max -smp 2 -m "$vm_mem" \
    -nodefaults -display none -no-reboot -nic none \
    -kernel "$image_dir/vmlinuz" -initrd "$image_dir/initrd.img" -append "$cmdline" \
    -drive file="$work/root.img",format=raw,if=none,id=root,cache=unsafe,discard=unmap \
    -device virtio-blk-pci,drive=root \
    -drive file="$work/results.img",format=raw,if=none,id=results,cache=writethrough \
    -device virtio-blk-pci,drive=results,serial=results \
    -serial file:"$serial" \
    >"$work/qemu.log" 2>&1 &
qemu_pid=$!

# Wait for the VM to power off, echoing the guest's test lines as they come.
shown=0
t_ready=""
deadline=$((t_boot + vm_timeout))
timed_out=0
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then timed_out=1; break; fi
    sleep 2
    if [ -f "$serial" ]; then
        n=$(wc -l <"$serial")
        if [ "$n" -gt "$shown" ]; then
            sed -n "$((shown + 1)),${n}p" "$serial" | grep -a 'claracore-qemu-test' | sed 's/^/  guest| /' >&2 || true
            if [ -z "$t_ready" ] && grep -aq 'claracore-qemu-test: INFO boot' "$serial"; then
                t_ready=$(date +%s)
            fi
            shown=$n
        fi
    fi
done
if [ "$timed_out" = 1 ]; then
    log "the VM did not power off within ${vm_timeout}s; killing qemu (pid $qemu_pid)"
    kill "$qemu_pid" 2>/dev/null || true
fi
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=""
vm_secs=$(($(date +%s) - t_boot))

tar -C "$work/results" -xf "$work/results.img" 2>/dev/null || true

echo "=== claracore qemu (TCG) systemd test ==="
if [ -f "$work/results/results.txt" ]; then
    while IFS= read -r line; do
        case "$line" in
            PASS\ *) result PASS "${line#PASS }" ;;
            FAIL\ *) result FAIL "${line#FAIL }" ;;
            *) echo "$line" ;;
        esac
    done <"$work/results/results.txt"
    if ! grep -q '^DONE' "$work/results/results.txt"; then
        result FAIL "guest scenario ran to the end"
    fi
else
    result FAIL "guest produced results (qemu rc $qemu_rc, timed out: $timed_out)"
    log "last lines of the serial console:"
    tail -n 60 "$serial" >&2 2>/dev/null || true
    cat "$work/qemu.log" >&2 2>/dev/null || true
fi
if [ "$timed_out" = 0 ]; then
    result PASS "VM powered off by itself (${vm_secs}s)"
else
    result FAIL "VM powered off within ${vm_timeout}s"
fi
if [ "$failed" -gt 0 ]; then
    for f in apt.log status.log claracore.log curl.log; do
        [ -f "$work/results/$f" ] || continue
        log "--- guest $f (last 40 lines)"
        tail -n 40 "$work/results/$f" >&2
    done
    cp "$serial" "$work/results/serial.log" 2>/dev/null || true
    if [ -n "${CLARACORE_QEMU_ARTIFACTS:-}" ]; then
        mkdir -p "$CLARACORE_QEMU_ARTIFACTS"
        cp -r "$work/results/." "$CLARACORE_QEMU_ARTIFACTS/"
        log "guest logs (full journal, kernel log, serial console) copied to $CLARACORE_QEMU_ARTIFACTS"
    fi
fi
ready_secs=never
[ -z "$t_ready" ] || ready_secs="$((t_ready - t_boot))s"
echo "INFO host: qemu start -> guest test running: $ready_secs; VM wall time ${vm_secs}s; total run time $(($(date +%s) - t_start))s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
