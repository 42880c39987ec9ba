//! Delayed retries (docs/queues-and-payloads.md, "Topology"; README, "Failure semantics"): a parent or row
//! that is not there yet goes through `<queue>.retry.<delay>` and lands when
//! it arrives; one that never arrives ends in `<queue>.dlq` with the retry
//! headers. A value MySQL refuses inside a batch is isolated by bisection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;

use crate::common::load::{check_index, wait_indexed, wait_rows, Expected};
use crate::common::time::{mysql_datetime, now_secs};
use crate::common::{
    assert_indexed, check_dead_letter, rabbitmqctl, wait_for, Got, TestEnv, APP_ID, CHAT_ID,
};
use crate::consumers::T1;

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// `name → arguments` (rabbitmqctl's rendering) of every queue in the vhost.
fn queue_arguments(env: &TestEnv) -> BTreeMap<String, String> {
    rabbitmqctl(&[
        "list_queues",
        "-p",
        &env.vhost,
        "--no-table-headers",
        "name",
        "arguments",
    ])
    .lines()
    .filter_map(|l| {
        let (n, a) = l.split_once('\t')?;
        Some((n.trim().to_string(), a.trim().to_string()))
    })
    .collect()
}

/// Asserts no `.dlq` holds a message; prints what the queues hold.
fn assert_nothing_dead(env: &TestEnv, what: &str) {
    let q = env.list_queues();
    let dead: Vec<(&String, &(u64, u64))> = q
        .iter()
        .filter(|(n, v)| n.ends_with(".dlq") && v.0 > 0)
        .collect();
    assert!(
        dead.is_empty(),
        "{what}: dead letters {dead:?}; queues {q:?}"
    );
}

#[test]
fn update_before_create_lands() {
    let env = TestEnv::new("update_before_create");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[("RETRY_DELAYS", "300ms,1s,2s")]);
        env.wait_consuming(&mut w).await;

        amqp.publish_json(
            "update_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "the edit"}),
            None,
        )
        .await;
        smol::Timer::after(Duration::from_millis(500)).await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "the original", "creator_id": 4}),
            Some(T1),
        )
        .await;
        let e = &env;
        let m = wait_for(
            "the update applied after its create",
            Duration::from_secs(15),
            POLL,
            move || async move {
                match e.db.message(CHAT_ID, 1).await {
                    Some(m) if m.body == b"the edit" => Ok(m),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        eprintln!("[update_before_create] final row {m:?}");
        assert_eq!(
            (m.token.as_str(), m.chat_number, m.creator_id),
            ("app_x", 1, Some(4))
        );
        assert_eq!(m.created_at, mysql_datetime((T1 * 1_000_000) as i64));
        assert!(m.updated_us > m.created_us, "updated_at moved: {m:?}");
        let d = assert_indexed(&env, &m).await;
        assert_eq!(d["_source"]["body"], "the edit");
        assert_eq!(env.db.count("messages", "1 = 1").await, 1);
        let q = env.list_queues();
        assert!(
            q.contains_key("update_messages.retry.300ms"),
            "the update went through the first retry tier: queues {q:?}"
        );
        assert_nothing_dead(&env, "update before create");
        w.stop();
        amqp.close().await;
    });
}

#[test]
fn message_whose_chat_arrives_two_seconds_later() {
    let env = TestEnv::new("chat_arrives_later");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[("RETRY_DELAYS", "1s,2s,4s")]);
        env.wait_consuming(&mut w).await;

        // Chat 2 does not exist yet: the next auto-increment id of `chats`
        // (the seed inserted id 1) is what the writer will give it.
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 2, "token": "app_x", "chat_number": 2, "number": 1,
                    "body": "early bird"}),
            Some(T1),
        )
        .await;
        let published = Instant::now();
        // While the chat is missing, watch the retry queues.
        let mut seen_retrying: BTreeMap<String, u64> = BTreeMap::new();
        while published.elapsed() < Duration::from_secs(2) {
            for (n, v) in env.list_queues() {
                if n.starts_with("create_messages.retry.") && v.0 > 0 {
                    *seen_retrying.entry(n).or_default() += v.0;
                }
            }
            smol::Timer::after(Duration::from_millis(100)).await;
        }
        assert!(
            env.db.message(2, 1).await.is_none(),
            "stored before its chat existed?"
        );
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 2}),
            Some(T1),
        )
        .await;
        let e = &env;
        let chat = wait_for("chat 2 stored", WAIT, POLL, move || async move {
            e.db.chat(APP_ID, 2).await.ok_or("no row".to_string())
        })
        .await;
        assert_eq!(chat.id, 2, "the chat got the id the message names");
        let m = wait_for(
            "the message stored once its chat exists",
            Duration::from_secs(15),
            POLL,
            move || async move { e.db.message(2, 1).await.ok_or("no row".to_string()) },
        )
        .await;
        eprintln!(
            "[chat_arrives_later] stored {:.1?} after publishing; retry queues seen holding it: \
             {seen_retrying:?}",
            published.elapsed()
        );
        assert_eq!(m.body, b"early bird");
        assert_eq!(m.created_at, mysql_datetime((T1 * 1_000_000) as i64));
        assert!(
            !seen_retrying.is_empty(),
            "the message should have waited in a create_messages.retry.* queue"
        );
        assert_indexed(&env, &m).await;
        assert_nothing_dead(&env, "chat arrives later");
        w.stop();
        amqp.close().await;
    });
}

#[test]
fn missing_parent_that_never_arrives_is_dead_lettered_after_the_tiers() {
    let env = TestEnv::new("missing_parent_dlq");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[("RETRY_DELAYS", "300ms,1s")]);
        env.wait_consuming(&mut w).await;

        let cases: [(&str, String); 3] = [
            (
                "create_chats",
                json!({"application_id": 999, "token": "ghost", "number": 1}).to_string(),
            ),
            (
                "create_messages",
                json!({"chat_id": 999, "token": "ghost", "chat_number": 1, "number": 1,
                       "body": "orphan"})
                .to_string(),
            ),
            (
                "update_messages",
                json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 77,
                       "body": "edit of nothing"})
                .to_string(),
            ),
        ];
        let start_secs = now_secs() as i64;
        for (q, payload) in &cases {
            let mut headers = FieldTable::default();
            headers.insert(
                "x-trace".into(),
                AMQPValue::LongString(format!("trace-{q}").into()),
            );
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(T1)
                .with_headers(headers);
            amqp.publish_props(q, payload.as_bytes(), props).await;
        }

        let mut failures = Vec::new();
        for (q, payload) in &cases {
            let dlq = format!("{q}.dlq");
            let a = &amqp;
            let d = dlq.clone();
            let g: Got = wait_for(
                &format!("{q}: dead letter after 2 tiers"),
                Duration::from_secs(20),
                Duration::from_millis(100),
                move || {
                    let d = d.clone();
                    async move { a.get(&d).await.ok_or("empty".to_string()) }
                },
            )
            .await;
            eprintln!(
                "[missing_parent_dlq] {dlq}: x-retry-count {:?}, x-original-queue {:?}, \
                 x-error {:?}, x-first-failure {:?}; body {}",
                g.header_int("x-retry-count"),
                g.header_str("x-original-queue"),
                g.header_str("x-error"),
                g.header_int("x-first-failure"),
                String::from_utf8_lossy(&g.body)
            );
            let mut p = Vec::new();
            if g.body != payload.as_bytes() {
                p.push("body changed".to_string());
            }
            if g.header_int("x-retry-count") != Some(2) {
                p.push(format!(
                    "x-retry-count should be 2 (the number of tiers), is {:?}",
                    g.headers.get("x-retry-count")
                ));
            }
            if g.header_str("x-original-queue").as_deref() != Some(q) {
                p.push(format!(
                    "x-original-queue {:?}",
                    g.headers.get("x-original-queue")
                ));
            }
            match g.header_str("x-error") {
                Some(e) if !e.trim().is_empty() && !e.contains('\n') => {}
                other => p.push(format!("x-error should be one non-empty line: {other:?}")),
            }
            match g.header_int("x-first-failure") {
                // The first failure happens at once, > 1 s before the last.
                Some(t) if t >= start_secs - 1 && t <= start_secs + 1 => {}
                other => p.push(format!(
                    "x-first-failure should be the first failure (~{start_secs}), is {other:?}"
                )),
            }
            if g.header_str("x-trace").as_deref() != Some(&format!("trace-{q}")) {
                p.push(format!(
                    "original header x-trace lost: {:?}",
                    g.headers.get("x-trace")
                ));
            }
            if g.timestamp != Some(T1) {
                p.push(format!("timestamp {:?} != {T1}", g.timestamp));
            }
            if g.content_type.as_deref() != Some("application/json") || g.delivery_mode != Some(2) {
                p.push(format!(
                    "properties changed: content_type {:?}, delivery_mode {:?}",
                    g.content_type, g.delivery_mode
                ));
            }
            if !p.is_empty() {
                failures.push(format!("{dlq}: {}", p.join("; ")));
            }
        }
        // No second copy keeps bouncing through the tiers.
        smol::Timer::after(Duration::from_millis(1500)).await;
        let q = env.list_queues();
        let args = queue_arguments(&env);
        for (name, _) in &cases {
            for tier in ["300ms", "1s"] {
                let rq = format!("{name}.retry.{tier}");
                match q.get(&rq) {
                    Some((0, _)) => {}
                    other => failures.push(format!("{rq}: should exist and be empty, {other:?}")),
                }
                let ttl = if tier == "1s" { 1000 } else { 300 };
                let a = args.get(&rq).cloned().unwrap_or_default();
                if !a.contains(&format!("{{\"x-message-ttl\",{ttl}}}"))
                    || !a.contains(&format!("{{\"x-dead-letter-routing-key\",\"{name}\"}}"))
                {
                    failures.push(format!("{rq}: arguments {a}"));
                }
            }
            let n = q.get(&format!("{name}.dlq")).map(|v| v.0);
            if n != Some(0) {
                failures.push(format!("{name}.dlq holds {n:?} more message(s)"));
            }
        }
        assert_eq!(env.db.count("chats", "1 = 1").await, 1);
        assert_eq!(env.db.count("messages", "1 = 1").await, 0);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        w.stop();
        amqp.close().await;
    });
}

/// One message MySQL refuses (a CHECK constraint, MariaDB error 4025) among
/// 200 valid ones taken as one batch: the 200 commit, the one is
/// dead-lettered with the MySQL error, nothing is retried.
#[test]
fn poison_message_in_a_batch_is_isolated() {
    let env = TestEnv::new("poison_in_batch");
    smol::block_on(async {
        env.migrate_and_seed().await;
        env.db
            .exec("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (body <> 'poison')")
            .await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut want: Expected = Expected::new();
        for n in 1..=201i64 {
            let body = if n == 101 {
                "poison".to_string()
            } else {
                format!("valid {n}")
            };
            amqp.publish_json(
                "create_messages",
                &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": n,
                        "body": body}),
                Some(T1),
            )
            .await;
            if n != 101 {
                want.insert((CHAT_ID, n), body);
            }
        }
        let started = Instant::now();
        let mut w = env.start_writer(&[
            ("RABBITMQ_PREFETCH_COUNT", "256"),
            // A retry would wait here, visible, instead of ending in the .dlq.
            ("RETRY_DELAYS", "30s"),
        ]);
        let rows = wait_rows(&env, &want, WAIT).await;
        eprintln!(
            "[poison_in_batch] 200 valid rows stored {:.1?} after start",
            started.elapsed()
        );
        let a = &amqp;
        let g = wait_for(
            "the poison message in create_messages.dlq",
            WAIT,
            Duration::from_millis(100),
            move || async move {
                a.get("create_messages.dlq")
                    .await
                    .ok_or("empty".to_string())
            },
        )
        .await;
        let err = g.header_str("x-error").unwrap_or_default();
        eprintln!("[poison_in_batch] dead letter x-error: {err}");
        assert_eq!(
            g.body,
            json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 101,
                   "body": "poison"})
            .to_string()
            .as_bytes()
        );
        if let Err(p) = check_dead_letter(&g, "create_messages", None) {
            panic!("poison dead letter: {p}");
        }
        assert!(
            err.contains("4025") || err.contains("no_poison"),
            "x-error should name the MySQL error (4025 / CONSTRAINT `no_poison`): {err:?}"
        );
        let indexed = wait_indexed(&env.es, &rows, WAIT).await;
        let q = env.list_queues();
        let retrying: Vec<_> = q
            .iter()
            .filter(|(n, v)| n.contains(".retry.") && v.0 > 0)
            .collect();
        assert!(retrying.is_empty(), "nothing retried: {q:?}");
        assert_eq!(
            q.get("create_messages.dlq").map(|v| v.0),
            Some(0),
            "exactly one dead letter: {q:?}"
        );
        assert!(env.db.message(CHAT_ID, 101).await.is_none());
        let (ok, _) = check_index(&env.es, &rows).await;
        eprintln!(
            "[poison_in_batch] published 201 / stored {} / indexed {indexed} ({ok}) / \
             dead-lettered 1",
            rows.len()
        );
        w.stop();
        amqp.close().await;
    });
}
