//! Count sync (docs/redis-and-counts.md): markers added during a sync, counts synced before their rows.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{sleep, wait_for, wait_until, TestEnv, APP_ID, TOKEN};

const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

/// Waits until application `app` has `chats_count == want`.
async fn wait_chats_count(env: &TestEnv, app: i64, want: i64) {
    wait_for(
        &format!("applications[{app}].chats_count == {want}"),
        WAIT,
        POLL,
        move || async move {
            match env.db.chats_count(app).await {
                Some(c) if c == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// Waits until chat `chat` has `messages_count == want`.
async fn wait_messages_count(env: &TestEnv, chat: i64, want: i64) {
    wait_for(
        &format!("chats[{chat}].messages_count == {want}"),
        WAIT,
        POLL,
        move || async move {
            match env.db.messages_count(chat).await {
                Some(c) if c == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

async fn wait_change_sets_empty(env: &TestEnv) {
    wait_until(
        "chat_changes and message_changes empty",
        WAIT,
        POLL,
        move || async move {
            env.kv.smembers("chat_changes").await.is_empty()
                && env.kv.smembers("message_changes").await.is_empty()
        },
    )
    .await
}

#[test]
fn change_sets_drive_counts() {
    let env = TestEnv::new("counts_change_sets");
    smol::block_on(async {
        env.migrate_and_seed().await;
        env.db.seed_app(8, "app_y", 0).await;
        env.db.seed_chat(2, 8, "app_y", 1, 0).await;
        env.db.seed_chat(3, APP_ID, TOKEN, 2, 0).await;
        let mut w = env.start_writer(&[
            ("COUNT_SYNC_INTERVAL", "200ms"),
            ("COUNT_RECONCILE_INTERVAL", "1h"),
        ]);
        env.wait_consuming(&mut w).await;
        // Only now: the start-up reconciliation is over, the markers drive it.
        env.kv.set_chat_counter(TOKEN, 2, true).await;
        env.kv.set_message_counter(TOKEN, 1, 12, true).await;
        env.kv.set_message_counter(TOKEN, 2, 3, true).await;
        env.kv.set_chat_counter("app_y", 1, true).await;
        env.kv.set_message_counter("app_y", 1, 7, true).await;

        wait_chats_count(&env, APP_ID, 2).await;
        wait_chats_count(&env, 8, 1).await;
        wait_messages_count(&env, 1, 12).await;
        wait_messages_count(&env, 3, 3).await;
        wait_messages_count(&env, 2, 7).await;
        wait_change_sets_empty(&env).await;

        // Later changes land too.
        env.kv.set_message_counter(TOKEN, 1, 13, true).await;
        env.kv.set_chat_counter(TOKEN, 5, true).await;
        wait_messages_count(&env, 1, 13).await;
        wait_chats_count(&env, APP_ID, 5).await;
        // The others did not move.
        assert_eq!(env.db.messages_count(3).await, Some(3));
        assert_eq!(env.db.messages_count(2).await, Some(7));
        assert_eq!(env.db.chats_count(8).await, Some(1));
        w.stop();
    });
}

#[test]
fn reconcile_at_startup_without_change_sets() {
    let env = TestEnv::new("counts_reconcile_startup");
    smol::block_on(async {
        env.migrate();
        env.db.seed_app(APP_ID, TOKEN, 0).await;
        // Many chats so the SCAN takes several cursor rounds.
        env.db.seed_chats(1, APP_ID, TOKEN, 150).await;
        env.kv.set_chat_counter(TOKEN, 150, false).await;
        for n in 1..=150 {
            env.kv.set_message_counter(TOKEN, n, n * 2, false).await;
        }
        assert!(env.kv.smembers("chat_changes").await.is_empty());
        let mut w = env.start_writer(&[
            ("COUNT_SYNC_INTERVAL", "200ms"),
            ("COUNT_RECONCILE_INTERVAL", "1h"),
        ]);
        wait_chats_count(&env, APP_ID, 150).await;
        let e = &env;
        wait_until(
            "every messages_count = its counter",
            WAIT,
            POLL,
            move || async move {
                let rows: Vec<(i64, i64)> =
                    e.db.query("SELECT number, messages_count FROM chats").await;
                rows.len() == 150 && rows.iter().all(|(n, c)| *c == n * 2)
            },
        )
        .await;
        w.stop();
    });
}

#[test]
fn reconcile_periodically_without_change_sets() {
    let env = TestEnv::new("counts_reconcile_periodic");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let mut w = env.start_writer(&[
            ("COUNT_SYNC_INTERVAL", "200ms"),
            ("COUNT_RECONCILE_INTERVAL", "1s"),
        ]);
        env.wait_consuming(&mut w).await;
        smol::Timer::after(Duration::from_millis(300)).await;
        // A publisher that keeps no change sets.
        env.kv.set_chat_counter(TOKEN, 4, false).await;
        env.kv.set_message_counter(TOKEN, 1, 9, false).await;
        wait_chats_count(&env, APP_ID, 4).await;
        wait_messages_count(&env, 1, 9).await;
        w.stop();
    });
}

#[test]
fn counts_are_never_lowered() {
    let env = TestEnv::new("counts_never_lowered");
    smol::block_on(async {
        env.migrate();
        env.db.seed_app(APP_ID, TOKEN, 10).await;
        env.db.seed_chat(1, APP_ID, TOKEN, 1, 10).await;
        env.kv.set_chat_counter(TOKEN, 3, true).await;
        env.kv.set_message_counter(TOKEN, 1, 3, true).await;
        let mut w = env.start_writer(&[
            ("COUNT_SYNC_INTERVAL", "200ms"),
            ("COUNT_RECONCILE_INTERVAL", "1s"),
        ]);
        env.wait_consuming(&mut w).await;
        // The markers were taken (a sync ran) and a reconciliation or two too.
        wait_change_sets_empty(&env).await;
        smol::Timer::after(Duration::from_millis(1500)).await;
        assert_eq!(
            env.db.chats_count(APP_ID).await,
            Some(10),
            "chats_count lowered"
        );
        assert_eq!(
            env.db.messages_count(1).await,
            Some(10),
            "messages_count lowered"
        );
        // Syncing works: a higher counter lands.
        env.kv.set_message_counter(TOKEN, 1, 11, true).await;
        wait_messages_count(&env, 1, 11).await;
        w.stop();
        assert_eq!(env.db.chats_count(APP_ID).await, Some(10));
        assert_eq!(env.db.messages_count(1).await, Some(11));
    });
}

/// The counter is synced before the chat row exists; when the chat
/// arrives the writer marks it again, so the count lands.
#[test]
fn case7_count_synced_before_its_row_exists() {
    let env = TestEnv::new("case7_count_before_row");
    smol::block_on(async {
        env.migrate();
        env.db.seed_app(APP_ID, TOKEN, 0).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[
            ("COUNT_SYNC_INTERVAL", "200ms"),
            ("COUNT_RECONCILE_INTERVAL", "1h"),
        ]);
        env.wait_consuming(&mut w).await;
        env.kv.set_chat_counter(TOKEN, 1, true).await;
        env.kv.set_message_counter(TOKEN, 1, 4, true).await;
        // The sync takes the markers; the chat's UPDATE matches no row.
        wait_change_sets_empty(&env).await;
        wait_chats_count(&env, APP_ID, 1).await;
        smol::Timer::after(Duration::from_millis(500)).await;
        assert!(env.db.chat(APP_ID, 1).await.is_none());

        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 1}),
            None,
        )
        .await;
        let e = &env;
        wait_for("chat 1 stored", WAIT, POLL, move || async move {
            e.db.chat(APP_ID, 1).await.ok_or("missing".to_string())
        })
        .await;
        let chat_id = env.db.chat(APP_ID, 1).await.unwrap().id;
        wait_messages_count(&env, chat_id, 4).await;
        w.stop();
        amqp.close().await;
    });
}

/// At black-box level: markers added while syncs run are never lost.
#[test]
fn case6_markers_added_during_sync_are_synced() {
    let env = TestEnv::new("case6_markers_during_sync");
    smol::block_on(async {
        env.migrate();
        env.db.seed_app(APP_ID, TOKEN, 0).await;
        const CHATS: i64 = 40;
        env.db.seed_chats(1, APP_ID, TOKEN, CHATS).await;
        let mut w = env.start_writer(&[
            ("COUNT_SYNC_INTERVAL", "100ms"),
            ("COUNT_RECONCILE_INTERVAL", "1h"),
        ]);
        env.wait_consuming(&mut w).await;

        // Like the API: INCR the counter, then SADD the marker; many chats,
        // for 3 s, while the writer syncs every 100 ms.
        let mut con = env.kv.con().await;
        let start = Instant::now();
        let mut k = 0i64;
        let mut rounds = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            let n = k % CHATS + 1;
            let _: i64 = redis::cmd("INCR")
                .arg(format!("message_counter:{TOKEN}:{n}"))
                .query_async(&mut con)
                .await
                .unwrap();
            let _: i64 = redis::cmd("SADD")
                .arg("message_changes")
                .arg(format!("{TOKEN}:{n}"))
                .query_async(&mut con)
                .await
                .unwrap();
            if n == 1 {
                let _: i64 = redis::cmd("INCR")
                    .arg(format!("chat_counter:{TOKEN}"))
                    .query_async(&mut con)
                    .await
                    .unwrap();
                let _: i64 = redis::cmd("SADD")
                    .arg("chat_changes")
                    .arg(TOKEN)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
            k += 1;
            rounds += 1;
        }
        eprintln!("case6: {rounds} INCR+SADD rounds in 3 s");
        let mut want: Vec<(i64, i64)> = Vec::new();
        for n in 1..=CHATS {
            let v: i64 = env
                .kv
                .cmd(&["GET", &format!("message_counter:{TOKEN}:{n}")])
                .await;
            want.push((n, v));
        }
        let chats: i64 = env.kv.cmd(&["GET", &format!("chat_counter:{TOKEN}")]).await;
        let e = &env;
        let want_ref = &want;
        wait_for(
            "every count equals its counter",
            WAIT,
            POLL,
            move || async move {
                let rows: Vec<(i64, i64)> =
                    e.db.query("SELECT number, messages_count FROM chats ORDER BY number")
                        .await;
                if &rows == want_ref {
                    Ok(())
                } else {
                    let diff: Vec<String> = rows
                        .iter()
                        .zip(want_ref.iter())
                        .filter(|(a, b)| a != b)
                        .map(|(a, b)| format!("chat {}: count {} counter {}", a.0, a.1, b.1))
                        .collect();
                    Err(diff.join(", "))
                }
            },
        )
        .await;
        wait_chats_count(&env, APP_ID, chats).await;
        w.stop();
    });
}

/// Markers added during a sync, made deterministic with the library's own sync: the sync has
/// taken its members and is blocked in MySQL (a test transaction holds the
/// application row) when a new member is added. The new member must still
/// be in the set after that sync finishes, and the next sync applies it.
#[test]
fn case6_member_added_while_a_sync_is_blocked_survives() {
    use async_compat::Compat;
    use chat_writer::config::Config;
    use chat_writer::count_sync::CountSync;
    use chat_writer::mysql::Store;
    use chat_writer::redis_store::Redis;
    use mysql_async::prelude::Queryable;
    use std::rc::Rc;

    let env = TestEnv::new("counts_case6_blocked");
    smol::block_on(async {
        env.migrate_and_seed().await;
        env.db.seed_app(8, "app_y", 0).await;
        let vars = env.writer_env();
        let cfg = Config::from_lookup(|k| vars.get(k).cloned()).expect("test config");
        let store = Store::new(&cfg);
        let redis = Rc::new(Redis::new(&cfg.redis_url, &cfg.tls.redis).expect("redis url"));
        let sync = CountSync::new(store.clone(), redis);

        env.kv.set_chat_counter(TOKEN, 5, true).await;
        env.kv.set_chat_counter("app_y", 3, false).await;

        // Hold the row lock of application 7 so the sync's UPDATE waits.
        let url = format!("mysql://root@127.0.0.1:3306/{}", env.db_name);
        let mut locker = Compat::new(mysql_async::Conn::from_url(url))
            .await
            .expect("connect");
        Compat::new(locker.query_drop("BEGIN")).await.unwrap();
        Compat::new(locker.query_drop("SELECT id FROM applications WHERE id = 7 FOR UPDATE"))
            .await
            .unwrap();

        let racing = async {
            // The sync has popped app_x by now and waits on the lock.
            sleep(Duration::from_millis(500)).await;
            assert!(
                env.kv.smembers("chat_changes").await.is_empty(),
                "the sync took its member before blocking"
            );
            env.kv.sadd("chat_changes", "app_y").await;
            Compat::new(locker.query_drop("COMMIT")).await.unwrap();
        };
        let (first, ()) = smol::future::zip(sync.sync_changes(), racing).await;
        let first = first.expect("first sync");
        assert_eq!((first.counters, first.rows_changed), (1, 1));
        assert_eq!(env.db.chats_count(APP_ID).await, Some(5));
        assert_eq!(env.db.chats_count(8).await, Some(0));
        assert_eq!(
            env.kv.smembers("chat_changes").await,
            vec!["app_y".to_string()]
        );

        let second = sync.sync_changes().await.expect("second sync");
        assert_eq!((second.counters, second.rows_changed), (1, 1));
        assert_eq!(env.db.chats_count(8).await, Some(3));
        assert!(env.kv.smembers("chat_changes").await.is_empty());
        store.close().await;
    });
}
