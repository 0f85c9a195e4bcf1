#!/usr/bin/env bash
# Make sure the deployment checks' validators exist: docker-compose (parses the compose files)
# and promtool (checks the Prometheus config). Installs the Debian packages `docker-compose` and
# `prometheus` with apt when root; otherwise says what is missing and lets the checks skip.
# Never fails the build: tests/test_deploy.py skips a check whose tool is absent, with a reason.
set -u

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_tools: missing ${missing[*]} (not root or no apt-get: install them to run the deployment checks; they will be skipped)" >&2
  exit 0
fi

echo "ensure_tools: installing ${missing[*]} with apt-get" >&2
apt-get update -qq >/dev/null 2>&1 || true
# prometheus pulls in a daemon we never start; --no-install-recommends keeps the install small.
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  echo "ensure_tools: apt-get install ${missing[*]} failed; the deployment checks that need them will be skipped" >&2
fi
# The Debian package starts a Prometheus server on :9090 through its init script when it can; we only want promtool.
if command -v service >/dev/null 2>&1 && [ -e /etc/init.d/prometheus ]; then
  service prometheus stop >/dev/null 2>&1 || true
fi
exit 0
