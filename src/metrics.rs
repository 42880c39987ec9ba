//! What the writer counts, for `/metrics` and readiness.
//!
//! One process-wide set of metrics ([`get`]), registered once in a
//! `prometheus-client` registry and encoded on each scrape in the
//! OpenMetrics text format (which Prometheus reads; counters end in
//! `_total`). Updates are atomic adds, so any task or thread may record.
//! The names, labels and units are listed in the README ("Monitoring").
//!
//! Readiness ([`readiness`]) is derived from the same gauges: connected to
//! RabbitMQ and MySQL, and consuming.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Label of per-queue metrics: the work queue's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// `create_chats`, `create_messages` or `update_messages` (and
    /// `chat_writer.index` for `deliveries_parked`).
    pub queue: &'static str,
}

/// A dependency whose connection state is exported as `chat_writer_up`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Dependency {
    /// The AMQP connection (consumers and publisher).
    rabbitmq,
    /// The MySQL pool (last write or probe).
    mysql,
    /// Redis (last marker flush, sync or probe).
    redis,
    /// Elasticsearch (last bulk or index check).
    elasticsearch,
}

/// Label of `chat_writer_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabel {
    /// Which dependency.
    pub dependency: Dependency,
}

/// The two kinds of count sync (docs/redis-and-counts.md).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SyncKind {
    /// Members moved out of the change sets.
    changes,
    /// The full SCAN of the counters.
    reconcile,
}

/// How a count sync run ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SyncResult {
    /// Every counter read and written.
    ok,
    /// Failed; the members were put back.
    error,
}

/// Labels of `chat_writer_count_sync_runs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// changes or reconcile.
    pub kind: SyncKind,
    /// ok or error.
    pub result: SyncResult,
}

/// Label of `chat_writer_count_sync_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncKindLabel {
    /// changes or reconcile.
    pub kind: SyncKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

fn batch_size_buckets() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
}

fn seconds_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

fn lag_buckets() -> Histogram {
    Histogram::new([0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0])
}

/// Every metric of the writer. Counters only go up; gauges are set.
pub struct Metrics {
    registry: Registry,
    /// Deliveries taken from each work queue.
    pub received: Family<QueueLabel, Counter>,
    /// Deliveries whose effect is in MySQL: a create inserted or already
    /// there (duplicates included), an update applied or superseded.
    pub stored: Family<QueueLabel, Counter>,
    /// Edits older than the edit their row holds (by edit version): success,
    /// acked, nothing written; included in `stored`.
    pub superseded: Family<QueueLabel, Counter>,
    /// Deliveries republished to their own queue as fresh copies and acked:
    /// those the broker had returned before (`x-delivery-count` >= 1), and
    /// those a consumer gave back (MySQL failing for MYSQL_REQUEUE_AFTER).
    /// Received again later.
    pub parked: Family<QueueLabel, Counter>,
    /// Creates whose row was already there (at-least-once delivery): success, not written again.
    pub duplicates: Family<QueueLabel, Counter>,
    /// Deliveries sent to a delay tier (parent or row not there yet).
    pub retried: Family<QueueLabel, Counter>,
    /// Deliveries dead-lettered (malformed, refused, or out of delay tiers).
    pub dead_lettered: Family<QueueLabel, Counter>,
    /// Deliveries taken but left unacked (shutdown during a MySQL retry, a
    /// broker failure before the ack): redelivered and received again.
    pub abandoned: Family<QueueLabel, Counter>,
    /// MySQL attempts that failed and were retried in place (README, "Failure semantics").
    pub write_errors: Family<QueueLabel, Counter>,
    /// Times a consumer gave every delivery it held back to its queue and
    /// paused, MySQL having failed a batch for MYSQL_REQUEUE_AFTER.
    pub mysql_requeues: Family<QueueLabel, Counter>,
    /// Work-queue consumers paused until MySQL answers again.
    pub consumers_paused: Gauge,
    /// Deliveries per batch.
    pub batch_size: Hist<QueueLabel>,
    /// Time of a batch's MySQL write (the transaction and its retries), seconds.
    pub batch_commit: Hist<QueueLabel>,
    /// Commit time minus the AMQP `timestamp` of the batch's oldest delivery
    /// that has one, seconds (the API's timestamps are whole seconds).
    pub publish_to_commit: Hist<QueueLabel>,
    /// Documents indexed (or already newer there).
    pub indexed: Counter,
    /// Documents refused for good (sent to the index dead-letter queue).
    pub index_rejected: Counter,
    /// Time of one `_bulk` round (all its retries), seconds.
    pub bulk: Histogram,
    /// Index messages ready in the queue (read at most every 5 s while
    /// busy) plus those the indexer holds unacked.
    pub index_backlog: Gauge,
    /// Commit time to indexed of the oldest index message of the last
    /// `_bulk`, seconds; while messages are held (Elasticsearch slow or
    /// down) their age, refreshed every 5 s; 0 when the indexer is idle.
    pub index_lag: Gauge<f64, AtomicU64>,
    /// Count sync runs by kind and result.
    pub count_sync_runs: Family<SyncLabels, Counter>,
    /// `chats_count` / `messages_count` rows changed by the count sync.
    pub count_sync_rows: Counter,
    /// Duration of a count sync run, seconds.
    pub count_sync_duration: Hist<SyncKindLabel>,
    /// 1 while the dependency answers, 0 otherwise.
    pub up: Family<DependencyLabel, Gauge>,
    /// 1 while every consumer of the current connection is consuming.
    pub consuming: Gauge,
    /// Index messages ready in the queue at the last look.
    index_ready: AtomicI64,
    /// Index messages the indexer holds unacked (a `_bulk` in progress or
    /// being retried).
    index_in_hand: AtomicI64,
    /// Commit time (µs) of the oldest index message in hand; 0 when none.
    index_oldest_in_hand_us: AtomicI64,
    /// Set by the first SIGTERM/SIGINT: no longer ready.
    shutting_down: std::sync::atomic::AtomicBool,
    /// The last failure of each dependency, until it works again: its text
    /// and whether it is a refusal (TLS or credentials).
    failures: std::sync::Mutex<Vec<(Dependency, Failure)>>,
    /// Why the search server last refused the indexer's `_bulk` (401 or
    /// 403, on the request or on its items), until a `_bulk` is answered
    /// without one. Kept apart from the probe's failure: a key may read
    /// (the probe passes) and still not write.
    bulk_refusal: std::sync::Mutex<Option<String>>,
}

/// Why a dependency failed last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// One line: what happened, with the reason.
    pub text: String,
    /// A TLS failure or refused credentials: an operator has to act, and
    /// `/readyz` says so even for Redis and Elasticsearch.
    pub refused: bool,
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("chat_writer");
        let m = Metrics {
            received: Family::default(),
            stored: Family::default(),
            superseded: Family::default(),
            parked: Family::default(),
            duplicates: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            abandoned: Family::default(),
            write_errors: Family::default(),
            mysql_requeues: Family::default(),
            consumers_paused: Gauge::default(),
            batch_size: Family::new_with_constructor(batch_size_buckets),
            batch_commit: Family::new_with_constructor(seconds_buckets),
            publish_to_commit: Family::new_with_constructor(lag_buckets),
            indexed: Counter::default(),
            index_rejected: Counter::default(),
            bulk: seconds_buckets(),
            index_backlog: Gauge::default(),
            index_lag: Gauge::default(),
            count_sync_runs: Family::default(),
            count_sync_rows: Counter::default(),
            count_sync_duration: Family::new_with_constructor(seconds_buckets),
            up: Family::default(),
            consuming: Gauge::default(),
            index_ready: AtomicI64::new(0),
            index_in_hand: AtomicI64::new(0),
            index_oldest_in_hand_us: AtomicI64::new(0),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            failures: std::sync::Mutex::new(Vec::new()),
            bulk_refusal: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("CHAT_WRITER_COMMIT"),
            })
            .set(1);
        r.register("build_info", "Version and commit of this binary", build);
        r.register(
            "deliveries_received",
            "Deliveries taken from the work queue",
            m.received.clone(),
        );
        r.register(
            "deliveries_stored",
            "Deliveries whose effect is in MySQL (duplicates included)",
            m.stored.clone(),
        );
        r.register(
            "deliveries_duplicate",
            "Creates whose row was already stored (ignored, acked)",
            m.duplicates.clone(),
        );
        r.register(
            "deliveries_retried",
            "Deliveries sent to a delay tier (parent or row not there yet)",
            m.retried.clone(),
        );
        r.register(
            "deliveries_dead_lettered",
            "Deliveries sent to the dead-letter queue",
            m.dead_lettered.clone(),
        );
        r.register(
            "deliveries_superseded",
            "Edits older than the edit their row holds (acked, not written; counted in stored)",
            m.superseded.clone(),
        );
        r.register(
            "deliveries_parked",
            "Deliveries republished to their queue as fresh copies and acked (returned by the broker before, or given back)",
            m.parked.clone(),
        );
        r.register(
            "deliveries_abandoned",
            "Deliveries taken but left unacked (redelivered later)",
            m.abandoned.clone(),
        );
        r.register(
            "mysql_write_errors",
            "MySQL write attempts that failed and were retried in place",
            m.write_errors.clone(),
        );
        r.register(
            "mysql_requeues",
            "Times a consumer gave its deliveries back to the queue and paused: MySQL failed a batch for MYSQL_REQUEUE_AFTER",
            m.mysql_requeues.clone(),
        );
        r.register(
            "consumers_paused",
            "Work-queue consumers paused until MySQL answers again",
            m.consumers_paused.clone(),
        );
        r.register("batch_size", "Deliveries per batch", m.batch_size.clone());
        r.register_with_unit(
            "batch_commit",
            "MySQL write time of a batch, retries included",
            Unit::Seconds,
            m.batch_commit.clone(),
        );
        r.register_with_unit(
            "publish_to_commit",
            "Commit time minus the AMQP timestamp of the batch's oldest delivery",
            Unit::Seconds,
            m.publish_to_commit.clone(),
        );
        r.register(
            "index_documents",
            "Documents indexed (or a newer version already there)",
            m.indexed.clone(),
        );
        r.register(
            "index_rejected",
            "Documents refused by Elasticsearch for good (dead-lettered)",
            m.index_rejected.clone(),
        );
        r.register_with_unit(
            "bulk",
            "Time of one _bulk round, retries included",
            Unit::Seconds,
            m.bulk.clone(),
        );
        r.register(
            "index_backlog_messages",
            "Index messages waiting: ready in the index queue plus held by the indexer",
            m.index_backlog.clone(),
        );
        r.register_with_unit(
            "index_lag",
            "Commit to indexed of the oldest message of the last _bulk",
            Unit::Seconds,
            m.index_lag.clone(),
        );
        r.register(
            "count_sync_runs",
            "Count sync runs",
            m.count_sync_runs.clone(),
        );
        r.register(
            "count_sync_rows_written",
            "Count rows changed by the count sync",
            m.count_sync_rows.clone(),
        );
        r.register_with_unit(
            "count_sync_duration",
            "Duration of a count sync run",
            Unit::Seconds,
            m.count_sync_duration.clone(),
        );
        r.register("up", "1 while the dependency answers", m.up.clone());
        r.register(
            "consuming",
            "1 while every consumer of the current connection is consuming",
            m.consuming.clone(),
        );
        // Every per-queue counter exists from the start at 0, so rates and
        // alerts work before the first event.
        for q in crate::amqp::WORK_QUEUES {
            let l = Metrics::queue(q);
            for f in [
                &m.received,
                &m.stored,
                &m.duplicates,
                &m.retried,
                &m.dead_lettered,
                &m.parked,
                &m.abandoned,
                &m.write_errors,
                &m.mysql_requeues,
            ] {
                let _ = f.get_or_create(&l);
            }
        }
        let _ = m
            .superseded
            .get_or_create(&Metrics::queue("update_messages"));
        let _ = m
            .parked
            .get_or_create(&Metrics::queue(crate::amqp::INDEX_QUEUE));
        Metrics { registry: r, ..m }
    }

    /// The per-queue label of `queue` (a work queue, or the index queue);
    /// other names are reported as `other`.
    pub fn queue(queue: &str) -> QueueLabel {
        let queue = crate::amqp::WORK_QUEUES
            .iter()
            .copied()
            .chain([crate::amqp::INDEX_QUEUE])
            .find(|q| *q == queue)
            .unwrap_or("other");
        QueueLabel { queue }
    }

    /// Marks the process as shutting down (first SIGTERM/SIGINT): `/readyz`
    /// answers 503 `shutting down` from then on, and `consuming` is 0 (no
    /// new deliveries are taken).
    pub fn set_shutting_down(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.consuming.set(0);
    }

    /// Sets `chat_writer_up{dependency}` to 1 or 0.
    pub fn set_up(&self, dependency: Dependency, up: bool) {
        self.up
            .get_or_create(&DependencyLabel { dependency })
            .set(i64::from(up));
    }

    /// The indexer took `n` index messages (0: it acked them), the oldest
    /// committed at `oldest_us`: `index_backlog_messages` counts them with
    /// the ready ones, and [`Metrics::refresh_index_lag`] ages them.
    pub fn set_index_in_hand(&self, n: usize, oldest_us: Option<i64>) {
        self.index_in_hand.store(n as i64, Ordering::Relaxed);
        self.index_oldest_in_hand_us
            .store(oldest_us.unwrap_or(0), Ordering::Relaxed);
        self.refresh_index_backlog();
    }

    /// `n` index messages are ready in the queue (a passive declare).
    pub fn set_index_ready(&self, n: u32) {
        self.index_ready.store(i64::from(n), Ordering::Relaxed);
        self.refresh_index_backlog();
    }

    fn refresh_index_backlog(&self) {
        self.index_backlog.set(
            self.index_ready.load(Ordering::Relaxed) + self.index_in_hand.load(Ordering::Relaxed),
        );
    }

    /// While index messages are in hand (Elasticsearch slow or down), sets
    /// `index_lag_seconds` to the age of the oldest at `now_us`, so the lag
    /// grows during an outage instead of keeping the last bulk's value.
    pub fn refresh_index_lag(&self, now_us: i64) {
        let oldest = self.index_oldest_in_hand_us.load(Ordering::Relaxed);
        if oldest > 0 {
            self.index_lag.set((now_us - oldest).max(0) as f64 / 1e6);
        }
    }

    /// `chat_writer_up{dependency}`.
    /// Records why `dependency` failed (`Some`), or that it works again
    /// (`None`). A failure is a refusal when [`crate::tls::refusal`]
    /// recognises it or `refused` says so (an HTTP 401 or 403).
    pub fn set_failure(&self, dependency: Dependency, failure: Option<(String, bool)>) {
        let Ok(mut all) = self.failures.lock() else {
            return;
        };
        all.retain(|(d, _)| *d != dependency);
        if let Some((text, refused)) = failure {
            let refused = refused || crate::tls::refusal(&text).is_some();
            let text = crate::tls::explain(&text);
            all.push((dependency, Failure { text, refused }));
        }
    }

    /// Records why the search server refused a `_bulk` (`Some`, a 401 or
    /// 403 with its reason), or that it took one (`None`). Returns true
    /// when this changes what was recorded.
    pub fn set_bulk_refusal(&self, refusal: Option<String>) -> bool {
        let Ok(mut r) = self.bulk_refusal.lock() else {
            return false;
        };
        let changed = *r != refusal;
        *r = refusal;
        changed
    }

    /// Why the search server refuses the indexer's `_bulk`, if it does.
    pub fn bulk_refusal(&self) -> Option<String> {
        self.bulk_refusal.lock().ok()?.clone()
    }

    /// The last failure of `dependency` since it last worked.
    pub fn failure(&self, dependency: Dependency) -> Option<Failure> {
        let all = self.failures.lock().ok()?;
        all.iter()
            .find(|(d, _)| *d == dependency)
            .map(|(_, f)| f.clone())
    }

    /// True if `dependency` is up (its last use or probe worked).
    pub fn is_up(&self, dependency: Dependency) -> bool {
        self.up.get_or_create(&DependencyLabel { dependency }).get() == 1
    }

    /// The whole exposition in the OpenMetrics text format (ends with
    /// `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics, created on first use.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// `Ok` when the writer is ready (connected to RabbitMQ and MySQL and
/// consuming), else the first reason it is not, in one line (`/readyz`).
pub fn readiness() -> Result<(), String> {
    let m = get();
    let why = |d: Dependency| match m.failure(d) {
        Some(f) => format!(": {}", f.text),
        None => String::new(),
    };
    if m.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
        return Err("shutting down".into());
    } else if !m.is_up(Dependency::rabbitmq) {
        return Err(format!(
            "rabbitmq: not connected{}",
            why(Dependency::rabbitmq)
        ));
    } else if m.consuming.get() != 1 {
        return Err("rabbitmq: not consuming".into());
    } else if !m.is_up(Dependency::mysql) {
        return Err(format!("mysql: not answering{}", why(Dependency::mysql)));
    } else if m.consumers_paused.get() > 0 {
        return Err("mysql: consumers paused after failed writes".into());
    }
    // Redis or the search server refusing the writer (TLS, credentials)
    // does not stop rows from landing, but will not heal by itself.
    for d in [
        Dependency::mysql,
        Dependency::redis,
        Dependency::elasticsearch,
    ] {
        if let Some(f) = m.failure(d).filter(|f| f.refused) {
            return Err(format!("{}: {}", dependency_name(d), f.text));
        }
    }
    if let Some(reason) = m.bulk_refusal() {
        return Err(format!("elasticsearch: {reason}"));
    }
    Ok(())
}

/// The name of `d` in `/readyz` and the logs.
pub fn dependency_name(d: Dependency) -> &'static str {
    match d {
        Dependency::rabbitmq => "rabbitmq",
        Dependency::mysql => "mysql",
        Dependency::redis => "redis",
        Dependency::elasticsearch => "elasticsearch",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_readiness() {
        let m = get();
        m.received
            .get_or_create(&Metrics::queue("create_chats"))
            .inc_by(3);
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("chat_writer_deliveries_received_total{queue=\"create_chats\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "chat_writer_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION"),
                env!("CHAT_WRITER_COMMIT")
            )),
            "{text}"
        );
        assert_eq!(
            Metrics::queue("chat_writer.index").queue,
            "chat_writer.index"
        );
        assert_eq!(Metrics::queue("create_messages.dlq").queue, "other");
        let err = |s: &str| Err(s.to_string());
        assert_eq!(readiness(), err("rabbitmq: not connected"));
        m.set_failure(
            Dependency::rabbitmq,
            Some(("connection refused".into(), false)),
        );
        assert_eq!(
            readiness(),
            err("rabbitmq: not connected: connection refused")
        );
        m.set_failure(Dependency::rabbitmq, None);
        m.set_up(Dependency::rabbitmq, true);
        assert_eq!(readiness(), err("rabbitmq: not consuming"));
        m.consuming.set(1);
        assert_eq!(readiness(), err("mysql: not answering"));
        m.set_up(Dependency::mysql, true);
        assert_eq!(readiness(), Ok(()));
        // Redis down is not a readiness matter; Redis refusing the writer is.
        m.set_failure(Dependency::redis, Some(("timed out".into(), false)));
        assert_eq!(readiness(), Ok(()));
        let tls = "invalid peer certificate: UnknownIssuer";
        m.set_failure(Dependency::redis, Some((tls.into(), false)));
        assert_eq!(
            readiness(),
            err(&format!("redis: {}", crate::tls::explain(tls)))
        );
        m.set_failure(Dependency::redis, None);
        m.set_failure(
            Dependency::elasticsearch,
            Some(("401 security_exception: missing credentials".into(), true)),
        );
        assert_eq!(
            readiness(),
            err("elasticsearch: 401 security_exception: missing credentials")
        );
        m.set_failure(Dependency::elasticsearch, None);
        assert_eq!(readiness(), Ok(()));
        // A key that reads (the probe passes) but may not write.
        let item = "403 security_exception: action [indices:data/write/bulk[s]] is unauthorized";
        assert!(m.set_bulk_refusal(Some(item.into())));
        assert!(!m.set_bulk_refusal(Some(item.into())), "unchanged");
        assert_eq!(readiness(), err(&format!("elasticsearch: {item}")));
        assert!(m.set_bulk_refusal(None));
        assert_eq!(readiness(), Ok(()));
        m.set_shutting_down();
        assert_eq!(readiness(), err("shutting down"));
        assert_eq!(m.consuming.get(), 0);
        m.set_up(Dependency::rabbitmq, false);
    }
}
