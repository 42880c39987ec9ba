#!/usr/bin/env bash
# The project's test command (README.md; .ci/run runs exactly this): set-up
# on a fresh machine of this kind (starts MariaDB, Redis or RabbitMQ if one
# is down, installs osmem-server from PyPI if missing), then formatting,
# lint, unit tests, and the integration tests against the real services
# (see tests/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/services.sh

echo "== services"
ensure_services
ensure_osmem_installed
OSMEM_SERVER_BIN=$(osmem_bin)
export OSMEM_SERVER_BIN
echo "osmem-server: $OSMEM_SERVER_BIN"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== unit tests"
cargo test --locked --lib --bins
echo "== unit tests of the build without TLS (--no-default-features)"
cargo clippy --locked -p chat-writer --lib --bins --no-default-features -- -D warnings
cargo test --locked -p chat-writer --lib --no-default-features
echo "== decoder property test (no services)"
cargo test --locked --test decoder_props -- --nocapture
echo "== integration tests"
cargo test --locked --test integration -- --test-threads 2
