#!/usr/bin/env bash
# Builds the service image (`make image`) with docker or podman, whichever works on this machine,
# and writes .image/env: the tool, its settings and the image, for the test that runs the stack
# from it (tests/e2e/test_image_stack.py).
#
#   IMAGE_BASE=official  FROM the Dockerfile's base, the official python:3.11.x-slim-bookworm (default)
#   IMAGE_BASE=standin   FROM a local stand-in for it (standin-base.sh), for machines that cannot pull
#                        the official one; an image built on it stays local: never push it
#   IMAGE_BASE=auto      the official base where it is present or can be pulled, else the stand-in
#   CONTAINER_TOOL=docker|podman   use this tool rather than the first that works
#
# Docker's and podman's layer caches make a rebuild of unchanged sources take seconds, and the
# stand-in base is built once (again only when its inputs change).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
state=$root/.image

die() { echo "image: $*" >&2; exit 1; }
say() { echo "image: $*"; }

pick_tool() {
    if [ -n "${CONTAINER_TOOL:-}" ]; then
        command -v "$CONTAINER_TOOL" >/dev/null || die "CONTAINER_TOOL=$CONTAINER_TOOL is not installed"
        echo "$CONTAINER_TOOL"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null; then
        echo podman
    else
        die "no container tool: install podman (apt-get install --no-install-recommends podman runc) or start Docker"
    fi
}

# podman's settings for this project only (CONTAINERS_CONF), /etc/containers untouched: containers
# get the machine's own hard limits, since podman's defaults are higher than root may set where it
# lacks CAP_SYS_RESOURCE ("error setting rlimit"), and runc where installed (crun fails on hosts
# whose cgroups are in hybrid mode).
podman_conf() {
    local conf=$state/containers.conf nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
    {
        echo "# Written by deploy/docker/image.sh; used through CONTAINERS_CONF."
        echo "[containers]"
        echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
        if command -v runc >/dev/null; then
            echo "[engine]"
            echo "runtime = \"runc\""
        fi
    } >"$conf.new"
    mv "$conf.new" "$conf"
    echo "$conf"
}

mkdir -p "$state"
tool=$(pick_tool)
conf=""
if [ "$tool" = podman ]; then
    conf=${CONTAINERS_CONF:-$(podman_conf)}
    export CONTAINERS_CONF=$conf
fi
say "building with $tool${conf:+ (CONTAINERS_CONF=$conf)}"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)
image=${IMAGE_NAME:-payments-cqrs}:$version
official=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
standin=localhost/python-standin:3.11-bookworm

build_standin() {
    STANDIN_PYTHON=${STANDIN_PYTHON:-python3} deploy/docker/standin-base.sh "$tool" "$standin"
}

case ${IMAGE_BASE:-official} in
    official) base=$official ;;
    standin)
        build_standin
        base=$standin
        ;;
    auto)
        if "$tool" image inspect "$official" >/dev/null 2>&1; then
            base=$official
        elif say "pulling $official" && "$tool" pull "$official"; then
            base=$official
        else
            say "$official cannot be pulled here: building on the local stand-in base (never push the result)"
            build_standin
            base=$standin
        fi
        ;;
    *) die "IMAGE_BASE is official, standin or auto, not ${IMAGE_BASE}" ;;
esac

previous=$("$tool" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
say "building $image from $base"
build=(build --build-arg "PYTHON_IMAGE=$base" --tag "$image" --file Dockerfile)
# Host networking for pip's downloads: no bridge or NAT needed.
[ "$tool" = podman ] && build+=(--network=host)
if ! "$tool" "${build[@]}" .; then
    [ "${IMAGE_BASE:-official}" = official ] &&
        echo "image: where $official cannot be pulled, IMAGE_BASE=standin builds on a local stand-in" >&2
    die "the build failed"
fi
id=$("$tool" image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$id" ]; then
    # Only the image this tag named before; other dangling images may be someone else's.
    "$tool" rmi "$previous" >/dev/null 2>&1 || true
fi

{
    echo "CONTAINER_TOOL=$tool"
    echo "CONTAINERS_CONF=$conf"
    echo "IMAGE=$image"
    echo "IMAGE_ID=$id"
    echo "IMAGE_BASE=$base"
} >"$state/env"

size=$("$tool" image inspect --format '{{.Size}}' "$image")
venv=$("$tool" run --rm --network=none --entrypoint du "$id" -sm /opt/venv | cut -f1)
say "$image ($id) from $base: $((size / 1000000)) MB, of which /opt/venv ${venv} MiB"
say "settings for the tests in $state/env"
