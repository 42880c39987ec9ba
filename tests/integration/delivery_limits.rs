//! Work queues declared (by the operator, before any writer) as quorum
//! queues with an `x-delivery-limit` and no dead-letter exchange: the
//! broker drops a delivery returned more often than the limit. The writer
//! never lets that happen to valid work: a delivery that arrives with
//! `x-delivery-count` >= 1 (the broker returned it before) is *parked*,
//! republished to its own queue as a fresh copy (publisher confirms) and
//! the original acked; a consumer that cannot reach MySQL for
//! MYSQL_REQUEUE_AFTER parks what it holds instead of `basic.nack` with
//! requeue. Nothing is lost, nothing stored twice.
//!
//! RabbitMQ 3.10 as measured: every return of a delivery (a consumer's
//! connection closed with it unacked, a `basic.nack` with requeue) adds one
//! to its `x-delivery-count` header; with `x-delivery-limit` = L the
//! (L + 1)-th return drops it.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::faults::{close_writer_connections, Proxy};
use crate::common::load::{
    body_of, create_message, wait_indexed, wait_rows, Expected, Item, Publisher, T0,
};
use crate::common::metrics::{wait_queue_counters, QueueCounters};
use crate::common::{
    assert_indexed, mysql_proxy, wait_for, wait_until, Amqp, TestEnv, Writer, APP_ID, CHAT_ID,
    TOKEN, WORK_QUEUES,
};
use crate::consumers::T1;

const POLL: Duration = Duration::from_millis(100);

/// Creates of the seeded chat: numbers 1..=MESSAGES.
const MESSAGES: i64 = 2_000;
/// Every EDIT_EVERY-th message is edited once; every second one of those
/// (number <= MESSAGES - SECOND_EDIT_LAG) a second time, published
/// SECOND_EDIT_LAG creates later.
const EDIT_EVERY: i64 = 10;
const SECOND_EDIT_LAG: i64 = 100;
/// A chat is created every CHAT_EVERY messages: numbers 2..=21 of the
/// seeded application (number 1 is seeded).
const CHAT_EVERY: i64 = 100;
const REPLICAS: usize = 2;

/// An edit of message `number` of the seeded chat with AMQP timestamp
/// `ts`: a second edit gets a later second, so it is the newer one however
/// the two travel (the writer versions an edit within its second).
fn edit_item(number: i64, body: &str, ts: u64) -> Item {
    Item {
        queue: "update_messages",
        payload: json!({"chat_id": CHAT_ID, "token": TOKEN, "chat_number": 1,
                        "number": number, "body": body})
        .to_string()
        .into_bytes(),
        timestamp: Some(ts),
    }
}

fn chat_item(number: i64) -> Item {
    Item {
        queue: "create_chats",
        payload: json!({"application_id": APP_ID, "token": TOKEN, "number": number})
            .to_string()
            .into_bytes(),
        timestamp: Some(T0),
    }
}

/// The workload in publishing order, and what `messages` must hold after.
fn workload(want: &mut Expected) -> Vec<Item> {
    let mut items = Vec::new();
    for n in 1..=MESSAGES {
        let body = body_of(CHAT_ID, n);
        items.push(create_message(CHAT_ID, TOKEN, 1, n, &body));
        want.insert((CHAT_ID, n), body);
        if n % EDIT_EVERY == 0 {
            let body = format!("first edit of {n}");
            items.push(edit_item(n, &body, T0 + 10_000 + n as u64));
            want.insert((CHAT_ID, n), body);
        }
        let m = n - SECOND_EDIT_LAG;
        if m > 0 && m % (2 * EDIT_EVERY) == 0 {
            let body = format!("second edit of {m}");
            items.push(edit_item(m, &body, T0 + 20_000 + m as u64));
            want.insert((CHAT_ID, m), body);
        }
        if n % CHAT_EVERY == 0 {
            items.push(chat_item(n / CHAT_EVERY + 1));
        }
    }
    items
}

/// Migrates and seeds, then declares quorum `queue` with `x-delivery-limit` = `limit` (connection returned).
async fn seeded_with_quorum(env: &TestEnv, queue: &str, limit: i64) -> Amqp {
    env.migrate_and_seed().await;
    let amqp = env.amqp().await;
    amqp.declare_quorum(queue, Some(limit)).await;
    amqp
}

/// Every replica's counters of every work queue.
fn counters(addrs: &[String]) -> Vec<[QueueCounters; 3]> {
    addrs
        .iter()
        .map(|a| {
            let m = crate::common::metrics::scrape(a);
            WORK_QUEUES.map(|q| QueueCounters::of(&m, q))
        })
        .collect()
}

/// The sum of `f` over every replica's counters of every work queue.
fn total(all: &[[QueueCounters; 3]], f: impl Fn(&QueueCounters) -> u64) -> u64 {
    all.iter().flat_map(|r| r.iter()).map(f).sum()
}

/// Two replicas on quorum work queues with `x-delivery-limit` = 2 and no
/// dead-letter exchange, both reaching MySQL through one proxy: three
/// MySQL outages longer than MYSQL_REQUEUE_AFTER (each replica gives back
/// what it holds) and, during two of them, the broker closes the replicas'
/// connections while they hold deliveries (returned, `x-delivery-count`
/// grows). Without parking, a delivery returned three times is dropped by
/// the broker; with it every create is stored exactly once and every edit
/// applied (the second edit of a message wins), nothing dead-lettered, the
/// queues empty.
#[test]
fn quorum_work_queues_with_a_delivery_limit_lose_nothing() {
    let env = TestEnv::new("quorum_delivery_limit");
    smol::block_on(async {
        let t0 = Instant::now();
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        for q in WORK_QUEUES {
            amqp.declare_quorum(q, Some(2)).await;
        }
        let mysql = mysql_proxy();
        let mysql_port = mysql.port.to_string();
        let (mut writers, addrs): (Vec<Writer>, Vec<String>) = (0..REPLICAS)
            .map(|_| {
                env.start_writer_at(&[
                    ("DATABASE_PORT", mysql_port.as_str()),
                    ("MYSQL_REQUEUE_AFTER", "2s"),
                    ("RABBITMQ_PREFETCH_COUNT", "64"),
                    // Edits race their creates (another queue): tiers
                    // that outlast the outages.
                    ("RETRY_DELAYS", "500ms,1s,2s,4s,8s,16s"),
                ])
            })
            .unzip();
        env.wait_queue_consumers(&WORK_QUEUES, REPLICAS as u32, Duration::from_secs(30), POLL)
            .await;

        let mut want = Expected::new();
        let items = workload(&mut want);
        let published_total = items.len();
        let publisher = Publisher::spawn(&env, items, 150);

        // Three outages of 4.5 s (MYSQL_REQUEUE_AFTER is 2 s), 2 s apart;
        // in the first and the last the broker closes the replicas'
        // connections 0.8 s in, while their batches wait for MySQL.
        let mut closed = Vec::new();
        smol::Timer::after(Duration::from_millis(1500)).await;
        for k in 0..3 {
            let rows_before = env.db.count("messages", "1 = 1").await;
            mysql.pause();
            let paused = Instant::now();
            smol::Timer::after(Duration::from_millis(800)).await;
            if k != 1 {
                let n = close_writer_connections(&env.vhost, "test: broker closes connections");
                assert!(
                    n >= REPLICAS,
                    "outage {k}: closed {n} connection(s), expected one per replica at least"
                );
                closed.push(n);
            }
            let left = Duration::from_millis(4500).saturating_sub(paused.elapsed());
            smol::Timer::after(left).await;
            for w in writers.iter_mut() {
                w.assert_running();
            }
            mysql.resume();
            let c = counters(&addrs);
            eprintln!(
                "[quorum_delivery_limit] outage {k}: {:.1?}, rows {rows_before} before; \
                 published {}; parked so far {}, MySQL requeues {}",
                paused.elapsed(),
                publisher.sent(),
                total(&c, |c| c.parked),
                total(&c, |c| c.requeues),
            );
            smol::Timer::after(Duration::from_secs(2)).await;
        }
        let published = publisher.join();
        assert_eq!(published, published_total);

        // Everything lands: every create once, the last edit of each.
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        assert_stored_once(&env, MESSAGES).await;
        let chats: Vec<i64> = env
            .db
            .chats_where(&format!("application_id = {APP_ID}"))
            .await
            .iter()
            .map(|c| c.number)
            .collect();
        let want_chats: Vec<i64> = (1..=MESSAGES / CHAT_EVERY + 1).collect();
        assert_eq!(chats, want_chats, "chat numbers");
        let indexed = wait_indexed(&env.es, &rows, Duration::from_secs(60)).await;

        // The queues: work queues empty with both replicas consuming,
        // nothing dead-lettered, nothing left in a delay tier.
        env.wait_queue_consumers(&WORK_QUEUES, REPLICAS as u32, Duration::from_secs(30), POLL)
            .await;
        let e = &env;
        wait_for(
            "every work queue empty (ready 0, unacked 0)",
            Duration::from_secs(30),
            Duration::from_millis(300),
            move || async move {
                let s: Vec<_> = WORK_QUEUES.iter().map(|q| e.queue_stats(q)).collect();
                if s.iter().all(|s| matches!(s, Some((0, 0, _)))) {
                    Ok(())
                } else {
                    Err(format!("(ready, unacked, consumers) {s:?}"))
                }
            },
        )
        .await;
        env.wait_queue_empty("chat_writer.index", Duration::from_secs(30))
            .await;
        let (dead, retrying) = env.dead_and_retrying();

        // Each replica's counters add up once every batch is settled.
        let a = &addrs;
        let c = wait_for(
            "received = stored + retried + dead-lettered + parked + abandoned",
            Duration::from_secs(20),
            POLL,
            move || async move {
                let c = counters(a);
                if c.iter().flat_map(|r| r.iter()).all(QueueCounters::balanced) {
                    Ok(c)
                } else {
                    Err(format!("{c:?}"))
                }
            },
        )
        .await;
        let (parked, requeues) = (total(&c, |c| c.parked), total(&c, |c| c.requeues));
        eprintln!(
            "[quorum_delivery_limit] published {published} ({MESSAGES} creates, edits, {} \
             chats) / stored {} rows / indexed {indexed} / dead-lettered {dead} / in delay \
             tiers {retrying}; parked {parked} (per replica {:?}), MySQL requeues {requeues}, \
             abandoned {}, duplicates {}, superseded {}, retried {}; connections closed {closed:?}; \
             {:.1?}",
            MESSAGES / CHAT_EVERY,
            rows.len(),
            c.iter()
                .map(|r| r.iter().map(|q| q.parked).sum::<u64>())
                .collect::<Vec<_>>(),
            total(&c, |c| c.abandoned),
            total(&c, |c| c.duplicate),
            total(&c, |c| c.superseded),
            total(&c, |c| c.retried),
            t0.elapsed(),
        );
        assert_eq!(dead, 0, "nothing dead-lettered: {:?}", env.list_queues());
        assert_eq!(retrying, 0, "nothing left in a delay tier");
        assert!(
            requeues >= 1,
            "no replica gave its deliveries back during the outages: {c:?}"
        );
        assert!(parked > 0, "no delivery was parked: {c:?}");
        assert_eq!(
            total(&c, |c| c.dead_lettered),
            0,
            "dead-lettered counters: {c:?}"
        );
        for w in writers.iter_mut() {
            w.stop();
        }
        amqp.close().await;
    });
}

/// One create on a quorum queue with `x-delivery-limit` = 1, held by a
/// writer that cannot reach MySQL (MYSQL_REQUEUE_AFTER 1 h); the broker
/// closes the writer's connection three times. Each time the delivery
/// comes back with `x-delivery-count` 1 and the writer parks it (a fresh
/// copy, count 0), so the broker never drops it (it would at the second
/// return); when MySQL is back the row lands once.
#[test]
fn a_returned_delivery_is_parked_not_dropped() {
    const QUEUE: &str = "create_messages";
    let env = TestEnv::new("parked_not_dropped");
    smol::block_on(async {
        let amqp = seeded_with_quorum(&env, QUEUE, 1).await;
        let (mysql, mut w, addr) = env.consuming_writer_behind_proxy("64", "1h").await;
        mysql.pause();
        amqp.publish_json(
            QUEUE,
            &json!({"chat_id": CHAT_ID, "token": TOKEN, "chat_number": 1, "number": 1,
                    "body": "kept", "creator_id": 3}),
            Some(T1),
        )
        .await;
        wait_create_counters(
            &addr,
            "the writer took the create and failed to write it",
            |c| c.received == 1 && c.write_errors >= 1,
        )
        .await;
        for k in 1..=3u64 {
            let n = close_writer_connections(&env.vhost, "test: broker closes connections");
            assert!(n >= 1, "no writer connection to close");
            // Back with x-delivery-count 1: parked; the fresh copy taken.
            let c = wait_create_counters(
                &addr,
                &format!("return {k}: the delivery parked and its copy taken"),
                |c| c.parked == k && c.received == 1 + 2 * k,
            )
            .await;
            w.assert_running();
            env.wait_queue_stats(
                QUEUE,
                &format!("return {k}: the copy held by the writer"),
                Duration::from_secs(20),
                Duration::from_millis(200),
                |s| s == (0, 1, 1),
            )
            .await;
            eprintln!("[parked_not_dropped] after return {k}: {c:?}");
        }

        mysql.resume();
        let m = crate::consumers::wait_message(&env, CHAT_ID, 1).await;
        assert_eq!(m.body, b"kept");
        assert_eq!(m.creator_id, Some(3));
        assert_indexed(&env, &m).await;
        env.wait_queue_empty(QUEUE, Duration::from_secs(20)).await;
        let c = wait_create_counters(&addr, "the create counted stored", |c| c.stored == 1).await;
        eprintln!("[parked_not_dropped] final {QUEUE} counters {c:?}");
        assert_eq!(env.db.count("messages", "1 = 1").await, 1);
        assert_eq!(
            (c.received, c.stored, c.duplicate, c.parked, c.abandoned),
            (7, 1, 0, 3, 3),
            "the original and each copy taken, each return parked: {c:?}"
        );
        assert!(c.balanced(), "{c:?}");
        env.assert_nothing_dead_or_retrying();
        w.stop();
        amqp.close().await;
    });
}

/// Waits (20 s at most) until the `create_messages` counters of the writer at `addr` satisfy `ok`.
async fn wait_create_counters(
    addr: &str,
    what: &str,
    ok: impl Fn(&QueueCounters) -> bool,
) -> QueueCounters {
    wait_queue_counters(
        addr,
        "create_messages",
        what,
        Duration::from_secs(20),
        POLL,
        ok,
    )
    .await
}

/// Waits until the number of rows in `messages` satisfies `ok`; a miss also reports `show_queue`.
async fn wait_row_count(
    env: &TestEnv,
    what: &str,
    timeout: Duration,
    poll: Duration,
    ok: impl Fn(i64) -> bool,
    show_queue: Option<&str>,
) {
    let ok = &ok;
    wait_for(what, timeout, poll, move || async move {
        let rows = env.db.count("messages", "1 = 1").await;
        match show_queue {
            _ if ok(rows) => Ok(()),
            Some(q) => Err(format!("{rows} rows; {q} {:?}", env.queue_stats(q))),
            None => Err(format!("{rows} rows")),
        }
    })
    .await
}

/// Asserts that `messages` holds messages 1..=`n` of the seeded chat, each once.
async fn assert_stored_once(env: &TestEnv, n: i64) {
    let keys: Vec<(i64, i64)> = env
        .db
        .query("SELECT COUNT(*), COUNT(DISTINCT chat_id, number) FROM messages")
        .await;
    assert_eq!(keys, vec![(n, n)], "rows, distinct keys");
    assert_eq!(
        env.db.message_numbers(CHAT_ID).await,
        (1..=n).collect::<Vec<i64>>()
    );
}

/// Publishes creates `numbers` of the seeded chat on the harness's own
/// connection, each confirmed.
async fn publish_creates(env: &TestEnv, numbers: std::ops::RangeInclusive<i64>) {
    let items: Vec<Item> = numbers
        .map(|n| create_message(CHAT_ID, TOKEN, 1, n, &body_of(CHAT_ID, n)))
        .collect();
    let n = items.len();
    let published = Publisher::spawn(env, items, 0).join();
    assert_eq!(published, n);
}

/// A writer that cannot reach MySQL (MYSQL_REQUEUE_AFTER 1 h) on a quorum
/// `create_messages` with `x-delivery-limit` = 1 holds a batch of 200
/// creates; the broker closes its connections three times, 4 s apart.
/// After the first close its batches mix deliveries the broker returned
/// (`x-delivery-count` 1) with fresh ones; the returned ones are parked as
/// soon as they are taken, not when the batch is finally written, so the
/// next close, while the batch still waits for MySQL, cannot make the
/// broker drop them. When MySQL is back every create is stored once.
#[test]
fn returned_deliveries_in_a_batch_waiting_for_mysql_are_parked_at_once() {
    const QUEUE: &str = "create_messages";
    const N: i64 = 200;
    let env = TestEnv::new("returned_in_waiting_batch");
    smol::block_on(async {
        let amqp = seeded_with_quorum(&env, QUEUE, 1).await;
        let (mysql, mut w, addr) = env.consuming_writer_behind_proxy("64", "1h").await;
        mysql.pause();
        publish_creates(&env, 1..=N).await;
        let a = addr.as_str();
        wait_create_counters(a, "the writer took creates and failed to write them", |c| {
            c.received >= 1 && c.write_errors >= 1
        })
        .await;
        for k in 1..=3 {
            smol::Timer::after(Duration::from_secs(4)).await;
            w.assert_running();
            let before = QueueCounters::scrape(a, QUEUE);
            let n = close_writer_connections(&env.vhost, "test: broker closes connections");
            assert!(n >= 1, "close {k}: no writer connection to close");
            // The writer consumes again and takes deliveries again.
            env.wait_queue_consumers(&[QUEUE], 1, Duration::from_secs(20), POLL)
                .await;
            let c = wait_create_counters(
                a,
                &format!("close {k}: the writer takes deliveries again"),
                |c| c.received > before.received,
            )
            .await;
            eprintln!(
                "[returned_in_waiting_batch] after close {k}: {QUEUE} {:?}, counters {c:?}",
                env.queue_stats(QUEUE)
            );
        }
        smol::Timer::after(Duration::from_secs(2)).await;
        mysql.resume();

        let e = &env;
        let settled = wait_for(
            &format!("{N} rows and {QUEUE} empty"),
            Duration::from_secs(30),
            Duration::from_millis(300),
            move || async move {
                let rows = e.db.count("messages", "1 = 1").await;
                let q = e.queue_stats(QUEUE);
                if rows == N && matches!(q, Some((0, 0, _))) {
                    Ok(rows)
                } else {
                    Err(format!(
                        "rows {rows}; {QUEUE} (ready, unacked, consumers) {q:?}"
                    ))
                }
            },
        )
        .await;
        let c = QueueCounters::scrape(a, QUEUE);
        eprintln!("[returned_in_waiting_batch] rows {settled}; final {QUEUE} counters {c:?}");
        assert_stored_once(&env, N).await;
        assert!(c.parked >= 1, "no delivery was parked: {c:?}");
        assert_eq!(c.dead_lettered, 0, "{c:?}");
        env.assert_nothing_dead_or_retrying();
        w.stop();
        amqp.close().await;
    });
}

/// `create_messages` a quorum queue with `x-delivery-limit` = 1 and a
/// backlog of 3,000 creates; the writer (prefetch 256, indexing off) is
/// stopped with SIGTERM while it works through them. What its consumer
/// holds but has not stored is parked (logged with a count), not returned
/// by the channel's close; the few deliveries a quorum queue may still
/// send after `cancel-ok` do return, once, and are parked by the next
/// writer. A second writer stores the rest: 3,000 rows, each once. (At a
/// limit of 0 those few are dropped by the broker: see the README.)
#[test]
fn sigterm_parks_what_the_consumer_holds() {
    const QUEUE: &str = "create_messages";
    const N: i64 = 3_000;
    let env = TestEnv::new("sigterm_parks");
    smol::block_on(async {
        let amqp = seeded_with_quorum(&env, QUEUE, 1).await;
        publish_creates(&env, 1..=N).await;
        let writer = || {
            env.start_writer_at(&[
                ("ELASTICSEARCH_URL", ""),
                ("RABBITMQ_PREFETCH_COUNT", "256"),
            ])
        };
        let (mut w1, addr1) = writer();
        wait_row_count(
            &env,
            "300 rows stored",
            Duration::from_secs(30),
            Duration::from_millis(10),
            |rows| rows >= 300,
            None,
        )
        .await;
        let c1_before = QueueCounters::scrape(&addr1, QUEUE);
        let exit = w1.stop();
        let rows_at_stop = env.db.count("messages", "1 = 1").await;
        eprintln!(
            "[sigterm_parks] SIGTERM at {} stored (counters {c1_before:?}), exit {exit:?}; \
             {rows_at_stop} rows after",
            c1_before.stored
        );
        assert!(
            rows_at_stop < N,
            "the writer stored all {N} before SIGTERM: nothing was held at the stop"
        );
        let log = w1.log();
        assert!(
            !log.contains("they return to the queue with the channel"),
            "the first writer could not park what it held:\n{}",
            w1.log_tail(40)
        );
        let parked_at_stop: u64 = log
            .lines()
            .filter_map(|l| l.split("shutdown: parked ").nth(1))
            .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(
            parked_at_stop >= 1,
            "the first writer parked nothing at SIGTERM:\n{}",
            w1.log_tail(40)
        );

        let (mut w2, addr2) = writer();
        wait_row_count(
            &env,
            &format!("{N} rows"),
            Duration::from_secs(40),
            Duration::from_millis(200),
            |rows| rows >= N,
            Some(QUEUE),
        )
        .await;
        env.wait_queue_stats(
            QUEUE,
            &format!("{QUEUE} empty (ready 0, unacked 0)"),
            Duration::from_secs(20),
            Duration::from_millis(200),
            |(ready, unacked, _)| ready == 0 && unacked == 0,
        )
        .await;
        let c2 = QueueCounters::scrape(&addr2, QUEUE);
        eprintln!("[sigterm_parks] second writer {QUEUE} counters {c2:?}");
        assert_stored_once(&env, N).await;
        env.assert_nothing_dead_or_retrying();
        assert_eq!(c2.dead_lettered, 0, "{c2:?}");
        w2.stop();
        amqp.close().await;
    });
}

/// The index queue `chat_writer.index` a quorum queue with
/// `x-delivery-limit` = 0; Elasticsearch unreachable (a proxy, paused)
/// while 30 creates are stored, so the indexer holds their index messages.
/// On SIGTERM the indexer parks them instead of letting the channel's
/// close return them (the broker would drop them); with Elasticsearch
/// back, the next writer indexes all 30 documents.
#[test]
fn sigterm_parks_index_messages_at_a_delivery_limit_of_0() {
    const INDEX_QUEUE: &str = "chat_writer.index";
    const N: i64 = 30;
    let env = TestEnv::new("sigterm_index_limit_0");
    smol::block_on(async {
        let amqp = seeded_with_quorum(&env, INDEX_QUEUE, 0).await;
        amqp.declare_work_queues().await;
        let es = Proxy::start(
            env.es_url
                .trim_start_matches("http://")
                .parse::<std::net::SocketAddr>()
                .expect("ES address"),
        );
        let es_url = format!("http://127.0.0.1:{}", es.port);
        let writer = || env.start_writer(&[("ELASTICSEARCH_URL", es_url.as_str())]);
        let mut w1 = writer();
        env.wait_consuming(&mut w1).await;
        let e = &env;
        wait_until(
            "index created and backfilled",
            Duration::from_secs(20),
            POLL,
            move || async move { e.es.backfilled().await == Some(true) },
        )
        .await;

        es.pause();
        publish_creates(&env, 1..=N).await;
        wait_row_count(
            &env,
            &format!("{N} rows"),
            Duration::from_secs(20),
            POLL,
            |rows| rows == N,
            None,
        )
        .await;
        let (_, held, _) = env
            .wait_queue_stats(
                INDEX_QUEUE,
                "the indexer holds the index messages",
                Duration::from_secs(20),
                POLL,
                |(ready, unacked, consumers)| ready == 0 && unacked >= 1 && consumers == 1,
            )
            .await;
        w1.stop();
        eprintln!("[sigterm_index_limit_0] {held} index message(s) held at SIGTERM");
        assert_eq!(
            env.es.count().await,
            Some(0),
            "documents indexed while Elasticsearch was cut"
        );

        es.resume();
        let mut w2 = writer();
        let rows = crate::common::load::all_messages(&env).await;
        assert_eq!(rows.len(), N as usize);
        let indexed = wait_indexed(&env.es, &rows, Duration::from_secs(30)).await;
        assert_eq!(indexed, N as usize);
        assert_eq!(env.es.count().await, Some(N as u64));
        env.wait_queue_empty(INDEX_QUEUE, Duration::from_secs(20))
            .await;
        env.assert_nothing_dead_or_retrying();
        w2.stop();
        amqp.close().await;
    });
}
