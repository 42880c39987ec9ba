//! The index queue's adjustable prefetch (`BatchConsumer::set_prefetch`):
//! a per-consumer `basic.qos` changed by cancelling and consuming again,
//! on classic and quorum queues (a channel-level qos, tried before, is
//! refused on quorum queues and closed the whole connection).

use std::time::Duration;

use chat_writer::amqp::consumer::{BatchConsumer, Next};
use chat_writer::shutdown::Shutdown;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

use crate::common::{wait_until, TestEnv, APP_ID, TOKEN};
use crate::consumers::T1;

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Consumes 20 messages through a prefetch change in the middle and checks
/// that each one comes out exactly once, in order, and that the broker
/// holds the new limit.
fn set_prefetch_keeps_deliveries(tag: &str, args: FieldTable) {
    let env = TestEnv::new(tag);
    smol::block_on(async {
        let amqp = env.amqp().await;
        amqp.declare_with_args("q", args).await;
        for i in 0..20 {
            amqp.publish("q", i.to_string().as_bytes(), None).await;
        }
        let conn = lapin::Connection::connect(&env.amqp_url(), Default::default())
            .await
            .expect("connect");
        let shutdown = Shutdown::new();
        let mut c = BatchConsumer::open_adjustable(&conn, "q", 4)
            .await
            .expect("open");
        // The broker delivers 4 (the limit) and holds the rest.
        wait_until(
            "4 unacked, 16 ready",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { env.queue_stats("q") == Some((16, 4, 1)) },
        )
        .await;
        // The 4 received stay unacked and are handed out first (a quorum
        // queue serves the new consumer once the cancelled one's deliveries
        // are settled, a classic queue at once).
        c.set_prefetch(10).await.expect("set_prefetch");
        assert_eq!(c.prefetch(), 10);
        let mut got: Vec<String> = Vec::new();
        let mut batches = 0;
        while got.len() < 20 {
            let batch = match c.next(&shutdown, Some(Duration::from_secs(5))).await {
                Ok(Next::Batch(b)) => b,
                Ok(Next::Idle) => panic!("no delivery within 5 s after {got:?}"),
                Ok(Next::Shutdown) => unreachable!("shutdown never triggered"),
                Err(e) => panic!("consumer failed after {got:?}: {e}"),
            };
            assert!(
                batch.len() <= 10,
                "batch of {} over the prefetch",
                batch.len()
            );
            got.extend(
                batch
                    .iter()
                    .map(|d| String::from_utf8_lossy(&d.data).into_owned()),
            );
            c.ack_through(batch.last().unwrap()).await.expect("ack");
            batches += 1;
            if batches == 1 {
                assert!(got.len() >= 4, "the 4 carried deliveries first: {got:?}");
                // The broker now holds the new limit of 10.
                let left = 20 - got.len() as u64;
                let want = (left - left.min(10), left.min(10), 1);
                wait_until(
                    &format!("(ready, unacked, consumers) = {want:?}"),
                    Duration::from_secs(10),
                    Duration::from_millis(50),
                    || async { env.queue_stats("q") == Some(want) },
                )
                .await;
            }
        }
        let want: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
        wait_until(
            "queue empty, nothing unacked",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { env.queue_stats("q") == Some((0, 0, 1)) },
        )
        .await;
        let _ = conn.close(200, "bye".into()).await;
        amqp.close().await;
    });
}

#[test]
fn set_prefetch_keeps_deliveries_on_a_classic_queue() {
    set_prefetch_keeps_deliveries("prefetch_classic", FieldTable::default());
}

#[test]
fn set_prefetch_keeps_deliveries_on_a_quorum_queue() {
    set_prefetch_keeps_deliveries("prefetch_quorum", quorum());
}

/// An operator made every queue a quorum queue before the writer started:
/// the indexer's prefetch follows its message sizes there too, and every
/// document is indexed once.
#[test]
fn indexer_on_quorum_queues() {
    let env = TestEnv::new("prefetch_quorum_writer");
    smol::block_on(async {
        env.migrate();
        env.db.seed_app(APP_ID, TOKEN, 0).await;
        env.db.seed_chats(1, APP_ID, TOKEN, 4).await;
        let amqp = env.amqp().await;
        for q in crate::common::WORK_QUEUES {
            amqp.declare_with_args(q, quorum()).await;
        }
        amqp.declare_with_args("chat_writer.index", quorum()).await;
        // A backlog (full batches: large index messages) ...
        for n in 1..=600i64 {
            let chat = n % 4 + 1;
            amqp.publish_json(
                "create_messages",
                &json!({"chat_id": chat, "token": TOKEN, "chat_number": chat, "number": n,
                        "body": format!("backlog message {n} {}", "x".repeat(200))}),
                Some(T1),
            )
            .await;
        }
        let mut w = env.start_writer(&[("RUST_LOG", "debug")]);
        env.wait_consuming(&mut w).await;
        let e = &env;
        wait_until(
            "600 documents",
            Duration::from_secs(30),
            Duration::from_millis(100),
            move || async move { e.es.count().await == Some(600) },
        )
        .await;
        // ... then a trickle (one document per index message).
        for n in 601..=640i64 {
            amqp.publish_json(
                "create_messages",
                &json!({"chat_id": 1, "token": TOKEN, "chat_number": 1, "number": n,
                        "body": "trickle"}),
                Some(T1),
            )
            .await;
            smol::Timer::after(Duration::from_millis(20)).await;
        }
        wait_until(
            "640 documents",
            Duration::from_secs(30),
            Duration::from_millis(100),
            move || async move { e.es.count().await == Some(640) },
        )
        .await;
        wait_until(
            "index queue drained",
            Duration::from_secs(10),
            Duration::from_millis(100),
            move || async move {
                e.queue_stats("chat_writer.index").map(|s| (s.0, s.1)) == Some((0, 0))
            },
        )
        .await;
        w.assert_running();
        let log = w.log();
        let changes: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("index queue prefetch"))
            .collect();
        assert!(
            !changes.is_empty(),
            "the prefetch never changed; log tail:\n{}",
            w.log_tail(40)
        );
        assert!(
            !log.contains("NOT_IMPLEMENTED") && !log.contains(" ERROR "),
            "broker refused something; log tail:\n{}",
            w.log_tail(40)
        );
        assert_eq!(env.db.count("messages", "1=1").await, 640);
        w.stop();
        amqp.close().await;
    });
}
