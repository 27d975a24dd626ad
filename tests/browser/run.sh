#!/usr/bin/env bash
# Real-browser test of lesson 04 (`make test-browser`):
#   installs Debian's chromium and Playwright (Python) if missing, starts JupyterLab headless on a
#   free port with a random token, opens notebooks/04_momentum_forgetting.ipynb in Chromium,
#   runs all cells, checks that the sliders (ipywidgets) and matplotlib figures rendered, moves a
#   slider and checks that the widget redraws, and saves tests/browser/out/lesson04.png.
# Uses the system chromium through Playwright's executable_path: never `playwright install`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$(pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ ! -x "$CHROMIUM" ]; then
    echo "== installing chromium (apt)"
    if [ "$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
    echo "== installing playwright (pip, driver only; the browser is the system chromium)"
    "$PY" -m pip install -q "playwright>=1.40"
fi

mkdir -p tests/browser/out
CHROMIUM="$CHROMIUM" exec "$PY" tests/browser/lesson04.py "$@"
