//! Operator commands: `chat-writer reindex` after an index loss while no
//! writer ran, and `chat-writer dlq show|replay` on a dead-letter queue.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;

use crate::common::load::{
    check_index, contract_mapping, create_message, mapping_types, update_message, wait_indexed,
    wait_rows, Expected, Publisher,
};
use crate::common::{TestEnv, APP_ID, CHAT_ID, TOKEN};
use crate::consumers::T1;

/// Runs `chat-writer <args>` to completion (60 s at most): (exit code,
/// stdout, stderr).
fn run(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let mut p = env.spawn(args, &[]);
    let exit = p.wait_exit(Duration::from_secs(60));
    (exit.code, p.stdout(), p.log())
}

#[test]
fn reindex_rebuilds_a_deleted_index() {
    let env = TestEnv::new("reindex");
    smol::block_on(async {
        env.migrate_and_seed().await;
        env.db.seed_chat(2, APP_ID, TOKEN, 2, 0).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut want = Expected::new();
        let mut items = Vec::new();
        for n in 1..=150 {
            for c in 1..=2 {
                let body = format!("reindex me {c}/{n}");
                items.push(create_message(c, TOKEN, c, n, &body));
                want.insert((c, n), body);
            }
        }
        let mut w = env.start_writer(&[]);
        Publisher::spawn(&env, items, 0).join();
        wait_rows(&env, &want, Duration::from_secs(60)).await;
        let mut edits = Vec::new();
        for n in 1..=40 {
            let body = format!("edited {n}");
            edits.push(update_message(1, TOKEN, 1, n, &body));
            want.insert((1, n), body);
        }
        Publisher::spawn(&env, edits, 0).join();
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        wait_indexed(&env.es, &rows, Duration::from_secs(60)).await;
        w.stop();

        // The index is lost while no writer runs.
        env.es.delete_index();
        assert!(!env.es.index_exists().await);
        let (code, out, err) = run(&env, &["reindex"]);
        eprintln!("[reindex] exit {code:?}; stdout {out:?}; stderr:\n{err}");
        assert_eq!(code, Some(0), "reindex exits 0");
        assert!(
            !err.trim().is_empty(),
            "reindex prints progress lines on stderr"
        );
        assert_eq!(mapping_types(&env.es).await, Some(contract_mapping()));
        let (ok, r) = check_index(&env.es, &rows).await;
        assert!(
            r.is_ok(),
            "after reindex ({ok} of {} right): {r:?}",
            rows.len()
        );
        assert_eq!(env.es.count().await, Some(rows.len() as u64));

        // Twice is harmless: same documents, same versions.
        let (code, _, err) = run(&env, &["reindex"]);
        assert_eq!(code, Some(0), "second reindex: {err}");
        let (ok2, r) = check_index(&env.es, &rows).await;
        assert!(r.is_ok(), "after a second reindex: {r:?}");
        eprintln!(
            "[reindex] rows {} / indexed {ok} / after a second run {ok2}",
            rows.len()
        );
        amqp.close().await;
    });
}

#[test]
fn dlq_show_and_replay() {
    let env = TestEnv::new("dlq_show_replay");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        amqp.declare("create_messages.dlq").await;
        // Three dead letters of messages whose chat (id 2) was missing.
        let payload = |n: i64| {
            json!({"chat_id": 2, "token": "app_x", "chat_number": 2, "number": n,
                   "body": format!("dead letter {n}")})
            .to_string()
        };
        for n in 1..=3i64 {
            let mut h = FieldTable::default();
            h.insert("x-retry-count".into(), AMQPValue::LongLongInt(5));
            h.insert(
                "x-original-queue".into(),
                AMQPValue::LongString("create_messages".into()),
            );
            h.insert(
                "x-error".into(),
                AMQPValue::LongString(format!("chat 2 not found (try {n})").into()),
            );
            h.insert("x-first-failure".into(), AMQPValue::LongLongInt(T1 as i64));
            h.insert(
                "x-trace".into(),
                AMQPValue::LongString(format!("trace-{n}").into()),
            );
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(T1 + n as u64)
                .with_headers(h);
            amqp.publish_props("create_messages.dlq", payload(n).as_bytes(), props)
                .await;
        }
        smol::Timer::after(Duration::from_millis(200)).await;
        let depth = |env: &TestEnv, q: &str| env.list_queues().get(q).map(|v| v.0);

        // show: everything, then 2; nothing removed.
        let (code, out, err) = run(&env, &["dlq", "show", "create_messages"]);
        eprintln!("[dlq] show: exit {code:?}\n{out}{err}");
        assert_eq!(code, Some(0), "dlq show exits 0: {err}");
        for n in 1..=3 {
            assert!(
                out.contains(&format!("chat 2 not found (try {n})")),
                "show prints x-error of dead letter {n}"
            );
            assert!(
                out.contains(&format!("dead letter {n}")),
                "show prints the body of dead letter {n}"
            );
        }
        let (code, out, _) = run(&env, &["dlq", "show", "create_messages", "2"]);
        assert_eq!(code, Some(0));
        assert!(out.contains("dead letter 1") && out.contains("dead letter 2"));
        assert!(
            !out.contains("dead letter 3"),
            "show N prints at most N: {out}"
        );
        assert_eq!(
            depth(&env, "create_messages.dlq"),
            Some(3),
            "show keeps them"
        );

        // replay 2, then the rest; no writer runs, so they wait in the queue.
        let (code, out, err) = run(&env, &["dlq", "replay", "create_messages", "2"]);
        eprintln!("[dlq] replay 2: exit {code:?}\n{out}{err}");
        assert_eq!(code, Some(0), "dlq replay exits 0: {err}");
        assert!(
            format!("{out}{err}")
                .split(|c: char| !c.is_ascii_digit())
                .any(|w| w == "2"),
            "replay prints how many it moved (2)"
        );
        assert_eq!(depth(&env, "create_messages.dlq"), Some(1));
        assert_eq!(depth(&env, "create_messages"), Some(2));
        let (code, out, err) = run(&env, &["dlq", "replay", "create_messages"]);
        assert_eq!(code, Some(0), "dlq replay (all): {err}");
        assert!(
            format!("{out}{err}")
                .split(|c: char| !c.is_ascii_digit())
                .any(|w| w == "1"),
            "replay prints how many it moved (1): {out}{err}"
        );
        assert_eq!(depth(&env, "create_messages.dlq"), Some(0));
        let back = amqp.peek_all("create_messages").await;
        assert_eq!(back.len(), 3);
        let mut problems = Vec::new();
        for n in 1..=3i64 {
            let Some(g) = back.iter().find(|g| g.body == payload(n).as_bytes()) else {
                problems.push(format!("dead letter {n}: body not back byte for byte"));
                continue;
            };
            if !matches!(g.header_int("x-retry-count"), None | Some(0)) {
                problems.push(format!(
                    "{n}: x-retry-count should be reset, is {:?}",
                    g.headers.get("x-retry-count")
                ));
            }
            if g.header_str("x-trace") != Some(format!("trace-{n}")) {
                problems.push(format!("{n}: original header lost: {:?}", g.headers));
            }
            if g.timestamp != Some(T1 + n as u64)
                || g.content_type.as_deref() != Some("application/json")
                || g.delivery_mode != Some(2)
            {
                problems.push(format!(
                    "{n}: properties changed: {:?} {:?} {:?}",
                    g.timestamp, g.content_type, g.delivery_mode
                ));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));

        // The cause is fixed (the chat exists now): the writer stores them.
        env.db.seed_chat(2, APP_ID, TOKEN, 2, 0).await;
        let mut w = env.start_writer(&[("RETRY_DELAYS", "30s")]);
        let mut want = Expected::new();
        for n in 1..=3 {
            want.insert((2, n), format!("dead letter {n}"));
        }
        let rows = wait_rows(&env, &want, Duration::from_secs(20)).await;
        for r in &rows {
            assert_eq!(
                r.created_us,
                ((T1 + r.number as u64) * 1_000_000) as i64,
                "created_at from the kept AMQP timestamp"
            );
        }
        assert_eq!(
            env.db
                .count("messages", &format!("chat_id = {CHAT_ID}"))
                .await,
            0
        );
        wait_indexed(&env.es, &rows, Duration::from_secs(20)).await;
        let (dead, retry) = env.dead_and_retrying();
        assert_eq!((dead, retry), (0, 0));
        eprintln!("[dlq] replayed 3, stored {} after the fix", rows.len());
        w.stop();
        amqp.close().await;
    });
}
