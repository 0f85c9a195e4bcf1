#!/bin/sh
# As the official image: hand /mosquitto to the broker's user (read-only mounts stay as they are);
# mosquitto itself drops root for the user `mosquitto`.
set -e
if [ "$(id -u)" = 0 ]; then
  chown -R mosquitto:mosquitto /mosquitto 2>/dev/null || true
fi
# Debian's build block-buffers `log_dest stdout` when stdout is not a terminal (the log would show up
# only at exit); the official image's broker logs each line at once, so line-buffer it here.
if [ "$1" = /usr/sbin/mosquitto ] || [ "$1" = mosquitto ]; then
  exec stdbuf -oL "$@"
fi
exec "$@"
