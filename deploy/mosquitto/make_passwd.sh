#!/usr/bin/env bash
# Write deploy/mosquitto/passwd (Mosquitto password file, hashed) for the five service users from
# the environment, plus nodes from an optional "user password" list file:
#   MQTT_BRIDGE_PASS=... HISTORY_LOGGER_MQTT_PASS=... AUTOMATION_MQTT_PASS=... SCHEDULER_MQTT_PASS=... \
#   REGISTRY_MQTT_PASS=... deploy/mosquitto/make_passwd.sh [nodes.txt]
# Needs mosquitto_passwd (Debian: mosquitto) or Docker (uses the eclipse-mosquitto:2 image).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${PASSWD_FILE:-$here/passwd}"
nodes="${1:-}"

declare -A users=(
  [mqtt_bridge]="${MQTT_BRIDGE_PASS:?set MQTT_BRIDGE_PASS}"
  [history_logger]="${HISTORY_LOGGER_MQTT_PASS:?set HISTORY_LOGGER_MQTT_PASS}"
  [automation_engine]="${AUTOMATION_MQTT_PASS:?set AUTOMATION_MQTT_PASS}"
  [scheduler]="${SCHEDULER_MQTT_PASS:?set SCHEDULER_MQTT_PASS}"
  [device_registry]="${REGISTRY_MQTT_PASS:?set REGISTRY_MQTT_PASS}"
)

plain="$(mktemp)"
trap 'rm -f "$plain"' EXIT
for user in "${!users[@]}"; do printf '%s:%s\n' "$user" "${users[$user]}" >> "$plain"; done
if [ -n "$nodes" ]; then
  while read -r user pass; do
    [ -n "${user:-}" ] && [ "${user:0:1}" != "#" ] && printf '%s:%s\n' "$user" "$pass" >> "$plain"
  done < "$nodes"
fi

if command -v mosquitto_passwd >/dev/null 2>&1; then
  cp "$plain" "$out"
  mosquitto_passwd -U "$out"
else
  cp "$plain" "$out"
  docker run --rm -v "$out:/passwd" eclipse-mosquitto:2 mosquitto_passwd -U /passwd
fi
# The broker in the container (eclipse-mosquitto:2) reads this file after dropping root, as its user
# mosquitto (uid and gid 1883): private to that user, it starts; private to whoever ran this, it cannot.
chmod 600 "$out"
if [ "$(id -u)" = 0 ]; then
  chown "${PASSWD_OWNER:-1883:1883}" "$out"
else
  echo "warning: not root, so $out stays owned by you and the broker in the container cannot read it;" \
       "run this with sudo -E, or: sudo chown 1883:1883 $out" >&2
fi
echo "wrote $out ($(wc -l < "$out") users)"
