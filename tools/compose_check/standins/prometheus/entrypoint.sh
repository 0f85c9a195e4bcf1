#!/bin/sh
# Debian builds Prometheus with its own default storage path (/var/lib/prometheus/metrics2); the
# official binary's default is data/ (relative to the working directory /prometheus). Keep that
# default when the command names no --storage.tsdb.path.
case " $* " in
  *" --storage.tsdb.path"*) exec /usr/bin/prometheus "$@" ;;
  *) exec /usr/bin/prometheus --storage.tsdb.path=data/ "$@" ;;
esac
