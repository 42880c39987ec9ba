//! chat-writer: the write side of the chat platform.
//!
//! The API publishes work to RabbitMQ; this crate consumes it and makes it
//! durable: rows in MySQL, documents in Elasticsearch, and Redis counters
//! synced into MySQL counts. README.md is the interface (configuration,
//! queues, failure semantics, monitoring).
//!
//! | concept | module |
//! |---|---|
//! | configuration (env, `--env-file`) | [`config`], [`env_file`] |
//! | payload decoding and validation | [`payload`] |
//! | the order of edits (edit versions) | [`edit_order`] |
//! | MySQL store, schema, batched writes | [`mysql`] |
//! | Redis connection and change markers | [`redis_store`] |
//! | count sync | [`count_sync`] |
//! | Elasticsearch client, bulk encoding, retry, indexer | [`elasticsearch`] |
//! | AMQP connection, topology, consumers, republishing | [`amqp`] |
//! | the batch pipeline of the work queues | [`pipeline`] |
//! | supervision and shutdown sequence | [`service`], [`shutdown`] |
//! | HTTP endpoint (`/healthz`, `/readyz`, `/metrics`), `healthcheck` | [`http`] |
//! | metrics, readiness, probes and the summary log line | [`metrics`], [`monitor`] |
//! | backoff, timestamps | [`backoff`], [`time`] |

#![warn(missing_docs)]

pub mod amqp;
pub mod backoff;
pub mod config;
pub mod count_sync;
pub mod edit_order;
pub mod elasticsearch;
pub mod env_file;
pub mod http;
pub mod metrics;
pub mod monitor;
pub mod mysql;
pub mod payload;
pub mod pipeline;
pub mod redis_store;
pub mod service;
pub mod shutdown;
pub mod time;
pub mod tls;

/// Version line printed by `--version`: crate version, git commit, build
/// date (UTC), all embedded by `build.rs`.
pub fn version_line() -> String {
    format!(
        "chat-writer {} (commit {}, built {})",
        env!("CARGO_PKG_VERSION"),
        env!("CHAT_WRITER_COMMIT"),
        env!("CHAT_WRITER_BUILD_DATE")
    )
}
