#!/usr/bin/env bash
# What the dashboard's browser tests (tests/ui) need on a clean machine: Debian's Chromium and
# Playwright for Python. Only Playwright's driver is used: `playwright install` would download a
# browser build of its own, which this project never does (the tests launch /usr/bin/chromium).
# The dashboard's front-end library (Chart.js from npm) is vendored in api/ui/static/vendor, so
# neither CI nor the API image needs npm; `npm ci && npm run vendor` refreshes that copy.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m pip install -q "playwright>=1.45,<2"
chromium --version
python -c "import playwright; from importlib.metadata import version; print('playwright', version('playwright'))"
