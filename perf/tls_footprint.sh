#!/usr/bin/env bash
# perf/tls_footprint.sh: what TLS costs chat-writer, measured side by side.
#
#   1. builds the shipped artifact twice, static musl release: with TLS
#      (default features; target/x86_64-unknown-linux-musl/release) and
#      without (--no-default-features; target/plain/...), and reports both
#      sizes (the release profile strips; a `strip` of a copy is checked);
#   2. waits for a quiet machine: while the 1-minute load average is above
#      --max-load (1.2), up to --wait minutes (then goes on and says so);
#   3. starts an osmem-server of its own on a free port and runs `load tls`
#      (perf/src/load/tls_footprint.rs) with the TLS build: the TLS test rig
#      (perf/src/rig.rs from tests/common/tls.rs) puts RabbitMQ and the
#      search server behind TLS proxies and starts a private Redis and
#      MariaDB with TLS and plain ports; then, alternately plain and TLS
#      (all four connections) for --rounds rounds: idle VmRSS/VmHWM after
#      --idle-secs on empty queues (indexing on; the build without TLS
#      too, plain) and a drain of --messages create_messages (indexing as
#      --indexing says, the same for both);
#      With --plain-relay, the plain writer reaches RabbitMQ through a plain
#      relay of the TLS proxy's shape: the same extra hop on both sides, so
#      the difference left is TLS alone;
#   4. prints a markdown report and writes it with the JSON under
#      target/perf/tls/.
#
# Usage: perf/tls_footprint.sh [--rounds K (3)] [--messages N (20000)]
#          [--idle-secs S (10)] [--indexing on|off (off)] [--max-load L (1.2)]
#          [--wait MINUTES (30)] [--plain-relay]
# Environment: CARGO_TARGET_DIR (default ./target).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$ROOT/target/perf/tls"

ROUNDS=3; N=20000; IDLE=10; INDEXING=off; MAX_LOAD=1.2; WAIT_MIN=30; RELAY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) ROUNDS="${2:?}"; shift ;;
    --messages) N="${2:?}"; shift ;;
    --idle-secs) IDLE="${2:?}"; shift ;;
    --indexing) INDEXING="${2:?}"; shift ;;
    --max-load) MAX_LOAD="${2:?}"; shift ;;
    --wait) WAIT_MIN="${2:?}"; shift ;;
    --plain-relay) RELAY=--plain-relay ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "tls_footprint.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'tls_footprint.sh: %s\n' "$*" >&2; exit 1; }

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
say "building chat-writer with and without TLS (release, static musl) and the load generator"
[[ -d "$HOME/.cargo/bin" ]] && PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "cargo not found"
command -v musl-gcc >/dev/null || die "musl-gcc not found (apt-get install musl-tools): ring needs it"
rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl ||
  rustup target add x86_64-unknown-linux-musl
cargo build --release --target x86_64-unknown-linux-musl --bin chat-writer
cargo build --release --target x86_64-unknown-linux-musl --bin chat-writer \
  --no-default-features --target-dir "$TARGET/plain"
cargo build --release -p chat-writer-perf --bin load
WRITER="$TARGET/x86_64-unknown-linux-musl/release/chat-writer"
PLAIN_WRITER="$TARGET/plain/x86_64-unknown-linux-musl/release/chat-writer"
LOAD="$TARGET/release/load"
[[ -x "$WRITER" && -x "$PLAIN_WRITER" && -x "$LOAD" ]] || die "binaries not found under $TARGET"
mkdir -p "$OUT"
rm -f "$OUT"/*.md "$OUT"/*.json "$OUT"/writer-*.log

size_of() { # bytes as built, bytes after `strip` of a copy, linkage
  local s
  cp "$1" "$OUT/stripped.tmp"
  strip "$OUT/stripped.tmp" 2>/dev/null || true
  s=$(stat -c %s "$OUT/stripped.tmp")
  rm -f "$OUT/stripped.tmp"
  echo "$(stat -c %s "$1") $s $(file -b "$1" | grep -oE 'static-pie linked|statically linked|dynamically linked' | head -1 | tr ' ' '_')"
}
read -r TLS_BYTES TLS_STRIPPED TLS_LINK < <(size_of "$WRITER")
read -r PLAIN_BYTES PLAIN_STRIPPED PLAIN_LINK < <(size_of "$PLAIN_WRITER")
mib() { awk -v s="$1" 'BEGIN { printf "%.2f MiB", s / 1048576 }'; }
{
  echo "### Binary: static musl release, with and without TLS"
  echo
  echo "| build | bytes | after strip | linkage |"
  echo "|---|---:|---:|---|"
  echo "| default features (TLS) | $TLS_BYTES ($(mib "$TLS_BYTES")) | $TLS_STRIPPED | ${TLS_LINK//_/ } |"
  echo "| \`--no-default-features\` (no TLS) | $PLAIN_BYTES ($(mib "$PLAIN_BYTES")) | $PLAIN_STRIPPED | ${PLAIN_LINK//_/ } |"
  echo "| TLS − no TLS | $((TLS_BYTES - PLAIN_BYTES)) ($(mib $((TLS_BYTES - PLAIN_BYTES)))) | | |"
} >"$OUT/binary.md"
printf '{"tls_bytes": %s, "no_tls_bytes": %s, "tls_stripped": %s, "no_tls_stripped": %s}\n' \
  "$TLS_BYTES" "$PLAIN_BYTES" "$TLS_STRIPPED" "$PLAIN_STRIPPED" >"$OUT/binary.json"
cat "$OUT/binary.md" >&2

# ------------------------------------------------------------ services
. "$ROOT/perf/services.sh"
say "checking MariaDB (for rabbitmqctl's sake: the drains use a private one), Redis, RabbitMQ"
ensure_services >&2 || die "a local service did not start"
ensure_osmem_installed >&2 || die "pip install osmem-server failed"
command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null ||
  die "mariadbd / mariadb-install-db not found (the rig starts a private MariaDB)"

# ------------------------------------------------------------ quiet machine
load1() { cut -d' ' -f1 /proc/loadavg; }
say "waiting for a quiet machine (1-min load <= $MAX_LOAD, at most $WAIT_MIN min)"
QUIET_NOTE=""
deadline=$((SECONDS + WAIT_MIN * 60))
while awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l > m) }'; do
  if ((SECONDS >= deadline)); then
    QUIET_NOTE="the load average stayed above $MAX_LOAD for $WAIT_MIN min; measured anyway at $(load1)"
    echo "$QUIET_NOTE" >&2
    break
  fi
  echo "  load $(load1) > $MAX_LOAD: waiting" >&2
  sleep 20
done
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

PORT=""
for p in $(seq 19350 19449); do
  if ! tcp_up 127.0.0.1 "$p"; then PORT=$p; break; fi
done
[[ -n "$PORT" ]] || die "no free port in 19350..19449 for osmem-server"
ES_URL="http://127.0.0.1:$PORT"
"$(osmem_bin)" -addr "127.0.0.1:$PORT" -no-stdin-watch -parent-pid $$ >"$OUT/osmem.log" 2>&1 &
OSMEM_PID=$!
es_up() { curl -fsS -o /dev/null --max-time 2 "$ES_URL/" 2>/dev/null; }
wait_up 30 osmem-server es_up || die "osmem-server did not answer on $ES_URL"

# ------------------------------------------------------------ measure
say "load tls: $ROUNDS rounds, drains of $N, indexing $INDEXING"
"$LOAD" --es "$ES_URL" --out "$OUT" tls --writer "$WRITER" --plain-writer "$PLAIN_WRITER" \
  --rounds "$ROUNDS" -n "$N" --idle-secs "$IDLE" --indexing "$INDEXING" $RELAY >/dev/null

{
  echo "## chat-writer: TLS footprint"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores,"
  echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock build.rs 2>/dev/null || echo ' (src dirty)'),"
  echo "load average at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg)${QUIET_NOTE:+ ($QUIET_NOTE)};"
  echo "command: \`perf/tls_footprint.sh --rounds $ROUNDS --messages $N --idle-secs $IDLE --indexing $INDEXING${RELAY:+ $RELAY}\`."
  echo
  cat "$OUT/binary.md"
  echo
  cat "$OUT/tls.md"
} >"$OUT/report.md"
cat "$OUT/report.md"
echo "report: $OUT/report.md, $OUT/tls.json, $OUT/binary.json" >&2
