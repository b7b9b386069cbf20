#!/usr/bin/env bash
# Create .venv if needed and install rfatlas into it (with --dev: also the test tools).
# Re-running is cheap: it reinstalls only when pyproject.toml changed; a failed install is not stamped.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
check="import rfcore, torch, zarr, prefect, distributed"
if [ "${1:-}" = "--dev" ]; then
    extra="[dev]"
    check="$check, pytest, moto, ruff, mypy, playwright"
    # The browser tests drive Debian's chromium (Playwright with the system browser: no download).
    if ! command -v chromium >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
            || { echo "setup failed: apt-get install chromium" >&2; exit 1; }
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.rfatlas-stamp"
want="$(sha256sum pyproject.toml | cut -c1-16)${extra}"
pip_install() {  # pip, minus one harmless warning of the local wheel cache; pip's own exit status
    .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch/torchvision first and pinned: pip takes them from the local wheel cache where one exists.
    pip_install "torch==2.14.1" "torchvision==0.29.1"
    pip_install -e ".${extra}"
    .venv/bin/python -c "$check" || { echo "setup failed: $check" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
