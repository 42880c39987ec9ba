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
# Usage: perf/demo.sh [demo flags]   e.g. perf/demo.sh --messages 20000
#   demo flags: --messages N (5000) --apps N (5) --chats-per-app N (10)
#               --updates N (500) --timeout SECS (120) --window N (1000)
# Environment: ELASTICSEARCH_URL (default http://127.0.0.1:9200),
#   CARGO_TARGET_DIR (where cargo puts the binaries, default ./target).
# Logs: target/demo/{writer,demo,osmem}.log. Exit 0 only if the demo verified
# everything and the writer shut down with exit code 0.
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

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------ cleanup
WRITER_PID=""
DEMO_PID=""
OSMEM_PID=""
cleanup() {
  local pid
  for pid in "$DEMO_PID" "$WRITER_PID" "$OSMEM_PID"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "$DEMO_PID" "$WRITER_PID" "$OSMEM_PID"; do
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
cargo build --release -p chat-writer-perf --bin demo
WRITER="$BIN_DIR/chat-writer"
DEMO="$BIN_DIR/demo"
[[ -x "$WRITER" && -x "$DEMO" ]] || die "binaries not found in $BIN_DIR"

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

# ------------------------------------------------------------ clean demo state
say "resetting database $DEMO_DB, index $DEMO_INDEX and vhost $DEMO_VHOST"
mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS \`$DEMO_DB\`"
curl -fsS -o /dev/null -X DELETE "$ES_URL/$DEMO_INDEX" 2>/dev/null || true
# A vhost of its own: the demo never touches queues of other vhosts.
rabbitmqctl -q delete_vhost "$DEMO_VHOST" </dev/null >/dev/null 2>&1 || true
rabbitmqctl -q add_vhost "$DEMO_VHOST" </dev/null >/dev/null
rabbitmqctl -q set_permissions -p "$DEMO_VHOST" guest ".*" ".*" ".*" </dev/null >/dev/null
dlq_depth() { # total messages in the writer's .dlq queues
  rabbitmqctl -q -p "$DEMO_VHOST" list_queues name messages --no-table-headers </dev/null 2>/dev/null |
    awk '$1 ~ /\.dlq$/ { n += $2 } END { print n + 0 }'
}

export DATABASE_HOST=127.0.0.1 DATABASE_PORT=3306 DATABASE_USERNAME=root DATABASE_PASSWORD=
export DATABASE_NAME="$DEMO_DB"
export REDIS_URL=redis://127.0.0.1:6379/0
export RABBITMQ_URL="amqp://guest:guest@127.0.0.1:5672/$DEMO_VHOST"
export ELASTICSEARCH_URL="$ES_URL" ELASTICSEARCH_INDEX="$DEMO_INDEX"
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
say "chat-writer migrate"
"$WRITER" migrate

say "starting chat-writer (log: $LOG_DIR/writer.log)"
"$WRITER" >"$LOG_DIR/writer.log" 2>&1 &
WRITER_PID=$!
sleep 1
kill -0 "$WRITER_PID" 2>/dev/null || {
  tail -n 30 "$LOG_DIR/writer.log" >&2
  die "chat-writer exited at start-up (log above)"
}

# ------------------------------------------------------------ demo
say "running the demo publisher: $DEMO $*"
# Live progress on the terminal; the summary is printed once, at the end.
"$DEMO" "$@" > >(tee "$LOG_DIR/demo.log" | sed -u '/== chat-writer demo summary/,$d') 2>&1 &
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

# ------------------------------------------------------------ verdict
say "summary"
sed -n '/== chat-writer demo summary/,$p' "$LOG_DIR/demo.log"
echo "  dead letters:                            $DLQ_AFTER"
echo "  /readyz before SIGTERM:                  ${READYZ%$'\n'}"
echo "  /metrics before SIGTERM ($LOG_DIR/metrics.txt), counters:"
grep -E '^chat_writer_(deliveries_[a-z_]+_total|index_documents_total|index_rejected_total|count_sync_rows_written_total|up)[{ ]' \
  "$LOG_DIR/metrics.txt" | grep -v ' 0$' | sed 's/^/    /' || true
echo "  chat-writer exit code after SIGTERM:    $WRITER_RC"
echo "  logs: $LOG_DIR/writer.log, $LOG_DIR/demo.log"
if [[ "$DEMO_RC" == 0 && "$WRITER_RC" == 0 ]]; then
  echo "DEMO PASSED"
  exit 0
fi
echo "DEMO FAILED (demo exit code $DEMO_RC, writer exit code $WRITER_RC)"
exit 1
