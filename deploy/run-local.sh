#!/usr/bin/env bash
# The many-machine layout of compose.yaml on one machine, without containers: the same
# processes (gunicorn web, koin worker, koin scheduler, koin tsa serve) against the local
# PostgreSQL and Redis.
#
#   deploy/run-local.sh [start]     create the database if missing, koin init, koin db upgrade,
#                                   start the four services, wait until they answer
#   deploy/run-local.sh stop        stop them (each process group: SIGTERM, then SIGKILL)
#   deploy/run-local.sh status      which of them run
#   deploy/run-local.sh koin ARGS   run `koin ARGS` with this deployment's environment
#                                   (e.g. `koin users create …`, `koin apikeys create …`)
#
# Settings (environment; start writes them to RUN_DIR/koin.env, which the other commands read):
#   KOIN_RUN_DIR        pids/, logs/ and koin.env (default: ./instance/run-local)
#   KOIN_HOME           keys, PKI and files (default: RUN_DIR/home)
#   KOIN_DATABASE_URL   default postgresql://postgres@127.0.0.1:5432/koin_deploy (the database
#                       is created when missing)
#   KOIN_REDIS_DB       Redis database number of the broker (default 3); or KOIN_BROKER_URL
#   KOIN_BIND_HOST      address the web and the TSA listen on (default 127.0.0.1)
#   KOIN_WEB_PORT, KOIN_TSA_PORT      default 8000 and 3161
#   KOIN_WEB_WORKERS, KOIN_WORKER_CONCURRENCY   gunicorn workers, signing processes (default 2)
#   KOIN_WORKER_METRICS_PORT   serve the worker's metrics there (default: not served)
#   KOIN_STOP_TIMEOUT   seconds a service gets to stop before SIGKILL (default 30)
#   KOIN_BIN            the koin command (default: .venv/bin/koin of this checkout, else PATH)
#   every other KOIN_* setting (KOIN_SMTP_URL, KOIN_KEY_PASSPHRASE, …) is passed on as it is.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SERVICES=(tsa worker scheduler web)  # started in this order, stopped in the reverse one

say() { echo "run-local: $*" >&2; }
die() { say "$*"; exit 1; }

RUN_DIR=${KOIN_RUN_DIR:-$ROOT/instance/run-local}
ENV_FILE=$RUN_DIR/koin.env

find_tools() {
    if [ -n "${KOIN_BIN:-}" ]; then
        KOIN=$KOIN_BIN
    elif [ -x "$ROOT/.venv/bin/koin" ]; then
        KOIN=$ROOT/.venv/bin/koin
    else
        KOIN=$(command -v koin) || die "koin is not installed (bash .ci/setup, or set KOIN_BIN)"
    fi
    local bin
    bin=$(dirname "$KOIN")
    PYTHON=$bin/python
    [ -x "$PYTHON" ] || PYTHON=$(command -v python3)
    GUNICORN=$bin/gunicorn
    [ -x "$GUNICORN" ] || GUNICORN=$(command -v gunicorn) || die "gunicorn is not installed"
}

# -- processes ----------------------------------------------------------------------------------

# Live (not zombie) processes of process group $1.
group_members() {
    ps -eo pgid=,pid=,stat= | awk -v g="$1" '$1 == g && $3 !~ /^Z/ {print $2}'
}

pid_of() {
    local file=$RUN_DIR/pids/$1.pid
    [ -f "$file" ] && cat "$file"
}

running() {
    local pid
    pid=$(pid_of "$1") || return 1
    [ -n "$(group_members "$pid")" ]
}

# Start service $1 as `$2…` in a session (so process group) of its own: stop kills the group,
# with every child (gunicorn and Celery workers) in it.
launch() {
    local name=$1
    shift
    local log=$RUN_DIR/logs/$name.log
    [ ! -f "$log" ] || mv -f "$log" "$log.1"  # the previous run's log, kept once
    setsid "$@" </dev/null >"$log" 2>&1 &
    local pid=$!
    echo "$pid" >"$RUN_DIR/pids/$name.pid"
    say "$name started (pid $pid, log $log)"
}

stop_service() {
    local name=$1 pid waited=0
    pid=$(pid_of "$name") || return 0
    if [ -n "$(group_members "$pid")" ]; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        while [ -n "$(group_members "$pid")" ]; do
            if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
                say "$name did not stop within $STOP_TIMEOUT s: SIGKILL"
                kill -KILL -- "-$pid" 2>/dev/null || true
                sleep 0.5
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        [ -z "$(group_members "$pid")" ] || die "$name (process group $pid) is still running"
        say "$name stopped"
    fi
    rm -f "$RUN_DIR/pids/$name.pid"
}

stop_all() {
    local i
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        stop_service "${SERVICES[$i]}"
    done
}

# -- readiness ----------------------------------------------------------------------------------

wait_until() {  # wait_until SERVICE SECONDS COMMAND…: until COMMAND succeeds, or fail
    local name=$1 limit=$2 waited=0
    shift 2
    until "$@"; do
        if ! running "$name"; then
            tail -n 30 "$RUN_DIR/logs/$name.log" >&2 || true
            say "$name exited; stopping the others"
            stop_all
            exit 1
        fi
        if [ "$waited" -ge $((limit * 5)) ]; then
            tail -n 30 "$RUN_DIR/logs/$name.log" >&2 || true
            say "$name is not ready after $limit s; stopping the others"
            stop_all
            exit 1
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
}

port_open() {
    "$PYTHON" -c 'import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()' "$1" "$2" \
        2>/dev/null
}

http_ok() {
    "$PYTHON" -c 'import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)' "$1" \
        2>/dev/null
}

log_says() { grep -q "$2" "$RUN_DIR/logs/$1.log" 2>/dev/null; }

# -- the database -------------------------------------------------------------------------------

create_database() {
    "$PYTHON" - "$KOIN_DATABASE_URL" <<'EOF'
"""Create the PostgreSQL database of the URL unless it exists (connecting to `postgres`)."""
import sys

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

url = make_url(sys.argv[1])
if not url.drivername.startswith("postgres"):
    sys.exit(0)
name = url.database
if not name:
    sys.exit("run-local: KOIN_DATABASE_URL names no database")
conninfo = psycopg.conninfo.make_conninfo(
    host=url.host or "", port=str(url.port or ""), user=url.username or "",
    password=url.password or "", dbname="postgres",
)
try:
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
        found = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if found is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"run-local: database {name} created", file=sys.stderr)
except psycopg.Error as exc:
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    sys.exit(f"run-local: PostgreSQL at {where}: {' '.join(str(exc).split())}")
EOF
}

check_broker() {
    "$PYTHON" - "$KOIN_BROKER_URL" <<'EOF'
import sys

import redis

try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=3).ping()
except redis.RedisError as exc:
    sys.exit(f"run-local: the broker (Redis) does not answer: {exc}")
EOF
}

# -- commands -----------------------------------------------------------------------------------

write_env() {
    local name
    (
        umask 077
        for name in $(compgen -e | grep '^KOIN_' | sort); do
            printf 'export %s=%q\n' "$name" "${!name}"
        done >"$ENV_FILE"
    )
}

start() {
    find_tools
    mkdir -p "$RUN_DIR/pids" "$RUN_DIR/logs"
    local name
    for name in "${SERVICES[@]}"; do
        running "$name" && die "$name is already running (pid $(pid_of "$name")); stop first"
    done
    export KOIN_RUN_DIR=$RUN_DIR
    export KOIN_HOME=${KOIN_HOME:-$RUN_DIR/home}
    export KOIN_BIND_HOST=${KOIN_BIND_HOST:-127.0.0.1}
    export KOIN_WEB_PORT=${KOIN_WEB_PORT:-8000}
    export KOIN_TSA_PORT=${KOIN_TSA_PORT:-3161}
    export KOIN_WEB_WORKERS=${KOIN_WEB_WORKERS:-2}
    export KOIN_WORKER_CONCURRENCY=${KOIN_WORKER_CONCURRENCY:-2}
    export KOIN_DATABASE_URL=${KOIN_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/koin_deploy}
    export KOIN_REDIS_DB=${KOIN_REDIS_DB:-3}
    export KOIN_BROKER_URL=${KOIN_BROKER_URL:-redis://127.0.0.1:6379/$KOIN_REDIS_DB}
    export KOIN_PUBLIC_URL=${KOIN_PUBLIC_URL:-http://$KOIN_BIND_HOST:$KOIN_WEB_PORT}
    export KOIN_TSA_URLS=${KOIN_TSA_URLS:-http://$KOIN_BIND_HOST:$KOIN_TSA_PORT/}
    export KOIN_ACCESS_LOG=${KOIN_ACCESS_LOG:-$RUN_DIR/logs/web-access.log}
    [ -n "${KOIN_SMTP_URL:-}" ] ||
        say "KOIN_SMTP_URL is not set: mail stays in the outbox until it is (see docs)"
    write_env

    create_database
    check_broker
    # on the terminal, not in a log: init shows a first administrator's password once
    "$KOIN" init
    "$KOIN" db upgrade

    launch tsa "$KOIN" tsa serve --host "$KOIN_BIND_HOST" --port "$KOIN_TSA_PORT"
    wait_until tsa 30 port_open "$KOIN_BIND_HOST" "$KOIN_TSA_PORT"
    # with KOIN_WORKER_METRICS_PORT: the worker's batch signatures at that port's /metrics
    launch worker env PROMETHEUS_MULTIPROC_DIR="$RUN_DIR/worker-metrics" \
        "$KOIN" worker --no-beat --concurrency "$KOIN_WORKER_CONCURRENCY" \
        --hostname "koin-worker@%h-$KOIN_WEB_PORT"
    launch scheduler "$KOIN" scheduler
    # the metrics of all gunicorn workers, summed by /metrics (web.metrics); gunicorn only
    launch web env PROMETHEUS_MULTIPROC_DIR="$RUN_DIR/metrics" \
        "$GUNICORN" --config python:web.gunicorn_config
    wait_until web 60 http_ok "http://$KOIN_BIND_HOST:$KOIN_WEB_PORT/healthz"
    wait_until worker 60 log_says worker " ready\."
    wait_until scheduler 30 log_says scheduler "beat: Starting"
    say "koin runs at $KOIN_PUBLIC_URL (TSA $KOIN_TSA_URLS, broker $KOIN_BROKER_URL)"
    say "stop with: $0 stop"
}

load_env() {
    [ -f "$ENV_FILE" ] || die "no $ENV_FILE: start first"
    # shellcheck disable=SC1090
    source "$ENV_FILE"
}

STOP_TIMEOUT=${KOIN_STOP_TIMEOUT:-30}
case "${1:-start}" in
    start) start ;;
    stop) stop_all ;;
    status)
        for name in "${SERVICES[@]}"; do
            if running "$name"; then echo "$name running (pid $(pid_of "$name"))"
            else echo "$name stopped"; fi
        done
        ;;
    koin)
        shift
        load_env
        find_tools
        exec "$KOIN" "$@"
        ;;
    *) die "usage: $0 [start|stop|status|koin ARGS…]" ;;
esac
