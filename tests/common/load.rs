//! Load and convergence helpers for the fault tests: a paced publisher on
//! its own thread (its own connection, spared by fault injection), the
//! expected state of every message, and checks that MySQL and the index hold
//! exactly that.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{expected_source, Amqp, Es, MessageRow, TestEnv};

/// 2026-11-29 12:00:00 UTC: AMQP timestamp of generated messages.
pub const T0: u64 = 1_795_953_600;

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Item {
    pub queue: &'static str,
    pub payload: Vec<u8>,
    pub timestamp: Option<u64>,
}

/// A `create_messages` payload for chat `chat_id` (number `chat_number` of
/// application `token`).
pub fn create_message(
    chat_id: i64,
    token: &str,
    chat_number: i64,
    number: i64,
    body: &str,
) -> Item {
    Item {
        queue: "create_messages",
        payload: json!({"chat_id": chat_id, "token": token, "chat_number": chat_number,
                        "number": number, "body": body})
        .to_string()
        .into_bytes(),
        timestamp: Some(T0 + number as u64 % 100_000),
    }
}

/// An `update_messages` payload.
pub fn update_message(
    chat_id: i64,
    token: &str,
    chat_number: i64,
    number: i64,
    body: &str,
) -> Item {
    Item {
        queue: "update_messages",
        payload: json!({"chat_id": chat_id, "token": token, "chat_number": chat_number,
                        "number": number, "body": body})
        .to_string()
        .into_bytes(),
        timestamp: None,
    }
}

/// The body of generated message `number` of chat `chat_id`.
pub fn body_of(chat_id: i64, number: i64) -> String {
    format!("message {number} of chat {chat_id} ✓")
}

/// A publisher thread with its own connection.
pub struct Publisher {
    handle: Option<JoinHandle<usize>>,
    pub sent: Arc<AtomicUsize>,
    pub total: usize,
}

impl Publisher {
    /// Publishes `items` in order at about `per_sec` messages per second
    /// (0 = as fast as confirms allow), each confirmed by the broker.
    pub fn spawn(env: &TestEnv, items: Vec<Item>, per_sec: usize) -> Publisher {
        let url = env.amqp_url();
        let vhost = env.vhost.clone();
        let sent = Arc::new(AtomicUsize::new(0));
        let total = items.len();
        let s = sent.clone();
        let handle = std::thread::spawn(move || {
            smol::block_on(async move {
                let amqp = Amqp::connect(&url, &vhost).await;
                let chunk = if per_sec == 0 {
                    500
                } else {
                    (per_sec / 20).max(1)
                };
                let start = Instant::now();
                for (k, part) in items.chunks(chunk).enumerate() {
                    let mut confirms = Vec::with_capacity(part.len());
                    for it in part {
                        confirms.push(
                            amqp.publish_nowait(it.queue, &it.payload, it.timestamp)
                                .await,
                        );
                    }
                    for c in confirms {
                        c.await.expect("publisher confirm");
                    }
                    s.fetch_add(part.len(), Ordering::SeqCst);
                    if per_sec > 0 {
                        // Chunk k+1 is due at (k+1) * 50 ms.
                        let due = start + Duration::from_millis(50 * (k as u64 + 1));
                        let now = Instant::now();
                        if due > now {
                            smol::Timer::after(due - now).await;
                        }
                    }
                }
                amqp.close().await;
                s.load(Ordering::SeqCst)
            })
        });
        Publisher {
            handle: Some(handle),
            sent,
            total,
        }
    }

    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits for the publisher to finish (at most 120 s) and returns how
    /// many it published.
    pub fn join(mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(120);
        let h = self.handle.take().expect("joined once");
        while !h.is_finished() {
            assert!(
                Instant::now() < deadline,
                "publisher did not finish in 120 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().expect("publisher thread panicked")
    }
}

/// What a test expects in `messages`: `(chat_id, number)` → body.
pub type Expected = BTreeMap<(i64, i64), String>;

/// Counts seen at the end of a fault test.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub published: usize,
    pub stored: usize,
    pub indexed: usize,
    pub dead_lettered: u64,
    pub in_retry: u64,
    pub duplicates: usize,
}

impl Tally {
    pub fn print(&self, what: &str) {
        eprintln!(
            "[{what}] published {} / stored {} / indexed {} / dead-lettered {} / \
             in retry queues {} / duplicates {}",
            self.published,
            self.stored,
            self.indexed,
            self.dead_lettered,
            self.in_retry,
            self.duplicates
        );
    }
}

/// All message rows of the test database.
pub async fn all_messages(env: &TestEnv) -> Vec<MessageRow> {
    env.db.messages_where("1 = 1").await
}

/// Compares the rows with `want`: `Ok(rows)` when every expected message is
/// there exactly once with its body and nothing else is.
pub fn compare_rows(rows: &[MessageRow], want: &Expected) -> Result<(), String> {
    let mut seen: BTreeMap<(i64, i64), usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for r in rows {
        *seen.entry((r.chat_id, r.number)).or_default() += 1;
        match want.get(&(r.chat_id, r.number)) {
            None => problems.push(format!("unexpected row ({}, {})", r.chat_id, r.number)),
            Some(b) if b.as_bytes() != r.body.as_slice() => problems.push(format!(
                "row ({}, {}) body {:?}, expected {b:?}",
                r.chat_id,
                r.number,
                r.body_str()
            )),
            _ => {}
        }
    }
    for (k, n) in &seen {
        if *n > 1 {
            problems.push(format!("row {k:?} stored {n} times"));
        }
    }
    let missing: Vec<&(i64, i64)> = want.keys().filter(|k| !seen.contains_key(k)).collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} row(s) missing, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        let n = problems.len();
        problems.truncate(8);
        Err(format!("{n} problem(s): {}", problems.join("; ")))
    }
}

/// Waits until the rows equal `want` (at most `timeout`).
pub async fn wait_rows(env: &TestEnv, want: &Expected, timeout: Duration) -> Vec<MessageRow> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = all_messages(env).await;
        let r = compare_rows(&rows, want);
        match r {
            Ok(()) => return rows,
            Err(e) if Instant::now() >= deadline => {
                panic!("rows did not converge within {timeout:?}: {e}")
            }
            Err(_) => {
                smol::Timer::after(Duration::from_millis(300)).await;
            }
        }
    }
}

/// `_mget` of `ids` (chunks of 1000): id → document (only found ones).
pub async fn mget(es: &Es, ids: &[String]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for chunk in ids.chunks(1000) {
        let (status, v) = es
            .req(
                "POST",
                &format!("/{}/_mget", es.index),
                Some(json!({ "ids": chunk }).to_string()),
            )
            .await;
        if status != 200 {
            continue;
        }
        for d in v["docs"].as_array().cloned().unwrap_or_default() {
            if d["found"] == Value::Bool(true) {
                if let Some(id) = d["_id"].as_str() {
                    out.insert(id.to_string(), d.clone());
                }
            }
        }
    }
    out
}

/// The document id of a row.
pub fn doc_id(r: &MessageRow) -> String {
    format!("{}:{}:{}", r.token, r.chat_number, r.number)
}

/// How many rows have their document with `_version` = updated_at µs and
/// the whole expected `_source`; `Err` describes the first mismatches.
pub async fn check_index(es: &Es, rows: &[MessageRow]) -> (usize, Result<(), String>) {
    let ids: Vec<String> = rows.iter().map(doc_id).collect();
    let docs = mget(es, &ids).await;
    let mut ok = 0;
    let mut problems = Vec::new();
    for r in rows {
        let id = doc_id(r);
        match docs.get(&id) {
            None => problems.push(format!("{id}: not indexed")),
            Some(d) if d["_version"].as_i64() != Some(r.updated_us) => problems.push(format!(
                "{id}: _version {} != updated_at µs {}",
                d["_version"], r.updated_us
            )),
            Some(d) if d["_source"] != expected_source(r) => problems.push(format!(
                "{id}: _source {} != {}",
                d["_source"],
                expected_source(r)
            )),
            Some(_) => ok += 1,
        }
    }
    if problems.is_empty() {
        (ok, Ok(()))
    } else {
        let n = problems.len();
        problems.truncate(5);
        (
            ok,
            Err(format!("{n} document problem(s): {}", problems.join("; "))),
        )
    }
}

/// Waits until every row's document is indexed exactly (at most `timeout`);
/// returns how many are.
pub async fn wait_indexed(es: &Es, rows: &[MessageRow], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, r) = check_index(es, rows).await;
        match r {
            Ok(()) => return ok,
            Err(e) if Instant::now() >= deadline => panic!(
                "index did not converge within {timeout:?} ({ok} of {} right): {e}",
                rows.len()
            ),
            Err(_) => {
                smol::Timer::after(Duration::from_millis(500)).await;
            }
        }
    }
}

impl TestEnv {
    /// Messages (ready + unacked) in every `.dlq` and in every `.retry.`
    /// queue of the vhost.
    pub fn dead_and_retrying(&self) -> (u64, u64) {
        let q = self.list_queues();
        let dead = q
            .iter()
            .filter(|(n, _)| n.ends_with(".dlq"))
            .map(|(_, v)| v.0)
            .sum();
        let retry = q
            .iter()
            .filter(|(n, _)| n.contains(".retry."))
            .map(|(_, v)| v.0)
            .sum();
        (dead, retry)
    }

    /// Waits until `queue` holds no message (ready + unacked), at most `timeout`.
    pub async fn wait_queue_empty(&self, queue: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.list_queues();
            let n = q.get(queue).map(|v| v.0);
            if n == Some(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} not empty within {timeout:?}: {n:?} message(s); queues {q:?}"
            );
            smol::Timer::after(Duration::from_millis(300)).await;
        }
    }

    /// Waits until every work queue has a consumer again (at most `timeout`).
    pub async fn wait_consumers_back(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.list_queues();
            if super::WORK_QUEUES
                .iter()
                .all(|n| q.get(*n).map(|v| v.1).unwrap_or(0) > 0)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consumers not back on every work queue within {timeout:?}: {q:?}"
            );
            smol::Timer::after(Duration::from_millis(200)).await;
        }
    }
}

/// The index mapping's `{field: type}`, `None` if the index is missing.
pub async fn mapping_types(es: &Es) -> Option<Value> {
    let (status, v) = es
        .req("GET", &format!("/{}/_mapping", es.index), None)
        .await;
    if status != 200 {
        return None;
    }
    // The response is keyed by the concrete index name (an alias resolves).
    let (_, m) = v.as_object()?.iter().next()?;
    let props = m["mappings"]["properties"].as_object()?;
    Some(Value::Object(
        props
            .iter()
            .map(|(k, v)| (k.clone(), v["type"].clone()))
            .collect(),
    ))
}

/// The mapping the contract asks for (section 7).
pub fn contract_mapping() -> Value {
    json!({"token": "keyword", "chat_number": "integer", "number": "integer",
           "body": "text", "created_at": "date"})
}
