#!/usr/bin/env bash
# perf/demo.sh: the one command that shows chat-writer doing its main job.
#
# On a Debian machine with MariaDB (127.0.0.1:3306, root, empty password),
# Redis (6379) and RabbitMQ (5672, guest/guest) installed, it:
#   1. builds chat-writer and the demo publisher (release);
#   2. starts MariaDB, Redis, RabbitMQ if they do not answer, and an
#      Elasticsearch-compatible server (osmem-server, installed with pip if
#      needed) if nothing answers on ELASTICSEARCH_URL;
#   3. resets the demo state: database chat_writer_demo dropped (migrate
#      recreates it), index chat_writer_demo deleted, RabbitMQ vhost
#      chat_writer_demo deleted and created again; Redis is not flushed, the demo's
#      tokens are random;
#   4. runs `chat-writer migrate`, starts chat-writer in the background
#      (COUNT_SYNC_INTERVAL=1s), runs the demo publisher/verifier (target
#      perf/src/demo.rs), then stops the writer with SIGTERM and checks that it
#      exits 0.
#
# With --tls, all four of the writer's connections go over TLS, to the same
# local endpoints the TLS tests make (perf/src/tls_rig.rs, from
# tests/common/tls.rs): `tls-rig` makes a throw-away CA and starts a TLS
# proxy in front of RabbitMQ (client certificate required), an HTTP TLS
# proxy in front of the search server (API key required), a private
# TLS-only redis-server (client certificate required) and a private MariaDB
# with require_secure_transport=ON; it writes target/demo/tls-rig.env and
# the writer runs with `--env-file` of it (amqps://, rediss://, https://,
# DATABASE_SSL_MODE=verify_identity, the rig's CA in each *_TLS_CA_FILE, the
# MySQL password and the API key from *_FILE variables). The demo publisher
# publishes to the plain broker and reads the private MariaDB and Redis over
# their unix sockets; the database is then the private MariaDB's (removed at
# the end with the rig), the system MariaDB is not touched. The summary adds
# what the servers saw (TLS handshakes and connections per service) and the
# demo passes only if all four were used over TLS.
#
# Usage: perf/demo.sh [--tls] [demo flags]   e.g. perf/demo.sh --messages 20000
#   demo flags: --messages N (5000) --apps N (5) --chats-per-app N (10)
#               --updates N (500) --timeout SECS (120) --window N (1000)
# Environment: ELASTICSEARCH_URL (default http://127.0.0.1:9200),
#   CARGO_TARGET_DIR (where cargo puts the binaries, default ./target).
# Logs: target/demo/{writer,demo,osmem,tls-rig}.log. Exit 0 only if the demo
# verified everything and the writer shut down with exit code 0.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
LOG_DIR="$ROOT/target/demo"
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
mkdir -p "$LOG_DIR"

ES_URL="${ELASTICSEARCH_URL:-http://127.0.0.1:9200}"
ES_URL="${ES_URL%/}"
DEMO_DB=chat_writer_demo
DEMO_INDEX=chat_writer_demo
DEMO_VHOST=chat_writer_demo

TLS=""
DEMO_ARGS=()
for a in "$@"; do
  if [[ "$a" == --tls ]]; then TLS=1; else DEMO_ARGS+=("$a"); fi
done
set -- ${DEMO_ARGS[@]+"${DEMO_ARGS[@]}"}

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------ cleanup
WRITER_PID=""
DEMO_PID=""
OSMEM_PID=""
RIG_PID=""
cleanup() {
  local pid
  for pid in "$DEMO_PID" "$WRITER_PID" "$RIG_PID" "$OSMEM_PID"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "$DEMO_PID" "$WRITER_PID" "$RIG_PID" "$OSMEM_PID"; do
    if [[ -n "$pid" ]]; then
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ build
say "building chat-writer and the demo publisher (release)"
[[ -d "$HOME/.cargo/bin" ]] && PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
cargo build --release --bin chat-writer
cargo build --release -p chat-writer-perf --bin demo ${TLS:+--bin tls-rig}
WRITER="$BIN_DIR/chat-writer"
DEMO="$BIN_DIR/demo"
[[ -x "$WRITER" && -x "$DEMO" ]] || die "binaries not found in $BIN_DIR"
[[ -z "$TLS" || -x "$BIN_DIR/tls-rig" ]] || die "tls-rig not found in $BIN_DIR"

# ------------------------------------------------------------ services
. "$ROOT/perf/services.sh"
es_up() { curl -fsS -o /dev/null --max-time 2 "$ES_URL/" 2>/dev/null; }

say "checking MariaDB, Redis, RabbitMQ, Elasticsearch"
command -v curl >/dev/null || die "curl not found (apt-get install -y curl)"
ensure_services || die "a local service did not start (see above)"
if es_up; then echo "Elasticsearch: up at $ES_URL"; else
  echo "Elasticsearch: nothing at $ES_URL, starting osmem-server"
  ensure_osmem_installed || die "pip install osmem-server failed"
  ES_ADDR="${ES_URL#*://}"
  ES_ADDR="${ES_ADDR%%/*}"
  "$(osmem_bin)" -addr "$ES_ADDR" -no-stdin-watch >"$LOG_DIR/osmem.log" 2>&1 &
  OSMEM_PID=$!
  wait_up 30 osmem-server es_up || die "osmem-server did not answer on $ES_ADDR"
  echo "osmem-server: pid $OSMEM_PID on $ES_ADDR (stopped at the end)"
fi

# ------------------------------------------------------------ TLS endpoints
RIG_ENV="$LOG_DIR/tls-rig.env"
WRITER_ARGS=()
if [[ -n "$TLS" ]]; then
  say "starting the TLS endpoints (tls-rig; log: $LOG_DIR/tls-rig.log)"
  rm -f "$RIG_ENV" "$RIG_ENV.status"
  ES_HOSTPORT="${ES_URL#*://}"
  ES_HOSTPORT="${ES_HOSTPORT%%/*}"
  # Its stdin is a pipe this script holds: if the script dies, the rig
  # sees the end of it and stops its servers.
  coproc RIGPROC { exec "$BIN_DIR/tls-rig" --env-file "$RIG_ENV" --amqp 127.0.0.1:5672 \
    --es "$ES_HOSTPORT" --vhost "$DEMO_VHOST" --redis-db 0 >"$LOG_DIR/tls-rig.log" 2>&1; }
  RIG_PID=$RIGPROC_PID
  rig_ready() { grep -q '^tls-rig: ready' "$LOG_DIR/tls-rig.log" 2>/dev/null; }
  for _ in $(seq 1 240); do
    rig_ready && break
    kill -0 "$RIG_PID" 2>/dev/null || break
    sleep 0.25
  done
  rig_ready || { tail -n 30 "$LOG_DIR/tls-rig.log" >&2; die "tls-rig did not start (log above)"; }
  sed -n 's/^tls-rig: /  /p' "$LOG_DIR/tls-rig.log"
  rig_var() { sed -n "s/^$1=//p" "$RIG_ENV" | tail -n 1; }
  # The file must win: no variable of the environment may shadow it.
  while IFS='=' read -r k _; do
    if [[ "$k" =~ ^[A-Z][A-Z0-9_]*$ ]]; then unset "$k" "${k%_FILE}" "${k}_FILE"; fi
  done <"$RIG_ENV"
  unset ELASTICSEARCH_URL ELASTICSEARCH_API_KEY DATABASE_SSL_MODE
  WRITER_ARGS=(--env-file "$RIG_ENV")
fi

# ------------------------------------------------------------ clean demo state
say "resetting database $DEMO_DB, index $DEMO_INDEX and vhost $DEMO_VHOST"
if [[ -z "$TLS" ]]; then
  mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS \`$DEMO_DB\`"
fi
curl -fsS -o /dev/null -X DELETE "$ES_URL/$DEMO_INDEX" 2>/dev/null || true
# A vhost of its own: the demo never touches queues of other vhosts.
rabbitmqctl -q delete_vhost "$DEMO_VHOST" </dev/null >/dev/null 2>&1 || true
rabbitmqctl -q add_vhost "$DEMO_VHOST" </dev/null >/dev/null
rabbitmqctl -q set_permissions -p "$DEMO_VHOST" guest ".*" ".*" ".*" </dev/null >/dev/null
dlq_depth() { # total messages in the writer's .dlq queues
  rabbitmqctl -q -p "$DEMO_VHOST" list_queues name messages --no-table-headers </dev/null 2>/dev/null |
    awk '$1 ~ /\.dlq$/ { n += $2 } END { print n + 0 }'
}

if [[ -z "$TLS" ]]; then
  export DATABASE_HOST=127.0.0.1 DATABASE_PORT=3306 DATABASE_USERNAME=root DATABASE_PASSWORD=
  export REDIS_URL=redis://127.0.0.1:6379/0
  export RABBITMQ_URL="amqp://guest:guest@127.0.0.1:5672/$DEMO_VHOST"
  export ELASTICSEARCH_URL="$ES_URL"
  DEMO_ENV=()
else
  # The writer's connections come from the rig's file; the demo's own,
  # plain ones: the broker and the search server directly, the private
  # MariaDB and Redis over their unix sockets.
  DEMO_ENV=(DATABASE_HOST=localhost DATABASE_PORT=3306 DATABASE_USERNAME=root DATABASE_PASSWORD=
    "DEMO_DATABASE_SOCKET=$(rig_var TLS_RIG_MYSQL_SOCKET)"
    "REDIS_URL=redis+unix://$(rig_var TLS_RIG_REDIS_SOCKET)?db=0"
    "RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/$DEMO_VHOST"
    "ELASTICSEARCH_URL=$ES_URL")
fi
export DATABASE_NAME="$DEMO_DB"
export ELASTICSEARCH_INDEX="$DEMO_INDEX"
export COUNT_SYNC_INTERVAL=1s
# The writer's HTTP endpoint (/healthz, /readyz, /metrics): 9464 unless taken.
HTTP_PORT=""
for p in 9464 $(seq 19464 19480); do
  if ! tcp_up 127.0.0.1 "$p"; then HTTP_PORT=$p; break; fi
done
[[ -n "$HTTP_PORT" ]] || die "no free port for HTTP_ADDR in 9464, 19464..19480"
export HTTP_ADDR="127.0.0.1:$HTTP_PORT"
export RUST_LOG="${RUST_LOG:-info}"

# ------------------------------------------------------------ writer
say "chat-writer ${WRITER_ARGS[*]+${WRITER_ARGS[*]} }migrate"
"$WRITER" ${WRITER_ARGS[@]+"${WRITER_ARGS[@]}"} migrate

say "starting chat-writer ${WRITER_ARGS[*]+${WRITER_ARGS[*]} }(log: $LOG_DIR/writer.log)"
"$WRITER" ${WRITER_ARGS[@]+"${WRITER_ARGS[@]}"} >"$LOG_DIR/writer.log" 2>&1 &
WRITER_PID=$!
sleep 1
kill -0 "$WRITER_PID" 2>/dev/null || {
  tail -n 30 "$LOG_DIR/writer.log" >&2
  die "chat-writer exited at start-up (log above)"
}

# ------------------------------------------------------------ demo
say "running the demo publisher: $DEMO $*"
# Live progress on the terminal; the summary is printed once, at the end.
env ${DEMO_ENV[@]+"${DEMO_ENV[@]}"} "$DEMO" "$@" > >(tee "$LOG_DIR/demo.log" | sed -u '/== chat-writer demo summary/,$d') 2>&1 &
DEMO_PID=$!
finished=""
wait -n -p finished "$DEMO_PID" "$WRITER_PID" && rc=0 || rc=$?
if [[ "$finished" == "$WRITER_PID" ]]; then
  WRITER_PID=""
  tail -n 30 "$LOG_DIR/writer.log" >&2
  die "chat-writer exited with code $rc while the demo was running (log above)"
fi
DEMO_PID=""
DEMO_RC=$rc

# What the writer says about itself before it stops: readiness and metrics.
READYZ=$(curl -sS --max-time 3 "http://$HTTP_ADDR/readyz" 2>&1 || true)
curl -sS --max-time 3 "http://$HTTP_ADDR/metrics" >"$LOG_DIR/metrics.txt" 2>&1 || true
# What the TLS servers saw while the writer runs (rewritten every second).
[[ -n "$TLS" ]] && { sleep 1.2; cp "$RIG_ENV.status" "$LOG_DIR/tls-status-running.txt" 2>/dev/null || true; }

# ------------------------------------------------------------ stop the writer
say "stopping chat-writer (SIGTERM)"
kill -TERM "$WRITER_PID"
t0=$SECONDS
for _ in $(seq 1 180); do kill -0 "$WRITER_PID" 2>/dev/null || break; sleep 0.25; done
if kill -0 "$WRITER_PID" 2>/dev/null; then
  kill -KILL "$WRITER_PID" 2>/dev/null || true
  wait "$WRITER_PID" 2>/dev/null || true
  WRITER_PID=""
  WRITER_RC="killed (still running 45s after SIGTERM)"
else
  wait "$WRITER_PID" && WRITER_RC=0 || WRITER_RC=$?
  WRITER_PID=""
fi
echo "chat-writer exit code: $WRITER_RC (after $((SECONDS - t0))s)"
DLQ_AFTER=$(dlq_depth)

TLS_OK=1
if [[ -n "$TLS" ]]; then
  say "stopping the TLS endpoints (tls-rig)"
  eval "exec ${RIGPROC[1]}>&-" 2>/dev/null || true
  kill -TERM "$RIG_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$RIG_PID" 2>/dev/null || break; sleep 0.1; done
  RIG_PID=""
  sed -n 's/^tls-rig: \(SIG\|end of\|stopped\)/  \1/p' "$LOG_DIR/tls-rig.log"
  st() { sed -n "s/^$1=//p" "${2:-$RIG_ENV.status}" 2>/dev/null | tail -n 1; }
  RUNNING="$LOG_DIR/tls-status-running.txt"
  T_AMQP=$(st amqp_tls_handshakes); T_AMQP_ERR=$(st amqp_handshake_errors)
  T_ES=$(st es_tls_handshakes); T_ES_FWD=$(st es_forwarded); T_ES_REF=$(st es_refused)
  T_REDIS=$(st redis_tls_clients "$RUNNING"); T_MYSQL=$(st mysql_tls_accepts)
  T_MYSQL_NOW=$(st mysql_tcp_connections "$RUNNING"); T_AMQP_NOW=$(st amqp_open "$RUNNING")
  for v in "$T_AMQP" "$T_ES_FWD" "$T_REDIS" "$T_MYSQL"; do
    [[ "${v:-0}" =~ ^[1-9] ]] || TLS_OK=""
  done
fi

# ------------------------------------------------------------ verdict
say "summary"
sed -n '/== chat-writer demo summary/,$p' "$LOG_DIR/demo.log"
echo "  dead letters:                            $DLQ_AFTER"
echo "  /readyz before SIGTERM:                  ${READYZ%$'\n'}"
echo "  /metrics before SIGTERM ($LOG_DIR/metrics.txt), counters:"
grep -E '^chat_writer_(deliveries_[a-z_]+_total|index_documents_total|index_rejected_total|count_sync_rows_written_total|up)[{ ]' \
  "$LOG_DIR/metrics.txt" | grep -v ' 0$' | sed 's/^/    /' || true
echo "  chat-writer exit code after SIGTERM:    $WRITER_RC"
if [[ -n "$TLS" ]]; then
  echo "  TLS, as the servers saw it (the writer alone used their TCP ports):"
  echo "    RabbitMQ (proxy, client certificate required):  ${T_AMQP:-0} TLS handshakes, ${T_AMQP_NOW:-0} open before SIGTERM, ${T_AMQP_ERR:-0} failed"
  echo "    MariaDB (require_secure_transport=ON):          ${T_MYSQL:-0} TLS handshakes, ${T_MYSQL_NOW:-0} TCP connections before SIGTERM"
  echo "    Redis (TLS-only port, client certificate):      ${T_REDIS:-0} TLS clients before SIGTERM"
  echo "    search server (proxy, API key from a file):     ${T_ES:-0} TLS handshakes, ${T_ES_FWD:-0} requests forwarded, ${T_ES_REF:-0} refused"
  if [[ -n "$TLS_OK" ]]; then
    echo "    => all four of the writer's connections were TLS"
  else
    echo "    => NOT all four services saw the writer over TLS"
  fi
fi
echo "  logs: $LOG_DIR/writer.log, $LOG_DIR/demo.log${TLS:+, $LOG_DIR/tls-rig.log}"
if [[ "$DEMO_RC" == 0 && "$WRITER_RC" == 0 && -n "$TLS_OK" ]]; then
  echo "DEMO PASSED${TLS:+ (all four connections over TLS)}"
  exit 0
fi
echo "DEMO FAILED (demo exit code $DEMO_RC, writer exit code $WRITER_RC${TLS:+, TLS on all four: ${TLS_OK:-no}})"
exit 1
