#!/usr/bin/env bash
# Builds a local stand-in for the official Python base image, for machines that cannot pull it
# (`make image IMAGE_BASE=standin`). It is Debian bookworm from the Debian mirror (mmdebstrap),
# the host's CPython copied to /usr/local as the official image lays it out, and the host's
# trusted certificate authorities. It stays local: never push it, nor an image built on it.
#
#   deploy/docker/standin-base.sh TOOL TAG    TOOL is docker or podman; TAG names the result
#
# STANDIN_PYTHON (default python3) names the interpreter to copy: a CPython 3.11 of at least
# 3.11.3, built on this Debian release (its extension modules link against the release's
# libraries, which the base gets from the mirror). Debian 12's own python3.11 is 3.11.2, too
# old; the machines this project runs on have a CPython 3.11 built from source (pyenv), which
# is what the base carries. An image of the same inputs (this script, the interpreter, the
# certificates) is reused.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"

die() { echo "standin-base: $*" >&2; exit 1; }

# The interpreter's installation: prefix, version, library version, whether libpython is shared.
describe_python() {
    "$1" - <<'PY'
import sys, sysconfig
print(sys.base_prefix)
print("%d.%d.%d" % sys.version_info[:3])
print(sysconfig.get_config_var("LDVERSION"))
print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)
print(sys.version.replace("\n", " "))
PY
}

# The Debian packages that hold the shared libraries the interpreter and its extension modules
# load (Tk's excepted: tkinter is left out).
library_packages() {
    local prefix=$1 ldversion=$2
    local files=("$prefix/bin/python${ldversion}")
    files+=("$prefix"/lib/libpython3*.so*)
    local module
    for module in "$prefix/lib/python${ldversion}/lib-dynload/"*.so; do
        case $(basename "$module") in _tkinter*) continue ;; esac
        files+=("$module")
    done
    local lib path owner
    ldd "${files[@]}" 2>/dev/null | awk '/=> \//{print $3}' | sort -u | while read -r lib; do
        case $lib in "$prefix"/*) continue ;; esac
        owner=""
        # usrmerge: dpkg may know the file under /lib or under /usr/lib.
        for path in "$lib" "$(realpath "$lib")" "/usr$lib" "${lib#/usr}"; do
            owner=$(dpkg -S "$path" 2>/dev/null | head -n1 | cut -d: -f1) && [ -n "$owner" ] && break
        done
        [ -n "$owner" ] || die "$lib, which the interpreter loads, belongs to no Debian package"
        echo "$owner"
    done | sort -u
}

# Runs inside mmdebstrap, as root, with the new root filesystem in $1: the interpreter, the
# certificates, the loader cache, and a check that the standard library loads.
customize() {
    local root=$1 prefix=$STANDIN_PREFIX ldversion=$STANDIN_LDVERSION
    echo "standin-base: copying CPython from $prefix to /usr/local"
    # Everything an application needs; not the test suite, IDLE, Tk, the static library, nor
    # any package installed into the host's interpreter.
    (cd "$prefix" && tar -cf - \
        --exclude="lib/python${ldversion}/site-packages/*" \
        --exclude=test --exclude=tests --exclude=idle_test \
        --exclude="lib/python${ldversion}/idlelib" \
        --exclude="lib/python${ldversion}/tkinter" \
        --exclude="lib/python${ldversion}/turtledemo" \
        --exclude="lib/python${ldversion}/lib-dynload/_tkinter*" \
        --exclude="lib/python${ldversion}/config-*/*.a" \
        --exclude="lib/python${ldversion}/config-*/*.o" \
        --exclude="*.opt-1.pyc" --exclude="*.opt-2.pyc" \
        "bin/python${ldversion}" lib/libpython3*.so* "lib/python${ldversion}") \
        | tar -C "$root/usr/local" -xf -
    if command -v strip >/dev/null; then
        # Debugging symbols are most of the size of the interpreter's binaries.
        find "$root/usr/local" -type f \( -name "python${ldversion}" -o -name "*.so*" \) \
            -exec strip --strip-unneeded {} +
    fi
    ln -sf "python${ldversion}" "$root/usr/local/bin/python3"
    ln -sf python3 "$root/usr/local/bin/python"
    chroot "$root" ldconfig
    local certs=(/usr/local/share/ca-certificates/*.crt)
    if [ -e "${certs[0]}" ]; then
        echo "standin-base: trusting the host's ${#certs[@]} local certificate authorities"
        cp "${certs[@]}" "$root/usr/local/share/ca-certificates/"
    fi
    chroot "$root" update-ca-certificates >/dev/null
    chroot "$root" /usr/local/bin/python3 -c '
import bz2, ctypes, decimal, ensurepip, hashlib, lzma, sqlite3, ssl, uuid, venv, zlib
ssl.create_default_context()
print("standin-base: the copied interpreter runs:", __import__("sys").version.split()[0])'
}

if [ "${1:-}" = customize ]; then
    customize "$2"
    exit 0
fi

[ $# -eq 2 ] || die "usage: $0 docker|podman TAG"
tool=$1 tag=$2

python=${STANDIN_PYTHON:-python3}
command -v "$python" >/dev/null || die "$python not found: set STANDIN_PYTHON to a CPython >= 3.11.3"
mapfile -t info < <(describe_python "$python")
prefix=${info[0]} version=${info[1]} ldversion=${info[2]} shared=${info[3]} full=${info[4]}
case $version in
    3.11.*) [ "${version##*.}" -ge 3 ] || die "$python is $version; the stand-in needs 3.11.3 or later (STANDIN_PYTHON)" ;;
    *) die "$python is $version; the image runs CPython 3.11 (STANDIN_PYTHON names another)" ;;
esac
[ -x "$prefix/bin/python${ldversion}" ] || die "$prefix/bin/python${ldversion} is missing: $python is not a standard CPython installation"
# shellcheck source=/dev/null
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || die "the host is ${PRETTY_NAME:-unknown}: a CPython built on Debian 12 (bookworm) is needed"
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: apt-get install --no-install-recommends mmdebstrap"
[ "$(id -u)" -eq 0 ] || die "run as root: mmdebstrap builds the root filesystem in root mode"

# What the image is made of; an image with this digest in its label is reused.
inputs=$( {
    cat "$self"
    echo "$full $prefix $shared"
    cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true
} | sha256sum | cut -c1-16)
label=org.example.payments-cqrs.standin-inputs
if [ "$("$tool" image inspect --format "{{ index .Config.Labels \"$label\" }}" "$tag" 2>/dev/null)" = "$inputs" ]; then
    echo "standin-base: $tag exists (inputs $inputs); reused"
    exit 0
fi
previous=$("$tool" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)

packages=$(library_packages "$prefix" "$ldversion" | grep -vx libc6 | paste -sd, -)
echo "standin-base: building $tag: Debian bookworm (minbase) with CPython $version from $prefix"
echo "standin-base: libraries from Debian: $packages"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export STANDIN_PREFIX=$prefix STANDIN_LDVERSION=$ldversion
# merged-usr lays out /usr as Debian 12 does without the usrmerge package, which would bring Perl.
mmdebstrap --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include="ca-certificates,netbase,tzdata,$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="\"$self\" customize \"\$1\"" \
    bookworm "$work/rootfs.tar"
echo "standin-base: importing the root filesystem as $tag"
"$tool" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change "LABEL $label=$inputs" \
    --change 'LABEL org.example.payments-cqrs.standin=local-only' \
    --change 'CMD ["python3"]' \
    "$work/rootfs.tar" "$tag" >/dev/null
if [ -n "$previous" ]; then
    # The tag has moved to the new image; the old one goes, unless an image still builds on it.
    "$tool" rmi "$previous" >/dev/null 2>&1 || true
fi
echo "standin-base: $tag built"
