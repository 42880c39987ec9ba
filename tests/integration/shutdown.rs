//! SIGTERM while a backlog drains: exit 0, nothing lost, nothing twice,
//! final count sync.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{wait_until, TestEnv, APP_ID, CHAT_ID, TOKEN};

const N: i64 = 5_000;

#[test]
fn sigterm_while_draining_a_backlog() {
    let env = TestEnv::new("sigterm_backlog");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut confirms = Vec::with_capacity(N as usize);
        for n in 1..=N {
            let p = json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": n,
                           "body": format!("backlog message {n}")});
            confirms.push(
                amqp.publish_nowait("create_messages", p.to_string().as_bytes(), None)
                    .await,
            );
        }
        for c in confirms {
            c.await.expect("publisher confirm");
        }

        // Long intervals: only the final sync at shutdown can write counts.
        let slow = [
            ("COUNT_SYNC_INTERVAL", "1h"),
            ("COUNT_RECONCILE_INTERVAL", "1h"),
            ("RABBITMQ_PREFETCH_COUNT", "256"),
            ("SHUTDOWN_TIMEOUT", "20s"),
        ];
        let mut w = env.start_writer(&slow);
        let start = Instant::now();
        loop {
            if env.db.count("messages", "chat_id = 1").await > 0 {
                break;
            }
            w.assert_running();
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no row within 20 s"
            );
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        env.kv.set_message_counter(TOKEN, 1, N, true).await;
        env.kv.set_chat_counter(TOKEN, 1, true).await;
        w.sigterm();
        let at_term = env.db.count("messages", "chat_id = 1").await;
        let exit = w.wait_exit(Duration::from_secs(25));
        assert_eq!(
            exit.code,
            Some(0),
            "exit after SIGTERM: {exit:?}\n{}",
            w.log_tail(60)
        );
        eprintln!(
            "sigterm: {at_term} rows at SIGTERM, exited after {:?}",
            exit.after
        );

        // The final sync ran.
        assert_eq!(
            env.db.messages_count(CHAT_ID).await,
            Some(N),
            "final sync: messages_count"
        );
        assert_eq!(
            env.db.chats_count(APP_ID).await,
            Some(1),
            "final sync: chats_count"
        );

        // Stored rows and the deliveries left in the queue partition 1..=N.
        env.wait_queue_settled("create_messages");
        let stored: BTreeSet<i64> = env.db.message_numbers(CHAT_ID).await.into_iter().collect();
        let left: Vec<i64> = amqp
            .peek_all("create_messages")
            .await
            .iter()
            .map(|g| {
                let v: Value = serde_json::from_slice(&g.body).expect("queued payload");
                v["number"].as_i64().expect("number")
            })
            .collect();
        let left_set: BTreeSet<i64> = left.iter().copied().collect();
        eprintln!(
            "sigterm: {} stored, {} still queued",
            stored.len(),
            left.len()
        );
        assert_eq!(left.len(), left_set.len(), "a delivery is queued twice");
        let both: Vec<&i64> = stored.intersection(&left_set).take(10).collect();
        assert!(
            both.is_empty(),
            "stored rows whose delivery is still queued (not acked before exit): {both:?}"
        );
        let all: BTreeSet<i64> = stored.union(&left_set).copied().collect();
        assert_eq!(
            all.len() as i64,
            N,
            "lost {} message(s) (neither stored nor queued)",
            N - all.len() as i64
        );
        let queues = env.list_queues();
        for (name, (messages, _)) in &queues {
            if name.ends_with(".dlq") || name.contains(".retry.") {
                assert_eq!(*messages, 0, "{name} should be empty: {queues:?}");
            }
        }

        // Restart: the rest is stored, each exactly once, and indexed.
        let mut w2 = env.start_writer(&[("RABBITMQ_PREFETCH_COUNT", "256")]);
        let e = &env;
        wait_until(
            "all rows stored after the restart",
            Duration::from_secs(40),
            Duration::from_millis(200),
            move || async move { e.db.count("messages", "chat_id = 1").await >= N },
        )
        .await;
        let numbers = env.db.message_numbers(CHAT_ID).await;
        assert_eq!(
            numbers,
            (1..=N).collect::<Vec<i64>>(),
            "each message exactly once"
        );
        wait_until(
            "create_messages drained",
            Duration::from_secs(20),
            Duration::from_millis(300),
            move || async move { e.list_queues().get("create_messages").map(|q| q.0) == Some(0) },
        )
        .await;
        wait_until(
            "all documents indexed",
            Duration::from_secs(40),
            Duration::from_millis(500),
            move || async move { e.es.count().await == Some(N as u64) },
        )
        .await;
        assert_eq!(env.db.messages_count(CHAT_ID).await, Some(N));
        w2.stop();
        amqp.close().await;
    });
}
