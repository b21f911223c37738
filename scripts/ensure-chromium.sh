#!/bin/sh
# Chromium for the status page's browser tests (tests/integration/test_status_page*.py).
# Idempotent: nothing to do when /usr/bin/chromium (or $CHROMIUM) exists; installs Debian's
# package when run as root where apt-get is; otherwise says why not and exits 0 (those tests
# then skip with the same reason).
set -u
if [ -n "${CHROMIUM:-}" ] && command -v "$CHROMIUM" >/dev/null 2>&1; then
  exit 0
fi
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-chromium: no chromium, and not root: not installing it (run 'sudo apt-get install chromium'); the browser tests will skip"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: no chromium and no apt-get here: install Chromium and set CHROMIUM=path; the browser tests will skip"
  exit 0
fi
echo "ensure-chromium: installing Debian's chromium for the browser tests (apt-get)"
if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; then
  echo "ensure-chromium: installed $(/usr/bin/chromium --version 2>/dev/null)"
else
  echo "ensure-chromium: apt-get could not install chromium; the browser tests will skip"
fi
exit 0
