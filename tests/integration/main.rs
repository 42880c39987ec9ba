//! Integration tests of chat-writer against real MySQL, Redis, RabbitMQ and
//! an Elasticsearch-compatible server. See tests/README.md.

#[path = "../common/mod.rs"]
mod common;

mod cases;
mod cli;
mod consumers;
mod counts;
mod delivery_limits;
mod edits;
mod es_index;
mod harness;
mod metrics;
mod mysql_session;
mod ops;
mod outages;
mod prefetch;
mod recovery;
mod replicas;
mod retries;
mod shutdown;
mod sigkill;
mod tls;
