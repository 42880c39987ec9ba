//! Several writers at once: three writer processes on the same
//! database, vhost, Redis DB and index drain ONE backlog of 30,000 creates
//! (six chats of two applications) and 3,000 edits of them, with Redis
//! counters and change sets set the way the API sets them.
//!
//! What it proves, exactly:
//! - every message row exists once (30,000 rows, 30,000 distinct
//!   `(chat_id, number)`), with the edited body where an edit was published;
//! - every document is indexed with its row's version and `_source`
//!   (`_count` = 30,000), the index queue drained, nothing dead-lettered or
//!   left in a retry queue;
//! - the broker shared the work: each replica's own `/metrics` shows a real
//!   share of the stored creates, and over the replicas
//!   `stored - duplicate` is exactly 30,000 creates and `stored` exactly
//!   3,000 edits; per replica `received = stored + retried + dead-lettered`;
//! - the count sync is safe with N replicas: every count equals its counter,
//!   each count row was raised exactly once over all replicas (8 rows: six
//!   chats, two applications), every replica ran syncs, and a counter set
//!   lower in Redis (and marked) never lowers a stored count;
//! - each replica exits 0 on SIGTERM.

use std::time::{Duration, Instant};

use crate::common::load::{
    body_of, compare_rows, create_message, update_message, wait_indexed, Expected, Item, Publisher,
};
use crate::common::metrics::{scrape, Metrics};
use crate::common::{free_port, wait_for, wait_until, TestEnv, Writer, WORK_QUEUES};

/// The two applications: (id, token).
const APPS: [(i64, &str); 2] = [(7, "app_x"), (8, "app_y")];
/// Chats per application (numbers 1..=3).
const CHATS_PER_APP: i64 = 3;
/// Messages per chat: 6 chats x 5,000 = 30,000.
const PER_CHAT: i64 = 5_000;
const CREATES: i64 = 30_000;
/// Every message whose number is a multiple of EDIT_EVERY is edited once:
/// 500 per chat, 3,000 in all.
const EDIT_EVERY: i64 = 10;
const EDITS: i64 = 3_000;
const REPLICAS: usize = 3;
const POLL: Duration = Duration::from_millis(200);

/// A seeded chat: row id, application, its token and number.
#[derive(Clone, Copy)]
struct Chat {
    id: i64,
    app_id: i64,
    token: &'static str,
    number: i64,
}

/// The six chats: ids 1..=3 in app_x, 4..=6 in app_y, numbers 1..=3 in each.
fn chats() -> Vec<Chat> {
    let mut out = Vec::new();
    for (a, (app_id, token)) in APPS.into_iter().enumerate() {
        for number in 1..=CHATS_PER_APP {
            out.push(Chat {
                id: a as i64 * CHATS_PER_APP + number,
                app_id,
                token,
                number,
            });
        }
    }
    out
}

fn edited_body(chat_id: i64, number: i64) -> String {
    format!("edited: {}", body_of(chat_id, number))
}

/// The backlog in publishing order: round n creates message n of every
/// chat; after a round whose n is a multiple of EDIT_EVERY come the edits
/// of those messages (published after their creates, but on another queue,
/// so a replica may take an edit before its row exists: it is retried).
fn backlog(want: &mut Expected) -> Vec<Item> {
    let chats = chats();
    let mut items = Vec::with_capacity((CREATES + EDITS) as usize);
    for n in 1..=PER_CHAT {
        for c in &chats {
            let body = body_of(c.id, n);
            items.push(create_message(c.id, c.token, c.number, n, &body));
            want.insert((c.id, n), body);
        }
        if n % EDIT_EVERY == 0 {
            for c in &chats {
                let body = edited_body(c.id, n);
                items.push(update_message(c.id, c.token, c.number, n, &body));
                want.insert((c.id, n), body);
            }
        }
    }
    items
}

/// What one replica's `/metrics` says.
#[derive(Debug, Clone, Copy, Default)]
struct Share {
    received: [u64; 2],
    stored: [u64; 2],
    duplicate: [u64; 2],
    retried: [u64; 2],
    dead_lettered: [u64; 2],
    write_errors: [u64; 2],
    indexed: u64,
    /// Count sync runs that ended ok: (changes, reconcile).
    sync_runs: (u64, u64),
    sync_errors: u64,
    sync_rows: u64,
}

/// The two message queues, in the order of the arrays of [`Share`].
const QUEUES: [&str; 2] = ["create_messages", "update_messages"];

fn read_share(addr: &str) -> Share {
    let m: Metrics = scrape(addr);
    let get = |name: &str, labels: &[(&str, &str)]| m.must(name, labels) as u64;
    let opt = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(0.0) as u64;
    let per_queue = |name: &str| QUEUES.map(|q| get(name, &[("queue", q)]));
    let runs = |kind: &str, result: &str| {
        opt(
            "chat_writer_count_sync_runs_total",
            &[("kind", kind), ("result", result)],
        )
    };
    Share {
        received: per_queue("chat_writer_deliveries_received_total"),
        stored: per_queue("chat_writer_deliveries_stored_total"),
        duplicate: per_queue("chat_writer_deliveries_duplicate_total"),
        retried: per_queue("chat_writer_deliveries_retried_total"),
        dead_lettered: per_queue("chat_writer_deliveries_dead_lettered_total"),
        write_errors: per_queue("chat_writer_mysql_write_errors_total"),
        indexed: get("chat_writer_index_documents_total", &[]),
        sync_runs: (runs("changes", "ok"), runs("reconcile", "ok")),
        sync_errors: runs("changes", "error") + runs("reconcile", "error"),
        sync_rows: get("chat_writer_count_sync_rows_written_total", &[]),
    }
}

fn read_shares(addrs: &[String]) -> Vec<Share> {
    addrs.iter().map(|a| read_share(a)).collect()
}

/// `a / b / c` of one figure of every replica.
fn per_replica(shares: &[Share], f: impl Fn(&Share) -> u64) -> String {
    shares
        .iter()
        .map(|s| f(s).to_string())
        .collect::<Vec<_>>()
        .join(" / ")
}

fn sum(shares: &[Share], f: impl Fn(&Share) -> u64) -> u64 {
    shares.iter().map(f).sum()
}

/// Counts: `(chat id, messages_count)` of every chat, `(application id,
/// chats_count)` of every application.
type Counts = (Vec<(i64, i64)>, Vec<(i64, i64)>);

/// The stored counts of every chat and application.
async fn stored_counts(env: &TestEnv) -> Counts {
    let chats: Vec<(i64, i64)> = env
        .db
        .query("SELECT id, messages_count FROM chats ORDER BY id")
        .await;
    let apps: Vec<(i64, i64)> = env
        .db
        .query("SELECT id, chats_count FROM applications ORDER BY id")
        .await;
    (chats, apps)
}

/// What the counts must be: each chat's Redis counter, each application's.
fn expected_counts() -> Counts {
    (
        chats().iter().map(|c| (c.id, PER_CHAT)).collect(),
        APPS.iter().map(|(id, _)| (*id, CHATS_PER_APP)).collect(),
    )
}

/// Waits until the change sets are empty (a replica took every member)
/// and then until every replica has finished at least two more change
/// syncs: two sync intervals on each replica after the members were taken.
async fn wait_synced_twice(env: &TestEnv, addrs: &[String]) {
    let kv = &env.kv;
    wait_until(
        "chat_changes and message_changes taken by a replica",
        Duration::from_secs(10),
        Duration::from_millis(50),
        move || async move {
            kv.smembers("chat_changes").await.is_empty()
                && kv.smembers("message_changes").await.is_empty()
        },
    )
    .await;
    let before: Vec<u64> = read_shares(addrs).iter().map(|s| s.sync_runs.0).collect();
    let before = &before;
    wait_for(
        "two more count syncs on every replica",
        Duration::from_secs(10),
        Duration::from_millis(50),
        move || async move {
            let now: Vec<u64> = read_shares(addrs).iter().map(|s| s.sync_runs.0).collect();
            if now.iter().zip(before).all(|(n, b)| *n >= b + 2) {
                Ok(())
            } else {
                Err(format!("change syncs {before:?} -> {now:?}"))
            }
        },
    )
    .await;
}

#[test]
fn three_writers_share_one_backlog() {
    let env = TestEnv::new("replicas");
    smol::block_on(async {
        let t0 = Instant::now();
        // Application 7 "app_x" with chat 1 (id 1), then the others.
        env.migrate_and_seed().await;
        env.db.seed_app(APPS[1].0, APPS[1].1, 0).await;
        for c in chats().into_iter().filter(|c| c.id != 1) {
            env.db.seed_chat(c.id, c.app_id, c.token, c.number, 0).await;
        }
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;

        // The whole backlog first, confirmed, and the counters as the API
        // leaves them after assigning every number: one backlog for all.
        let mut want = Expected::new();
        let items = backlog(&mut want);
        assert_eq!(items.len() as i64, CREATES + EDITS);
        assert_eq!(want.len() as i64, CREATES);
        let t_pub = Instant::now();
        let published = Publisher::spawn(&env, items, 0).join();
        assert_eq!(published as i64, CREATES + EDITS);
        let publish_time = t_pub.elapsed();
        for (_, token) in APPS {
            env.kv.set_chat_counter(token, CHATS_PER_APP, true).await;
        }
        for c in chats() {
            env.kv
                .set_message_counter(c.token, c.number, PER_CHAT, true)
                .await;
        }

        // Three replicas started back to back (the same start-up work, so
        // they reach the broker within a fraction of a second of each
        // other), each with its own HTTP port. The production prefetch
        // (256). Delay tiers that double up to 16 s (31.75 s in all):
        // edits race their creates here, and an edit of a message near the
        // end of the backlog must outlast the drain even on a loaded CI
        // machine; a retry costs at most about the time it waited for.
        let addrs: Vec<String> = (0..REPLICAS)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let t_start = Instant::now();
        let mut writers: Vec<Writer> = addrs
            .iter()
            .map(|addr| {
                env.start_writer(&[
                    ("HTTP_ADDR", addr.as_str()),
                    ("RABBITMQ_PREFETCH_COUNT", "256"),
                    ("RETRY_DELAYS", "250ms,500ms,1s,2s,4s,8s,16s"),
                    ("COUNT_SYNC_INTERVAL", "200ms"),
                ])
            })
            .collect();
        // Every replica consumes every work queue (3 consumers each).
        let e = &env;
        wait_for(
            "3 consumers on every work queue",
            Duration::from_secs(30),
            POLL,
            move || async move {
                let q = e.list_queues();
                let consumers: Vec<u64> = WORK_QUEUES
                    .iter()
                    .map(|n| q.get(*n).map(|v| v.1).unwrap_or(0))
                    .collect();
                if consumers.iter().all(|c| *c == REPLICAS as u64) {
                    Ok(())
                } else {
                    Err(format!("consumers {consumers:?}"))
                }
            },
        )
        .await;
        let all_consuming = t_start.elapsed();

        // Rows: a cheap poll first (no 30,000-row reads while the replicas
        // write), then the whole comparison, body by body.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            for w in writers.iter_mut() {
                w.assert_running();
            }
            let rows = env.db.count("messages", "1 = 1").await;
            let edited = env.db.count("messages", "body LIKE 'edited: %'").await;
            if (rows, edited) == (CREATES, EDITS) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rows did not converge within 120 s: {rows} rows, {edited} edited; queues {:?}",
                env.list_queues()
            );
            smol::Timer::after(POLL).await;
        }
        let rows_time = t_start.elapsed();
        let rows = crate::common::load::all_messages(&env).await;
        if let Err(e) = compare_rows(&rows, &want) {
            panic!("rows: {e}");
        }
        let keys: Vec<(i64, i64)> = env
            .db
            .query("SELECT COUNT(*), COUNT(DISTINCT chat_id, number) FROM messages")
            .await;
        assert_eq!(keys, vec![(CREATES, CREATES)], "rows, distinct keys");
        let edited_moved = rows
            .iter()
            .filter(|r| r.number % EDIT_EVERY == 0 && r.updated_us > r.created_us)
            .count() as i64;
        assert_eq!(edited_moved, EDITS, "every edit moved updated_at");

        // Documents: `_count` first, then every document exactly (version =
        // updated_at µs, whole `_source`, so the edited body). They land
        // well after the rows: the index is created by the first replica's
        // watch a second or two in, and each replica then asks for its own
        // backfill of the new index (three cursors, three passes), so the
        // replicas index about three times the 33,000 documents needed.
        let es = &env.es;
        wait_for(
            "_count = 30,000",
            Duration::from_secs(120),
            Duration::from_millis(500),
            move || async move {
                match es.count().await {
                    Some(n) if n == CREATES as u64 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        let indexed = wait_indexed(&env.es, &rows, Duration::from_secs(60)).await;
        assert_eq!(indexed as i64, CREATES);
        let index_time = t_start.elapsed();
        env.wait_queue_empty("chat_writer.index", Duration::from_secs(30))
            .await;
        for q in WORK_QUEUES {
            env.wait_queue_empty(q, Duration::from_secs(30)).await;
        }
        assert_eq!(
            env.dead_and_retrying(),
            (0, 0),
            "nothing in a .dlq, nothing left in a retry queue: {:?}",
            env.list_queues()
        );
        assert_eq!(es.count().await, Some(CREATES as u64), "no extra document");

        // Counts: every count equals its counter.
        let want_counts = expected_counts();
        let want_counts = &want_counts;
        wait_for(
            "every count equals its Redis counter",
            Duration::from_secs(20),
            POLL,
            move || async move {
                let got = stored_counts(e).await;
                if &got == want_counts {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .await;

        // Each replica's own figures. A batch is counted when it is settled
        // (after its commit), so wait until the sums are complete.
        let a = &addrs;
        let shares = wait_for(
            "the replicas' metrics to add up",
            Duration::from_secs(20),
            POLL,
            move || async move {
                let s = read_shares(a);
                let creates = sum(&s, |s| s.stored[0]) - sum(&s, |s| s.duplicate[0]);
                let edits = sum(&s, |s| s.stored[1]);
                if (creates, edits) == (CREATES as u64, EDITS as u64) {
                    Ok(s)
                } else {
                    Err(format!(
                        "creates stored - duplicate {creates}, edits stored {edits}"
                    ))
                }
            },
        )
        .await;
        eprintln!(
            "[replicas] published {published} ({CREATES} creates + {EDITS} edits) in {:.1?}; \
             3 replicas seen consuming after {all_consuming:.1?}; rows after {rows_time:.1?}, \
             documents after {index_time:.1?}",
            publish_time
        );
        eprintln!(
            "[replicas] shares create_messages stored: {} (received {}; duplicate {}); \
             updates stored: {} (received {}; retried {}); documents indexed: {}; \
             MySQL write errors retried: {}; count sync rows: {}; count sync runs \
             changes/reconcile: {}; failed count syncs: {}",
            per_replica(&shares, |s| s.stored[0]),
            per_replica(&shares, |s| s.received[0]),
            per_replica(&shares, |s| s.duplicate[0]),
            per_replica(&shares, |s| s.stored[1]),
            per_replica(&shares, |s| s.received[1]),
            per_replica(&shares, |s| s.retried[1]),
            per_replica(&shares, |s| s.indexed),
            per_replica(&shares, |s| s.write_errors[0] + s.write_errors[1]),
            per_replica(&shares, |s| s.sync_rows),
            shares
                .iter()
                .map(|s| format!("{}/{}", s.sync_runs.0, s.sync_runs.1))
                .collect::<Vec<_>>()
                .join(" ; "),
            per_replica(&shares, |s| s.sync_errors),
        );
        assert!(
            sum(&shares, |s| s.indexed) >= (CREATES + EDITS) as u64,
            "every create and every edit indexed at least once: {shares:?}"
        );
        for (k, s) in shares.iter().enumerate() {
            for (q, name) in QUEUES.iter().enumerate() {
                assert_eq!(
                    s.received[q],
                    s.stored[q] + s.retried[q] + s.dead_lettered[q],
                    "replica {k} {name}: received = stored + retried + dead-lettered ({s:?})"
                );
                assert_eq!(s.dead_lettered[q], 0, "replica {k} {name}");
            }
            assert_eq!(s.retried[0], 0, "replica {k}: every create's chat exists");
            // A real share. With the production prefetch each replica holds
            // at most 256 unacked deliveries and the broker hands the rest
            // round-robin to whoever has room, so the shares follow how fast
            // each replica writes; a replica that connects later only misses
            // what the others drained before (measured: a fraction of a
            // second). 10% (a third of a fair share) is far above "it
            // merely connected" (one prefetch is <1%) yet leaves room for a
            // replica slowed by a busy CI machine.
            assert!(
                s.stored[0] * 10 >= CREATES as u64,
                "replica {k} stored only {} of {CREATES} creates: {shares:?}",
                s.stored[0]
            );
            assert!(
                s.sync_runs.0 >= 1 && s.sync_runs.1 >= 1,
                "replica {k} ran both kinds of count sync: {s:?}"
            );
        }
        // Counters were final before any replica started, so each of the 8
        // count rows (6 chats, 2 applications) was raised exactly once, by
        // whichever replica synced it first; the others found it equal
        // (`WHERE count < new`) and wrote nothing.
        assert_eq!(
            sum(&shares, |s| s.sync_rows),
            8,
            "count rows written over all replicas: {shares:?}"
        );

        // Counts never go down: counters set lower in Redis (a stale value)
        // and marked; some replica takes each member, and every replica
        // syncs twice more; the stored counts stay.
        let (low_chat, low_app) = (chats()[0], APPS[1]);
        env.kv
            .set_message_counter(low_chat.token, low_chat.number, 1_234, true)
            .await;
        env.kv.set_chat_counter(low_app.1, 1, true).await;
        wait_synced_twice(&env, &addrs).await;
        assert_eq!(
            &stored_counts(&env).await,
            want_counts,
            "a lower counter lowered a stored count"
        );
        let after_low = read_shares(&addrs);
        assert_eq!(
            sum(&after_low, |s| s.sync_rows),
            8,
            "a lower counter wrote a count row"
        );
        eprintln!(
            "[replicas] after setting 2 counters lower: count sync rows {}; runs \
             changes/reconcile {}",
            per_replica(&after_low, |s| s.sync_rows),
            after_low
                .iter()
                .map(|s| format!("{}/{}", s.sync_runs.0, s.sync_runs.1))
                .collect::<Vec<_>>()
                .join(" ; "),
        );
        // The counters back to the truth for the final syncs at shutdown.
        env.kv
            .set_message_counter(low_chat.token, low_chat.number, PER_CHAT, true)
            .await;
        env.kv
            .set_chat_counter(low_app.1, CHATS_PER_APP, true)
            .await;

        // SIGTERM to all three at once; each exits 0 (polled together, so
        // each exit time is measured from the signal).
        for w in &mut writers {
            w.assert_running();
            w.sigterm();
        }
        let t_term = Instant::now();
        let mut exits: Vec<Option<Duration>> = vec![None; REPLICAS];
        while exits.iter().any(Option::is_none) {
            for (k, w) in writers.iter_mut().enumerate() {
                if exits[k].is_some() {
                    continue;
                }
                if let Some(exit) = w.try_exit() {
                    assert_eq!(
                        exit.code,
                        Some(0),
                        "replica {k} should exit 0 after SIGTERM, got {exit:?}\n{}",
                        w.log_tail(60)
                    );
                    exits[k] = Some(t_term.elapsed());
                }
            }
            assert!(
                t_term.elapsed() < Duration::from_secs(25),
                "not every replica exited within 25 s of SIGTERM: {exits:?}"
            );
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        let exits: Vec<Duration> = exits.into_iter().flatten().collect();
        assert_eq!(
            &stored_counts(&env).await,
            want_counts,
            "counts after the final syncs"
        );
        // A failed count sync is allowed only as a lock conflict (its
        // members go back and the next run writes them): with several
        // replicas the count UPDATE on `chats` meets other replicas'
        // message INSERTs, whose foreign-key checks hold shared locks on
        // the same chat rows.
        for (k, w) in writers.iter().enumerate() {
            let log = w.log();
            let failed: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("count sync failed") || l.contains("count reconcile failed"))
                .collect();
            let other: Vec<&&str> = failed
                .iter()
                .filter(|l| !(l.contains("ERROR 1213") || l.contains("ERROR 1205")))
                .collect();
            assert!(
                other.is_empty(),
                "replica {k}: a count sync failed for another reason than a lock conflict: \
                 {other:?}"
            );
        }
        eprintln!(
            "[replicas] stopped, exit 0 after {exits:.1?}; whole test {:.1?}",
            t0.elapsed()
        );
        amqp.close().await;
    });
}

/// A message of the seeded chat (`crate::common::CHAT_ID`, chat number 1).
fn seeded_chat_message(number: i64) -> serde_json::Value {
    serde_json::json!({"chat_id": crate::common::CHAT_ID, "token": crate::common::TOKEN,
        "chat_number": 1, "number": number, "body": format!("body {number}")})
}

/// A replica that cannot reach MySQL does not sit on the deliveries it
/// took: after MYSQL_REQUEUE_AFTER (2 s here) of failed writes it gives
/// every one back to the queue and stops consuming that queue, so another
/// replica stores them while the first is still cut off; when MySQL
/// answers again it consumes again and takes a share.
///
/// Exactly: replica A (MySQL behind a paused proxy) stores nothing,
/// requeues once, and every delivery it received is counted parked (given
/// back as a republished copy; `received = stored + retried +
/// dead_lettered + parked + abandoned` with stored = 0); replica B, started after A paused, stores all 200; A's
/// `/readyz` is 503 while cut off and 200 after; then 200 more messages
/// are shared (A stores some); 400 rows, each once; nothing dead-lettered.
#[test]
fn a_replica_without_mysql_gives_its_deliveries_to_the_others() {
    use crate::common::faults::Proxy;
    use crate::common::metrics::http_get;
    let env = TestEnv::new("replicas_requeue");
    smol::block_on(async {
        const WAIT: Duration = Duration::from_secs(30);
        env.migrate_and_seed().await;
        let mysql = Proxy::start("127.0.0.1:3306".parse().expect("address"));
        let mysql_port = mysql.port.to_string();
        let (addr_a, addr_b) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut a = env.start_writer(&[
            ("HTTP_ADDR", addr_a.as_str()),
            ("DATABASE_PORT", mysql_port.as_str()),
            ("MYSQL_REQUEUE_AFTER", "2s"),
            ("RABBITMQ_PREFETCH_COUNT", "256"),
        ]);
        env.wait_consuming(&mut a).await;
        let cm = [("queue", "create_messages")];
        let (aa, ab) = (addr_a.as_str(), addr_b.as_str());

        // A alone, MySQL gone: it takes the messages, fails, gives them back.
        mysql.pause();
        for n in 1..=200 {
            amqp.publish_json(
                "create_messages",
                &seeded_chat_message(n),
                Some(crate::consumers::T1),
            )
            .await;
        }
        wait_until(
            "replica A gave its deliveries back and paused",
            WAIT,
            POLL,
            move || async move {
                let m = scrape(aa);
                m.value("chat_writer_mysql_requeues_total", &cm) == Some(1.0)
                    && m.value("chat_writer_consumers_paused", &[]) == Some(1.0)
            },
        )
        .await;
        let e = &env;
        wait_for(
            "all 200 ready again, no consumer on create_messages",
            WAIT,
            POLL,
            move || async move {
                match e.queue_stats("create_messages") {
                    Some((200, 0, 0)) => Ok(()),
                    other => Err(format!("(ready, unacked, consumers) {other:?}")),
                }
            },
        )
        .await;
        let (status, _, body) = http_get(aa, "/readyz").expect("GET /readyz");
        assert_eq!(status, 503, "replica A /readyz while cut off: {body}");

        // B takes all of them while A is still cut off.
        let mut b = env.start_writer(&[
            ("HTTP_ADDR", addr_b.as_str()),
            ("RABBITMQ_PREFETCH_COUNT", "256"),
        ]);
        wait_until("200 rows stored by B", WAIT, POLL, move || async move {
            e.db.count("messages", "1 = 1").await == 200
        })
        .await;
        wait_until("B counted 200 stored", WAIT, POLL, move || async move {
            scrape(ab).value("chat_writer_deliveries_stored_total", &cm) == Some(200.0)
        })
        .await;
        let m = scrape(aa);
        let got = |name: &str| m.must(name, &cm);
        assert_eq!(
            got("chat_writer_deliveries_stored_total"),
            0.0,
            "{}",
            m.text
        );
        assert_eq!(got("chat_writer_mysql_requeues_total"), 1.0, "{}", m.text);
        let received = got("chat_writer_deliveries_received_total");
        assert!((1.0..=200.0).contains(&received), "{}", m.text);
        assert_eq!(
            got("chat_writer_deliveries_parked_total"),
            received,
            "{}",
            m.text
        );
        assert_eq!(
            got("chat_writer_deliveries_abandoned_total"),
            0.0,
            "{}",
            m.text
        );

        // A broker reconnect while A is paused: the paused consumer's task
        // is cancelled with its connection, and its pause must go with it
        // (else `consumers_paused` stays 1 and /readyz 503 for good).
        assert!(crate::common::faults::close_writer_connections(&env.vhost, "test") >= 2);

        // MySQL back: A consumes again and takes a share of new work.
        mysql.resume();
        wait_for(
            "A consuming again (2 consumers on create_messages)",
            WAIT,
            POLL,
            move || async move {
                match e.queue_stats("create_messages") {
                    Some((_, _, 2)) => Ok(()),
                    other => Err(format!("(ready, unacked, consumers) {other:?}")),
                }
            },
        )
        .await;
        wait_until("A ready again", WAIT, POLL, move || async move {
            http_get(aa, "/readyz").is_ok_and(|(s, _, _)| s == 200)
        })
        .await;
        for n in 201..=400 {
            amqp.publish_json(
                "create_messages",
                &seeded_chat_message(n),
                Some(crate::consumers::T1),
            )
            .await;
        }
        wait_until("400 rows", WAIT, POLL, move || async move {
            e.db.count("messages", "1 = 1").await == 400
        })
        .await;
        assert_eq!(
            env.db
                .count(
                    "messages",
                    &format!(
                        "chat_id = {} AND number BETWEEN 1 AND 400",
                        crate::common::CHAT_ID
                    )
                )
                .await,
            400
        );
        // A batch's rows are committed before it is settled and counted.
        wait_until("400 stored over A and B", WAIT, POLL, move || async move {
            let stored = |a: &str| scrape(a).value("chat_writer_deliveries_stored_total", &cm);
            matches!((stored(aa), stored(ab)), (Some(x), Some(y)) if x + y == 400.0)
        })
        .await;
        let (sa, sb) = (scrape(aa), scrape(ab));
        let stored_a = sa.must("chat_writer_deliveries_stored_total", &cm);
        let stored_b = sb.must("chat_writer_deliveries_stored_total", &cm);
        assert!(
            stored_a >= 1.0,
            "A took no share after MySQL came back:\n{}",
            sa.text
        );
        assert_eq!(stored_a + stored_b, 400.0, "{}\n{}", sa.text, sb.text);
        assert_eq!(sa.must("chat_writer_consumers_paused", &[]), 0.0);
        for s in [&sa, &sb] {
            assert_eq!(
                s.must("chat_writer_deliveries_dead_lettered_total", &cm),
                0.0
            );
        }
        assert_eq!(env.queue_stats("create_messages.dlq").map(|s| s.0), Some(0));
        assert_eq!(a.stop().code, Some(0));
        assert_eq!(b.stop().code, Some(0));
        amqp.close().await;
    });
}

/// Three writers started together on a database of 3,000 messages and a
/// missing index: one creates the index and requests its backfill; the
/// others see it claimed (`_meta.chat_writer.backfill_claimed_us`) and
/// leave it, so every existing row is queued and indexed exactly once over
/// all replicas (not once per replica), and the index ends marked
/// backfilled.
#[test]
fn three_writers_backfill_a_new_index_once() {
    const ROWS: i64 = 3_000;
    let env = TestEnv::new("replicas_backfill");
    smol::block_on(async {
        const WAIT: Duration = Duration::from_secs(60);
        env.migrate_and_seed().await;
        let values: Vec<String> = (1..=ROWS)
            .map(|n| {
                format!(
                    "({}, '{}', 1, {n}, 'old body {n}', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                    crate::common::CHAT_ID,
                    crate::common::TOKEN
                )
            })
            .collect();
        env.db
            .exec(&format!(
                "INSERT INTO messages (chat_id, token, chat_number, number, body, created_at, updated_at) VALUES {}",
                values.join(",")
            ))
            .await;
        let addrs: Vec<String> = (0..REPLICAS)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut writers: Vec<Writer> = addrs
            .iter()
            .map(|a| env.start_writer(&[("HTTP_ADDR", a.as_str())]))
            .collect();
        let es = &env.es;
        let e = &env;
        wait_for(
            "3,000 documents, the index marked backfilled, the queues drained",
            WAIT,
            POLL,
            move || async move {
                let (count, marked) = (es.count().await, es.backfilled().await);
                let q = e.list_queues();
                let depth = |n: &str| q.get(n).map(|v| v.0);
                let state = (
                    count,
                    marked,
                    depth("chat_writer.index"),
                    depth("chat_writer.backfill"),
                );
                if state == (Some(ROWS as u64), Some(true), Some(0), Some(0)) {
                    Ok(())
                } else {
                    Err(format!(
                        "(documents, marked, index queue, backfill queue) {state:?}"
                    ))
                }
            },
        )
        .await;
        let indexed: Vec<f64> = addrs
            .iter()
            .map(|a| scrape(a).must("chat_writer_index_documents_total", &[]))
            .collect();
        let logs: Vec<String> = writers.iter().map(|w| w.log()).collect();
        let lines = |needle: &str| -> usize {
            logs.iter()
                .map(|l| l.lines().filter(|x| x.contains(needle)).count())
                .sum()
        };
        eprintln!(
            "[replicas_backfill] documents indexed per replica {indexed:?}; requests {}",
            lines("backfill: requested")
        );
        assert_eq!(indexed.iter().sum::<f64>(), ROWS as f64, "{indexed:?}");
        assert_eq!(lines("backfill: requested"), 1, "{logs:#?}");
        assert_eq!(
            lines(&format!("backfill: done, {ROWS} documents queued")),
            1,
            "{logs:#?}"
        );
        assert_eq!(lines("backfill: done"), 1, "{logs:#?}");

        // The index is replaced under the running replicas by one whose
        // creator claimed the backfill 55 s ago and died before queuing it:
        // once the claim is stale (60 s), a replica that had settled the
        // old index takes it over; the index converges with no restart.
        // First every replica's idle check (every 3 s) sees the first index
        // marked, so each has settled it.
        smol::Timer::after(Duration::from_secs(4)).await;
        es.delete_index();
        let claimed_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_micros() as i64
            - 55_000_000;
        let mapping = serde_json::json!({"mappings": {
            "_meta": {"chat_writer": {"backfilled": false, "backfill_claimed_us": claimed_us}},
            "properties": {"token": {"type": "keyword"}, "chat_number": {"type": "integer"},
                "number": {"type": "integer"}, "body": {"type": "text"},
                "created_at": {"type": "date"}}}});
        let (status, _) = es
            .req("PUT", &format!("/{}", es.index), Some(mapping.to_string()))
            .await;
        assert_eq!(status, 200);
        wait_for(
            "the replaced index backfilled after its claim went stale",
            WAIT,
            POLL,
            move || async move {
                let (count, marked) = (es.count().await, es.backfilled().await);
                if (count, marked) == (Some(ROWS as u64), Some(true)) {
                    Ok(())
                } else {
                    Err(format!("(documents, marked) {:?}", (count, marked)))
                }
            },
        )
        .await;
        let logs: Vec<String> = writers.iter().map(|w| w.log()).collect();
        let requested: usize = logs
            .iter()
            .map(|l| l.matches("backfill: requested").count())
            .sum();
        assert_eq!(requested, 2, "{logs:#?}");
        for w in writers.iter_mut() {
            assert_eq!(w.stop().code, Some(0));
        }
    });
}
