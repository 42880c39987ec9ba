#!/usr/bin/env bash
# perf/run.sh: the full performance report of chat-writer, in one command.
#
# What it does:
#   1. builds the writer as the shipped artifact (release, static musl:
#      cargo build --release --target x86_64-unknown-linux-musl --bin chat-writer)
#      and the load generator (perf/src/load, `load`);
#   2. makes sure MariaDB, Redis and RabbitMQ answer (perf/services.sh) and
#      starts an osmem-server of its own on a free port (stopped at the end);
#   3. runs, each in its own database / vhost / index / Redis DB 11:
#        roofline   every stage alone (broker drain, MySQL multi-row and
#                   per-message INSERT, _bulk, Redis pipeline), median of reps
#        backlog    N create_messages pre-published, writer started, time to
#                   the last row and document; idle RSS, peak RSS, RSS after
#                   the drain, CPU per 10k, threads, sockets; ratio to roofline;
#                   CPU by process; then the same drain with indexing off
#        steady     R msgs/s for T s: publish->row and publish->document
#                   latency p50/p99/max, per-second series and a PNG plot;
#                   then the same rate with indexing off (rows only)
#        endpoint   idle RSS with the HTTP endpoint on (scraped) vs off
#        binary     size of the stripped static binary
#      and optionally: memory (10,000 vs 1,000,000 backlog), A/B of two
#      binaries, the edit path of two binaries, a diagnostic drain with
#      RUST_LOG=debug (batch statistics);
#   4. prints the combined markdown report and writes it, with the JSON of
#      every part and the PNG, under target/perf/.
#
# Usage: perf/run.sh [--quick] [--memcheck] [--debug-log] [--ab BIN_A BIN_B]
#                    [--edits BIN_A BIN_B] [--reps K] [--messages N] [--rate R]
#                    [--secs T]
#   --quick      10,000-message backlog, 5 s steady, 1 repetition (smoke run)
#   --memcheck   also drain 10,000 and 1,000,000 messages (takes minutes)
#   --debug-log  also one drain with RUST_LOG=debug: batch sizes, time per
#                batch, documents per _bulk from the writer's own log
#   --ab A B     also run the A/B comparison of two writer binaries
#   --edits A B  also compare the update (edit) path of two writer binaries,
#                alternately, indexing off: N/2 rows inserted directly, N
#                update_messages pre-published (a first and a final edit of
#                every message), timed until every row holds its final body;
#                each binary migrates its own sandbox, so an old binary with
#                an older schema works. Alone: target/release/load edits
#                --a OLD --b NEW [--rounds K] [-n N]
# Environment: CARGO_TARGET_DIR (default ./target). Output: target/perf/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$ROOT/target/perf"

QUICK=""; MEMCHECK=""; DEBUGLOG=""; AB_A=""; AB_B=""; ED_A=""; ED_B=""
REPS=""; N=""; RATE=2000; SECS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --memcheck) MEMCHECK=1 ;;
    --debug-log) DEBUGLOG=1 ;;
    --ab) AB_A="${2:?--ab needs two binaries}"; AB_B="${3:?--ab needs two binaries}"; shift 2 ;;
    --edits) ED_A="${2:?--edits needs two binaries}"; ED_B="${3:?--edits needs two binaries}"; shift 2 ;;
    --reps) REPS="${2:?}"; shift ;;
    --messages) N="${2:?}"; shift ;;
    --rate) RATE="${2:?}"; shift ;;
    --secs) SECS="${2:?}"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$QUICK" ]]; then
  N="${N:-10000}"; SECS="${SECS:-5}"; REPS="${REPS:-1}"; ROOF_N=10000; AB_N=5000; AB_SECS=5; AB_ROUNDS=1
else
  N="${N:-100000}"; SECS="${SECS:-20}"; REPS="${REPS:-3}"; ROOF_N=50000; AB_N=20000; AB_SECS=10; AB_ROUNDS=3
fi

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

OSMEM_PID=""
cleanup() {
  if [[ -n "$OSMEM_PID" ]] && kill -0 "$OSMEM_PID" 2>/dev/null; then
    kill -TERM "$OSMEM_PID" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$OSMEM_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$OSMEM_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ build
say "building chat-writer (release, static musl) and the load generator"
[[ -d "$HOME/.cargo/bin" ]] && PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "cargo not found"
rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl ||
  rustup target add x86_64-unknown-linux-musl
cargo build --release --target x86_64-unknown-linux-musl --bin chat-writer
cargo build --release -p chat-writer-perf --bin load
WRITER="$TARGET/x86_64-unknown-linux-musl/release/chat-writer"
LOAD="$TARGET/release/load"
[[ -x "$WRITER" && -x "$LOAD" ]] || die "binaries not found under $TARGET"

# ------------------------------------------------------------ services
. "$ROOT/perf/services.sh"
say "checking MariaDB, Redis, RabbitMQ; starting an osmem-server of our own"
ensure_services >&2 || die "a local service did not start"
ensure_osmem_installed >&2 || die "pip install osmem-server failed"
FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
if [[ ! -f "$FONT" ]]; then
  echo "installing fonts-dejavu-core for the plot's text" >&2
  (apt-get install -y -q fonts-dejavu-core >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fonts-dejavu-core >/dev/null 2>&1; }) ||
    echo "warning: no font; the PNG will be skipped" >&2
fi
mkdir -p "$OUT"
rm -rf "$OUT"/*.md "$OUT"/*.json "$OUT"/*.png "$OUT"/writer-*.log "$OUT"/mysql-only
PORT=""
for p in $(seq 19250 19349); do
  if ! tcp_up 127.0.0.1 "$p"; then PORT=$p; break; fi
done
[[ -n "$PORT" ]] || die "no free port in 19250..19349 for osmem-server"
ES_URL="http://127.0.0.1:$PORT"
"$(osmem_bin)" -addr "127.0.0.1:$PORT" -no-stdin-watch -parent-pid $$ >"$OUT/osmem.log" 2>&1 &
OSMEM_PID=$!
es_up() { curl -fsS -o /dev/null --max-time 2 "$ES_URL/" 2>/dev/null; }
wait_up 30 osmem-server es_up || die "osmem-server did not answer on $ES_URL"
echo "osmem-server: pid $OSMEM_PID on $ES_URL" >&2

L=("$LOAD" --es "$ES_URL" --out "$OUT")

# ------------------------------------------------------------ measurements
say "roofline (n $ROOF_N, $REPS repetitions)"
"${L[@]}" roofline -n "$ROOF_N" --reps "$REPS" >/dev/null

say "backlog drain of $N messages ($REPS repetitions)"
"${L[@]}" backlog --writer "$WRITER" -n "$N" --reps "$REPS" --roofline "$OUT/roofline.json" >/dev/null

say "backlog drain of $N messages with indexing off (the MySQL path alone)"
"${L[@]}" --out "$OUT/mysql-only" backlog --writer "$WRITER" -n "$N" --reps "$REPS" \
  --roofline "$OUT/roofline.json" --writer-env ELASTICSEARCH_URL= >/dev/null
{ echo "#### The same drain with indexing off (\`ELASTICSEARCH_URL=\`): the MySQL path alone, as the roofline measures it"
  sed '1d' "$OUT/mysql-only/backlog.md"; } >"$OUT/backlog-mysql-only.md"
cp "$OUT/mysql-only/backlog.json" "$OUT/backlog-mysql-only.json"

say "steady $RATE msgs/s for $SECS s"
"${L[@]}" steady --writer "$WRITER" --rate "$RATE" --secs "$SECS" --font "$FONT" >/dev/null

say "steady $RATE msgs/s for $SECS s with indexing off (the MySQL path alone)"
"${L[@]}" --out "$OUT/mysql-only" steady --writer "$WRITER" --rate "$RATE" --secs "$SECS" \
  --font "$FONT" --writer-env ELASTICSEARCH_URL= >/dev/null
{ echo "#### The same steady rate with indexing off (\`ELASTICSEARCH_URL=\`): the MySQL path alone"
  sed '1d' "$OUT/mysql-only/steady.md"; } >"$OUT/steady-mysql-only.md"
cp "$OUT/mysql-only/steady.json" "$OUT/steady-mysql-only.json"

say "HTTP endpoint: idle RSS on (scraped) vs off ($REPS pairs)"
"${L[@]}" endpoint --writer "$WRITER" --reps "$REPS" >/dev/null

if [[ -n "$DEBUGLOG" ]]; then
  say "diagnostic drain with RUST_LOG=debug"
  "${L[@]}" --out "$OUT/debug" backlog --writer "$WRITER" -n "$N" --reps 1 \
    --roofline "$OUT/roofline.json" --writer-log debug >/dev/null
  { echo "#### Diagnostic drain with RUST_LOG=debug (logging costs CPU: rates here are not the headline)"
    sed '1d' "$OUT/debug/backlog.md"; } >"$OUT/debug-backlog.md"
fi

if [[ -n "$MEMCHECK" ]]; then
  say "memory check: backlog 10,000 vs 1,000,000"
  "${L[@]}" memory --writer "$WRITER" --sizes 10000,1000000 >/dev/null
fi

if [[ -n "$AB_A" ]]; then
  say "A/B: $AB_A vs $AB_B"
  "${L[@]}" ab --a "$AB_A" --b "$AB_B" --rounds "$AB_ROUNDS" -n "$AB_N" --rate "$RATE" \
    --secs "$AB_SECS" --roofline "$OUT/roofline.json" >/dev/null
fi

if [[ -n "$ED_A" ]]; then
  say "edits A/B: $ED_A vs $ED_B"
  "${L[@]}" edits --a "$ED_A" --b "$ED_B" --rounds "$AB_ROUNDS" -n "$AB_N" >/dev/null
fi

# ------------------------------------------------------------ binary size
STRIPPED="$OUT/chat-writer.stripped"
cp "$WRITER" "$STRIPPED"
strip "$STRIPPED" 2>/dev/null || true
SIZE=$(stat -c %s "$STRIPPED")
LINKAGE=$(file -b "$STRIPPED" 2>/dev/null | grep -oE 'static(-pie)?[ -]linked|statically linked|dynamically linked' | head -1 || true)
{
  echo "### Binary"
  echo
  echo "| figure | value |"
  echo "|---|---:|"
  echo "| chat-writer, x86_64-unknown-linux-musl, stripped | $SIZE bytes ($(awk -v s="$SIZE" 'BEGIN { printf "%.2f MiB", s / 1048576 }')) |"
  echo "| linkage | ${LINKAGE:-unknown} |"
} >"$OUT/binary.md"
printf '{"bytes": %s, "mib": %s, "linkage": "%s"}\n' "$SIZE" \
  "$(awk -v s="$SIZE" 'BEGIN { printf "%.3f", s / 1048576 }')" "${LINKAGE:-unknown}" >"$OUT/binary.json"

# ------------------------------------------------------------ report
{
  echo "## chat-writer performance report"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo),"
  echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)'),"
  echo "load average at the end $(cut -d' ' -f1-3 /proc/loadavg); command: \`perf/run.sh${QUICK:+ --quick}\`."
  echo "Services on the same machine: MariaDB, RabbitMQ, Redis, osmem-server ($ES_URL)."
  echo
  for part in roofline backlog backlog-mysql-only steady steady-mysql-only endpoint debug-backlog memory ab edits binary; do
    [[ -f "$OUT/$part.md" ]] && { cat "$OUT/$part.md"; echo; }
  done
} >"$OUT/report.md"
{
  echo "{"
  sep=""
  for part in roofline backlog backlog-mysql-only steady steady-mysql-only endpoint memory ab edits binary; do
    if [[ -f "$OUT/$part.json" ]]; then
      printf '%s"%s": ' "$sep" "${part//-/_}"; cat "$OUT/$part.json"; sep=","
    fi
  done
  echo "}"
} >"$OUT/report.json"
cat "$OUT/report.md"
echo "report: $OUT/report.md, $OUT/report.json; plot: $OUT/steady.png" >&2
