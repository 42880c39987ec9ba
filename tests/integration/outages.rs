//! Outages during load (README, "Failure semantics": the broker closing a
//! channel, `_bulk` rejecting some items, an outage longer than any retry
//! budget, and more), each injected on resources the test owns: a TCP
//! proxy in front of MySQL / Redis / Elasticsearch, a private redis-server
//! and osmem-server, and the test vhost's own AMQP connections and channels.
//! For each: nothing lost, nothing stored twice, nothing valid
//! dead-lettered, every document indexed with its version, counts right.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::faults::{
    close_consumer_channels, close_writer_connections, OsmemServer, Proxy, RedisServer,
};
use crate::common::load::{
    body_of, check_index, contract_mapping, create_message, mapping_types, update_message,
    wait_indexed, wait_rows, Expected, Item, Publisher, Tally,
};
use crate::common::{wait_until, Es, Kv, TestEnv, APP_ID, TOKEN};

/// Chats 1..=4 (ids = numbers) of application 7 "app_x".
const CHATS: i64 = 4;

/// Seeds application 7 and chats 1..=CHATS.
pub(crate) async fn seed(env: &TestEnv) {
    env.migrate_and_seed().await;
    for c in 2..=CHATS {
        env.db.seed_chat(c, APP_ID, TOKEN, c, 0).await;
    }
}

/// `per_chat` creates in each chat, numbers `first..first + per_chat`,
/// interleaved across chats.
pub(crate) fn creates(first: i64, per_chat: i64, want: &mut Expected) -> Vec<Item> {
    let mut items = Vec::new();
    for n in first..first + per_chat {
        for c in 1..=CHATS {
            let body = body_of(c, n);
            items.push(create_message(c, TOKEN, c, n, &body));
            want.insert((c, n), body);
        }
    }
    items
}

/// Rows stored now.
async fn stored(env: &TestEnv) -> i64 {
    env.db.count("messages", "1 = 1").await
}

/// Sets every chat's counter to `per_chat` (and marks it), as the API does.
async fn set_counters(kv: &Kv, per_chat: i64) {
    kv.set_chat_counter(TOKEN, CHATS, true).await;
    for c in 1..=CHATS {
        kv.set_message_counter(TOKEN, c, per_chat, true).await;
    }
}

/// Waits until every chat's messages_count is `per_chat` and the
/// application's chats_count is CHATS.
async fn wait_counts(env: &TestEnv, per_chat: i64, timeout: Duration) {
    let what = format!("messages_count = {per_chat} in every chat");
    wait_until(
        &what,
        timeout,
        Duration::from_millis(300),
        move || async move {
            let mut ok = env.db.chats_count(APP_ID).await == Some(CHATS);
            for c in 1..=CHATS {
                ok &= env.db.messages_count(c).await == Some(per_chat);
            }
            ok
        },
    )
    .await;
    let counts: Vec<Option<i64>> = {
        let mut v = Vec::new();
        for c in 1..=CHATS {
            v.push(env.db.messages_count(c).await);
        }
        v
    };
    eprintln!("[counts] chats_count {CHATS}, messages_count per chat {counts:?}");
}

/// Sleeps `d` while checking that the writer stays up and nothing valid is
/// dead-lettered; returns the rows stored at the end.
async fn hold(env: &TestEnv, w: &mut crate::common::Writer, d: Duration, what: &str) -> i64 {
    let end = Instant::now() + d;
    while Instant::now() < end {
        w.assert_running();
        let (dead, _) = env.dead_and_retrying();
        assert_eq!(dead, 0, "{what}: a valid message was dead-lettered");
        smol::Timer::after(Duration::from_millis(500)).await;
    }
    stored(env).await
}

/// The final checks shared by every outage test; prints the tally.
async fn converge(
    env: &TestEnv,
    es: &Es,
    w: &mut crate::common::Writer,
    want: &Expected,
    published: usize,
    what: &str,
) -> Tally {
    let rows = wait_rows(env, want, Duration::from_secs(90)).await;
    let indexed = wait_indexed(es, &rows, Duration::from_secs(60)).await;
    env.wait_queue_empty("chat_writer.index", Duration::from_secs(30))
        .await;
    for q in crate::common::WORK_QUEUES {
        env.wait_queue_empty(q, Duration::from_secs(30)).await;
    }
    w.assert_running();
    let (dead, in_retry) = env.dead_and_retrying();
    let t = Tally {
        published,
        stored: rows.len(),
        indexed,
        dead_lettered: dead,
        in_retry,
        duplicates: 0, // (chat_id, number) is unique; compare_rows checked
    };
    t.print(what);
    assert_eq!(dead, 0, "{what}: nothing valid dead-lettered");
    assert_eq!(in_retry, 0, "{what}: nothing waiting in a retry queue");
    t
}

/// MySQL unreachable (through a proxy the test owns) for 6 s while
/// messages keep coming: nothing dead-lettered, all stored once after.
#[test]
fn case8_mysql_unreachable_during_load() {
    let env = TestEnv::new("case8_mysql_outage");
    smol::block_on(async {
        seed(&env).await;
        let mysql: SocketAddr = "127.0.0.1:3306".parse().unwrap();
        let proxy = Proxy::start(mysql);
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let port = proxy.port.to_string();
        // Short tiers: an outage taken for a missing parent would reach the
        // .dlq within the outage.
        let mut w = env.start_writer(&[("DATABASE_PORT", &port), ("RETRY_DELAYS", "500ms,1s")]);
        env.wait_consuming(&mut w).await;
        set_counters(&env.kv, 600).await;

        let mut want = Expected::new();
        let publisher = Publisher::spawn(&env, creates(1, 600, &mut want), 300);
        smol::Timer::after(Duration::from_millis(1500)).await;
        let before = stored(&env).await;
        proxy.pause();
        let t_pause = Instant::now();
        // Connections already open inside the writer die now; settle.
        smol::Timer::after(Duration::from_millis(500)).await;
        let at_pause = stored(&env).await;
        let after = hold(&env, &mut w, Duration::from_secs(6), "MySQL down").await;
        proxy.resume();
        eprintln!(
            "[case8] MySQL unreachable for {:.1?}: rows {before} before, {at_pause} .. {after} \
             during; proxy refused {} connection(s); published so far {}",
            t_pause.elapsed(),
            proxy.refused(),
            publisher.sent()
        );
        assert_eq!(
            at_pause,
            after,
            "rows were stored while the proxy to MySQL was paused ({} connection(s) ever went \
             through it, {} refused): the writer does not reach MySQL at \
             DATABASE_HOST:DATABASE_PORT over TCP. mysql_async's prefer_socket (default true) \
             switches a loopback host to the server's @@socket; the writer should set \
             prefer_socket(false) so it connects where it is told",
            proxy.accepted(),
            proxy.refused()
        );
        assert!(
            proxy.refused() > 0,
            "the writer never tried to reconnect during the outage"
        );
        let published = publisher.join();
        converge(
            &env,
            &env.es,
            &mut w,
            &want,
            published,
            "case8 MySQL outage",
        )
        .await;
        wait_counts(&env, 600, Duration::from_secs(20)).await;
        w.stop();
        amqp.close().await;
    });
}

/// Redis unreachable (a private redis-server behind a proxy) for 6 s: MySQL
/// writes continue, and the counts converge once it is back.
#[test]
fn redis_unreachable_during_load() {
    let env = TestEnv::new("redis_outage");
    smol::block_on(async {
        seed(&env).await;
        let redis = RedisServer::start();
        let kv = Kv::with_url(&redis.url());
        let proxy = Proxy::start(redis.addr());
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let url = format!("redis://127.0.0.1:{}/0", proxy.port);
        let mut w = env.start_writer(&[("REDIS_URL", &url), ("RETRY_DELAYS", "500ms,1s")]);
        env.wait_consuming(&mut w).await;

        let per_chat = 600;
        let mut want = Expected::new();
        let publisher = Publisher::spawn(&env, creates(1, per_chat, &mut want), 300);
        // The API side: counters and markers move with what is published
        // (straight to Redis; only the writer's path is cut).
        let bump = || {
            let sent = publisher.sent() as i64 / CHATS;
            let kv = kv.clone();
            async move { set_counters(&kv, sent).await }
        };
        smol::Timer::after(Duration::from_millis(1500)).await;
        bump().await;
        proxy.pause();
        let t_pause = Instant::now();
        let at_pause = stored(&env).await;
        let end = Instant::now() + Duration::from_secs(6);
        while Instant::now() < end {
            w.assert_running();
            bump().await;
            smol::Timer::after(Duration::from_millis(500)).await;
        }
        let after = stored(&env).await;
        proxy.resume();
        eprintln!(
            "[redis_outage] Redis unreachable for {:.1?}: rows {at_pause} -> {after} during; \
             proxy refused {} connection(s)",
            t_pause.elapsed(),
            proxy.refused()
        );
        assert!(
            after >= at_pause + 500,
            "MySQL writes should continue while Redis is down: {at_pause} -> {after}"
        );
        let published = publisher.join();
        set_counters(&kv, per_chat).await;
        converge(&env, &env.es, &mut w, &want, published, "Redis outage").await;
        wait_counts(&env, per_chat, Duration::from_secs(20)).await;
        w.stop();
        amqp.close().await;
    });
}

/// During a backlog the broker closes the consumers' channels (as
/// `consumer_timeout` does), then closes the writer's connections again and
/// again for 5 s. The writer reconnects, resumes every consumer, and the
/// redelivered messages are stored once.
#[test]
fn case4_broker_closes_channels_and_connections() {
    let env = TestEnv::new("case4_broker");
    smol::block_on(async {
        seed(&env).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let per_chat = 1500;
        let mut want = Expected::new();
        let mut items = creates(1, per_chat, &mut want);
        // Some edits of messages of the backlog's first part: their creates
        // are ahead in the other queue; a late one retries (short tiers).
        for n in 1..=50 {
            let body = format!("edited {n}");
            items.push(update_message(1, TOKEN, 1, n, &body));
            want.insert((1, n), body);
        }
        // A backlog, then a steady 300 messages/s while the faults happen.
        let split = items.len() / 2;
        let later = items.split_off(split);
        let mut published = Publisher::spawn(&env, items, 0).join();
        set_counters(&env.kv, per_chat).await;
        let mut w = env.start_writer(&[("RETRY_DELAYS", "1s,2s,4s,8s")]);
        let steady = Publisher::spawn(&env, later, 300);
        let e = &env;
        wait_until(
            "300 rows stored",
            Duration::from_secs(30),
            Duration::from_millis(100),
            move || async move { stored(e).await >= 300 },
        )
        .await;

        // Channel-level close of every consuming channel.
        let n0 = stored(&env).await;
        let hit = close_consumer_channels(&env.vhost);
        eprintln!("[case4] closed {hit} consuming channel(s) at {n0} rows");
        assert!(
            hit >= 3,
            "expected the 3 work consumers' channels, hit {hit}"
        );
        smol::Timer::after(Duration::from_millis(300)).await;
        env.wait_consumers_back(Duration::from_secs(30)).await;
        let n1 = stored(&env).await;
        wait_until(
            "progress after the channel close",
            Duration::from_secs(30),
            Duration::from_millis(100),
            move || async move { stored(e).await > n1 },
        )
        .await;

        // Connections closed every second for 5 s.
        let mut closed = Vec::new();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            closed.push(close_writer_connections(
                &env.vhost,
                "test: broker going away",
            ));
            w.assert_running();
            smol::Timer::after(Duration::from_secs(1)).await;
        }
        eprintln!(
            "[case4] connections closed per round: {closed:?}; rows {}",
            stored(&env).await
        );
        assert!(closed[0] >= 1, "no writer connection to close: {closed:?}");
        let during = steady.sent();
        published += steady.join();
        eprintln!("[case4] {during} of the steady load published while faults were injected");
        env.wait_consumers_back(Duration::from_secs(30)).await;
        converge(
            &env,
            &env.es,
            &mut w,
            &want,
            published,
            "case4 broker closes",
        )
        .await;
        wait_counts(&env, per_chat, Duration::from_secs(20)).await;
        w.stop();
        amqp.close().await;
    });
}

/// Elasticsearch unreachable (a proxy in front of a private
/// osmem-server) for 6 s during load: MySQL writes continue, index work
/// waits, and every document lands afterwards. A document already at a
/// higher external version stays, and its 409 does not block the queue.
#[test]
fn case5_elasticsearch_down_during_load_then_back() {
    let env = TestEnv::new("case5_es_outage");
    smol::block_on(async {
        seed(&env).await;
        let osmem = OsmemServer::start();
        let proxy = Proxy::start(osmem.addr());
        let es = Es::new(&format!("http://127.0.0.1:{}", proxy.port), &env.index);
        let direct = Es::new(&osmem.url(), &env.index);
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let url = es.base.clone();
        let mut w = env.start_writer(&[("ELASTICSEARCH_URL", &url)]);
        env.wait_consuming(&mut w).await;
        let d = &direct;
        wait_until(
            "index created",
            Duration::from_secs(20),
            Duration::from_millis(100),
            move || async move { d.index_exists().await },
        )
        .await;
        // A newer version of message (1, 5) already in the index.
        let future = 9_000_000_000_000_000i64;
        let planted = json!({"token": "app_x", "chat_number": 1, "number": 5,
                             "body": "from the future", "created_at": "2030-01-01T00:00:00.000000Z"});
        direct.put_doc("app_x:1:5", future, &planted).await;

        let per_chat = 500;
        let mut want = Expected::new();
        let publisher = Publisher::spawn(&env, creates(1, per_chat, &mut want), 300);
        smol::Timer::after(Duration::from_millis(1000)).await;
        proxy.pause();
        let t_pause = Instant::now();
        let at_pause = stored(&env).await;
        let after = hold(&env, &mut w, Duration::from_secs(6), "ES down").await;
        let backlog = env
            .list_queues()
            .get("chat_writer.index")
            .map(|v| v.0)
            .unwrap_or(0);
        proxy.resume();
        eprintln!(
            "[case5] ES unreachable for {:.1?}: rows {at_pause} -> {after} during; \
             chat_writer.index held {backlog} message(s); proxy refused {}",
            t_pause.elapsed(),
            proxy.refused()
        );
        assert!(
            after >= at_pause + 500,
            "MySQL writes should continue while ES is down: {at_pause} -> {after}"
        );
        assert!(backlog > 0, "index work should wait in chat_writer.index");
        let published = publisher.join();
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        let (others, planted_row): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|r| !(r.chat_id == 1 && r.number == 5));
        let indexed = wait_indexed(&direct, &others, Duration::from_secs(60)).await;
        env.wait_queue_empty("chat_writer.index", Duration::from_secs(30))
            .await;
        let doc = direct.doc("app_x:1:5").await.expect("planted doc");
        assert_eq!(
            (&doc["_source"], doc["_version"].as_i64()),
            (&planted, Some(future)),
            "an older version overwrote a newer one (row {planted_row:?})"
        );
        let (dead, in_retry) = env.dead_and_retrying();
        Tally {
            published,
            stored: others.len() + planted_row.len(),
            indexed: indexed + 1,
            dead_lettered: dead,
            in_retry,
            duplicates: 0,
        }
        .print("case5 ES outage");
        assert_eq!((dead, in_retry), (0, 0));
        w.stop();
        amqp.close().await;
    });
}

/// Elasticsearch stopped for 6 s during load and restarted EMPTY on the same
/// port: the writer recreates the index with the mapping and backfills every
/// message from MySQL, including updates made during the outage.
#[test]
fn elasticsearch_restarted_empty_is_backfilled() {
    let env = TestEnv::new("es_restart_empty");
    smol::block_on(async {
        seed(&env).await;
        let mut osmem = OsmemServer::start();
        let es = Es::new(&osmem.url(), &env.index);
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let url = osmem.url();
        let mut w = env.start_writer(&[("ELASTICSEARCH_URL", &url)]);
        env.wait_consuming(&mut w).await;

        let mut want = Expected::new();
        let first = Publisher::spawn(&env, creates(1, 250, &mut want), 0).join();
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        wait_indexed(&es, &rows, Duration::from_secs(60)).await;
        eprintln!(
            "[es_restart_empty] {} documents indexed; stopping ES",
            rows.len()
        );

        osmem.stop();
        let t_stop = Instant::now();
        // Load during the outage: new messages and edits of old ones.
        let mut items = creates(251, 250, &mut want);
        for n in 1..=100 {
            let body = format!("edited while ES was down {n}");
            items.push(update_message(2, TOKEN, 2, n, &body));
            want.insert((2, n), body);
        }
        let at_stop = stored(&env).await;
        let publisher = Publisher::spawn(&env, items, 300);
        let after = hold(&env, &mut w, Duration::from_secs(6), "ES stopped").await;
        let published = first + publisher.join();
        osmem.restart();
        let t_back = Instant::now();
        eprintln!(
            "[es_restart_empty] ES down {:.1?}: rows {at_stop} -> {after}; restarted empty",
            t_stop.elapsed()
        );
        assert!(after > at_stop, "MySQL writes continue while ES is down");
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        let e = &es;
        wait_until(
            "index recreated",
            Duration::from_secs(30),
            Duration::from_millis(200),
            move || async move { e.index_exists().await },
        )
        .await;
        let indexed = wait_indexed(&es, &rows, Duration::from_secs(40)).await;
        eprintln!(
            "[es_restart_empty] index converged {:.1?} after ES came back",
            t_back.elapsed()
        );
        assert_eq!(
            mapping_types(&es).await,
            Some(contract_mapping()),
            "the recreated index has the contract's mapping"
        );
        assert_eq!(
            es.count().await,
            Some(rows.len() as u64),
            "no extra document"
        );
        env.wait_queue_empty("chat_writer.index", Duration::from_secs(30))
            .await;
        let (ok, r) = check_index(&es, &rows).await;
        assert!(r.is_ok(), "{r:?}");
        let (dead, in_retry) = env.dead_and_retrying();
        Tally {
            published,
            stored: rows.len(),
            indexed: indexed.min(ok),
            dead_lettered: dead,
            in_retry,
            duplicates: 0,
        }
        .print("ES restarted empty");
        assert_eq!((dead, in_retry), (0, 0));
        w.stop();
        amqp.close().await;
    });
}
