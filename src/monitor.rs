//! Probes and the periodic summary line.
//!
//! Consumers and the count sync only learn that MySQL or Redis is down when
//! they use them, and an idle writer uses neither; the indexer learns that
//! Elasticsearch hangs only when a request times out (60 s). So every
//! [`PROBE_EVERY`] a task asks each one (`SELECT 1` on a connection of its
//! own, `PING`, `GET /<index>/_mapping` of Elasticsearch, each within [`PROBE_TIMEOUT`])
//! and sets `chat_writer_up`, which `/readyz` reads (MySQL) and operators
//! alert on. The probe's MySQL connection is one more than
//! DB_MAX_OPEN_CONNS.
//! Every [`SUMMARY_EVERY`] it also logs one `summary` line at info with the
//! rates since the previous line, the index backlog and lag, and the
//! dependency states: what an operator greps for, with no per-message line
//! at info under load.

use crate::amqp::WORK_QUEUES;
use crate::config::Config;
use crate::elasticsearch::Client;
use crate::metrics::{self, Dependency, Metrics};
use crate::redis_store::Redis;
use crate::shutdown::Shutdown;
use crate::tls::SslMode;
use async_compat::Compat;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use std::time::{Duration, Instant};

/// How often MySQL and Redis are probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a probe may take before the dependency counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the summary line is logged.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

async fn within<T>(d: Duration, f: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(f.await) }, async {
        async_io::Timer::after(d).await;
        None
    })
    .await
}

/// `SELECT 1` on the probe's own connection (opened with `opts` when
/// missing, dropped after a failure): true if MySQL answered in time. Its
/// own connection, not the pool's, so a pool busy with batches waiting on
/// locks does not read as MySQL being down.
/// `opts` adapt to the server's TLS as the pool's do
/// ([`crate::mysql::adapted`]). Records the failure (or its end) for
/// `/readyz`.
pub async fn probe_mysql(opts: &mut Opts, mode: SslMode, conn: &mut Option<Conn>) -> bool {
    let where_ = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
    let ping = Compat::new(async {
        if conn.is_none() {
            *conn = Some(crate::mysql::connect_with(opts, mode).await?);
        }
        match conn.as_mut() {
            Some(c) => c.query_drop("SELECT 1").await,
            None => Ok(()),
        }
    });
    let failure = match within(PROBE_TIMEOUT, ping).await {
        Some(Ok(())) => None,
        Some(Err(e)) => Some(e.to_string()),
        None => Some(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    };
    let ok = failure.is_none();
    if !ok {
        // Dropped inside the adapter: the driver closes it on its runtime.
        Compat::new(async { drop(conn.take()) }).await;
    }
    metrics::get().set_failure(
        Dependency::mysql,
        failure.map(|f| (format!("{where_}: {}", f.replace('\n', " ")), false)),
    );
    ok
}

/// `PING`: true if Redis answered in time (the connection is reset
/// otherwise, so the next use reconnects). Records the failure (or its
/// end) for `/readyz`.
pub async fn probe_redis(redis: &Redis) -> bool {
    let ping = async {
        let mut conn = redis.conn().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    let failure = match within(PROBE_TIMEOUT, ping).await {
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(e.to_string()),
        None => Some(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    };
    let ok = failure.is_none();
    if !ok {
        redis.reset();
    }
    metrics::get().set_failure(
        Dependency::redis,
        failure.map(|f| (format!("{}: {f}", redis.address()), false)),
    );
    ok
}

/// [`Client::ping`]: true if the search server answered in time with a
/// status under 500 (401 or 403 still mean the server is there, but are
/// recorded as a refusal for `/readyz` and logged once per change).
pub async fn probe_elasticsearch(client: &Client) -> bool {
    let m = metrics::get();
    let (up, failure) = match client.ping().await {
        Ok(()) => (true, None),
        Err((Some(status), line)) => (status < 500, Some((line, matches!(status, 401 | 403)))),
        Err((None, line)) => (false, Some((line, false))),
    };
    if let Some((line, _)) = failure.as_ref().filter(|(l, refused)| {
        (*refused || crate::tls::refusal(l).is_some())
            && m.failure(Dependency::elasticsearch).map(|f| f.text) != Some(crate::tls::explain(l))
    }) {
        log::error!(
            "elasticsearch: {}; documents wait in the index queue until this is fixed",
            crate::tls::explain(line)
        );
    }
    m.set_failure(Dependency::elasticsearch, failure);
    up
}

/// Totals of the per-queue counters, for rates.
#[derive(Default, Clone, Copy)]
struct Totals {
    received: u64,
    stored: u64,
    duplicates: u64,
    retried: u64,
    dead_lettered: u64,
    indexed: u64,
}

fn totals() -> Totals {
    let m = metrics::get();
    let mut t = Totals {
        indexed: m.indexed.get(),
        ..Totals::default()
    };
    for q in WORK_QUEUES {
        let l = Metrics::queue(q);
        t.received += m.received.get_or_create(&l).get();
        t.stored += m.stored.get_or_create(&l).get();
        t.duplicates += m.duplicates.get_or_create(&l).get();
        t.retried += m.retried.get_or_create(&l).get();
        t.dead_lettered += m.dead_lettered.get_or_create(&l).get();
    }
    t
}

fn state(d: Dependency) -> &'static str {
    if metrics::get().is_up(d) {
        "up"
    } else {
        "down"
    }
}

/// Probes until shutdown and logs the summary line. `elasticsearch`: its
/// base URL when indexing is on (not probed, and omitted from the summary,
/// otherwise).
pub async fn run(cfg: &Config, redis: std::rc::Rc<Redis>, shutdown: Shutdown) {
    let m = metrics::get();
    let db = Some(cfg.database_name.as_str());
    let mut mysql = crate::mysql::opts(cfg, db);
    let elasticsearch = cfg.elasticsearch_url.as_deref().map(|base| {
        Client::with(
            base,
            &cfg.elasticsearch_index,
            &cfg.tls.elasticsearch,
            cfg.elasticsearch_api_key.as_ref(),
            PROBE_TIMEOUT,
        )
    });
    let indexing = elasticsearch.is_some();
    let mut probe_conn: Option<Conn> = None;
    let mut last = totals();
    let mut last_at = Instant::now();
    loop {
        m.set_up(
            Dependency::mysql,
            probe_mysql(&mut mysql, cfg.database_ssl_mode, &mut probe_conn).await,
        );
        m.set_up(Dependency::redis, probe_redis(&redis).await);
        if let Some(client) = &elasticsearch {
            m.set_up(Dependency::elasticsearch, probe_elasticsearch(client).await);
        }
        m.refresh_index_lag(crate::time::now_micros());
        if last_at.elapsed() >= SUMMARY_EVERY {
            let now = totals();
            let secs = last_at.elapsed().as_secs_f64();
            let rate = |a: u64, b: u64| (a - b) as f64 / secs;
            let es = if indexing {
                format!(
                    " indexed_per_s={:.1} index_backlog={} index_lag_s={:.3} elasticsearch={}",
                    rate(now.indexed, last.indexed),
                    m.index_backlog.get(),
                    m.index_lag.get(),
                    state(Dependency::elasticsearch)
                )
            } else {
                String::new()
            };
            log::info!(
                "summary interval_s={secs:.0} received_per_s={:.1} stored_per_s={:.1} duplicates={} retried={} dead_lettered={}{es} rabbitmq={} consuming={} paused={} mysql={} redis={}",
                rate(now.received, last.received),
                rate(now.stored, last.stored),
                now.duplicates - last.duplicates,
                now.retried - last.retried,
                now.dead_lettered - last.dead_lettered,
                state(Dependency::rabbitmq),
                m.consuming.get(),
                m.consumers_paused.get(),
                state(Dependency::mysql),
                state(Dependency::redis),
            );
            last = now;
            last_at = Instant::now();
        }
        if !shutdown.sleep(PROBE_EVERY).await {
            if let Some(c) = probe_conn.take() {
                let _ = within(PROBE_TIMEOUT, Compat::new(c.disconnect())).await;
            }
            return;
        }
    }
}
