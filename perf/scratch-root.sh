#!/usr/bin/env bash
# perf/scratch-root.sh: proves the final `FROM scratch` stage of
# Dockerfile.scratch works, without a Docker engine.
#
# It assembles the same root filesystem as that stage in a temporary folder
# (only the static binary at /chat-writer, mode 0755: no /etc, no /tmp, no
# libc, no shell, no CA bundle) and runs it from that otherwise empty root
# with `chroot --userspec=65532:65532` (the image's USER) and a clean
# environment (`env -i`, like `docker run`), against the local services by
# IP (127.0.0.1):
#   1. `--version`, `--help`;
#   2. `migrate` into a database of its own (scratch_root_<pid>);
#   3. a short drain: the writer runs in the chroot (HTTP_ADDR on a free port,
#      ELASTICSEARCH_URL to an osmem-server started on a free port,
#      COUNT_SYNC_INTERVAL=1s, Redis DB 12, a RabbitMQ vhost of its own);
#      one application and one chat are seeded in MySQL, their Redis counters
#      set the way the API sets them, N create_messages published (python3 +
#      pika, publisher confirms); it waits until every row is in MySQL, every
#      document in the index and the counts are synced;
#   4. `chroot ... /chat-writer healthcheck` (exit 0), then SIGTERM (exit 0);
#   5. prints a PASS/FAIL summary with the binary size and the "image size"
#      (= the root folder, `du -sb`).
# Informational (never a failure): DATABASE_HOST=localhost in the empty root
# (there is no /etc/hosts there, see the NOTE it prints).
#
# Usage: perf/scratch-root.sh [path/to/static/chat-writer]
#   Without an argument it uses $CARGO_TARGET_DIR (default ./target)
#   /x86_64-unknown-linux-musl/release/chat-writer, building it first
#   (cargo build --release --locked --target x86_64-unknown-linux-musl) if
#   it is missing.
# Environment: SCRATCH_MESSAGES (1000) messages to publish,
#   SCRATCH_TIMEOUT (90) seconds to wait for the drain.
# Needs: root (chroot), mysql, redis-cli, rabbitmqctl, curl, python3 with
#   pika, osmem-server (pip; perf/services.sh finds it). Everything it creates
#   (database, vhost, Redis keys, osmem process, root folder) is removed on
#   exit; logs stay in target/scratch-root/.
# Exit 0 only if every check passed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
LOG_DIR="$REPO/target/scratch-root"
TARGET=x86_64-unknown-linux-musl
MESSAGES="${SCRATCH_MESSAGES:-1000}"
DRAIN_TIMEOUT="${SCRATCH_TIMEOUT:-90}"
USERSPEC=65532:65532

# shellcheck source=perf/services.sh
. "$REPO/perf/services.sh"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'scratch-root.sh: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }
secs_since() { # secs_since START_MS -> "1.234"
  local d=$(($(now_ms) - $1))
  printf '%d.%03d' $((d / 1000)) $((d % 1000))
}

# ------------------------------------------------------------ results
RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS  $*"); printf 'PASS  %s\n' "$*"; }
fail() { RESULTS+=("FAIL  $*"); printf 'FAIL  %s\n' "$*"; FAILED=1; }
note() { RESULTS+=("NOTE  $*"); printf 'NOTE  %s\n' "$*"; }

# ------------------------------------------------------------ cleanup
ROOT_FS=""
WRITER_PID=""
OSMEM_PID=""
DB_CREATED=""
VHOST_CREATED=""
REDIS_KEYS=()
REDIS_MEMBERS=()
TAG="scratch_root_$$"
DB_NAME="$TAG"
VHOST="$TAG"
INDEX="$TAG"
TOKEN="${TAG}_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
REDIS_DB=12

# shellcheck disable=SC2317 # called from the EXIT trap / wait_up (shellcheck 0.9 cannot see it)
stop_pid() { # stop_pid PID SECONDS: SIGTERM, then SIGKILL after SECONDS
  local pid=$1 secs=$2
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # called from the EXIT trap / wait_up (shellcheck 0.9 cannot see it)
cleanup() {
  local rc=$?
  set +e
  stop_pid "$WRITER_PID" 35
  stop_pid "$OSMEM_PID" 5
  if [[ -n "$DB_CREATED" ]]; then
    mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS \`$DB_NAME\`" 2>/dev/null
  fi
  if [[ -n "$VHOST_CREATED" ]]; then
    rabbitmqctl -q delete_vhost "$VHOST" </dev/null >/dev/null 2>&1
  fi
  if ((${#REDIS_KEYS[@]})); then
    redis-cli -h 127.0.0.1 -n "$REDIS_DB" DEL "${REDIS_KEYS[@]}" >/dev/null 2>&1
  fi
  if ((${#REDIS_MEMBERS[@]})); then
    redis-cli -h 127.0.0.1 -n "$REDIS_DB" SREM chat_changes "${REDIS_MEMBERS[@]}" >/dev/null 2>&1
    redis-cli -h 127.0.0.1 -n "$REDIS_DB" SREM message_changes "${REDIS_MEMBERS[@]}" >/dev/null 2>&1
  fi
  if [[ -n "$ROOT_FS" && -d "$ROOT_FS" ]]; then
    rm -rf -- "$ROOT_FS"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ preconditions
[[ $EUID -eq 0 ]] || die "chroot needs root"
for tool in chroot mysql redis-cli rabbitmqctl curl python3; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
CHROOT=$(command -v chroot)
python3 -c 'import pika' 2>/dev/null || die "python3 module pika not found (pip install pika)"
OSMEM=$(osmem_bin) || die "osmem-server not found (pip install osmem-server)"
[[ "$MESSAGES" =~ ^[1-9][0-9]*$ ]] || die "SCRATCH_MESSAGES must be a positive integer"
[[ "$DRAIN_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "SCRATCH_TIMEOUT must be a positive integer"
mysql_up || die "MariaDB does not answer on 127.0.0.1:3306"
redis_up || die "Redis does not answer on 127.0.0.1:6379"
tcp_up 127.0.0.1 5672 || die "RabbitMQ does not answer on 127.0.0.1:5672"
mkdir -p "$LOG_DIR"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ------------------------------------------------------------ binary
if [[ $# -ge 1 ]]; then
  BIN=$1
  [[ -f "$BIN" ]] || die "no such file: $BIN"
else
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/$TARGET/release/chat-writer"
  if [[ ! -f "$BIN" ]]; then
    say "building the static binary ($TARGET, release)"
    [[ -d "$HOME/.cargo/bin" ]] && PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "cargo not found"
    cargo build --release --locked --target "$TARGET" --bin chat-writer
    [[ -f "$BIN" ]] || die "cargo did not produce $BIN"
  fi
fi
BIN=$(realpath "$BIN")
echo "binary: $BIN"

# ------------------------------------------------------------ root filesystem
say "assembling the scratch root filesystem"
# What `FROM scratch` + `COPY --from=build .../chat-writer /chat-writer` gives:
# a root directory owned by root, mode 0755, holding one file.
ROOT_FS=$(mktemp -d "${TMPDIR:-/tmp}/scratch-root.XXXXXX")
chmod 0755 "$ROOT_FS"
install -m 0755 -o root -g root "$BIN" "$ROOT_FS/chat-writer"
CONTENTS=$(cd "$ROOT_FS" && find . -mindepth 1 -printf '%p %m %u:%g\n')
echo "root: $ROOT_FS"
echo "contents: $CONTENTS"
if [[ "$CONTENTS" == "./chat-writer 755 root:root" ]]; then
  pass "root filesystem holds only /chat-writer (0755)"
else
  fail "root filesystem holds more than /chat-writer: $CONTENTS"
fi
if command -v readelf >/dev/null; then
  if readelf -lW "$ROOT_FS/chat-writer" | grep -q 'Requesting program interpreter'; then
    fail "binary is dynamically linked (has a program interpreter)"
  elif readelf -dW "$ROOT_FS/chat-writer" 2>/dev/null | grep -q '(NEEDED)'; then
    fail "binary needs shared libraries"
  else
    pass "binary is static (no interpreter, no NEEDED libraries)"
  fi
fi
BIN_BYTES=$(stat -c %s "$ROOT_FS/chat-writer")
IMAGE_BYTES=$(du -sb "$ROOT_FS" | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# ------------------------------------------------------------ environment
HTTP_PORT=$(free_port)
OSMEM_PORT=$(free_port)
[[ "$HTTP_PORT" != "$OSMEM_PORT" ]] || OSMEM_PORT=$(free_port)
ES_URL="http://127.0.0.1:$OSMEM_PORT"
# The environment `docker run` gives (PATH, HOSTNAME, HOME=/ for a user
# without a passwd entry) plus the writer's variables; nothing else from
# this shell leaks into the chroot.
WRITER_ENV=(
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  HOSTNAME=scratch-root HOME=/
  DATABASE_HOST=127.0.0.1 DATABASE_PORT=3306 DATABASE_USERNAME=root DATABASE_PASSWORD=
  DATABASE_NAME="$DB_NAME"
  REDIS_URL="redis://127.0.0.1:6379/$REDIS_DB"
  RABBITMQ_URL="amqp://guest:guest@127.0.0.1:5672/$VHOST"
  ELASTICSEARCH_URL="$ES_URL" ELASTICSEARCH_INDEX="$INDEX"
  COUNT_SYNC_INTERVAL=1s
  HTTP_ADDR="127.0.0.1:$HTTP_PORT"
  RUST_LOG=info
)
# "${ROOT_RUN[@]}" ARGS runs /chat-writer ARGS in the empty root as
# 65532:65532 with WRITER_ENV only; VAR=value words placed between the env
# part and the chroot part override it (env applies them in order). env and
# chroot both exec, so a backgrounded run's $! is the writer itself.
ENV_RUN=(env -i "${WRITER_ENV[@]}")
CHROOT_RUN=("$CHROOT" --userspec="$USERSPEC" "$ROOT_FS" /chat-writer)
ROOT_RUN=("${ENV_RUN[@]}" "${CHROOT_RUN[@]}")

# ------------------------------------------------------------ --version, --help
say "chroot --userspec=$USERSPEC <root> /chat-writer --version"
if VERSION=$("${ROOT_RUN[@]}" --version 2>&1); then
  echo "$VERSION"
  pass "--version: $VERSION"
  HEAD=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || true)
  if [[ "$VERSION" == *"commit unknown"* ]]; then
    note "built without git metadata (as in the Docker build stage): commit unknown"
  elif [[ -n "$HEAD" && "$VERSION" != *"commit $HEAD"* ]]; then
    note "the binary was not built from HEAD ($HEAD): rebuild it or pass a fresh one"
  fi
else
  echo "$VERSION"
  fail "--version exited non-zero"
fi

say "chroot ... /chat-writer --help"
if HELP=$("${ROOT_RUN[@]}" --help 2>&1) && [[ "$HELP" == *USAGE:* && "$HELP" == *ELASTICSEARCH_URL* ]]; then
  printf '%s\n' "$HELP" | sed -n '1,4p'
  echo "  ... ($(printf '%s\n' "$HELP" | wc -l) lines)"
  pass "--help"
else
  printf '%s\n' "$HELP"
  fail "--help"
fi

# ------------------------------------------------------------ migrate
say "chroot ... /chat-writer migrate (database $DB_NAME)"
DB_CREATED=1
t0=$(now_ms)
if timeout --foreground 60 "${ROOT_RUN[@]}" migrate; then
  MIGRATE_S=$(secs_since "$t0")
  TABLES=$(mysql -uroot -h127.0.0.1 -N -e \
    "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '$DB_NAME' AND table_name IN ('applications', 'chats', 'messages')")
  if [[ "$TABLES" == 3 ]]; then
    pass "migrate created $DB_NAME with its 3 tables (${MIGRATE_S}s)"
  else
    fail "migrate exited 0 but $DB_NAME has $TABLES of the 3 tables"
  fi
else
  fail "migrate exited non-zero"
  die "cannot go on without a schema"
fi

# Informational: in an empty root there is no /etc/hosts and no
# /etc/resolv.conf, so even "localhost" is not a known name (musl asks DNS at
# 127.0.0.1:53). Docker bind-mounts both files into every container, so this
# only matters for chroot-style runs.
LOCALHOST_OUT=$(timeout --foreground 20 "${ENV_RUN[@]}" DATABASE_HOST=localhost "${CHROOT_RUN[@]}" migrate 2>&1) && LOCALHOST_RC=0 || LOCALHOST_RC=$?
if [[ $LOCALHOST_RC == 0 ]]; then
  note "DATABASE_HOST=localhost resolved in the empty root (a DNS server on 127.0.0.1:53 answered)"
else
  note "DATABASE_HOST=localhost fails in the empty root (exit $LOCALHOST_RC, no /etc/hosts): ${LOCALHOST_OUT##*migrate failed: }"
fi

# ------------------------------------------------------------ seed
say "seeding one application and one chat; vhost $VHOST; Redis DB $REDIS_DB"
mysql -uroot -h127.0.0.1 "$DB_NAME" -e "
  INSERT INTO applications (token, name, chats_count, created_at, updated_at)
    VALUES ('$TOKEN', 'scratch-root', 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6));
  INSERT INTO chats (application_id, token, number, messages_count, created_at, updated_at)
    SELECT id, token, 1, 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) FROM applications WHERE token = '$TOKEN';"
CHAT_ID=$(mysql -uroot -h127.0.0.1 -N "$DB_NAME" -e "SELECT id FROM chats WHERE token = '$TOKEN' AND number = 1")
[[ "$CHAT_ID" =~ ^[0-9]+$ ]] || die "seeding the chat failed"
VHOST_CREATED=1
rabbitmqctl -q add_vhost "$VHOST" </dev/null >/dev/null
rabbitmqctl -q set_permissions -p "$VHOST" guest ".*" ".*" ".*" </dev/null >/dev/null
# What the API does: the counters hold the numbers it handed out, the change
# sets name what changed. The count sync must copy them into MySQL.
REDIS_KEYS=("chat_counter:$TOKEN" "message_counter:$TOKEN:1")
REDIS_MEMBERS=("$TOKEN" "$TOKEN:1")
rcli() { redis-cli -h 127.0.0.1 -n "$REDIS_DB" "$@" >/dev/null; }
rcli SET "chat_counter:$TOKEN" 1
rcli SET "message_counter:$TOKEN:1" "$MESSAGES"
rcli SADD chat_changes "$TOKEN"
rcli SADD message_changes "$TOKEN:1"
echo "application token $TOKEN, chat id $CHAT_ID"

# ------------------------------------------------------------ osmem
say "starting osmem-server on 127.0.0.1:$OSMEM_PORT"
"$OSMEM" -addr "127.0.0.1:$OSMEM_PORT" -no-stdin-watch >"$LOG_DIR/osmem.log" 2>&1 &
OSMEM_PID=$!
# shellcheck disable=SC2317 # called from the EXIT trap / wait_up (shellcheck 0.9 cannot see it)
es_up() { curl -fsS -o /dev/null --max-time 2 "$ES_URL/"; }
wait_up 30 osmem-server es_up || die "osmem-server did not answer (log: $LOG_DIR/osmem.log)"

# ------------------------------------------------------------ the writer
say "starting chroot ... /chat-writer (HTTP_ADDR 127.0.0.1:$HTTP_PORT; log $LOG_DIR/writer.log)"
t0=$(now_ms)
"${ROOT_RUN[@]}" >"$LOG_DIR/writer.log" 2>&1 &
WRITER_PID=$!
# shellcheck disable=SC2317 # called from the EXIT trap / wait_up (shellcheck 0.9 cannot see it)
healthz() { curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$HTTP_PORT/healthz"; }
if wait_up 30 "chat-writer /healthz" healthz; then
  pass "writer started in the empty root, /healthz answered after $(secs_since "$t0")s"
else
  tail -n 30 "$LOG_DIR/writer.log" >&2
  fail "writer did not answer /healthz"
  die "writer did not start (log above)"
fi
WRITER_EXE=$(readlink "/proc/$WRITER_PID/exe" 2>/dev/null || true)
WRITER_ROOT=$(readlink "/proc/$WRITER_PID/root" 2>/dev/null || true)
WRITER_UIDS=$(awk '/^Uid:/ { print $2 ":" $3 }' "/proc/$WRITER_PID/status" 2>/dev/null || true)
WRITER_GIDS=$(awk '/^Gid:/ { print $2 ":" $3 }' "/proc/$WRITER_PID/status" 2>/dev/null || true)
WRITER_GROUPS=$(awk '/^Groups:/ { $1 = ""; sub(/^ /, ""); print }' "/proc/$WRITER_PID/status" 2>/dev/null || true)
echo "pid $WRITER_PID: exe $WRITER_EXE, root $WRITER_ROOT, uid $WRITER_UIDS, gid $WRITER_GIDS, groups '${WRITER_GROUPS}'"
if [[ "$WRITER_ROOT" == "$ROOT_FS" && "$WRITER_UIDS" == 65532:65532 && "$WRITER_GIDS" == 65532:65532 ]]; then
  pass "writer runs as 65532:65532 with / = the scratch root"
else
  fail "writer process: root $WRITER_ROOT, uid $WRITER_UIDS, gid $WRITER_GIDS"
fi

# ------------------------------------------------------------ publish
say "publishing $MESSAGES create_messages (vhost $VHOST, publisher confirms)"
t_pub=$(now_ms)
AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$VHOST" CHAT_ID="$CHAT_ID" TOKEN="$TOKEN" \
  MESSAGES="$MESSAGES" timeout --foreground 120 python3 - <<'PY'
import json, os, time
import pika

url, n = os.environ["AMQP_URL"], int(os.environ["MESSAGES"])
chat_id, token = int(os.environ["CHAT_ID"]), os.environ["TOKEN"]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
try:  # the writer declares its queues; use an existing one as it is
    ch.queue_declare("create_messages", passive=True)
except pika.exceptions.ChannelClosedByBroker:
    ch = conn.channel()
    ch.queue_declare("create_messages", durable=True)
ch.confirm_delivery()
for i in range(1, n + 1):
    body = {"chat_id": chat_id, "token": token, "chat_number": 1, "number": i,
            "body": f"scratch-root message {i} \u00e9\u00e8 \u2713 \U0001F680", "creator_id": None}
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                 timestamp=int(time.time()))
    ch.basic_publish("", "create_messages", json.dumps(body).encode(), props, mandatory=True)
conn.close()
PY
PUBLISH_S=$(secs_since "$t_pub")
t_last=$(now_ms)
pass "published $MESSAGES create_messages in ${PUBLISH_S}s (all confirmed)"

# ------------------------------------------------------------ drain
say "waiting for $MESSAGES rows, $MESSAGES documents and synced counts (at most ${DRAIN_TIMEOUT}s)"
ROWS=0 DOCS=0 MSG_COUNT=0 CHAT_COUNT=0
ROWS_S="" DOCS_S="" COUNTS_S="" ROWS_LAST="" DOCS_LAST=""
observe() {
  local counts
  counts=$(mysql -uroot -h127.0.0.1 -N "$DB_NAME" -e "
    SELECT (SELECT COUNT(*) FROM messages WHERE chat_id = $CHAT_ID),
           (SELECT messages_count FROM chats WHERE id = $CHAT_ID),
           (SELECT chats_count FROM applications WHERE token = '$TOKEN')" 2>/dev/null) ||
    counts="0 0 0"
  read -r ROWS MSG_COUNT CHAT_COUNT <<<"$counts"
  DOCS=$(curl -sS --max-time 5 "$ES_URL/$INDEX/_count" 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get("count", 0))' 2>/dev/null || echo 0)
}
deadline=$((SECONDS + DRAIN_TIMEOUT))
while :; do
  observe
  if [[ -z "$ROWS_S" && "$ROWS" == "$MESSAGES" ]]; then
    ROWS_S=$(secs_since "$t_pub") ROWS_LAST=$(secs_since "$t_last")
  fi
  if [[ -z "$DOCS_S" && "$DOCS" == "$MESSAGES" ]]; then
    DOCS_S=$(secs_since "$t_pub") DOCS_LAST=$(secs_since "$t_last")
  fi
  if [[ -z "$COUNTS_S" && "$MSG_COUNT" == "$MESSAGES" && "$CHAT_COUNT" == 1 ]]; then
    COUNTS_S=$(secs_since "$t_pub")
  fi
  [[ -n "$ROWS_S" && -n "$DOCS_S" && -n "$COUNTS_S" ]] && break
  if ((SECONDS >= deadline)); then break; fi
  kill -0 "$WRITER_PID" 2>/dev/null || break
  sleep 0.2
done
echo "rows $ROWS, documents $DOCS, chats.messages_count $MSG_COUNT, applications.chats_count $CHAT_COUNT"
if [[ -n "$ROWS_S" ]]; then pass "$MESSAGES message rows in MySQL ${ROWS_S}s after the first publish"
else fail "message rows in MySQL: $ROWS of $MESSAGES"; fi
if [[ -n "$DOCS_S" ]]; then pass "$MESSAGES documents in the index ${DOCS_S}s after the first publish"
else fail "documents in the index: $DOCS of $MESSAGES"; fi
if [[ -n "$COUNTS_S" ]]; then pass "counts synced from Redis DB $REDIS_DB (messages_count $MSG_COUNT, chats_count $CHAT_COUNT) ${COUNTS_S}s after the first publish"
else fail "counts: messages_count $MSG_COUNT (want $MESSAGES), chats_count $CHAT_COUNT (want 1)"; fi
# One body, byte for byte (utf8mb4 from the empty root, no locale there);
# compared as hex so this shell's locale does not matter.
WANT_HEX=$(python3 -c 'print("scratch-root message 7 \u00e9\u00e8 \u2713 \U0001F680".encode().hex().upper())')
GOT_HEX=$(mysql -uroot -h127.0.0.1 -N "$DB_NAME" -e \
  "SELECT HEX(body) FROM messages WHERE chat_id = $CHAT_ID AND number = 7")
if [[ "$GOT_HEX" == "$WANT_HEX" ]]; then pass "non-ASCII (utf8mb4) body stored byte for byte"
else fail "body of message 7: got hex $GOT_HEX, want $WANT_HEX"; fi

# ------------------------------------------------------------ healthcheck, resources
say "chroot ... /chat-writer healthcheck"
if timeout --foreground 10 "${ROOT_RUN[@]}" healthcheck; then
  pass "healthcheck exit 0"
else
  fail "healthcheck exited non-zero"
fi
status_kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$WRITER_PID/status" 2>/dev/null || true; }
HWM_KB=$(status_kb VmHWM)
RSS_KB=$(status_kb VmRSS)
THREADS=$(status_kb Threads)
HWM_KB=${HWM_KB:-0} RSS_KB=${RSS_KB:-0} THREADS=${THREADS:-?}
DLQ=$(rabbitmqctl -q -p "$VHOST" list_queues name messages --no-table-headers </dev/null 2>/dev/null |
  awk '$1 ~ /\.dlq$/ { n += $2 } END { print n + 0 }')
if [[ "$DLQ" == 0 ]]; then pass "no dead letters"; else fail "$DLQ dead letters in $VHOST"; fi
AFTER=$(cd "$ROOT_FS" && find . -mindepth 1 -printf '%p\n')
if [[ "$AFTER" == ./chat-writer ]]; then pass "the writer wrote nothing into its root (no /tmp, no files needed)"
else fail "files appeared in the root: $AFTER"; fi

# ------------------------------------------------------------ SIGTERM
say "SIGTERM to the writer (pid $WRITER_PID)"
t0=$(now_ms)
kill -TERM "$WRITER_PID" 2>/dev/null || true
for _ in $(seq 1 400); do kill -0 "$WRITER_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$WRITER_PID" 2>/dev/null; then
  fail "writer still running 40s after SIGTERM"
else
  wait "$WRITER_PID" && WRITER_RC=0 || WRITER_RC=$?
  WRITER_PID=""
  if [[ "$WRITER_RC" == 0 ]]; then pass "SIGTERM: exit 0 after $(secs_since "$t0")s"
  else fail "SIGTERM: exit $WRITER_RC"; fi
fi
# A fresh index is expected to be created and backfilled; anything else
# logged at WARN or ERROR is worth a look.
UNEXPECTED=$(grep -E ' (ERROR|WARN) ' "$LOG_DIR/writer.log" |
  grep -vE 'index [^ ]+ is missing; created it with the mapping|backfill: requested' || true)
if [[ -n "$UNEXPECTED" ]]; then
  note "the writer logged $(printf '%s\n' "$UNEXPECTED" | wc -l) unexpected WARN/ERROR lines (see $LOG_DIR/writer.log):"
  printf '%s\n' "$UNEXPECTED" | head -n 10
else
  pass "writer log: no WARN/ERROR besides creating the fresh index"
fi

# ------------------------------------------------------------ summary
say "summary"
printf '%s\n' "${RESULTS[@]}"
echo
echo "binary:      $BIN"
echo "version:     ${VERSION:-?}"
echo "binary size: $BIN_BYTES bytes ($(mib "$BIN_BYTES"))"
echo "image size:  $IMAGE_BYTES bytes ($(mib "$IMAGE_BYTES")) = du -sb of the scratch root"
echo "drain:       $MESSAGES messages published in ${PUBLISH_S}s (one confirm at a time); after the first publish:"
echo "             rows ${ROWS_S:-timeout}s, documents ${DOCS_S:-timeout}s, counts ${COUNTS_S:-timeout}s;"
echo "             after the last publish: rows ${ROWS_LAST:-timeout}s, documents ${DOCS_LAST:-timeout}s"
echo "writer:      VmHWM $((HWM_KB / 1024)).$(((HWM_KB % 1024) * 10 / 1024)) MiB, VmRSS after the drain $((RSS_KB / 1024)).$(((RSS_KB % 1024) * 10 / 1024)) MiB, $THREADS threads"
echo "logs:        $LOG_DIR/writer.log, $LOG_DIR/osmem.log"
if [[ $FAILED == 0 ]]; then
  echo "SCRATCH ROOT PASSED"
  exit 0
fi
echo "SCRATCH ROOT FAILED"
exit 1
