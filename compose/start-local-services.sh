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
# (conveyor.testing.brokers.TansuBroker).
#
# Env: WAIT_SECONDS (default 60) bounds the wait for each service.
# Exit status: 0 when every service is up; 1 (with a message naming the service) otherwise.

set -euo pipefail

HOST=127.0.0.1
WAIT_SECONDS="${WAIT_SECONDS:-60}"
MODE="${CONVEYOR_SERVICES:-auto}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_FILE="$ROOT/compose/docker-compose.yml"
LOG_DIR="${TMPDIR:-/tmp}"

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

  start_service RabbitMQ 5672 "rabbitmq-server -detached" rabbitmq-server -detached
  echo "RabbitMQ: $STATUS"

  start_service NATS 4222 "nats-server -js via start-stop-daemon" start_nats
  nats_jetstream || fail "NATS on $HOST:4222 does not have JetStream enabled; restart it with -js"
  echo "NATS: $STATUS; JetStream enabled"
}

case "$MODE" in
  docker) docker_works || fail "CONVEYOR_SERVICES=docker but Docker compose is not working"; run_docker ;;
  local) run_local ;;
  auto) if docker_works; then run_docker; else run_local; fi ;;
  *) fail "CONVEYOR_SERVICES must be auto, docker or local (got '$MODE')" ;;
esac
