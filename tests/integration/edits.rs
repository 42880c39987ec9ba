//! The order of edits (`update_messages`): every edit has an edit version
//! (the `x-edit-version` header, else the time the writer received it,
//! moved into the second of the AMQP `timestamp`), the row keeps the
//! version of the edit it holds (`messages.edit_version`), and an edit
//! older than the row's is superseded: acked, counted, nothing written.
//!
//! Each test makes an older edit reach the writer after a newer one was
//! applied, the way it happens in production: it waited in a delay tier
//! (its row did not exist yet), it was redelivered after a writer died
//! holding it, or a replica without MySQL gave it back. The row and its
//! document end with the newer edit; the older one is counted superseded.

use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

use crate::common::faults::Proxy;
use crate::common::metrics::QueueCounters;
use crate::common::time::now_us;
use crate::common::{
    assert_indexed, check_dead_letter, free_port, wait_for, wait_until, MessageRow, TestEnv,
    CHAT_ID, TOKEN,
};
use crate::consumers::T1;

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);
const UPDATES: &str = "update_messages";

/// A `create_messages` payload of message `number` of the seeded chat.
fn create(number: i64, body: &str) -> serde_json::Value {
    json!({"chat_id": CHAT_ID, "token": TOKEN, "chat_number": 1, "number": number,
           "body": body, "creator_id": 4})
}

/// An `update_messages` payload of message `number` of the seeded chat.
fn edit(number: i64, body: &str) -> serde_json::Value {
    json!({"chat_id": CHAT_ID, "token": TOKEN, "chat_number": 1, "number": number,
           "body": body})
}

/// Headers holding `x-edit-version` = `v`.
fn version_header(v: AMQPValue) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("x-edit-version".into(), v);
    h
}

/// Waits until message `number` of the seeded chat holds `body`.
async fn wait_body(env: &TestEnv, number: i64, body: &str) -> MessageRow {
    wait_for(
        &format!("message {number} holds {body:?}"),
        WAIT,
        POLL,
        move || async move {
            match env.db.message(CHAT_ID, number).await {
                Some(m) if m.body == body.as_bytes() => Ok(m),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

async fn edit_version(env: &TestEnv, number: i64) -> i64 {
    env.db
        .edit_version(CHAT_ID, number)
        .await
        .unwrap_or_else(|| panic!("no row for message {number}"))
}

/// Waits until the writer at `addr` counts `n` superseded updates.
async fn wait_superseded(addr: &str, n: u64) -> QueueCounters {
    wait_for(
        &format!("{n} superseded update(s) on {addr}"),
        WAIT,
        POLL,
        move || async move {
            let c = QueueCounters::scrape(addr, UPDATES);
            if c.superseded == n {
                Ok(c)
            } else {
                Err(format!("{c:?}"))
            }
        },
    )
    .await
}

/// Waits until the `update_messages` counters of the writer at `addr`
/// satisfy `ok`.
async fn wait_counters(
    addr: &str,
    what: &str,
    ok: impl Fn(&QueueCounters) -> bool,
) -> QueueCounters {
    let ok = &ok;
    wait_for(what, WAIT, POLL, move || async move {
        let c = QueueCounters::scrape(addr, UPDATES);
        if ok(&c) {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await
}

/// Waits until `queue` has `n` consumers (a passive declare: fast).
async fn wait_consumers(env: &TestEnv, queue: &str, n: u32) {
    let amqp = env.amqp().await;
    let a = &amqp;
    wait_for(
        &format!("{n} consumer(s) on {queue}"),
        WAIT,
        POLL,
        move || async move {
            match a.queue_info(queue).await {
                Some((_, c)) if c == n => Ok(()),
                other => Err(format!("(ready, consumers) {other:?}")),
            }
        },
    )
    .await;
    amqp.close().await;
}

/// Waits until `queue` has no ready message and `unacked` unacked ones.
async fn wait_held(env: &TestEnv, queue: &str, unacked: u64) {
    wait_for(
        &format!("{unacked} unacked delivery(ies) held from {queue}"),
        WAIT,
        POLL,
        move || async move {
            match env.queue_stats(queue) {
                Some((0, u, _)) if u == unacked => Ok(()),
                other => Err(format!("(ready, unacked, consumers) {other:?}")),
            }
        },
    )
    .await
}

/// Nothing in a `.dlq`, nothing left in a delay tier.
fn assert_nothing_dead_or_retrying(env: &TestEnv) {
    assert_eq!(
        env.dead_and_retrying(),
        (0, 0),
        "(dead letters, in delay tiers): queues {:?}",
        env.list_queues()
    );
}

/// The version `v` of the `x-edit-version` header of the one message in
/// `queue` (read without taking it).
async fn peek_version(env: &TestEnv, queue: &str) -> i64 {
    let amqp = env.amqp().await;
    let got = amqp.peek_all(queue).await;
    amqp.close().await;
    assert_eq!(got.len(), 1, "{queue}: {got:?}");
    got[0].header_int("x-edit-version").unwrap_or_else(|| {
        panic!(
            "the copy in {queue} carries no integer x-edit-version: {:?}",
            got[0].headers
        )
    })
}

/// `stamp` moved into the second `ts`, as the writer versions an edit
/// without `x-edit-version` whose AMQP timestamp is `ts`.
fn clamp_into(stamp: i64, ts: u64) -> i64 {
    let start = ts as i64 * 1_000_000;
    stamp.clamp(start, start + 999_999)
}

/// Edit A of a message is published before its create: it finds no row and
/// waits in the delay tiers (1 s, then 4 s). Meanwhile the create lands and
/// edit B is applied. When A comes back from the 4 s tier it carries the
/// version of its first receipt (older than B's): superseded, the row and
/// its document keep B.
#[test]
fn an_older_edit_from_a_delay_tier_does_not_overwrite_a_newer_one() {
    let env = TestEnv::new("edit_from_delay_tier");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[("HTTP_ADDR", addr.as_str()), ("RETRY_DELAYS", "1s,4s,8s")]);
        env.wait_consuming(&mut w).await;

        let t_a = now_us();
        amqp.publish_json(UPDATES, &edit(1, "edit A"), None).await;
        // A went through the 1 s tier and waits in the 4 s tier.
        let c = wait_counters(&addr, "A sent to the 4 s tier", |c| c.retried == 2).await;
        assert_eq!((c.received, c.stored), (2, 0), "{c:?}");
        let a_version = peek_version(&env, "update_messages.retry.4s").await;
        assert!(
            a_version >= t_a && a_version <= now_us(),
            "A's version {a_version} is the time of its first receipt ({t_a}..)"
        );

        amqp.publish_json("create_messages", &create(1, "the original"), Some(T1))
            .await;
        wait_body(&env, 1, "the original").await;
        let t_b = now_us();
        amqp.publish_json(UPDATES, &edit(1, "edit B"), None).await;
        let row_b = wait_body(&env, 1, "edit B").await;
        let b_version = edit_version(&env, 1).await;
        let c = QueueCounters::scrape(&addr, UPDATES);
        assert!(
            c.received == 3 && c.superseded == 0,
            "A should still wait in the 4 s tier when B is applied (a slow machine?): {c:?}"
        );
        assert!(
            b_version >= t_b && b_version > a_version,
            "B's version {b_version} (received after {t_b}) is newer than A's {a_version}"
        );

        // A comes back from the 4 s tier and is superseded.
        let c = wait_superseded(&addr, 1).await;
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        eprintln!(
            "[edit_from_delay_tier] A version {a_version}, B version {b_version}; \
             update_messages counters {c:?}"
        );
        assert_eq!(row, row_b, "the superseded edit changed the row");
        assert_eq!(row.body_str(), "edit B");
        assert_eq!(edit_version(&env, 1).await, b_version);
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "edit B");
        assert_eq!(
            c,
            QueueCounters {
                received: 4,
                stored: 2,
                superseded: 1,
                retried: 2,
                ..Default::default()
            },
            "A (received 3 times: at once, from each tier) and B"
        );
        assert_eq!(env.db.count("messages", "1 = 1").await, 1);
        assert_nothing_dead_or_retrying(&env);
        w.stop();
        amqp.close().await;
    });
}

/// Edits A then B of a message, both published before its create, come
/// back from the delay tiers in the opposite order: A waits in the 4 s tier
/// when B is published (B goes to the 1 s tier), the create lands at once,
/// so B comes back first and is applied, and A, older, is superseded.
#[test]
fn two_edits_waiting_in_tiers_apply_in_publish_order() {
    let env = TestEnv::new("edits_in_tiers");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[("HTTP_ADDR", addr.as_str()), ("RETRY_DELAYS", "1s,4s,8s")]);
        env.wait_consuming(&mut w).await;

        amqp.publish_json(UPDATES, &edit(1, "edit A"), None).await;
        wait_counters(&addr, "A sent to the 4 s tier", |c| c.retried == 2).await;
        amqp.publish_json(UPDATES, &edit(1, "edit B"), None).await;
        wait_counters(&addr, "B sent to the 1 s tier", |c| c.retried == 3).await;
        amqp.publish_json("create_messages", &create(1, "the original"), Some(T1))
            .await;

        // B comes back after 1 s and is applied while A still waits.
        let row_b = wait_body(&env, 1, "edit B").await;
        let b_version = edit_version(&env, 1).await;
        let c = QueueCounters::scrape(&addr, UPDATES);
        assert!(
            c.received == 4 && c.superseded == 0,
            "A came back before B was applied (a slow machine?): {c:?}"
        );
        // A comes back from the 4 s tier: older than B, superseded.
        let c = wait_superseded(&addr, 1).await;
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        eprintln!("[edits_in_tiers] B version {b_version}; update_messages counters {c:?}");
        assert_eq!(row, row_b, "the superseded edit changed the row");
        assert_eq!(row.body_str(), "edit B");
        assert_eq!(edit_version(&env, 1).await, b_version);
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "edit B");
        // A: at once, from the 1 s tier, from the 4 s tier; B: at once, from
        // the 1 s tier.
        assert_eq!(
            c,
            QueueCounters {
                received: 5,
                stored: 2,
                superseded: 1,
                retried: 3,
                ..Default::default()
            }
        );
        assert_eq!(env.db.count("messages", "1 = 1").await, 1);
        assert_nothing_dead_or_retrying(&env);
        w.stop();
        amqp.close().await;
    });
}

/// Edit A (AMQP timestamp second T) is taken by writer 1, which cannot
/// reach MySQL and holds it unacked (prefetch 1). Edit B (second T + 2) is
/// applied by writer 2 meanwhile. Writer 1 is killed: the broker redelivers
/// A to writer 2, which versions it at redelivery, but within its second T:
/// older than B, superseded.
#[test]
fn an_older_edit_redelivered_after_a_restart_stays_older() {
    let env = TestEnv::new("edit_redelivered");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mysql = Proxy::start("127.0.0.1:3306".parse().expect("address"));
        let mysql_port = mysql.port.to_string();
        let (addr1, addr2) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let mut w1 = env.start_writer(&[
            ("HTTP_ADDR", addr1.as_str()),
            ("DATABASE_PORT", mysql_port.as_str()),
            ("RABBITMQ_PREFETCH_COUNT", "1"),
            ("MYSQL_REQUEUE_AFTER", "1h"),
        ]);
        env.wait_consuming(&mut w1).await;
        amqp.publish_json("create_messages", &create(1, "the original"), Some(T1))
            .await;
        let created = wait_body(&env, 1, "the original").await;
        assert_eq!(
            edit_version(&env, 1).await,
            0,
            "a created row has version 0"
        );

        // Writer 1 loses MySQL and takes A: it holds it, retrying in place.
        mysql.pause();
        let ts_a = T1 + 10;
        let ts_b = T1 + 12;
        amqp.publish_json(UPDATES, &edit(1, "edit A"), Some(ts_a))
            .await;
        wait_held(&env, UPDATES, 1).await;
        wait_counters(&addr1, "writer 1 failed to write A", |c| {
            c.received == 1 && c.write_errors >= 1
        })
        .await;

        // Writer 2 (MySQL direct) applies B while writer 1 holds A.
        let mut w2 = env.start_writer(&[("HTTP_ADDR", addr2.as_str())]);
        wait_consumers(&env, UPDATES, 2).await;
        amqp.publish_json(UPDATES, &edit(1, "edit B"), Some(ts_b))
            .await;
        let row_b = wait_body(&env, 1, "edit B").await;
        let b_version = edit_version(&env, 1).await;
        assert_eq!(
            b_version,
            clamp_into(now_us(), ts_b),
            "B's version: its receipt moved into its AMQP second"
        );
        assert!(row_b.updated_us > created.updated_us);
        assert_eq!(
            env.queue_stats(UPDATES).map(|s| s.1),
            Some(1),
            "A still held"
        );

        // Writer 1 dies holding A: A goes to writer 2, stamped now but
        // within second ts_a.
        w1.kill();
        let c2 = wait_superseded(&addr2, 1).await;
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        eprintln!(
            "[edit_redelivered] B version {b_version}; writer 2 update_messages counters {c2:?}"
        );
        assert_eq!(row, row_b, "the redelivered older edit changed the row");
        assert_eq!(row.body_str(), "edit B");
        assert_eq!(edit_version(&env, 1).await, b_version);
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "edit B");
        assert_eq!(
            (
                c2.received,
                c2.stored,
                c2.superseded,
                c2.retried,
                c2.dead_lettered
            ),
            (2, 2, 1, 0, 0),
            "{c2:?}"
        );
        env.wait_queue_empty(UPDATES, WAIT).await;
        assert_eq!(env.db.count("messages", "1 = 1").await, 1);
        assert_nothing_dead_or_retrying(&env);
        w2.stop();
        amqp.close().await;
    });
}

/// A publisher that knows its edit order sets `x-edit-version` (any AMQP
/// integer type): it is used as is. An edit with a lower version than the
/// row's is superseded, a higher one or an equal one (the later processed
/// wins a tie) is applied.
#[test]
fn publisher_edit_versions_are_used_as_is() {
    let env = TestEnv::new("edit_version_header");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[("HTTP_ADDR", addr.as_str())]);
        env.wait_consuming(&mut w).await;
        amqp.publish_json("create_messages", &create(1, "the original"), Some(T1))
            .await;
        wait_body(&env, 1, "the original").await;
        let a = addr.as_str();
        let stored = |n: u64| async move {
            wait_until(
                &format!("{n} update(s) stored"),
                WAIT,
                POLL,
                move || async move { QueueCounters::scrape(a, UPDATES).stored == n },
            )
            .await
        };
        let publish = |body: &'static str, v: AMQPValue| {
            let amqp = &amqp;
            async move {
                amqp.publish_with_headers(
                    UPDATES,
                    edit(1, body).to_string().as_bytes(),
                    Some(T1),
                    version_header(v),
                )
                .await
            }
        };

        // B, version 2,000,000: applied.
        publish("edit B", AMQPValue::LongUInt(2_000_000)).await;
        let row_b = wait_body(&env, 1, "edit B").await;
        assert_eq!(edit_version(&env, 1).await, 2_000_000);
        stored(1).await;

        // A, version 1,000,000 (older): superseded, nothing changes.
        publish("edit A", AMQPValue::LongInt(1_000_000)).await;
        let c = wait_superseded(&addr, 1).await;
        assert_eq!(c.stored, 2, "{c:?}");
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        assert_eq!(row, row_b, "an older edit changed the row");
        assert_eq!(edit_version(&env, 1).await, 2_000_000);
        assert_indexed(&env, &row).await;

        // A again, version 3,000,000 (newer): applied.
        publish("edit A again", AMQPValue::LongLongInt(3_000_000)).await;
        let row_a = wait_body(&env, 1, "edit A again").await;
        assert_eq!(edit_version(&env, 1).await, 3_000_000);
        assert!(row_a.updated_us > row_b.updated_us);
        stored(3).await;

        // The same version again: the later one wins the tie.
        publish("same version", AMQPValue::LongLongInt(3_000_000)).await;
        let row_tie = wait_body(&env, 1, "same version").await;
        assert_eq!(edit_version(&env, 1).await, 3_000_000);
        assert!(row_tie.updated_us > row_a.updated_us);
        stored(4).await;
        let doc = assert_indexed(&env, &row_tie).await;
        assert_eq!(doc["_source"]["body"], "same version");

        let c = QueueCounters::scrape(&addr, UPDATES);
        eprintln!("[edit_version_header] update_messages counters {c:?}");
        assert_eq!(
            c,
            QueueCounters {
                received: 4,
                stored: 4,
                superseded: 1,
                ..Default::default()
            }
        );
        assert_nothing_dead_or_retrying(&env);
        w.stop();
        amqp.close().await;
    });
}

/// Replica 1 cannot reach MySQL and holds edit A (prefetch 1); replica 2
/// applies the newer edit B meanwhile. After MYSQL_REQUEUE_AFTER replica 1
/// gives A back, republished with the version of its receipt
/// (`x-edit-version`), so replica 2 finds it older than B: superseded.
#[test]
fn an_edit_given_back_by_a_replica_without_mysql_is_superseded() {
    let env = TestEnv::new("edit_given_back");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mysql = Proxy::start("127.0.0.1:3306".parse().expect("address"));
        let mysql_port = mysql.port.to_string();
        let (addr1, addr2) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        // Replica 1 gives back after 6 s of failures: time for replica 2 to
        // start and apply B first.
        let mut r1 = env.start_writer(&[
            ("HTTP_ADDR", addr1.as_str()),
            ("DATABASE_PORT", mysql_port.as_str()),
            ("RABBITMQ_PREFETCH_COUNT", "1"),
            ("MYSQL_REQUEUE_AFTER", "6s"),
        ]);
        env.wait_consuming(&mut r1).await;
        amqp.publish_json("create_messages", &create(1, "the original"), Some(T1))
            .await;
        wait_body(&env, 1, "the original").await;

        mysql.pause();
        let t_a = now_us();
        amqp.publish_json(UPDATES, &edit(1, "edit A"), None).await;
        wait_counters(&addr1, "replica 1 took A and failed to write it", |c| {
            c.received == 1 && c.write_errors >= 1
        })
        .await;
        let t_held = Instant::now();

        let mut r2 = env.start_writer(&[("HTTP_ADDR", addr2.as_str())]);
        wait_consumers(&env, UPDATES, 2).await;
        amqp.publish_json(UPDATES, &edit(1, "edit B"), None).await;
        let row_b = wait_body(&env, 1, "edit B").await;
        let b_version = edit_version(&env, 1).await;
        let c1 = QueueCounters::scrape(&addr1, UPDATES);
        assert_eq!(
            c1.parked,
            0,
            "replica 1 gave A back {:.1?} after taking it, before B was applied \
             (a slow machine?): {c1:?}",
            t_held.elapsed()
        );
        assert!(b_version > t_a, "B {b_version} received after A ({t_a}..)");

        // Replica 1 gives A back; replica 2 takes it: superseded.
        let c2 = wait_superseded(&addr2, 1).await;
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        assert_eq!(row, row_b, "the given-back older edit changed the row");
        assert_eq!(row.body_str(), "edit B");
        assert_eq!(edit_version(&env, 1).await, b_version);
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "edit B");
        let c1 = QueueCounters::scrape(&addr1, UPDATES);
        eprintln!(
            "[edit_given_back] B version {b_version}; replica 1 update_messages {c1:?}; \
             replica 2 {c2:?}"
        );
        assert_eq!(
            c1,
            QueueCounters {
                received: 1,
                parked: 1,
                requeues: 1,
                write_errors: c1.write_errors,
                ..Default::default()
            },
            "replica 1 parked A (republished and acked), nothing abandoned"
        );
        assert!(c1.write_errors >= 1, "{c1:?}");
        assert_eq!(
            (c2.received, c2.stored, c2.superseded, c2.retried, c2.parked),
            (2, 2, 1, 0, 0),
            "{c2:?}"
        );
        env.wait_queue_empty(UPDATES, WAIT).await;
        assert_nothing_dead_or_retrying(&env);

        mysql.resume();
        wait_consumers(&env, UPDATES, 2).await;
        r1.stop();
        r2.stop();
        amqp.close().await;
    });
}

/// `chat-writer migrate` on a database made before `messages.edit_version`
/// existed: the column is added (BIGINT NOT NULL DEFAULT 0), the old rows
/// kept (an edited one gets its updated_at as version); a second migrate
/// changes nothing; the writer then applies an edit to an old row.
#[test]
fn migrate_adds_edit_version_to_an_existing_table() {
    let env = TestEnv::new("migrate_edit_version");
    smol::block_on(async {
        crate::common::Db::server()
            .exec(&format!(
                "CREATE DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
                env.db_name
            ))
            .await;
        for t in OLD_TABLES {
            env.db.exec(t).await;
        }
        env.db.seed_app(crate::common::APP_ID, TOKEN, 0).await;
        env.db
            .seed_chat(CHAT_ID, crate::common::APP_ID, TOKEN, 1, 1)
            .await;
        env.db
            .exec(
                "INSERT INTO messages (chat_id, token, chat_number, number, body, creator_id, \
                 created_at, updated_at) VALUES (1, 'app_x', 1, 1, 'old body', 9, \
                 '2026-01-01 00:00:00.250000', '2026-01-02 00:00:00.500000')",
            )
            .await;
        let old = env.db.message(CHAT_ID, 1).await.expect("old row");

        let columns = |env: &TestEnv| {
            let sql = format!(
                "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{}' \
                 AND TABLE_NAME = 'messages' ORDER BY ORDINAL_POSITION",
                env.db_name
            );
            let db = env.db.clone();
            async move {
                let rows: Vec<(String, String, String, Option<String>)> = db.query(&sql).await;
                rows
            }
        };
        assert!(
            !columns(&env).await.iter().any(|c| c.0 == "edit_version"),
            "the old schema has no edit_version"
        );
        env.migrate();
        let after = columns(&env).await;
        let col = after
            .iter()
            .find(|c| c.0 == "edit_version")
            .unwrap_or_else(|| panic!("no messages.edit_version after migrate: {after:?}"));
        assert!(
            col.1.starts_with("bigint"),
            "edit_version type {:?}: {after:?}",
            col.1
        );
        assert_eq!(col.2, "NO", "edit_version is NOT NULL: {col:?}");
        assert_eq!(
            col.3.as_deref().map(|d| d.trim_matches('\'')),
            Some("0"),
            "edit_version DEFAULT 0: {col:?}"
        );
        assert_eq!(
            env.db.message(CHAT_ID, 1).await.as_ref(),
            Some(&old),
            "migrate changed the old row"
        );
        // Edited before the upgrade (updated_at after created_at): its
        // version is its updated_at.
        assert_eq!(edit_version(&env, 1).await, old.updated_us);
        env.migrate();
        assert_eq!(
            columns(&env).await,
            after,
            "a second migrate changed the table"
        );

        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;
        let before = now_us();
        amqp.publish_json(UPDATES, &edit(1, "new body"), None).await;
        let row = wait_body(&env, 1, "new body").await;
        let v = edit_version(&env, 1).await;
        assert!(
            v >= before && v <= now_us(),
            "the edit's version is its receipt time: {v} not in {before}..now"
        );
        assert_eq!(
            (row.created_at.as_str(), row.creator_id, row.token.as_str()),
            (old.created_at.as_str(), old.creator_id, old.token.as_str())
        );
        assert!(row.updated_us > old.updated_us);
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "new body");
        assert_nothing_dead_or_retrying(&env);
        w.stop();
        amqp.close().await;
    });
}

/// An `x-edit-version` header that is not an integer >= 1 makes the update
/// malformed: dead-lettered at once, `x-error` naming the header, body and
/// headers kept; the row is not touched.
#[test]
fn a_malformed_edit_version_header_is_dead_lettered() {
    let env = TestEnv::new("edit_version_malformed");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let addr = format!("127.0.0.1:{}", free_port());
        // A retry would wait here, visible, instead of ending in the .dlq.
        let mut w = env.start_writer(&[("HTTP_ADDR", addr.as_str()), ("RETRY_DELAYS", "30s")]);
        env.wait_consuming(&mut w).await;
        amqp.publish_json("create_messages", &create(1, "the original"), Some(T1))
            .await;
        let created = wait_body(&env, 1, "the original").await;

        let bad: [(&str, AMQPValue); 3] = [
            ("a string", AMQPValue::LongString("abc".into())),
            ("zero", AMQPValue::LongInt(0)),
            ("negative", AMQPValue::LongLongInt(-5)),
        ];
        for (what, v) in &bad {
            amqp.publish_with_headers(
                UPDATES,
                edit(1, what).to_string().as_bytes(),
                Some(T1),
                version_header(v.clone()),
            )
            .await;
        }
        let (a, e) = (&amqp, &env);
        let dead = wait_for(
            "3 dead letters in update_messages.dlq",
            WAIT,
            Duration::from_millis(100),
            move || async move {
                let q = e.list_queues();
                match q.get("update_messages.dlq") {
                    Some((3, _)) => Ok(a.drain("update_messages.dlq").await),
                    other => Err(format!("{other:?}; queues {q:?}")),
                }
            },
        )
        .await;
        assert_eq!(dead.len(), 3);
        for (what, v) in &bad {
            let body = edit(1, what).to_string();
            let g = dead
                .iter()
                .find(|g| g.body == body.as_bytes())
                .unwrap_or_else(|| panic!("no dead letter for the {what} header: {dead:?}"));
            eprintln!(
                "[edit_version_malformed] {what}: x-error {:?}",
                g.header_str("x-error")
            );
            if let Err(p) = check_dead_letter(g, UPDATES, Some("x-edit-version")) {
                panic!("dead letter of the {what} header: {p}");
            }
            assert_eq!(
                g.headers.get("x-edit-version"),
                Some(v),
                "the original header is kept"
            );
            assert_eq!(g.timestamp, Some(T1));
        }
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        assert_eq!(row, created, "a malformed edit changed the row");
        assert_eq!(edit_version(&env, 1).await, 0);
        let c = QueueCounters::scrape(&addr, UPDATES);
        assert_eq!(
            c,
            QueueCounters {
                received: 3,
                dead_lettered: 3,
                ..Default::default()
            }
        );
        assert_eq!(env.dead_and_retrying(), (0, 0), "{:?}", env.list_queues());
        w.stop();
        amqp.close().await;
    });
}

/// Inserts message `number` of the seeded chat directly (not through the
/// writer), with `created_at` / `updated_at` as MySQL DATETIME(6) text.
async fn insert_message(env: &TestEnv, number: i64, body: &str, created: &str, updated: &str) {
    env.db
        .exec_params(
            "INSERT INTO messages (chat_id, token, chat_number, number, body, creator_id, \
             created_at, updated_at) VALUES (?, ?, 1, ?, ?, 4, ?, ?)",
            mysql_async::Params::Positional(vec![
                CHAT_ID.into(),
                TOKEN.into(),
                number.into(),
                body.into(),
                created.into(),
                updated.into(),
            ]),
        )
        .await
}

/// Replica A cannot reach MySQL: it takes a filler edit of message 2 (a
/// batch of 1, retried in place) and then receives edit "old" of message 1,
/// which it holds unacked without taking it (prefetch 2). Replica B applies
/// edit "new" of message 1 meanwhile. After MYSQL_REQUEUE_AFTER replica A
/// gives both back: "old" carries the time it arrived at A, not the time
/// of the give-back, so replica B finds it older than "new": superseded.
#[test]
fn an_edit_received_but_not_taken_keeps_its_arrival_time_when_given_back() {
    let env = TestEnv::new("edit_held_not_taken");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let created = "2026-01-01 00:00:00.000000";
        insert_message(&env, 1, "the original", created, created).await;
        insert_message(&env, 2, "the second", created, created).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mysql = Proxy::start("127.0.0.1:3306".parse().expect("address"));
        let mysql_port = mysql.port.to_string();
        let (addr_a, addr_b) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        // A gives back after 6 s of failures: time for B to start and
        // apply "new" first.
        let mut a = env.start_writer(&[
            ("HTTP_ADDR", addr_a.as_str()),
            ("DATABASE_PORT", mysql_port.as_str()),
            ("RABBITMQ_PREFETCH_COUNT", "2"),
            ("MYSQL_REQUEUE_AFTER", "6s"),
        ]);
        env.wait_consuming(&mut a).await;
        mysql.pause();

        amqp.publish_json(UPDATES, &edit(2, "filler"), None).await;
        wait_counters(&addr_a, "A took the filler and failed to write it", |c| {
            c.received == 1 && c.write_errors >= 1
        })
        .await;
        let t_stuck = Instant::now();
        let t_old = now_us();
        amqp.publish_json(UPDATES, &edit(1, "old"), None).await;
        // "old" is held by A (its prefetch window) but not taken.
        wait_held(&env, UPDATES, 2).await;
        let c = QueueCounters::scrape(&addr_a, UPDATES);
        assert_eq!(c.received, 1, "A took \"old\" into a batch: {c:?}");

        let mut b = env.start_writer(&[("HTTP_ADDR", addr_b.as_str())]);
        wait_consumers(&env, UPDATES, 2).await;
        amqp.publish_json(UPDATES, &edit(1, "new"), None).await;
        let row_new = wait_body(&env, 1, "new").await;
        let new_version = edit_version(&env, 1).await;
        let c = QueueCounters::scrape(&addr_a, UPDATES);
        assert_eq!(
            c.parked,
            0,
            "A gave its deliveries back {:.1?} after its batch got stuck, before \"new\" was \
             applied (a slow machine?): {c:?}",
            t_stuck.elapsed()
        );
        assert!(new_version > t_old, "{new_version} <= {t_old}");

        // A gives "old" and the filler back; B takes them: the filler is
        // applied, "old" superseded.
        wait_body(&env, 2, "filler").await;
        let cb = wait_counters(&addr_b, "B settled \"new\", the filler and \"old\"", |c| {
            c.received == 3 && c.balanced()
        })
        .await;
        let ca = QueueCounters::scrape(&addr_a, UPDATES);
        eprintln!(
            "[edit_held_not_taken] \"new\" version {new_version}; replica A {ca:?}; replica B {cb:?}"
        );
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        assert_eq!(
            row.body_str(),
            "new",
            "the older edit given back by A overwrote the newer one"
        );
        assert_eq!(row, row_new);
        assert_eq!(edit_version(&env, 1).await, new_version);
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "new");
        assert_eq!(
            (cb.stored, cb.superseded, cb.dead_lettered, cb.retried),
            (3, 1, 0, 0),
            "replica B: \"new\" and the filler applied, \"old\" superseded: {cb:?}"
        );
        assert_eq!((ca.parked, ca.requeues), (2, 1), "replica A: {ca:?}");
        env.wait_queue_empty(UPDATES, WAIT).await;
        assert_nothing_dead_or_retrying(&env);

        mysql.resume();
        wait_consumers(&env, UPDATES, 2).await;
        a.stop();
        b.stop();
        amqp.close().await;
    });
}

/// Two edits of one message in one batch: "good" (`x-edit-version` 10) and
/// "poison" (20), which a CHECK constraint refuses. The newest is refused,
/// so the next newest gets its own try: the row holds "good" (version 10)
/// and only "poison" is dead-lettered, with the MySQL error.
#[test]
fn when_mysql_refuses_the_newest_edit_the_next_newest_is_applied() {
    let env = TestEnv::new("edit_newest_refused");
    smol::block_on(async {
        env.migrate_and_seed().await;
        env.db
            .exec("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (body <> 'poison')")
            .await;
        let created = "2026-01-01 00:00:00.000000";
        insert_message(&env, 1, "the original", created, created).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        // Both queued before the writer starts: it takes them in one batch.
        for (body, v) in [("good", 10i64), ("poison", 20)] {
            amqp.publish_with_headers(
                UPDATES,
                edit(1, body).to_string().as_bytes(),
                Some(T1),
                version_header(AMQPValue::LongLongInt(v)),
            )
            .await;
        }
        let addr = format!("127.0.0.1:{}", free_port());
        // A retry would wait here, visible, instead of ending in the .dlq.
        let mut w = env.start_writer(&[("HTTP_ADDR", addr.as_str()), ("RETRY_DELAYS", "30s")]);
        let a = addr.as_str();
        wait_until("/metrics answers", WAIT, POLL, move || async move {
            crate::common::metrics::http_get(a, "/metrics").is_ok()
        })
        .await;
        let c = wait_counters(&addr, "both edits settled", |c| {
            c.received == 2 && c.balanced()
        })
        .await;
        let (a, e) = (&amqp, &env);
        let dead = wait_for(
            "dead letters in update_messages.dlq",
            WAIT,
            Duration::from_millis(100),
            move || async move {
                let q = e.list_queues();
                match q.get("update_messages.dlq") {
                    Some((n, _)) if *n >= 1 => Ok(a.drain("update_messages.dlq").await),
                    other => Err(format!("{other:?}; queues {q:?}")),
                }
            },
        )
        .await;
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        eprintln!(
            "[edit_newest_refused] row {:?} version {}; update_messages {c:?}; dead letters {:?}",
            row.body_str(),
            edit_version(&env, 1).await,
            dead.iter()
                .map(|g| (
                    String::from_utf8_lossy(&g.body).into_owned(),
                    g.header_str("x-error")
                ))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            row.body_str(),
            "good",
            "the edit MySQL accepts was not applied"
        );
        assert_eq!(edit_version(&env, 1).await, 10);
        assert_eq!(dead.len(), 1, "only \"poison\" is dead-lettered: {dead:?}");
        let g = &dead[0];
        assert_eq!(g.body, edit(1, "poison").to_string().as_bytes());
        if let Err(p) = check_dead_letter(g, UPDATES, None) {
            panic!("poison dead letter: {p}");
        }
        let err = g.header_str("x-error").unwrap_or_default();
        assert!(
            err.contains("4025") || err.contains("no_poison"),
            "x-error should name the MySQL error (4025 / CONSTRAINT `no_poison`): {err:?}"
        );
        assert_eq!(
            (c.stored, c.dead_lettered, c.superseded, c.retried),
            (1, 1, 0, 0),
            "{c:?}"
        );
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "good");
        assert_eq!(env.dead_and_retrying(), (0, 0), "{:?}", env.list_queues());
        w.stop();
        amqp.close().await;
    });
}

/// `chat-writer migrate` on a table from before `messages.edit_version`:
/// a row edited then (updated_at ten minutes after created_at) gets its
/// updated_at in microseconds as its version, a row never edited keeps 0.
/// An edit from before the upgrade (AMQP timestamp an hour before that
/// updated_at, as if it waited in a delay tier) is then superseded; a new
/// edit is applied.
#[test]
fn migrate_sets_the_version_of_rows_edited_before_the_column_existed() {
    let env = TestEnv::new("migrate_fills_edit_version");
    smol::block_on(async {
        crate::common::Db::server()
            .exec(&format!(
                "CREATE DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
                env.db_name
            ))
            .await;
        for t in OLD_TABLES {
            env.db.exec(t).await;
        }
        env.db.seed_app(crate::common::APP_ID, TOKEN, 0).await;
        env.db
            .seed_chat(CHAT_ID, crate::common::APP_ID, TOKEN, 1, 2)
            .await;
        insert_message(
            &env,
            1,
            "edited before the upgrade",
            "2026-06-01 12:00:00.000000",
            "2026-06-01 12:10:00.250000",
        )
        .await;
        insert_message(
            &env,
            2,
            "never edited",
            "2026-06-01 12:00:00.000000",
            "2026-06-01 12:00:00.000000",
        )
        .await;
        let edited = env.db.message(CHAT_ID, 1).await.expect("row 1");
        let untouched = env.db.message(CHAT_ID, 2).await.expect("row 2");
        assert_eq!(edited.updated_us - edited.created_us, 600_250_000);

        env.migrate();
        assert_eq!(
            (edit_version(&env, 1).await, edit_version(&env, 2).await),
            (edited.updated_us, 0),
            "edit_version after migrate: the edited row's updated_at in µs ({}), 0 for the other",
            edited.updated_us
        );
        assert_eq!(env.db.message(CHAT_ID, 1).await.as_ref(), Some(&edited));
        assert_eq!(env.db.message(CHAT_ID, 2).await.as_ref(), Some(&untouched));

        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[("HTTP_ADDR", addr.as_str())]);
        env.wait_consuming(&mut w).await;

        // Published an hour before the row's edit: superseded.
        let stale_ts = (edited.updated_us / 1_000_000 - 3600) as u64;
        amqp.publish_json(UPDATES, &edit(1, "stale edit"), Some(stale_ts))
            .await;
        let c = wait_counters(&addr, "the stale edit settled", |c| {
            c.received == 1 && c.balanced()
        })
        .await;
        let row = env.db.message(CHAT_ID, 1).await.expect("row 1");
        assert_eq!(
            row.body_str(),
            "edited before the upgrade",
            "an edit older than the row's pre-upgrade edit overwrote it ({c:?})"
        );
        assert_eq!(row, edited);
        assert_eq!(edit_version(&env, 1).await, edited.updated_us);
        assert_eq!((c.stored, c.superseded), (1, 1), "{c:?}");

        // A new edit (no AMQP timestamp, received now): applied.
        let before = now_us();
        amqp.publish_json(UPDATES, &edit(1, "new edit"), None).await;
        let row = wait_body(&env, 1, "new edit").await;
        let v = edit_version(&env, 1).await;
        assert!(v >= before && v <= now_us(), "version {v} from {before}");
        assert!(row.updated_us > edited.updated_us);
        let doc = assert_indexed(&env, &row).await;
        assert_eq!(doc["_source"]["body"], "new edit");
        let c = wait_superseded(&addr, 1).await;
        assert_eq!((c.received, c.stored), (2, 2), "{c:?}");
        assert_nothing_dead_or_retrying(&env);
        w.stop();
        amqp.close().await;
    });
}

/// The schema before `messages.edit_version`: the three tables
/// as the first `chat-writer migrate` created them.
const OLD_TABLES: [&str; 3] = [
    "CREATE TABLE applications (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        token VARCHAR(255) NOT NULL,
        name VARCHAR(255) NOT NULL,
        chats_count INT NOT NULL DEFAULT 0,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        UNIQUE KEY index_applications_on_token (token)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
    "CREATE TABLE chats (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        application_id BIGINT NOT NULL,
        token VARCHAR(255) NOT NULL,
        number INT NOT NULL,
        messages_count INT NOT NULL DEFAULT 0,
        creator_id BIGINT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        UNIQUE KEY index_chats_on_application_id_and_number (application_id, number),
        KEY index_chats_on_token_and_number (token, number),
        CONSTRAINT fk_chats_application_id FOREIGN KEY (application_id) REFERENCES applications (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
    "CREATE TABLE messages (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        chat_id BIGINT NOT NULL,
        token VARCHAR(255) NOT NULL,
        chat_number INT NOT NULL,
        number INT NOT NULL,
        body TEXT NOT NULL,
        creator_id BIGINT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        UNIQUE KEY index_messages_on_chat_id_and_number (chat_id, number),
        KEY index_messages_on_token_and_chat_number (token, chat_number),
        CONSTRAINT fk_messages_chat_id FOREIGN KEY (chat_id) REFERENCES chats (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
];
