#!/usr/bin/env bash
# The project's test command (README.md, run by .ci/run): formatting, lint,
# unit tests, then the integration tests against the real services
# (MySQL 127.0.0.1:3306, Redis 127.0.0.1:6379, RabbitMQ 127.0.0.1:5672 with
# rabbitmqctl, osmem-server from `pip install osmem-server`; see tests/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== unit tests"
cargo test --locked --lib --bins
echo "== integration tests"
cargo test --locked --test integration -- --test-threads 2
