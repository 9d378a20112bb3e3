#!/usr/bin/env bash
# Start the services Conveyor's tests and examples use, and wait until they accept connections:
# PostgreSQL (127.0.0.1:5432, database "test"), RabbitMQ (5672) and NATS with JetStream (4222).
#
# Safe to run any number of times: a service that already accepts connections is left alone.
#
# Mode (env CONVEYOR_SERVICES, default "auto"):
#   docker  docker compose -f compose/docker-compose.yml up -d --wait (also starts Kafka)
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
# Connection.Start. A node that accepts TCP but fails the check is reported as
# wedged and restarted: `rabbitmqctl shutdown`, else SIGTERM/SIGKILL to the pid
# in its pid file, then `rabbitmq-server -detached` as for a first start.
#
# Env: WAIT_SECONDS (default 60) bounds the wait for each service;
#      AMQP_TIMEOUT (default 10) bounds one AMQP handshake;
#      RABBITMQ_PID_FILE (default /var/lib/rabbitmq/mnesia/rabbit@*.pid) names the node's pid file.
# Exit status: 0 when every service is up; 1 (with a message naming the service) otherwise.

set -euo pipefail

HOST=127.0.0.1
WAIT_SECONDS="${WAIT_SECONDS:-60}"
MODE="${CONVEYOR_SERVICES:-auto}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_FILE="$ROOT/compose/docker-compose.yml"
LOG_DIR="${TMPDIR:-/tmp}"
AMQP_TIMEOUT="${AMQP_TIMEOUT:-10}"
VENV_PYTHON="$ROOT/.venv/bin/python"

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
  psql -h "$HOST" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAX "$@"
}

# wait_postgres: the port opens before the server accepts queries ("starting up").
wait_postgres() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until psql_postgres -c 'SELECT 1' >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "PostgreSQL did not accept queries on $HOST:5432 within ${WAIT_SECONDS}s"
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

# nats_jetstream: true if the NATS server on 4222 announces JetStream in its INFO line.
nats_jetstream() {
  local info
  info="$(timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/4222" && head -n 1 <&3' "$HOST" 2>/dev/null)" ||
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

# wait_amqp PORT: poll until the broker answers the AMQP handshake, or fail.
wait_amqp() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until amqp_handshake "$1"; do
    ((SECONDS < deadline)) ||
      fail "RabbitMQ accepts TCP on $HOST:$1 but did not answer the AMQP handshake within ${WAIT_SECONDS}s ($RABBIT_PROBE)"
    sleep 1
  done
}

# rabbit_pid: the pid in the node's pid file, if that process is alive.
rabbit_pid() {
  local file pid
  for file in ${RABBITMQ_PID_FILE:-/var/lib/rabbitmq/mnesia/rabbit@*.pid}; do
    [[ -r "$file" ]] || continue
    pid="$(tr -dc 0-9 <"$file")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# stop_rabbitmq PORT LOG: stop a wedged node; fail unless its port closes.
stop_rabbitmq() {
  local port="$1" log="$2" pid deadline
  if ! timeout -k 5 "$WAIT_SECONDS" rabbitmqctl shutdown >>"$log" 2>&1; then
    echo "RabbitMQ: 'rabbitmqctl shutdown' failed or hung; signalling the node's process" >&2
    if pid="$(rabbit_pid)"; then
      kill -TERM "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 30))
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "RabbitMQ: pid $pid ignored SIGTERM for 30s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
    else
      echo "RabbitMQ: no live pid in ${RABBITMQ_PID_FILE:-/var/lib/rabbitmq/mnesia/rabbit@*.pid}" >&2
    fi
  fi
  deadline=$((SECONDS + WAIT_SECONDS))
  while port_open "$port"; do
    ((SECONDS < deadline)) ||
      fail "RabbitMQ is wedged and still holds $HOST:$port after stopping it; stop it by hand (log: $log)"
    sleep 0.5
  done
}

# start_rabbitmq PORT: leave a node that answers AMQP alone; restart a wedged one;
# start a missing one. Sets STATUS.
start_rabbitmq() {
  local port="$1" log="$LOG_DIR/conveyor-start-rabbitmq.log" how="started"
  : >"$log"
  if port_open "$port"; then
    if amqp_handshake "$port"; then
      STATUS="ok (already answering the AMQP handshake on $HOST:$port: $RABBIT_PROBE)"
      return
    fi
    echo "RabbitMQ: WEDGED: accepts TCP on $HOST:$port but did not answer the AMQP handshake" \
      "within ${AMQP_TIMEOUT}s ($RABBIT_PROBE); restarting it" >&2
    stop_rabbitmq "$port" "$log"
    how="restarted (it was wedged)"
  fi
  if ! rabbitmq-server -detached >>"$log" 2>&1; then
    echo "warning: 'rabbitmq-server -detached' exited non-zero; output in $log" >&2
  fi
  wait_port RabbitMQ "$port" "; start command: rabbitmq-server -detached (output in $log)"
  wait_amqp "$port"
  STATUS="$how (rabbitmq-server -detached), answering the AMQP handshake on $HOST:$port: $RABBIT_PROBE"
}

start_postgres() {
  local version
  [[ -d /etc/postgresql ]] || fail "PostgreSQL is not installed (no /etc/postgresql)"
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

start_nats() {
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}

docker_works() {
  command -v docker >/dev/null 2>&1 &&
    docker compose version >/dev/null 2>&1 &&
    docker info >/dev/null 2>&1
}

run_docker() {
  docker compose -f "$COMPOSE_FILE" up -d --wait ||
    fail "docker compose up failed; see: docker compose -f $COMPOSE_FILE ps"
  local service
  for service in kafka rabbitmq nats postgres; do
    echo "$service: ok (docker compose, healthy)"
  done
}

run_local() {
  start_service PostgreSQL 5432 "pg_ctlcluster ... main start" start_postgres
  wait_postgres
  local database
  database="$(ensure_test_db)"
  echo "PostgreSQL: $STATUS; $database"

  start_rabbitmq 5672
  echo "RabbitMQ: $STATUS"

  start_service NATS 4222 "nats-server -js via start-stop-daemon" start_nats
  nats_jetstream || fail "NATS on $HOST:4222 does not have JetStream enabled; restart it with -js"
  echo "NATS: $STATUS; JetStream enabled"
}

main() {
  case "$MODE" in
    docker) docker_works || fail "CONVEYOR_SERVICES=docker but Docker compose is not working"; run_docker ;;
    local) run_local ;;
    auto) if docker_works; then run_docker; else run_local; fi ;;
    *) fail "CONVEYOR_SERVICES must be auto, docker or local (got '$MODE')" ;;
  esac
}

# Sourced (by a test of these functions), define them only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main
fi
