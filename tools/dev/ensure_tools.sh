#!/usr/bin/env bash
# Make sure the tools some checks need exist: docker-compose (parses the compose files), promtool
# (checks the Prometheus config), mosquitto, and chromium (tests/test_docs_browser.py opens the
# REST docs pages in headless Chromium with no route off the machine). Installs the Debian packages
# with apt when root; otherwise says what is missing and lets the checks skip.
# Never fails the build: a test whose tool is absent skips with a reason.
set -u

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_tools: missing ${missing[*]} (not root or no apt-get: install them to run the deployment checks; they will be skipped)" >&2
  exit 0
fi

echo "ensure_tools: installing ${missing[*]} with apt-get" >&2
apt-get update -qq >/dev/null 2>&1 || true
# prometheus pulls in a daemon we never start; --no-install-recommends keeps the install small.
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  echo "ensure_tools: apt-get install ${missing[*]} failed; the checks that need them will be skipped" >&2
fi
# The Debian package starts a Prometheus server on :9090 through its init script when it can; we only want promtool.
if command -v service >/dev/null 2>&1 && [ -e /etc/init.d/prometheus ]; then
  service prometheus stop >/dev/null 2>&1 || true
fi
exit 0
