//! The count sync: Redis counters into `applications.chats_count` and
//! `chats.messages_count` (docs/redis-and-counts.md; a cron job in the service this one replaces).
//!
//! Every COUNT_SYNC_INTERVAL the change sets are drained with `SPOP key
//! 1000`, which removes members atomically: a member added while a sync
//! runs stays in the set for the next one. The counters of each
//! chunk are read with one `MGET` and written with one
//! `UPDATE … JOIN (…) SET count = new WHERE count < new`, so counts never go
//! down and unchanged rows are not written. A chunk that fails goes back
//! into its set. At start-up and every COUNT_RECONCILE_INTERVAL the counters
//! are also found with `SCAN` (never `KEYS`) and written the same way.

use crate::metrics::{self, SyncKind, SyncKindLabel, SyncLabels, SyncResult};
use crate::mysql::Store;
use crate::redis_store::{Redis, CHAT_CHANGES, MESSAGE_CHANGES};
use crate::shutdown::Shutdown;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Members taken per `SPOP`, keys per `SCAN` page and rows per `UPDATE`.
pub const CHUNK: usize = 1000;
/// Retries of one chunk's MySQL write after a deadlock or lock wait
/// timeout, before the run fails (40, 80, 160 ms apart).
pub const LOCK_RETRIES: u32 = 3;

/// The two kinds of counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// `chat_counter:<token>` → `applications.chats_count`.
    Chats,
    /// `message_counter:<token>:<chat_number>` → `chats.messages_count`.
    Messages,
}

impl Counter {
    fn key_prefix(self) -> &'static str {
        match self {
            Counter::Chats => "chat_counter:",
            Counter::Messages => "message_counter:",
        }
    }
    fn change_set(self) -> &'static str {
        match self {
            Counter::Chats => CHAT_CHANGES,
            Counter::Messages => MESSAGE_CHANGES,
        }
    }
}

/// Totals of one sync run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    /// Counters read.
    pub counters: u64,
    /// Rows whose count was raised.
    pub rows_changed: u64,
}

impl std::ops::AddAssign for SyncStats {
    fn add_assign(&mut self, o: SyncStats) {
        self.counters += o.counters;
        self.rows_changed += o.rows_changed;
    }
}

/// The sync, over the writer's MySQL store and Redis connection.
pub struct CountSync {
    store: Store,
    redis: Rc<Redis>,
}

impl CountSync {
    /// A sync over `store` and `redis`.
    pub fn new(store: Store, redis: Rc<Redis>) -> CountSync {
        CountSync { store, redis }
    }

    /// Drains both change sets and writes their counters.
    ///
    /// Errors: a Redis or MySQL failure, as one line; members of the failed
    /// chunk are back in their set (unless Redis itself is unreachable, in
    /// which case they are in the set still or covered by reconciliation).
    pub async fn sync_changes(&self) -> Result<SyncStats, String> {
        let mut stats = SyncStats::default();
        for kind in [Counter::Chats, Counter::Messages] {
            // Bounded: a publisher faster than us cannot keep one run going.
            for _ in 0..1000 {
                let members: Vec<String> = {
                    let mut conn = self.conn().await?;
                    redis::cmd("SPOP")
                        .arg(kind.change_set())
                        .arg(CHUNK)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| self.redis_error(e))?
                };
                if members.is_empty() {
                    break;
                }
                match self.apply(kind, &members).await {
                    Ok(s) => stats += s,
                    Err(e) => {
                        self.put_back(kind, &members).await;
                        return Err(e);
                    }
                }
                if members.len() < CHUNK {
                    break;
                }
            }
        }
        Ok(stats)
    }

    /// SCANs every `chat_counter:*` and `message_counter:*` key and writes
    /// the counts, whether or not a change set named them.
    ///
    /// Errors: a Redis or MySQL failure, as one line.
    pub async fn reconcile(&self) -> Result<SyncStats, String> {
        let mut stats = SyncStats::default();
        for kind in [Counter::Chats, Counter::Messages] {
            let pattern = format!("{}*", kind.key_prefix());
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = {
                    let mut conn = self.conn().await?;
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(CHUNK)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| self.redis_error(e))?
                };
                let members: Vec<String> = keys
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(kind.key_prefix()).map(str::to_string))
                    .collect();
                if !members.is_empty() {
                    stats += self.apply(kind, &members).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(stats)
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        self.redis.conn().await.map_err(|e| self.redis_error(e))
    }

    fn redis_error(&self, e: redis::RedisError) -> String {
        self.redis.reset();
        format!("redis: {e}")
    }

    async fn put_back(&self, kind: Counter, members: &[String]) {
        let result = match self.redis.conn().await {
            Ok(mut conn) => {
                redis::cmd("SADD")
                    .arg(kind.change_set())
                    .arg(members)
                    .query_async::<()>(&mut conn)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.redis.reset();
            log::error!(
                "count sync: could not put {} members back into {}: {e}; reconciliation will cover them",
                members.len(),
                kind.change_set()
            );
        }
    }

    /// Reads the counters of `members` and raises the stored counts.
    async fn apply(&self, kind: Counter, members: &[String]) -> Result<SyncStats, String> {
        let keys: Vec<String> = members
            .iter()
            .map(|m| format!("{}{m}", kind.key_prefix()))
            .collect();
        let values: Vec<Option<String>> = {
            let mut conn = self.conn().await?;
            redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.redis_error(e))?
        };
        let mut stats = SyncStats::default();
        let parsed = members.iter().zip(values).filter_map(|(m, v)| {
            let v = v?;
            match v.trim().parse::<i64>() {
                // INT column: a counter beyond it is stored at the maximum.
                Ok(n) if n >= 0 => Some((m.as_str(), n.min(i64::from(i32::MAX)))),
                _ => {
                    log::warn!(
                        "count sync: {}{m} holds {v:?}, not a count; skipped",
                        kind.key_prefix()
                    );
                    None
                }
            }
        });
        let parsed: Vec<(&str, i64)> = parsed.collect();
        let message_counts: Vec<(&str, i32, i64)> = match kind {
            Counter::Chats => Vec::new(),
            Counter::Messages => parsed
                .iter()
                .filter_map(|&(m, n)| {
                    let (token, number) = m.rsplit_once(':')?;
                    let number = number.parse::<i32>().ok().filter(|n| *n >= 1)?;
                    Some((token, number, n))
                })
                .collect(),
        };
        stats.counters = match kind {
            Counter::Chats => parsed.len(),
            Counter::Messages => message_counts.len(),
        } as u64;
        // The raise locks the parent rows that concurrent message and chat
        // inserts lock too (their foreign-key checks), in another order, so
        // InnoDB may pick it as a deadlock victim (1213) or time it out
        // (1205): retried here a few times, since nothing was written.
        let mut attempt = 0u32;
        let changed = loop {
            let r = match kind {
                Counter::Chats => self.store.raise_chat_counts(&parsed).await,
                Counter::Messages => self.store.raise_message_counts(&message_counts).await,
            };
            match r {
                Err(mysql_async::Error::Server(ref e))
                    if matches!(e.code, 1213 | 1205) && attempt < LOCK_RETRIES =>
                {
                    attempt += 1;
                    log::debug!(
                        "count sync: mysql error {} on {} counters, retry={attempt}",
                        e.code,
                        stats.counters
                    );
                    async_io::Timer::after(Duration::from_millis(20 << attempt)).await;
                }
                other => break other,
            }
        };
        stats.rows_changed = changed.map_err(|e| format!("mysql: {e}"))?;
        Ok(stats)
    }
}

/// The periodic task: reconcile at start, then sync every `interval` and
/// reconcile every `reconcile_every`, until shutdown. The final sync is
/// the caller's, after the consumers have stopped.
pub async fn run(
    sync: &CountSync,
    interval: Duration,
    reconcile_every: Duration,
    shutdown: &Shutdown,
) {
    let mut next_reconcile = Instant::now();
    loop {
        if Instant::now() >= next_reconcile {
            let t = Instant::now();
            let r = sync.reconcile().await;
            record(SyncKind::reconcile, &r, t);
            match r {
                Ok(s) => {
                    next_reconcile = Instant::now() + reconcile_every;
                    log::info!(
                        "count reconcile: counters={} rows_changed={} duration_ms={}",
                        s.counters,
                        s.rows_changed,
                        t.elapsed().as_millis()
                    );
                }
                Err(e) => log::warn!(
                    "count reconcile failed, will retry: {}",
                    crate::tls::explain(&e.to_string())
                ),
            }
        }
        let t = Instant::now();
        let r = sync.sync_changes().await;
        record(SyncKind::changes, &r, t);
        match r {
            Ok(s) if s.counters > 0 => log::info!(
                "count sync: counters={} rows_changed={} duration_ms={}",
                s.counters,
                s.rows_changed,
                t.elapsed().as_millis()
            ),
            Ok(_) => {}
            Err(e) => log::warn!(
                "count sync failed, will retry: {}",
                crate::tls::explain(&e.to_string())
            ),
        }
        if !shutdown.sleep(interval).await {
            return;
        }
    }
}

/// Counts a sync run in the metrics (runs by kind and result, rows
/// changed, duration).
fn record(kind: SyncKind, r: &Result<SyncStats, String>, started: Instant) {
    let m = metrics::get();
    let result = match r {
        Ok(s) => {
            m.count_sync_rows.inc_by(s.rows_changed);
            SyncResult::ok
        }
        Err(_) => SyncResult::error,
    };
    m.count_sync_runs
        .get_or_create(&SyncLabels { kind, result })
        .inc();
    m.count_sync_duration
        .get_or_create(&SyncKindLabel { kind })
        .observe(started.elapsed().as_secs_f64());
}
