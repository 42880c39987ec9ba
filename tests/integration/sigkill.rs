//! SIGKILL at random points (README, "Failure semantics"): a 20,000-message backlog
//! (creates on a few chats plus edits of messages created earlier), the
//! writer killed 3 to 5 times in a row after random delays, then a clean run
//! until drained: every row exactly once, every document indexed with its
//! version, counts equal to the counters, nothing dead-lettered.

use std::time::{Duration, Instant};

use crate::common::faults::Rng;
use crate::common::load::{
    body_of, create_message, update_message, wait_indexed, wait_rows, Expected, Publisher, Tally,
    T0,
};
use crate::common::{wait_until, TestEnv, APP_ID, TOKEN, WORK_QUEUES};

const CHATS: i64 = 4;
/// Messages per chat created before the backlog (then edited in it).
const EARLY: i64 = 500;
/// Messages per chat in the end.
const PER_CHAT: i64 = 5000;

#[test]
fn sigkill_at_random_points_during_a_backlog() {
    let env = TestEnv::new("sigkill_backlog");
    let mut rng = Rng::from_env("sigkill_backlog");
    smol::block_on(async {
        env.migrate_and_seed().await;
        for c in 2..=CHATS {
            env.db.seed_chat(c, APP_ID, TOKEN, c, 0).await;
        }
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let extra = [
            ("RABBITMQ_PREFETCH_COUNT", "256"),
            ("RETRY_DELAYS", "1s,2s,5s"),
            ("COUNT_SYNC_INTERVAL", "500ms"),
        ];

        // Messages created earlier, with a clean run.
        let mut want = Expected::new();
        let mut early = Vec::new();
        for n in 1..=EARLY {
            for c in 1..=CHATS {
                let body = body_of(c, n);
                early.push(create_message(c, TOKEN, c, n, &body));
                want.insert((c, n), body);
            }
        }
        let mut published = Publisher::spawn(&env, early, 0).join();
        let mut w = env.start_writer(&extra);
        wait_rows(&env, &want, Duration::from_secs(60)).await;
        w.stop();

        // The backlog: 18,000 creates and 2,000 edits of the early ones.
        let mut backlog = Vec::new();
        let mut edits = Vec::new();
        for n in 1..=EARLY {
            for c in 1..=CHATS {
                let body = format!("edited: {}", body_of(c, n));
                edits.push(update_message(c, TOKEN, c, n, &body));
                want.insert((c, n), body);
            }
        }
        let mut edits = edits.into_iter();
        for n in EARLY + 1..=PER_CHAT {
            for c in 1..=CHATS {
                let body = body_of(c, n);
                backlog.push(create_message(c, TOKEN, c, n, &body));
                want.insert((c, n), body);
                if (n * CHATS + c) % 9 == 0 {
                    backlog.extend(edits.next());
                }
            }
        }
        backlog.extend(edits);
        assert_eq!(backlog.len(), 20_000);
        let t_pub = Instant::now();
        published += Publisher::spawn(&env, backlog, 0).join();
        eprintln!(
            "[sigkill_backlog] published the 20,000-message backlog in {:.1?}",
            t_pub.elapsed()
        );
        env.kv.set_chat_counter(TOKEN, CHATS, true).await;
        for c in 1..=CHATS {
            env.kv.set_message_counter(TOKEN, c, PER_CHAT, true).await;
        }

        // The writer drains thousands of messages a second: kill it at
        // random points of the backlog (a random row count in each slice,
        // then a random few milliseconds more), not after a fixed time.
        let kills = rng.range(3, 6);
        let total = (CHATS * PER_CHAT) as u64;
        let early = (CHATS * EARLY) as u64;
        let slice = (total - early) / (kills + 1);
        for k in 1..=kills {
            let threshold = (early + slice * (k - 1) + rng.range(slice / 4, slice)) as i64;
            let extra_ms = rng.range(0, 120);
            let mut w = env.start_writer(&extra);
            let t = Instant::now();
            loop {
                w.assert_running();
                if env.db.count("messages", "1 = 1").await >= threshold
                    || t.elapsed() > Duration::from_secs(60)
                {
                    break;
                }
                smol::Timer::after(Duration::from_millis(10)).await;
            }
            smol::Timer::after(Duration::from_millis(extra_ms)).await;
            w.kill();
            let rows = env.db.count("messages", "1 = 1").await;
            let q = env.list_queues();
            eprintln!(
                "[sigkill_backlog] kill {k}/{kills} {:.0?} after start (target {threshold} rows \
                 + {extra_ms} ms): {rows} rows; create_messages {:?}, update_messages {:?}, \
                 chat_writer.index {:?} (messages, consumers)",
                t.elapsed(),
                q.get("create_messages"),
                q.get("update_messages"),
                q.get("chat_writer.index")
            );
            for q in WORK_QUEUES {
                env.wait_queue_settled(q);
            }
        }

        // The clean run.
        let t_clean = Instant::now();
        let mut w = env.start_writer(&extra);
        let rows = wait_rows(&env, &want, Duration::from_secs(240)).await;
        eprintln!(
            "[sigkill_backlog] clean run stored everything in {:.1?}",
            t_clean.elapsed()
        );
        let wrong_time: Vec<_> = rows
            .iter()
            .filter(|r| r.created_us != ((T0 + r.number as u64) * 1_000_000) as i64)
            .take(3)
            .collect();
        assert!(
            wrong_time.is_empty(),
            "created_at is the AMQP timestamp: {wrong_time:?}"
        );
        let edited_ok = rows
            .iter()
            .filter(|r| r.number <= EARLY && r.updated_us > r.created_us)
            .count();
        assert_eq!(
            edited_ok as i64,
            EARLY * CHATS,
            "every edit moved updated_at"
        );
        let indexed = wait_indexed(&env.es, &rows, Duration::from_secs(120)).await;
        env.wait_queue_empty("chat_writer.index", Duration::from_secs(60))
            .await;
        for q in WORK_QUEUES {
            env.wait_queue_empty(q, Duration::from_secs(30)).await;
        }
        let e = &env;
        wait_until(
            "counts equal the counters",
            Duration::from_secs(20),
            Duration::from_millis(300),
            move || async move {
                let mut ok = e.db.chats_count(APP_ID).await == Some(CHATS);
                for c in 1..=CHATS {
                    ok &= e.db.messages_count(c).await == Some(PER_CHAT);
                }
                ok
            },
        )
        .await;
        w.stop();
        let mut counts = Vec::new();
        for c in 1..=CHATS {
            counts.push(env.db.messages_count(c).await);
        }
        assert_eq!(counts, vec![Some(PER_CHAT); CHATS as usize]);
        let (dead, in_retry) = env.dead_and_retrying();
        Tally {
            published,
            stored: rows.len(),
            indexed,
            dead_lettered: dead,
            in_retry,
            duplicates: 0,
        }
        .print("sigkill_backlog");
        eprintln!(
            "[sigkill_backlog] {kills} kills; counts {counts:?}; es _count {:?}",
            env.es.count().await
        );
        assert_eq!(env.es.count().await, Some(rows.len() as u64));
        assert_eq!(
            (dead, in_retry),
            (0, 0),
            "nothing dead-lettered or retrying"
        );
        amqp.close().await;
    });
}
