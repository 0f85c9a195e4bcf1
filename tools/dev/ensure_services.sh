#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and Mosquitto answer on 127.0.0.1 (5432, 6379, 1883): reuse the
# running ones, start installed ones, install missing ones with apt when root. Says what is
# missing otherwise and exits non-zero.
set -u

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_up() { for _ in $(seq 1 60); do up "$1" && return 0; sleep 0.5; done; return 1; }
apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing: $* (install it, or run as root so this script can apt-get install it)" >&2
    return 1
  fi
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq >/dev/null; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

status=0

if ! up 5432; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql || status=1
    fresh_pg=1
  fi
  if ls /etc/postgresql/* >/dev/null 2>&1; then
    version=$(ls /etc/postgresql | sort -V | tail -1)
    if [ -n "${fresh_pg:-}" ]; then  # the tests connect over TCP without a password, as on CI
      echo "host all all 127.0.0.1/32 trust" > /tmp/pg_hba_trust
      cat /tmp/pg_hba_trust "/etc/postgresql/$version/main/pg_hba.conf" > /tmp/pg_hba_new
      cp /tmp/pg_hba_new "/etc/postgresql/$version/main/pg_hba.conf"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  fi
  wait_up 5432 || { echo "PostgreSQL is not answering on 127.0.0.1:5432" >&2; status=1; }
fi

if ! up 6379; then
  command -v redis-server >/dev/null || apt_install redis-server || status=1
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null
  fi
  wait_up 6379 || { echo "Redis is not answering on 127.0.0.1:6379" >&2; status=1; }
fi

if ! up 1883; then
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt_install mosquitto || status=1
  if [ -x /usr/sbin/mosquitto ]; then
    /usr/sbin/mosquitto -d -c /etc/mosquitto/mosquitto.conf
  fi
  wait_up 1883 || { echo "Mosquitto is not answering on 127.0.0.1:1883" >&2; status=1; }
fi

exit $status
