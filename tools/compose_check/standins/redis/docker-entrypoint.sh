#!/bin/sh
# As the official image: `redis-server` runs as user redis owning /data, and with protected mode off
# (the official image compiles that default in; other containers reach it over the compose network).
set -e
if [ "${1#-}" != "$1" ]; then
  set -- redis-server "$@"
fi
case " $* " in *" --version "*|*" -v "*|*" --help "*|*" -h "*) exec "$@" ;; esac
if [ "$1" = redis-server ]; then
  shift
  if [ -n "${1:-}" ] && [ "${1#-}" = "$1" ]; then   # a config file comes first
    conf="$1"; shift
    set -- redis-server "$conf" --protected-mode no "$@"
  else
    set -- redis-server --protected-mode no "$@"
  fi
  if [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' + 2>/dev/null || true
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
