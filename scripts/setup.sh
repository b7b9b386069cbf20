#!/usr/bin/env bash
# Create .venv if needed and install rfatlas into it (with --dev: also the test tools).
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.rfatlas-stamp"
want="$(sha256sum pyproject.toml | cut -c1-16)${extra}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch/torchvision first and pinned: pip takes them from the local wheel cache where one exists.
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored: it is neither" || true
    .venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -v "is ignored: it is neither" || true
    .venv/bin/python -c "import rfcore, torch, zarr, prefect" || { echo "setup failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
