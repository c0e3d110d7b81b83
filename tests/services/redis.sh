#!/bin/sh
# A throwaway Redis server for the job engine's tests on Redis (Debian's `redis-server` package).
#   redis.sh start   install the package if missing, start the server if it is not running (idempotent);
#                    prints the REDIS_URL to give the tests as TEST_REDIS_URL
#   redis.sh url     prints that URL
#   redis.sh stop    stops the server
# The server listens on a Unix socket only (no TCP port) and keeps nothing on disk: it holds test queues only.
# Needs root to install the package.
set -eu

REDIS_ROOT=${PAPERTAG_REDIS_ROOT:-/tmp/papertag-redis}
SOCKET="$REDIS_ROOT/redis.sock"
URL="unix://$SOCKET"

install() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "redis.sh: Redis is not installed; run as root or: apt-get install redis-server" >&2
    exit 1
  fi
  echo "redis.sh: installing Debian's redis-server package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends redis-server >&2
}

running() {
  redis-cli -s "$SOCKET" ping 2>/dev/null | grep -q PONG
}

start() {
  install
  mkdir -p "$REDIS_ROOT"
  if ! running; then
    redis-server --port 0 --unixsocket "$SOCKET" --unixsocketperm 700 --dir "$REDIS_ROOT" --save "" \
      --appendonly no --daemonize yes --pidfile "$REDIS_ROOT/redis.pid" --logfile "$REDIS_ROOT/server.log" >&2
    tries=0
    until running; do
      tries=$((tries + 1))
      if [ "$tries" -gt 100 ]; then
        cat "$REDIS_ROOT/server.log" >&2
        exit 1
      fi
      sleep 0.1
    done
  fi
  echo "$URL"
}

stop() {
  if running; then
    redis-cli -s "$SOCKET" shutdown nosave >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  start) start ;;
  url) echo "$URL" ;;
  stop) stop ;;
  *) echo "usage: $0 start|url|stop" >&2; exit 2 ;;
esac
