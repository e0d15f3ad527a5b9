#!/usr/bin/env bash
# Set this machine up for cowfs. Idempotent, and silent when there is nothing to do.
#
#   scripts/setup.sh [--bench]
#
# 1. Debian packages (as root): fuse3 (fusermount3, mount.fuse3), libfuse3-dev, pkg-config and gcc
#    and patch (to build pyfuse3), attr (getfattr/setfattr), busybox-static (the container demo's image).
#    --bench or COWFS_SETUP_BENCH=1 adds fio and fuse-overlayfs. `apt-get update` runs only when
#    something is missing.
# 2. A virtualenv in <repo>/.venv: first pyfuse3, built from its pinned sdist with cowfs's patch
#    (third_party/pyfuse3/; redone when the patch changes, stamp .venv/.pyfuse3-stamp), then
#    `pip install -e '.[test]'` (`.[test,bench]` with --bench), redone only when pyproject.toml,
#    the Python or the checkout's path changed, or --bench asks for the bench extra the venv lacks
#    (stamp: .venv/.cowfs-stamp; once there, the extra is kept).
# 3. The mount(8) helper wiring (as root): /usr/local/bin/cowfs -> <repo>/.venv/bin/cowfs.
#    `mount -t fuse.cowfs` runs /sbin/mount.fuse (fuse3's link to mount.fuse3), which runs `cowfs`
#    with PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin.
#
# Environment: PYTHON (default python3) picks the interpreter for the venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.cowfs-stamp"
PYTHON="${PYTHON:-python3}"
HELPER_LINK=/usr/local/bin/cowfs
BENCH="${COWFS_SETUP_BENCH:-0}"

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

for arg in "$@"; do
    case "$arg" in
        --bench) BENCH=1 ;;
        -h | --help)
            sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "setup: unknown argument: $arg (usage: scripts/setup.sh [--bench])" >&2; exit 2 ;;
    esac
done

is_root() { [ "$(id -u)" -eq 0 ]; }

# --- 1. Debian packages --------------------------------------------------------------------------
pkgs=(fuse3 libfuse3-dev pkg-config gcc patch attr busybox-static)
[ "$BENCH" = 1 ] && pkgs+=(fio fuse-overlayfs)

command -v "$PYTHON" >/dev/null 2>&1 || pkgs+=(python3 python3-venv python3-dev)
if command -v "$PYTHON" >/dev/null 2>&1; then
    # pyfuse3 compiles against Python.h; Debian's own python3 needs python3-dev and python3-venv
    # (a pyenv or python.org build ships both).
    py_inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    py_exe="$("$PYTHON" -c 'import sys; print(sys.executable)')"
    if [ ! -f "$py_inc/Python.h" ]; then
        case "$py_exe" in
            /usr/bin/*) pkgs+=(python3-dev) ;;
            *) die "$py_exe has no C headers ($py_inc/Python.h); pyfuse3 cannot be built" ;;
        esac
    fi
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        case "$py_exe" in
            /usr/bin/*) pkgs+=(python3-venv) ;;
            *) die "$py_exe cannot create virtualenvs (no venv/ensurepip module)" ;;
        esac
    fi
fi

missing=()
for p in "${pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    is_root || die "missing Debian packages: ${missing[*]} (run this script as root, or apt-get install them)"
    say "installing Debian packages: ${missing[*]}"
    log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get failed"
    fi
    rm -f "$log"
fi

if [ ! -e /dev/fuse ]; then
    if is_root && command -v modprobe >/dev/null 2>&1; then
        modprobe fuse >/dev/null 2>&1 || true
    fi
    [ -e /dev/fuse ] || say "warning: /dev/fuse is missing: real mounts (the demo, the 'fuse' tests) cannot run here"
fi

# --- 2. The virtualenv -----------------------------------------------------------------------------
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH="$ROOT/third_party/pyfuse3/pyfuse3-$PYFUSE3_VERSION-cowfs.patch"
PYFUSE3_STAMP="$VENV/.pyfuse3-stamp"

pip_quiet() {
    # PIP_NO_WARN_SCRIPT_LOCATION and the filter keep pip's chatter (this machine's extra
    # file:// indexes, its version check) out of the output; a failure prints everything.
    local log
    log="$(mktemp)"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 \
        "$VENV/bin/python" -m pip "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "pip $1 failed"
    fi
    grep -v -E "file:///|^WARNING: Location|^WARNING: Retrying|^\s*$|^WARNING: You are using pip|^You should consider upgrading" \
        "$log" >&2 || true
    rm -f "$log"
}

build_pyfuse3() {
    # Upstream pyfuse3 cannot run a file system without OPENDIR (see the patch's header); cowfs
    # needs that for the kernel's directory cache. The sdist is pinned by hash, then patched.
    local src
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT  # also when a step below dies
    say "building pyfuse3 $PYFUSE3_VERSION with cowfs's patch ($(basename "$PYFUSE3_PATCH"))"
    pip_quiet download -q --no-deps --no-binary pyfuse3 "pyfuse3==$PYFUSE3_VERSION" -d "$tmp"
    src="$tmp/pyfuse3-$PYFUSE3_VERSION.tar.gz"
    [ -f "$src" ] || die "pip download did not fetch the pyfuse3 $PYFUSE3_VERSION sdist"
    if [ "$(sha256sum "$src" | cut -d' ' -f1)" != "$PYFUSE3_SHA256" ]; then
        die "pyfuse3-$PYFUSE3_VERSION.tar.gz does not have the pinned sha256 $PYFUSE3_SHA256"
    fi
    tar -xzf "$src" -C "$tmp"
    patch -s -d "$tmp/pyfuse3-$PYFUSE3_VERSION" -p1 <"$PYFUSE3_PATCH" || die "the pyfuse3 patch does not apply"
    # Cython regenerates the C source from the patched .pyx only if the shipped one is gone.
    rm -f "$tmp/pyfuse3-$PYFUSE3_VERSION/src/pyfuse3/__init__.c"
    pip_quiet install -q --force-reinstall --no-deps "$tmp/pyfuse3-$PYFUSE3_VERSION"
    rm -rf "$tmp"
    trap - EXIT
}

want_stamp="$(
    {
        sha256sum "$ROOT/pyproject.toml" "$PYFUSE3_PATCH" | cut -d' ' -f1
        echo "$ROOT"
        "$PYTHON" -c 'import sys; print(sys.executable, sys.version)'
    } | sha256sum | cut -d' ' -f1
)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
# The stamp ends in " bench" when the bench extra is installed. A venv that has it keeps it, so that
# setup.sh and setup.sh --bench, run in turn, do not reinstall each time.
extras=test
if [ "$BENCH" = 1 ] || [[ "$have_stamp" == *" bench" ]]; then
    extras=test,bench
    want_stamp="$want_stamp bench"
fi

py_version="$("$PYTHON" -c 'import sys; print(sys.version)')"
venv_ok() {
    # Usable, made from the same Python, and made at this path: a copied checkout's venv has #! lines
    # and an editable install that point at the old place, so it is rebuilt rather than patched.
    [ -x "$VENV/bin/python" ] &&
        [ "$("$VENV/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null)" = "$py_version" ] &&
        [[ "$(head -n1 "$VENV/bin/pip" 2>/dev/null)" == "#!$VENV/bin/python"* ]]
}

if [ "$want_stamp" != "$have_stamp" ] || [ ! -x "$VENV/bin/cowfs" ] || ! venv_ok; then
    if ! venv_ok; then
        say "creating virtualenv $VENV"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    pyfuse3_want="$(sha256sum "$PYFUSE3_PATCH" | cut -d' ' -f1) $PYFUSE3_SHA256"
    if [ "$(cat "$PYFUSE3_STAMP" 2>/dev/null || true)" != "$pyfuse3_want" ] ||
        ! "$VENV/bin/python" -c 'import pyfuse3; assert pyfuse3.cowfs_patches' >/dev/null 2>&1; then
        build_pyfuse3
        echo "$pyfuse3_want" >"$PYFUSE3_STAMP"
    fi
    say "installing cowfs and its test tools into .venv (pip install -e '.[$extras]')"
    (cd "$ROOT" && pip_quiet install -q -e ".[$extras]")
    echo "$want_stamp" >"$STAMP"
fi

# --- 3. The mount(8) helper ------------------------------------------------------------------------
target="$VENV/bin/cowfs"
if is_root; then
    if [ -L "$HELPER_LINK" ] || [ ! -e "$HELPER_LINK" ]; then
        if [ "$(readlink "$HELPER_LINK" 2>/dev/null || true)" != "$target" ]; then
            ln -sfn "$target" "$HELPER_LINK"
            say "linked $HELPER_LINK -> $target (for mount -t fuse.cowfs)"
        fi
    else
        say "warning: $HELPER_LINK exists and is not a symlink; left alone, so mount -t fuse.cowfs runs it"
    fi
    if [ ! -x /sbin/mount.fuse ] && [ ! -x /sbin/mount.fuse.cowfs ]; then
        say "warning: /sbin/mount.fuse is missing (package fuse3): mount -t fuse.cowfs will not work"
    fi
fi
