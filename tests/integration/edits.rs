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

use crate::common::metrics::{wait_queue_counters, QueueCounters};
use crate::common::time::now_us;
use crate::common::{
    assert_indexed, check_dead_letter, wait_for, wait_until, Amqp, Db, Got, MessageRow, TestEnv,
    Writer, APP_ID, CHAT_ID, TOKEN,
};
use crate::consumers::T1;

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);
const UPDATES: &str = "update_messages";
const UPDATES_DLQ: &str = "update_messages.dlq";

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

/// Migrates and seeds, then declares the work queues on a harness connection (returned).
async fn seeded_with_work_queues(env: &TestEnv) -> Amqp {
    env.migrate_and_seed().await;
    let amqp = env.amqp().await;
    amqp.declare_work_queues().await;
    amqp
}

/// Publishes the create of message 1 ("the original") and waits for its row.
async fn create_original(env: &TestEnv, amqp: &Amqp) -> MessageRow {
    amqp.publish_json("create_messages", &create(1, "the original"), Some(T1))
        .await;
    wait_body(env, 1, "the original").await
}

/// Publishes edit `body` of message 1 (AMQP timestamp T1) with `x-edit-version` = `v`.
async fn publish_versioned(amqp: &Amqp, body: &str, v: AMQPValue) {
    let mut headers = FieldTable::default();
    headers.insert("x-edit-version".into(), v);
    amqp.publish_with_headers(
        UPDATES,
        edit(1, body).to_string().as_bytes(),
        Some(T1),
        headers,
    )
    .await
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

/// The `edit_version` of the row of message `number` of the seeded chat.
async fn edit_version(env: &TestEnv, number: i64) -> i64 {
    env.db
        .edit_version(CHAT_ID, number)
        .await
        .unwrap_or_else(|| panic!("no row for message {number}"))
}

/// Asserts that message 1 is still `kept` (else `why`), holding `body` at `version`, as is its document.
async fn assert_holds(env: &TestEnv, kept: &MessageRow, body: &str, version: i64, why: &str) {
    let row = env.db.message(CHAT_ID, 1).await.expect("row");
    assert_eq!(row, *kept, "{why}");
    assert_eq!(row.body_str(), body);
    assert_eq!(edit_version(env, 1).await, version);
    let doc = assert_indexed(env, &row).await;
    assert_eq!(doc["_source"]["body"], body);
}

/// Waits until the `update_messages` counters of the writer at `addr` satisfy `ok`.
async fn wait_counters(
    addr: &str,
    what: &str,
    ok: impl Fn(&QueueCounters) -> bool,
) -> QueueCounters {
    wait_queue_counters(addr, UPDATES, what, WAIT, POLL, ok).await
}

/// Waits until the writer at `addr` counts `n` superseded updates.
async fn wait_superseded(addr: &str, n: u64) -> QueueCounters {
    wait_counters(addr, &format!("{n} superseded update(s) on {addr}"), |c| {
        c.superseded == n
    })
    .await
}

/// Waits until the writer at `addr` counts `n` stored updates.
async fn wait_stored(addr: &str, n: u64) {
    wait_counters(addr, &format!("{n} update(s) stored"), |c| c.stored == n).await;
}

/// Waits until the writer at `addr` took one update and failed to write it.
async fn wait_write_failed(addr: &str, what: &str) {
    wait_counters(addr, what, |c| c.received == 1 && c.write_errors >= 1).await;
}

/// Waits until `update_messages` has `n` consumers.
async fn wait_consumers(env: &TestEnv, n: u32) {
    env.wait_queue_consumers(&[UPDATES], n, WAIT, POLL).await;
}

/// A second writer (MySQL direct) and its HTTP address, once `update_messages` has 2 consumers.
async fn start_direct_replica(env: &TestEnv) -> (Writer, String) {
    let started = env.start_writer_at(&[]);
    wait_consumers(env, 2).await;
    started
}

/// Waits until `update_messages` has no ready message and `unacked` unacked ones.
async fn wait_held(env: &TestEnv, unacked: u64) {
    env.wait_queue_stats(
        UPDATES,
        &format!("{unacked} unacked delivery(ies) held from {UPDATES}"),
        WAIT,
        POLL,
        |(ready, u, _)| ready == 0 && u == unacked,
    )
    .await;
}

/// Waits until `update_messages.dlq` holds a number of messages `ok` accepts, then drains it.
async fn wait_dead_letters(
    env: &TestEnv,
    amqp: &Amqp,
    what: &str,
    ok: impl Fn(u64) -> bool,
) -> Vec<Got> {
    let ok = &ok;
    wait_for(what, WAIT, Duration::from_millis(100), move || async move {
        let q = env.list_queues();
        match q.get(UPDATES_DLQ) {
            Some((n, _)) if ok(*n) => Ok(amqp.drain(UPDATES_DLQ).await),
            other => Err(format!("{other:?}; queues {q:?}")),
        }
    })
    .await
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

/// A database with the tables from before `messages.edit_version`, the app and chat 1 seeded.
async fn create_old_schema(env: &TestEnv, messages_count: i64) {
    Db::server()
        .exec(&format!(
            "CREATE DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
            env.db_name
        ))
        .await;
    for t in OLD_TABLES {
        env.db.exec(t).await;
    }
    env.db.seed_app(APP_ID, TOKEN, 0).await;
    env.db
        .seed_chat(CHAT_ID, APP_ID, TOKEN, 1, messages_count)
        .await;
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

/// Edit A of a message is published before its create: it finds no row and
/// waits in the delay tiers (1 s, then 4 s). Meanwhile the create lands and
/// edit B is applied. When A comes back from the 4 s tier it carries the
/// version of its first receipt (older than B's): superseded, the row and
/// its document keep B.
#[test]
fn an_older_edit_from_a_delay_tier_does_not_overwrite_a_newer_one() {
    let env = TestEnv::new("edit_from_delay_tier");
    smol::block_on(async {
        let amqp = seeded_with_work_queues(&env).await;
        let (mut w, addr) = env.consuming_writer(&[("RETRY_DELAYS", "1s,4s,8s")]).await;

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

        create_original(&env, &amqp).await;
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
        eprintln!(
            "[edit_from_delay_tier] A version {a_version}, B version {b_version}; \
             update_messages counters {c:?}"
        );
        assert_holds(
            &env,
            &row_b,
            "edit B",
            b_version,
            "the superseded edit changed the row",
        )
        .await;
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
        env.assert_nothing_dead_or_retrying();
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
        let amqp = seeded_with_work_queues(&env).await;
        let (mut w, addr) = env.consuming_writer(&[("RETRY_DELAYS", "1s,4s,8s")]).await;

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
        eprintln!("[edits_in_tiers] B version {b_version}; update_messages counters {c:?}");
        assert_holds(
            &env,
            &row_b,
            "edit B",
            b_version,
            "the superseded edit changed the row",
        )
        .await;
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
        env.assert_nothing_dead_or_retrying();
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
        let amqp = seeded_with_work_queues(&env).await;
        let (mysql, mut w1, addr1) = env.consuming_writer_behind_proxy("1", "1h").await;
        let created = create_original(&env, &amqp).await;
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
        wait_held(&env, 1).await;
        wait_write_failed(&addr1, "writer 1 failed to write A").await;

        // Writer 2 (MySQL direct) applies B while writer 1 holds A.
        let (mut w2, addr2) = start_direct_replica(&env).await;
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
        eprintln!(
            "[edit_redelivered] B version {b_version}; writer 2 update_messages counters {c2:?}"
        );
        assert_holds(
            &env,
            &row_b,
            "edit B",
            b_version,
            "the redelivered older edit changed the row",
        )
        .await;
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
        env.assert_nothing_dead_or_retrying();
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
        let amqp = seeded_with_work_queues(&env).await;
        let (mut w, addr) = env.consuming_writer(&[]).await;
        create_original(&env, &amqp).await;

        // B, version 2,000,000: applied.
        publish_versioned(&amqp, "edit B", AMQPValue::LongUInt(2_000_000)).await;
        let row_b = wait_body(&env, 1, "edit B").await;
        assert_eq!(edit_version(&env, 1).await, 2_000_000);
        wait_stored(&addr, 1).await;

        // A, version 1,000,000 (older): superseded, nothing changes.
        publish_versioned(&amqp, "edit A", AMQPValue::LongInt(1_000_000)).await;
        let c = wait_superseded(&addr, 1).await;
        assert_eq!(c.stored, 2, "{c:?}");
        let row = env.db.message(CHAT_ID, 1).await.expect("row");
        assert_eq!(row, row_b, "an older edit changed the row");
        assert_eq!(edit_version(&env, 1).await, 2_000_000);
        assert_indexed(&env, &row).await;

        // A again, version 3,000,000 (newer): applied.
        publish_versioned(&amqp, "edit A again", AMQPValue::LongLongInt(3_000_000)).await;
        let row_a = wait_body(&env, 1, "edit A again").await;
        assert_eq!(edit_version(&env, 1).await, 3_000_000);
        assert!(row_a.updated_us > row_b.updated_us);
        wait_stored(&addr, 3).await;

        // The same version again: the later one wins the tie.
        publish_versioned(&amqp, "same version", AMQPValue::LongLongInt(3_000_000)).await;
        let row_tie = wait_body(&env, 1, "same version").await;
        assert_eq!(edit_version(&env, 1).await, 3_000_000);
        assert!(row_tie.updated_us > row_a.updated_us);
        wait_stored(&addr, 4).await;
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
        env.assert_nothing_dead_or_retrying();
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
        let amqp = seeded_with_work_queues(&env).await;
        // Replica 1 gives back after 6 s of failures: time for replica 2 to
        // start and apply B first.
        let (mysql, mut r1, addr1) = env.consuming_writer_behind_proxy("1", "6s").await;
        create_original(&env, &amqp).await;

        mysql.pause();
        let t_a = now_us();
        amqp.publish_json(UPDATES, &edit(1, "edit A"), None).await;
        wait_write_failed(&addr1, "replica 1 took A and failed to write it").await;
        let t_held = Instant::now();

        let (mut r2, addr2) = start_direct_replica(&env).await;
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
        assert_holds(
            &env,
            &row_b,
            "edit B",
            b_version,
            "the given-back older edit changed the row",
        )
        .await;
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
        env.assert_nothing_dead_or_retrying();

        mysql.resume();
        wait_consumers(&env, 2).await;
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
        create_old_schema(&env, 1).await;
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
        env.assert_nothing_dead_or_retrying();
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
        let amqp = seeded_with_work_queues(&env).await;
        // A retry would wait here, visible, instead of ending in the .dlq.
        let (mut w, addr) = env.consuming_writer(&[("RETRY_DELAYS", "30s")]).await;
        let created = create_original(&env, &amqp).await;

        let bad: [(&str, AMQPValue); 3] = [
            ("a string", AMQPValue::LongString("abc".into())),
            ("zero", AMQPValue::LongInt(0)),
            ("negative", AMQPValue::LongLongInt(-5)),
        ];
        for (what, v) in &bad {
            publish_versioned(&amqp, what, v.clone()).await;
        }
        let dead = wait_dead_letters(&env, &amqp, "3 dead letters in update_messages.dlq", |n| {
            n == 3
        })
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
        env.assert_nothing_dead_or_retrying();
        w.stop();
        amqp.close().await;
    });
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
        let amqp = seeded_with_work_queues(&env).await;
        let created = "2026-01-01 00:00:00.000000";
        insert_message(&env, 1, "the original", created, created).await;
        insert_message(&env, 2, "the second", created, created).await;
        // A gives back after 6 s of failures: time for B to start and
        // apply "new" first.
        let (mysql, mut a, addr_a) = env.consuming_writer_behind_proxy("2", "6s").await;
        mysql.pause();

        amqp.publish_json(UPDATES, &edit(2, "filler"), None).await;
        wait_write_failed(&addr_a, "A took the filler and failed to write it").await;
        let t_stuck = Instant::now();
        let t_old = now_us();
        amqp.publish_json(UPDATES, &edit(1, "old"), None).await;
        // "old" is held by A (its prefetch window) but not taken.
        wait_held(&env, 2).await;
        let c = QueueCounters::scrape(&addr_a, UPDATES);
        assert_eq!(c.received, 1, "A took \"old\" into a batch: {c:?}");

        let (mut b, addr_b) = start_direct_replica(&env).await;
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
        assert_holds(
            &env,
            &row_new,
            "new",
            new_version,
            "the older edit given back by A overwrote the newer one",
        )
        .await;
        assert_eq!(
            (cb.stored, cb.superseded, cb.dead_lettered, cb.retried),
            (3, 1, 0, 0),
            "replica B: \"new\" and the filler applied, \"old\" superseded: {cb:?}"
        );
        assert_eq!((ca.parked, ca.requeues), (2, 1), "replica A: {ca:?}");
        env.wait_queue_empty(UPDATES, WAIT).await;
        env.assert_nothing_dead_or_retrying();

        mysql.resume();
        wait_consumers(&env, 2).await;
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
        let amqp = seeded_with_work_queues(&env).await;
        env.db
            .exec("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (body <> 'poison')")
            .await;
        let created = "2026-01-01 00:00:00.000000";
        insert_message(&env, 1, "the original", created, created).await;
        // Both queued before the writer starts: it takes them in one batch.
        for (body, v) in [("good", 10i64), ("poison", 20)] {
            publish_versioned(&amqp, body, AMQPValue::LongLongInt(v)).await;
        }
        // A retry would wait here, visible, instead of ending in the .dlq.
        let (mut w, addr) = env.start_writer_at(&[("RETRY_DELAYS", "30s")]);
        let a = addr.as_str();
        wait_until("/metrics answers", WAIT, POLL, move || async move {
            crate::common::metrics::http_get(a, "/metrics").is_ok()
        })
        .await;
        let c = wait_counters(&addr, "both edits settled", |c| {
            c.received == 2 && c.balanced()
        })
        .await;
        let dead = wait_dead_letters(&env, &amqp, "dead letters in update_messages.dlq", |n| {
            n >= 1
        })
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
        env.assert_nothing_dead_or_retrying();
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
        create_old_schema(&env, 2).await;
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
        let (mut w, addr) = env.consuming_writer(&[]).await;

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
        // The row and the document can be seen before the delivery is
        // counted (the counters follow the ack): wait until both settled.
        let c = wait_counters(&addr, "the new edit settled", |c| {
            c.received == 2 && c.balanced()
        })
        .await;
        assert_eq!((c.stored, c.superseded), (2, 1), "{c:?}");
        env.assert_nothing_dead_or_retrying();
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
