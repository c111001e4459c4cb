#!/usr/bin/env bash
# What the dashboard's browser tests (tests/ui, part of the default `python -m pytest`) need:
# Debian's Chromium and Playwright for Python. Run by scripts/install.sh. Only Playwright's driver
# is used: `playwright install` would download a browser build of its own, which this project never
# does (the tests launch /usr/bin/chromium, or SDPO_TEST_CHROMIUM). The dashboard's front-end
# library (Chart.js from npm) is vendored in api/ui/static/vendor, so neither CI nor the API image
# needs npm; `npm ci && npm run vendor` refreshes that copy.
set -euo pipefail
CHROMIUM="${SDPO_TEST_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  # apt-get as root (CI, containers), through sudo where there is one; else say what to do.
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install-ui-test.sh: Chromium is not at $CHROMIUM and this user can neither apt-get nor sudo." >&2
    echo "  The browser tests (tests/ui) need it: ask an administrator for \`apt-get install chromium\`," >&2
    echo "  or point SDPO_TEST_CHROMIUM at a Chromium or Chrome binary, then run this script again." >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
python -m pip install -q "playwright>=1.45,<2"
"$CHROMIUM" --version
python -c "from importlib.metadata import version; print('playwright', version('playwright'))"
