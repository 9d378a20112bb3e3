#!/usr/bin/env bash
# Start the services Conveyor's tests and examples use, and wait until they accept connections:
# PostgreSQL (127.0.0.1:5432, database "test"), RabbitMQ (5672) and NATS with JetStream (4222).
#
# Safe to run any number of times, and on a shared host: a service that already
# runs is never stopped or restarted. One that runs but is unhealthy (a RabbitMQ
# node that accepts TCP without answering the AMQP handshake, a NATS server without
# JetStream) fails the script with a message naming it and the command that fixes it.
# Only a service that is not running at all is started.
#
#   start-local-services.sh           start what is not running, then check everything
#   start-local-services.sh --check   start nothing: check every service, fail naming the unhealthy ones
#                                     (`make bench` runs this)
#
# Mode (env CONVEYOR_SERVICES, default "auto"):
#   docker  docker compose -f compose/docker-compose.yml up -d --wait --no-recreate (also starts Kafka)
#   local   start locally installed services (Debian/Ubuntu packages, no Docker)
#   auto    docker when `docker compose version` and `docker info` both succeed, else local
#
# Kafka is not started in local mode: the tests run their own Tansu broker
# (conveyor.testing.servers.TansuBroker).
#
# RabbitMQ counts as up only when it answers the AMQP handshake, not merely when
# its port accepts TCP (a wedged node once did that and never answered). With the
# repository's .venv the check is a full aio-pika connection (guest/guest, opens
# a channel); without it, the AMQP protocol header must be answered with
# Connection.Start.
#
# Env: WAIT_SECONDS (default 60) bounds the wait for each service;
#      AMQP_TIMEOUT (default 10) bounds one AMQP handshake;
#      POSTGRES_PORT, RABBITMQ_PORT, NATS_PORT (5432, 5672, 4222) the ports checked.
# Exit status: 0 when every service is up; 1 (with a message naming the service and the fix) otherwise.

set -euo pipefail

HOST=127.0.0.1
WAIT_SECONDS="${WAIT_SECONDS:-60}"
MODE="${CONVEYOR_SERVICES:-auto}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_FILE="$ROOT/compose/docker-compose.yml"
LOG_DIR="${TMPDIR:-/tmp}"
AMQP_TIMEOUT="${AMQP_TIMEOUT:-10}"
VENV_PYTHON="$ROOT/.venv/bin/python"
POSTGRES_PORT="${POSTGRES_PORT:-5432}"
RABBITMQ_PORT="${RABBITMQ_PORT:-5672}"
NATS_PORT="${NATS_PORT:-4222}"
# What fixes a RabbitMQ node that accepts TCP but does not answer AMQP (this script never restarts one).
RABBITMQ_FIX="sudo rabbitmqctl shutdown && sudo rabbitmq-server -detached (or: sudo systemctl restart rabbitmq-server; with Docker: docker compose -f compose/docker-compose.yml restart rabbitmq)"

fail() {
  echo "ERROR: $*" >&2
  exit 1
}

# port_open PORT: true if something accepts TCP connections on $HOST:PORT (no nc needed).
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# wait_port NAME PORT [HINT]: poll until the port accepts connections, or fail naming the service.
wait_port() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until port_open "$2"; do
    ((SECONDS < deadline)) || fail "$1 did not accept connections on $HOST:$2 within ${WAIT_SECONDS}s${3:-}"
    sleep 0.5
  done
}

# start_service NAME PORT DESCRIPTION COMMAND...: run COMMAND unless the port is open,
# wait for the port, and set STATUS to what was done.
start_service() {
  local name="$1" port="$2" description="$3" log
  shift 3
  if port_open "$port"; then
    STATUS="ok (already accepting connections on $HOST:$port)"
    return
  fi
  log="$LOG_DIR/conveyor-start-${name,,}.log"
  if ! "$@" >"$log" 2>&1; then
    echo "warning: '$*' exited non-zero; output in $log" >&2
  fi
  wait_port "$name" "$port" "; start command: $* (output in $log)"
  STATUS="started ($description), accepting connections on $HOST:$port"
}

psql_postgres() {
  psql -h "$HOST" -p "$POSTGRES_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAX "$@"
}

# wait_postgres: the port opens before the server accepts queries ("starting up").
wait_postgres() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until psql_postgres -c 'SELECT 1' >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "PostgreSQL did not accept queries on $HOST:$POSTGRES_PORT within ${WAIT_SECONDS}s"
    sleep 0.5
  done
}

# ensure_test_db: create the database "test" if it is missing; print what was done.
ensure_test_db() {
  if [[ "$(psql_postgres -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" == 1 ]]; then
    echo "database test exists"
  else
    psql_postgres -c 'CREATE DATABASE test' >/dev/null || fail "PostgreSQL: could not create database test"
    echo "created database test"
  fi
}

# nats_jetstream: true if the NATS server on $NATS_PORT announces JetStream in its INFO line.
nats_jetstream() {
  local info
  info="$(timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" && head -n 1 <&3' "$HOST" "$NATS_PORT" 2>/dev/null)" ||
    return 1
  [[ "$info" == *'"jetstream":true'* ]]
}

# amqp_handshake PORT: true if the broker on $HOST:PORT answers the AMQP handshake
# within $AMQP_TIMEOUT s; RABBIT_PROBE says which check decided. A broker that
# greets with Connection.Start but refuses the full handshake (credentials, vhost)
# is answering: it is reported, not treated as wedged.
amqp_handshake() {
  local error
  if [[ -x "$VENV_PYTHON" ]] && "$VENV_PYTHON" -c 'import aio_pika' >/dev/null 2>&1; then
    RABBIT_PROBE="AMQP connection and channel (aio-pika)"
    if error="$(amqp_connect "$1" 2>&1)"; then
      return 0
    fi
    amqp_greets "$1" || return 1
    RABBIT_PROBE="AMQP Connection.Start only; the full handshake as guest failed: ${error##*$'\n'}"
    echo "warning: RabbitMQ on $HOST:$1 answers AMQP but refused the test handshake: ${error##*$'\n'}" >&2
    return 0
  fi
  RABBIT_PROBE="AMQP protocol header answered by Connection.Start"
  amqp_greets "$1"
}

# amqp_connect PORT: open an AMQP connection (guest/guest) and a channel, then close them.
amqp_connect() {
  timeout -k 2 "$((AMQP_TIMEOUT + 2))" "$VENV_PYTHON" - "amqp://guest:guest@$HOST:$1/" "$AMQP_TIMEOUT" <<'PY'
import asyncio
import sys

import aio_pika


async def handshake(url: str, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        connection = await aio_pika.connect(url, timeout=seconds)
        try:
            await connection.channel()
        finally:
            await connection.close()


try:
    asyncio.run(handshake(sys.argv[1], float(sys.argv[2])))
except BaseException as exc:  # one line for the caller's message
    sys.exit(f"{type(exc).__name__}: {exc}".replace("\n", " ") or "failed")
PY
}

# amqp_greets PORT: true if the broker answers the AMQP 0-9-1 protocol header with a
# Connection.Start method frame (type 1, channel 0, class 10, method 10). No Python needed.
amqp_greets() {
  local reply
  reply="$(timeout -k 1 "$AMQP_TIMEOUT" bash -c \
    'exec 3<>"/dev/tcp/$0/$1" && printf "AMQP\0\0\011\001" >&3 && head -c 11 <&3 | od -An -tx1' \
    "$HOST" "$1" 2>/dev/null)" || return 1
  reply="$(echo $reply)"
  [[ "$reply" == "01 00 00 "*" 00 0a 00 0a" ]]
}

# wait_amqp PORT [MESSAGE]: poll until the broker answers the AMQP handshake, or fail with MESSAGE.
wait_amqp() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until amqp_handshake "$1"; do
    ((SECONDS < deadline)) ||
      fail "${2:-RabbitMQ accepts TCP on $HOST:$1 but did not answer the AMQP handshake within ${WAIT_SECONDS}s ($RABBIT_PROBE)}"
    sleep 1
  done
}

# start_rabbitmq PORT: leave a node that answers AMQP alone; start one when nothing listens;
# fail, naming the fix, when a node listens but does not answer (it is never restarted here). Sets STATUS.
start_rabbitmq() {
  local port="$1" log="$LOG_DIR/conveyor-start-rabbitmq.log"
  if port_open "$port"; then
    # A node that is still booting answers within WAIT_SECONDS; one that does not is left running, and reported.
    wait_amqp "$port" "$(rabbit_wedged "$port")"
    STATUS="ok (already answering the AMQP handshake on $HOST:$port: $RABBIT_PROBE)"
    return
  fi
  : >"$log"
  if ! rabbitmq-server -detached >>"$log" 2>&1; then
    echo "warning: 'rabbitmq-server -detached' exited non-zero; output in $log" >&2
  fi
  wait_port RabbitMQ "$port" "; start command: rabbitmq-server -detached (output in $log)"
  wait_amqp "$port"
  STATUS="started (rabbitmq-server -detached), answering the AMQP handshake on $HOST:$port: $RABBIT_PROBE"
}

# rabbit_wedged PORT: the message for a node that accepts TCP but does not answer AMQP.
rabbit_wedged() {
  echo "RabbitMQ is unhealthy: it accepts TCP on $HOST:$1 but does not answer the AMQP handshake" \
    "(each try bounded by AMQP_TIMEOUT=${AMQP_TIMEOUT}s). This script does not restart a service it did not start;" \
    "restart it yourself: $RABBITMQ_FIX"
}

start_postgres() {
  local version
  [[ -d /etc/postgresql ]] || fail "PostgreSQL is not installed (no /etc/postgresql)"
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

start_nats() {
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p "$NATS_PORT" -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}

docker_works() {
  command -v docker >/dev/null 2>&1 &&
    docker compose version >/dev/null 2>&1 &&
    docker info >/dev/null 2>&1
}

run_docker() {
  # --no-recreate: a running container is left as it is, even if the compose file changed.
  docker compose -f "$COMPOSE_FILE" up -d --wait --no-recreate ||
    fail "docker compose up failed; see: docker compose -f $COMPOSE_FILE ps"
  local service
  for service in kafka rabbitmq nats postgres; do
    echo "$service: ok (docker compose, healthy)"
  done
}

run_local() {
  start_service PostgreSQL "$POSTGRES_PORT" "pg_ctlcluster ... main start" start_postgres
  wait_postgres
  local database
  database="$(ensure_test_db)"
  echo "PostgreSQL: $STATUS; $database"

  start_rabbitmq "$RABBITMQ_PORT"
  echo "RabbitMQ: $STATUS"

  start_service NATS "$NATS_PORT" "nats-server -js via start-stop-daemon" start_nats
  nats_jetstream || fail "NATS on $HOST:$NATS_PORT does not have JetStream enabled; this script does not restart" \
    "a service it did not start: restart it yourself with -js (nats-server -js ...)"
  echo "NATS: $STATUS; JetStream enabled"
}

# check_all: start nothing; report every service, fail naming each unhealthy one and its fix.
check_all() {
  local unhealthy=()
  if ! port_open "$POSTGRES_PORT"; then
    unhealthy+=("PostgreSQL: nothing accepts connections on $HOST:$POSTGRES_PORT; start it: bash compose/start-local-services.sh")
  elif ! psql_postgres -c 'SELECT 1' >/dev/null 2>&1; then
    unhealthy+=("PostgreSQL on $HOST:$POSTGRES_PORT does not answer queries as user postgres; check its log, or restart it yourself")
  elif [[ "$(psql_postgres -c "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null)" != 1 ]]; then
    unhealthy+=("PostgreSQL on $HOST:$POSTGRES_PORT has no database test; create it: bash compose/start-local-services.sh")
  else
    echo "PostgreSQL: ok (answering queries on $HOST:$POSTGRES_PORT; database test exists)"
  fi
  if ! port_open "$RABBITMQ_PORT"; then
    unhealthy+=("RabbitMQ: nothing accepts connections on $HOST:$RABBITMQ_PORT; start it: bash compose/start-local-services.sh")
  elif ! amqp_handshake "$RABBITMQ_PORT"; then
    unhealthy+=("$(rabbit_wedged "$RABBITMQ_PORT")")
  else
    echo "RabbitMQ: ok (answering the AMQP handshake on $HOST:$RABBITMQ_PORT: $RABBIT_PROBE)"
  fi
  if ! port_open "$NATS_PORT"; then
    unhealthy+=("NATS: nothing accepts connections on $HOST:$NATS_PORT; start it: bash compose/start-local-services.sh")
  elif ! nats_jetstream; then
    unhealthy+=("NATS on $HOST:$NATS_PORT does not have JetStream enabled; restart it yourself with -js")
  else
    echo "NATS: ok (accepting connections on $HOST:$NATS_PORT; JetStream enabled)"
  fi
  if ((${#unhealthy[@]})); then
    printf 'ERROR: %s\n' "${unhealthy[@]}" >&2
    exit 1
  fi
}

main() {
  if [[ "${1:-}" == "--check" ]]; then
    check_all
    return
  fi
  [[ -z "${1:-}" ]] || fail "unknown argument '$1' (the only option is --check)"
  case "$MODE" in
    docker) docker_works || fail "CONVEYOR_SERVICES=docker but Docker compose is not working"; run_docker ;;
    local) run_local ;;
    auto) if docker_works; then run_docker; else run_local; fi ;;
    *) fail "CONVEYOR_SERVICES must be auto, docker or local (got '$MODE')" ;;
  esac
}

# Sourced (by a test of these functions), define them only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
