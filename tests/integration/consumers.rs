//! Happy paths of the three consumers, duplicates, emoji bodies and edits that change nothing.

use std::time::Duration;

use serde_json::json;

use crate::common::time::{mysql_datetime, now_us};
use crate::common::{
    assert_indexed, wait_for, wait_until, MessageRow, TestEnv, APP_ID, CHAT_ID, TOKEN,
};

/// 2026-11-29 12:00:00 UTC, in seconds: the AMQP timestamp of test messages.
pub const T1: u64 = 1_795_953_600;
const S: u64 = 1_000_000;
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

pub async fn wait_message(env: &TestEnv, chat_id: i64, number: i64) -> MessageRow {
    wait_for(
        &format!("message ({chat_id}, {number}) stored"),
        WAIT,
        POLL,
        move || async move {
            env.db
                .message(chat_id, number)
                .await
                .ok_or("no row".to_string())
        },
    )
    .await
}

#[test]
fn create_chats_happy_path() {
    let env = TestEnv::new("create_chats_happy");
    smol::block_on(async {
        env.migrate();
        env.db.seed_app(APP_ID, TOKEN, 0).await;
        let app_before = env.db.app(APP_ID).await.unwrap();
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        // Long sync interval: the change markers the writer adds stay visible.
        let mut w = env.start_writer(&[("COUNT_SYNC_INTERVAL", "1h")]);
        env.wait_consuming(&mut w).await;

        let before = now_us();
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 1, "creator_id": 42}),
            Some(T1),
        )
        .await;
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 2}),
            Some(T1 + 1),
        )
        .await;
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 3, "creator_id": null}),
            None,
        )
        .await;
        let e = &env;
        let rows = wait_for("3 chats stored", WAIT, POLL, move || async move {
            let rows = e.db.chats_where("application_id = 7").await;
            if rows.len() == 3 {
                Ok(rows)
            } else {
                Err(format!("{rows:?}"))
            }
        })
        .await;
        let after = now_us();

        let c1 = &rows[0];
        assert!(c1.id > 0);
        assert_eq!(
            (
                c1.application_id,
                c1.token.as_str(),
                c1.number,
                c1.messages_count,
                c1.creator_id
            ),
            (7, "app_x", 1, 0, Some(42)),
            "{c1:?}"
        );
        assert_eq!(
            c1.created_at,
            mysql_datetime((T1 * S) as i64),
            "created_at = AMQP timestamp"
        );
        assert_eq!(
            c1.updated_at, c1.created_at,
            "new row: updated_at = created_at"
        );

        let c2 = &rows[1];
        assert_eq!(
            (
                c2.application_id,
                c2.token.as_str(),
                c2.number,
                c2.messages_count,
                c2.creator_id
            ),
            (7, "app_x", 2, 0, None),
            "creator_id absent -> NULL: {c2:?}"
        );
        assert_eq!(c2.created_at, mysql_datetime(((T1 + 1) * S) as i64));
        assert_eq!(c2.updated_at, c2.created_at);

        let c3 = &rows[2];
        assert_eq!(
            (
                c3.application_id,
                c3.token.as_str(),
                c3.number,
                c3.messages_count,
                c3.creator_id
            ),
            (7, "app_x", 3, 0, None),
            "creator_id null -> NULL: {c3:?}"
        );
        assert!(
            c3.created_us >= before - 2_000_000 && c3.created_us <= after + 2_000_000,
            "no AMQP timestamp: created_at should be the processing time (UTC), \
             between {} and {}, is {}",
            mysql_datetime(before),
            mysql_datetime(after),
            c3.created_at
        );
        assert_eq!(c3.updated_at, c3.created_at);
        let ids: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 3, "distinct ids");

        // The consumer never writes counts.
        let app = env.db.app(APP_ID).await.unwrap();
        assert_eq!(
            app, app_before,
            "the application row is untouched by create_chats"
        );

        // docs/redis-and-counts.md: after creating a chat the writer marks <token> and <token>:<number>.
        let e = &env;
        wait_until(
            "change markers of the new chats",
            WAIT,
            POLL,
            move || async move {
                e.kv.smembers("chat_changes").await == vec!["app_x".to_string()]
                    && e.kv.smembers("message_changes").await
                        == vec![
                            "app_x:1".to_string(),
                            "app_x:2".to_string(),
                            "app_x:3".to_string(),
                        ]
            },
        )
        .await;

        w.stop();
        // No counter in Redis: the final sync must not invent a count.
        assert_eq!(env.db.chats_count(APP_ID).await, Some(0));
        for r in env.db.chats_where("application_id = 7").await {
            assert_eq!(r.messages_count, 0);
        }
        amqp.close().await;
    });
}

#[test]
fn create_messages_happy_path() {
    let env = TestEnv::new("create_messages_happy");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[("COUNT_SYNC_INTERVAL", "1h")]);
        env.wait_consuming(&mut w).await;

        let before = now_us();
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "Hello, world", "creator_id": 5}),
            Some(T1),
        )
        .await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 2,
                    "body": "second"}),
            None,
        )
        .await;
        let m1 = wait_message(&env, CHAT_ID, 1).await;
        let m2 = wait_message(&env, CHAT_ID, 2).await;
        let after = now_us();

        assert!(m1.id > 0 && m2.id > 0 && m1.id != m2.id);
        assert_eq!(
            (
                m1.chat_id,
                m1.token.as_str(),
                m1.chat_number,
                m1.number,
                m1.body_str().as_str(),
                m1.creator_id
            ),
            (1, "app_x", 1, 1, "Hello, world", Some(5)),
            "{m1:?}"
        );
        assert_eq!(m1.created_at, mysql_datetime((T1 * S) as i64));
        assert_eq!(m1.updated_at, m1.created_at);
        assert_eq!(
            (
                m2.chat_id,
                m2.token.as_str(),
                m2.chat_number,
                m2.number,
                m2.body_str().as_str(),
                m2.creator_id
            ),
            (1, "app_x", 1, 2, "second", None),
            "{m2:?}"
        );
        assert!(
            m2.created_us >= before - 2_000_000 && m2.created_us <= after + 2_000_000,
            "no AMQP timestamp: created_at should be the processing time, is {}",
            m2.created_at
        );
        assert_eq!(m2.updated_at, m2.created_at);

        // Elasticsearch: whole documents, _version = updated_at in µs.
        let d1 = assert_indexed(&env, &m1).await;
        assert_eq!(d1["_source"]["created_at"], "2026-11-29T12:00:00.000000Z");
        assert_indexed(&env, &m2).await;

        // The consumer never writes counts; it marks the chat for the sync.
        let chat = env.db.chat(APP_ID, 1).await.unwrap();
        assert_eq!(chat.messages_count, 0);
        assert_eq!(
            chat.updated_at, "2026-01-01 00:00:00.000000",
            "chat row untouched"
        );
        let e = &env;
        wait_until("message_changes has app_x:1", WAIT, POLL, move || async move {
            e.kv.smembers("message_changes").await == vec!["app_x:1".to_string()]
        })
        .await;
        assert_eq!(env.db.chats_count(APP_ID).await, Some(0));
        w.stop();
        amqp.close().await;
    });
}

#[test]
fn update_messages_happy_path() {
    let env = TestEnv::new("update_messages_happy");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;

        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "before", "creator_id": 9}),
            Some(T1),
        )
        .await;
        let m0 = wait_message(&env, CHAT_ID, 1).await;
        assert_indexed(&env, &m0).await;

        amqp.publish_json(
            "update_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "after"}),
            Some(T1 + 500),
        )
        .await;
        let e = &env;
        let m1 = wait_for("body updated", WAIT, POLL, move || async move {
            match e.db.message(CHAT_ID, 1).await {
                Some(m) if m.body == b"after" => Ok(m),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert_eq!(
            MessageRow {
                body: b"after".to_vec(),
                updated_at: m1.updated_at.clone(),
                updated_us: m1.updated_us,
                ..m0.clone()
            },
            m1,
            "an update changes body and updated_at only"
        );
        assert!(m1.updated_us > m0.updated_us, "updated_at increases");
        let mysql_now = env.db.utc_now_us().await;
        assert!(
            (mysql_now - m1.updated_us).abs() < 60_000_000,
            "updated_at comes from MySQL's clock (UTC): {} vs UTC_TIMESTAMP {}",
            m1.updated_at,
            mysql_datetime(mysql_now)
        );
        let d = assert_indexed(&env, &m1).await;
        assert_eq!(d["_source"]["body"], "after");
        assert_eq!(d["_source"]["created_at"], "2026-11-29T12:00:00.000000Z");
        assert_eq!(env.db.messages_count(CHAT_ID).await, Some(0));
        w.stop();
        amqp.close().await;
    });
}

#[test]
fn duplicate_creates_keep_the_original() {
    let env = TestEnv::new("duplicates");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;
        let e = &env;

        // Chats: the original, then a duplicate with another creator and time.
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 2, "creator_id": 1}),
            Some(T1),
        )
        .await;
        let c0 = wait_for("chat 2", WAIT, POLL, move || async move {
            e.db.chat(APP_ID, 2).await.ok_or("no row".to_string())
        })
        .await;
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 2, "creator_id": 2}),
            Some(T1 + 100),
        )
        .await;
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 3}),
            Some(T1),
        )
        .await;

        // Messages: the same.
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "first", "creator_id": 1}),
            Some(T1),
        )
        .await;
        let m0 = wait_message(&env, CHAT_ID, 1).await;
        assert_indexed(&env, &m0).await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "second", "creator_id": 2}),
            Some(T1 + 100),
        )
        .await;
        // The very same payload twice in a row.
        let same = json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 2,
                          "body": "twice"});
        amqp.publish_json("create_messages", &same, Some(T1)).await;
        amqp.publish_json("create_messages", &same, Some(T1)).await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 3,
                    "body": "sentinel"}),
            Some(T1),
        )
        .await;

        wait_for(
            "chat 3 (after the duplicate)",
            WAIT,
            POLL,
            move || async move { e.db.chat(APP_ID, 3).await.ok_or("no row".to_string()) },
        )
        .await;
        wait_message(&env, CHAT_ID, 3).await;
        wait_until(
            "work queues drained (ready + unacked = 0)",
            WAIT,
            Duration::from_millis(300),
            move || async move {
                let q = e.list_queues();
                ["create_chats", "create_messages"]
                    .iter()
                    .all(|n| q.get(*n).map(|x| x.0) == Some(0))
            },
        )
        .await;

        assert_eq!(
            env.db
                .count("chats", "application_id = 7 AND number = 2")
                .await,
            1
        );
        assert_eq!(
            env.db.chat(APP_ID, 2).await.unwrap(),
            c0,
            "duplicate create_chats ignored"
        );
        assert_eq!(
            env.db.count("messages", "chat_id = 1 AND number = 1").await,
            1
        );
        let m_now = env.db.message(CHAT_ID, 1).await.unwrap();
        assert_eq!(
            m_now, m0,
            "duplicate create_messages ignored (body, creator, times)"
        );
        assert_eq!(
            env.db.count("messages", "chat_id = 1 AND number = 2").await,
            1
        );
        let twice = env.db.message(CHAT_ID, 2).await.unwrap();
        assert_eq!(twice.body, b"twice");
        assert_indexed(&env, &twice).await;
        // The index still holds the original.
        let d = assert_indexed(&env, &m0).await;
        assert_eq!(d["_source"]["body"], "first");
        // Duplicates are success, not dead letters.
        for q in ["create_chats.dlq", "create_messages.dlq"] {
            let got = amqp.drain(q).await;
            assert!(
                got.is_empty(),
                "{q} should be empty, holds {} message(s)",
                got.len()
            );
        }
        w.stop();
        amqp.close().await;
    });
}

/// Emoji bodies plus the other valid bodies: empty, with NUL.
#[test]
fn case1_emoji_and_edge_bodies_round_trip() {
    let env = TestEnv::new("case1_emoji");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;

        let bodies = [
            (1, "hello 👋🏽 — ünïcødé 漢字 🎉𝄞"),
            (2, ""),
            (3, "nul\u{0}inside"),
            (4, "quotes \" and \\ backslash\nnew line\ttab"),
        ];
        for (n, body) in bodies {
            amqp.publish_json(
                "create_messages",
                &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": n,
                        "body": body}),
                Some(T1),
            )
            .await;
        }
        for (n, body) in bodies {
            let m = wait_message(&env, CHAT_ID, n).await;
            assert_eq!(m.body, body.as_bytes(), "message {n}: body byte for byte");
            let d = assert_indexed(&env, &m).await;
            assert_eq!(
                d["_source"]["body"], body,
                "message {n} indexed byte for byte"
            );
        }
        // An edit to an emoji body.
        let edit = "edited 🚀🚀 ✓";
        amqp.publish_json(
            "update_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": edit}),
            None,
        )
        .await;
        let e = &env;
        let m = wait_for("emoji edit stored", WAIT, POLL, move || async move {
            match e.db.message(CHAT_ID, 1).await {
                Some(m) if m.body == edit.as_bytes() => Ok(m),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let d = assert_indexed(&env, &m).await;
        assert_eq!(d["_source"]["body"], edit);
        w.stop();
        amqp.close().await;
    });
}

/// An update whose body equals the stored body is a success: no
/// retry, no dead letter, updated_at still increases (it is the ES version).
#[test]
fn case2_identical_update_is_success() {
    let env = TestEnv::new("case2_identical_update");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        // A retry would take 30 s: far longer than this test waits.
        let mut w = env.start_writer(&[("RETRY_DELAYS", "30s")]);
        env.wait_consuming(&mut w).await;

        let body = "same text";
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": body, "creator_id": 3}),
            Some(T1),
        )
        .await;
        let mut prev = wait_message(&env, CHAT_ID, 1).await;
        assert_indexed(&env, &prev).await;

        for round in 1..=2 {
            let published = now_us();
            amqp.publish_json(
                "update_messages",
                &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                        "body": body}),
                None,
            )
            .await;
            let e = &env;
            let p = prev.updated_us;
            let m = wait_for(
                &format!("identical update {round} applied (updated_at increases)"),
                Duration::from_secs(10),
                POLL,
                move || async move {
                    match e.db.message(CHAT_ID, 1).await {
                        Some(m) if m.updated_us > p => Ok(m),
                        other => Err(format!("{other:?}")),
                    }
                },
            )
            .await;
            assert!(
                now_us() - published < 5_000_000,
                "applied at once, not after a retry"
            );
            assert_eq!(m.body, body.as_bytes());
            assert_eq!(
                (m.id, m.creator_id, &m.created_at),
                (prev.id, prev.creator_id, &prev.created_at)
            );
            assert_indexed(&env, &m).await;
            prev = m;
        }

        let queues = env.list_queues();
        for (name, (messages, _)) in &queues {
            if name.contains(".retry.") || name.ends_with(".dlq") {
                assert_eq!(*messages, 0, "queue {name} should be empty: {queues:?}");
            }
        }
        let dl = amqp.drain("update_messages.dlq").await;
        assert!(dl.is_empty(), "identical update dead-lettered: {dl:?}");
        w.stop();
        amqp.close().await;
    });
}

/// The queue already exists with other arguments (the old service's
/// dead-letter exchange). The writer consumes it as it is and still
/// dead-letters by publishing to `<queue>.dlq` itself.
#[test]
fn case3_existing_queue_with_other_arguments() {
    let env = TestEnv::new("case3_queue_args");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        let mut args = lapin::types::FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            lapin::types::AMQPValue::LongString("old-service-dlx".into()),
        );
        amqp.declare_with_args("create_messages", args).await;
        amqp.declare("create_chats").await;
        amqp.declare("update_messages").await;
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;

        amqp.publish("create_messages", b"this is not json", None)
            .await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "kept"}),
            Some(T1),
        )
        .await;
        let m = wait_message(&env, CHAT_ID, 1).await;
        assert_eq!(m.body, b"kept");
        let e = &env;
        let amqp_ref = &amqp;
        let dl = wait_for(
            "dead letter in create_messages.dlq",
            WAIT,
            POLL,
            move || async move {
                amqp_ref
                    .get("create_messages.dlq")
                    .await
                    .ok_or("empty".to_string())
            },
        )
        .await;
        assert_eq!(dl.body, b"this is not json");
        if let Err(problem) = crate::common::check_dead_letter(&dl, "create_messages", None) {
            panic!("dead letter headers: {problem}");
        }
        // The existing queue is still the one with its arguments, consumed.
        let q = e.list_queues();
        assert_eq!(q.get("create_messages").map(|x| x.1), Some(1), "{q:?}");
        w.stop();
        amqp.close().await;
    });
}
