#!/usr/bin/env bash
# Install what tests/test_browser.py needs, idempotently: Debian's chromium (/usr/bin/chromium) and the
# Playwright Python client (pinned) in the project's venv. Playwright never downloads its own browser.
# Usage: bash tests/browser_setup.sh            (PY=path/to/python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PLAYWRIGHT_VERSION="1.65.2"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi

if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '$PLAYWRIGHT_VERSION')" \
        2>/dev/null; then
    "$PY" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi

echo "chromium: $(/usr/bin/chromium --version 2>/dev/null)"
"$PY" -c "import importlib.metadata as m; print('playwright:', m.version('playwright'))"
