#!/usr/bin/env bash
# Fails when protos/ breaks the contracts of the previous commit (buf's FILE rules).
set -euo pipefail
buf="${1:-buf}"
cd "$(dirname "$0")/.."
if ! git rev-parse --quiet --verify HEAD~1 >/dev/null; then
    echo "buf breaking: no previous commit to compare with; skipped"
    exit 0
fi
# grep reads all of its input (no -q), so that git never dies of SIGPIPE under pipefail.
if ! git ls-tree -r --name-only HEAD~1 -- protos | grep '\.proto$' >/dev/null; then
    echo "buf breaking: the previous commit has no protos; skipped"
    exit 0
fi
"$buf" breaking --against '.git#ref=HEAD~1'
echo "buf breaking: no breaking change against HEAD~1"
