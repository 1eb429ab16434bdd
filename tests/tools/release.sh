#!/usr/bin/env bash
# Builds the release artifacts from this checkout, reproducibly:
#
#   claracore_<version>-1_<arch>.deb     cargo-deb, configured in Cargo.toml
#                                        ([package.metadata.deb])
#   claracore-<version>-<rust host triple>.tar.gz
#                                        the same binary, the units, sysusers and
#                                        tmpfiles snippets, the example config,
#                                        completions, man pages, README, LICENSE
#   SHA256SUMS                           of both
#
# Reproducible: SOURCE_DATE_EPOCH is the HEAD commit's time (unless set), the
# checkout, cargo's home and the target directory are remapped in the
# compiled paths (so neither where the tree nor where the build lives shows),
# and every archive is written with sorted names, that timestamp, owner 0 and
# no gzip name or time. Building twice from the same commit gives the same
# bytes; --check-reproducible does exactly that and compares the hashes.
#
# Usage: tests/tools/release.sh [--out DIR] [--check-reproducible]
#   --out DIR              where the artifacts go (default target/dist)
#   --check-reproducible   build everything twice, each time in a fresh,
#                          empty target directory at a different path, and
#                          fail (naming the files that differ) unless the
#                          two SHA256SUMS are identical
# Prints the output directory as its last line on stdout; all else on stderr.
#
# Env: CLARACORE_CACHE (cargo-deb is installed there, keyed by its version;
#      default ~/.cache/claracore), CLARACORE_RELEASE_TARGET (the release
#      target directory, default target/release-pkg: the remap flags change
#      every crate's hash, so sharing target/ would only rebuild it),
#      SOURCE_DATE_EPOCH.
# Needs Rust, git, and dpkg-dev and binutils (installed with apt if missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${CLARACORE_CACHE:-$HOME/.cache/claracore}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
CARGO_DEB_VERSION=3.8.0

log() { echo "release: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}
now() { date +%s; }

out="$repo/target/dist"
check=0
while [ $# -gt 0 ]; do
    case "$1" in
    --out)
        out="${2:?--out needs a directory}"
        shift 2
        ;;
    --check-reproducible)
        check=1
        shift
        ;;
    *) die "unknown argument: $1 (see the header of $0)" ;;
    esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
target="${CLARACORE_RELEASE_TARGET:-$repo/target/release-pkg}"

# --- tools --------------------------------------------------------------------
need=()
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v strip >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# cargo-deb from crates.io, pinned and cached by version.
cargo_deb_root="$cache/cargo-deb-$CARGO_DEB_VERSION"
if [ ! -x "$cargo_deb_root/bin/cargo-deb" ]; then
    exec 9>"$cache/.cargo-deb.lock"
    flock 9
    if [ ! -x "$cargo_deb_root/bin/cargo-deb" ]; then
        log "installing cargo-deb $CARGO_DEB_VERSION into $cargo_deb_root (once, ~2 min)"
        rm -rf "$cargo_deb_root.tmp"
        cargo install --quiet --locked --version "$CARGO_DEB_VERSION" \
            --root "$cargo_deb_root.tmp" cargo-deb >&2
        mv "$cargo_deb_root.tmp" "$cargo_deb_root"
    fi
    flock -u 9
    exec 9>&-
fi
export PATH="$cargo_deb_root/bin:$PATH"

# --- inputs -------------------------------------------------------------------
cd "$repo"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
commit="$(git rev-parse --short HEAD)"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    log "note: the tree has uncommitted changes; they are built, with $commit's time"
fi
version="$(cargo metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "claracore"))')"
triple="$(rustc -vV | sed -n 's/^host: //p')"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
log "claracore $version at $commit, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH ($(date -u -d "@$SOURCE_DATE_EPOCH" +%FT%TZ)), $(rustc --version), cargo-deb $CARGO_DEB_VERSION"

# build TARGET_DIR OUT_DIR: one complete release into OUT_DIR.
build() {
    local tdir="$1" odir="$2" t0 bin pkg stage name
    mkdir -p "$tdir" "$odir"
    tdir="$(cd "$tdir" && pwd)"
    t0=$(now)
    # The last matching remap wins, so the target directory (which may sit
    # inside the checkout) comes after the checkout.
    log "cargo build --release in $tdir"
    CARGO_TARGET_DIR="$tdir" \
        RUSTFLAGS="--remap-path-prefix=$repo=/build/claracore --remap-path-prefix=$cargo_home=/cargo --remap-path-prefix=$tdir=/build/target" \
        cargo build --release --locked --bin claracore >&2
    log "build took $(($(now) - t0)) s"
    bin="$tdir/release/claracore"

    # Man pages and completions from the CLI's own definition; cargo-deb finds
    # them under target/release/package/ (Cargo.toml's assets).
    pkg="$tdir/release/package"
    rm -rf "$pkg"
    mkdir -p "$pkg/man" "$pkg/completions"
    "$bin" generate man "$pkg/man"
    gzip -9n "$pkg"/man/*.1
    "$bin" generate completions bash >"$pkg/completions/claracore.bash"
    "$bin" generate completions zsh >"$pkg/completions/_claracore"
    "$bin" generate completions fish >"$pkg/completions/claracore.fish"

    rm -f "$odir"/claracore_*.deb "$odir"/claracore-*.tar.gz "$odir/SHA256SUMS"
    CARGO_TARGET_DIR="$tdir" cargo deb --no-build --locked --output "$odir" >&2
    local deb
    deb="$(ls "$odir"/claracore_*.deb)"

    # The tarball: the .deb's own (stripped) binary, so both carry one file.
    stage="$(mktemp -d "$tdir/tarball.XXXXXX")"
    name="claracore-$version-$triple"
    mkdir -p "$stage/$name/systemd" "$stage/$name/completions" "$stage/$name/man/man1" "$stage/deb"
    dpkg-deb -x "$deb" "$stage/deb"
    install -m 0755 "$stage/deb/usr/bin/claracore" "$stage/$name/claracore"
    install -m 0644 README.md systemd/LICENSE "$stage/$name/"
    install -m 0644 systemd/config.example.toml "$stage/$name/"
    install -m 0644 systemd/claracore.service systemd/claracore.socket systemd/claracore-local.socket \
        systemd/claracore.sysusers systemd/claracore.tmpfiles "$stage/$name/systemd/"
    install -m 0644 "$pkg"/completions/* "$stage/$name/completions/"
    install -m 0644 "$pkg"/man/*.1.gz "$stage/$name/man/man1/"
    find "$stage/$name" -type d -exec chmod 0755 {} +
    tar -C "$stage" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
        --format=gnu -cf - "$name" | gzip -9n >"$odir/$name.tar.gz"
    rm -rf "$stage"

    (cd "$odir" && sha256sum "$(basename "$deb")" "$name.tar.gz" >SHA256SUMS)
    log "artifacts in $odir ($(($(now) - t0)) s in all):"
    sed 's/^/    /' "$odir/SHA256SUMS" >&2
}

# Names what differs between two builds' artifacts.
explain_difference() { # DIR_A DIR_B
    local a="$1" b="$2" w f
    w="$(mktemp -d)"
    for f in $(cd "$a" && ls claracore_*.deb claracore-*.tar.gz); do
        cmp -s "$a/$f" "$b/$f" && continue
        log "$f differs"
        mkdir -p "$w/a" "$w/b"
        case "$f" in
        *.deb)
            dpkg-deb -R "$a/$f" "$w/a/$f"
            dpkg-deb -R "$b/$f" "$w/b/$f"
            (cd "$a" && dpkg-deb -c "$f") >"$w/a/$f.list"
            (cd "$b" && dpkg-deb -c "$f") >"$w/b/$f.list"
            ;;
        *.tar.gz)
            mkdir -p "$w/a/$f" "$w/b/$f"
            tar -C "$w/a/$f" -xzf "$a/$f"
            tar -C "$w/b/$f" -xzf "$b/$f"
            tar -tvzf "$a/$f" >"$w/a/$f.list"
            tar -tvzf "$b/$f" >"$w/b/$f.list"
            ;;
        esac
        diff "$w/a/$f.list" "$w/b/$f.list" >&2 || true
        diff -rq "$w/a/$f" "$w/b/$f" >&2 || true
    done
    rm -rf "$w"
}

t_all=$(now)
if [ "$check" = 0 ]; then
    build "$target" "$out"
else
    # Two clean builds at different paths; the first one's artifacts are the
    # output, the second's are only compared.
    second="$target-2"
    rm -rf "$target" "$second"
    build "$target" "$out"
    t1=$(($(now) - t_all))
    build "$second" "$second/dist"
    t2=$(($(now) - t_all - t1))
    if cmp -s "$out/SHA256SUMS" "$second/dist/SHA256SUMS"; then
        log "reproducible: two clean builds ($t1 s, $t2 s) at $target and $second gave identical artifacts"
        rm -rf "$second"
    else
        log "NOT reproducible: the two clean builds differ:"
        diff "$out/SHA256SUMS" "$second/dist/SHA256SUMS" >&2 || true
        explain_difference "$out" "$second/dist"
        die "artifacts differ between two builds of $commit (second build kept at $second)"
    fi
fi
log "done in $(($(now) - t_all)) s"
echo "$out"
