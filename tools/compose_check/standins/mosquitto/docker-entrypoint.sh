#!/bin/sh
# As the official image: hand /mosquitto to the broker's user (read-only mounts stay as they are);
# mosquitto itself drops root for the user `mosquitto`.
set -e
if [ "$(id -u)" = 0 ]; then
  chown -R mosquitto:mosquitto /mosquitto 2>/dev/null || true
fi
exec "$@"
