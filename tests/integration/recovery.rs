//! Recovery paths found by review: an index lost while the writer could not
//! see it, a backfill cut short, and SIGTERM while a dependency hangs
//! (README, "Failure semantics"; docs/elasticsearch.md). Faults are injected on resources the test
//! owns (a private osmem-server, a freezing proxy in front of MySQL).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::common::faults::{OsmemServer, Proxy};
use crate::common::load::{
    check_index, contract_mapping, mapping_types, wait_indexed, wait_rows, Expected, Publisher,
};
use crate::common::{wait_until, Es, TestEnv};
use crate::outages::{creates, seed};

/// Elasticsearch is down when the writer starts and comes back empty while
/// index work is being retried: the retried bulk must not auto-create an
/// unmapped index; the index is created with the mapping and every message,
/// old and new, is backfilled.
#[test]
fn elasticsearch_back_empty_after_the_writer_started_is_backfilled() {
    let env = TestEnv::new("es_back_empty");
    smol::block_on(async {
        seed(&env).await;
        let mut osmem = OsmemServer::start();
        let es = Es::new(&osmem.url(), &env.index);
        let url = osmem.url();
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut want = Expected::new();
        let mut w = env.start_writer(&[("ELASTICSEARCH_URL", &url)]);
        env.wait_consuming(&mut w).await;
        let mut published = Publisher::spawn(&env, creates(1, 50, &mut want), 0).join();
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        wait_indexed(&es, &rows, Duration::from_secs(60)).await;
        w.stop();

        osmem.stop();
        let mut w = env.start_writer(&[("ELASTICSEARCH_URL", &url)]);
        env.wait_consuming(&mut w).await;
        published += Publisher::spawn(&env, creates(51, 50, &mut want), 0).join();
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        smol::Timer::after(Duration::from_secs(2)).await; // bulks are being retried
        osmem.restart();
        let indexed = wait_indexed(&es, &rows, Duration::from_secs(60)).await;
        assert_eq!(mapping_types(&es).await, Some(contract_mapping()));
        let e = &es;
        wait_until(
            "backfill marked",
            Duration::from_secs(30),
            Duration::from_millis(200),
            move || async move { e.backfilled().await == Some(true) },
        )
        .await;
        assert_eq!(es.count().await, Some(rows.len() as u64));
        let (ok, r) = check_index(&es, &rows).await;
        assert!(r.is_ok(), "{r:?}");
        eprintln!(
            "[es_back_empty] published {published} / stored {} / indexed {indexed} ({ok})",
            rows.len()
        );
        assert_eq!(env.dead_and_retrying(), (0, 0));
        w.stop();
        amqp.close().await;
    });
}

/// The index exists with the mapping but its backfill never finished (the
/// writer was cut off between creating it and queuing the backfill): the
/// next writer sees the marker and backfills.
#[test]
fn index_created_but_never_backfilled_is_backfilled_by_the_next_writer() {
    let env = TestEnv::new("backfill_cut_short");
    smol::block_on(async {
        seed(&env).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut want = Expected::new();
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;
        let published = Publisher::spawn(&env, creates(1, 75, &mut want), 0).join();
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        wait_indexed(&env.es, &rows, Duration::from_secs(60)).await;
        w.stop();

        env.es.delete_index();
        let mapping = json!({"mappings": {
            "_meta": {"chat_writer": {"backfilled": false}},
            "properties": {"token": {"type": "keyword"}, "chat_number": {"type": "integer"},
                "number": {"type": "integer"}, "body": {"type": "text"}, "created_at": {"type": "date"}}}});
        let (status, _) = env
            .es
            .req("PUT", &format!("/{}", env.index), Some(mapping.to_string()))
            .await;
        assert_eq!(status, 200);
        assert_eq!(env.es.count().await, Some(0));

        let mut w = env.start_writer(&[]);
        let indexed = wait_indexed(&env.es, &rows, Duration::from_secs(60)).await;
        let e = &env.es;
        wait_until(
            "backfill marked",
            Duration::from_secs(30),
            Duration::from_millis(200),
            move || async move { e.backfilled().await == Some(true) },
        )
        .await;
        assert_eq!(env.es.count().await, Some(rows.len() as u64));
        eprintln!(
            "[backfill_cut_short] published {published} / stored {} / indexed {indexed}",
            rows.len()
        );
        w.stop();
        amqp.close().await;
    });
}

/// SIGTERM while MySQL hangs (connections open, no answer) with a batch in
/// flight, and while Elasticsearch hangs with index work in flight: exit 0
/// well within SHUTDOWN_TIMEOUT; the batch is not acked and lands on the
/// next run.
#[test]
fn sigterm_while_mysql_and_elasticsearch_hang_exits_0_in_time() {
    let env = TestEnv::new("sigterm_hang");
    smol::block_on(async {
        seed(&env).await;
        let mysql = Proxy::start("127.0.0.1:3306".parse::<SocketAddr>().unwrap());
        let osmem = OsmemServer::start();
        let es_proxy = Proxy::start(osmem.addr());
        let es_url = format!("http://127.0.0.1:{}", es_proxy.port);
        let es = Es::new(&osmem.url(), &env.index);
        let port = mysql.port.to_string();
        let extra = [
            ("DATABASE_PORT", port.as_str()),
            ("ELASTICSEARCH_URL", es_url.as_str()),
            ("SHUTDOWN_TIMEOUT", "8s"),
        ];
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut want = Expected::new();
        let mut w = env.start_writer(&extra);
        env.wait_consuming(&mut w).await;
        let mut published = Publisher::spawn(&env, creates(1, 25, &mut want), 0).join();
        wait_rows(&env, &want, Duration::from_secs(60)).await;

        // Both hang; more work arrives; the writer is stuck in MySQL and ES.
        mysql.freeze();
        es_proxy.freeze();
        published += Publisher::spawn(&env, creates(26, 25, &mut want), 0).join();
        smol::Timer::after(Duration::from_secs(2)).await;
        w.sigterm();
        let exit = w.wait_exit(Duration::from_secs(20));
        eprintln!("[sigterm_hang] exit {:?} after {:?}", exit.code, exit.after);
        assert_eq!(exit.code, Some(0), "clean exit; log:\n{}", w.log_tail(30));
        assert!(
            exit.after < Duration::from_secs(8),
            "within SHUTDOWN_TIMEOUT: {:?}",
            exit.after
        );

        mysql.resume();
        es_proxy.resume();
        let mut w = env.start_writer(&extra);
        let rows = wait_rows(&env, &want, Duration::from_secs(60)).await;
        let indexed = wait_indexed(&es, &rows, Duration::from_secs(60)).await;
        eprintln!(
            "[sigterm_hang] published {published} / stored {} / indexed {indexed}",
            rows.len()
        );
        assert_eq!(env.dead_and_retrying(), (0, 0));
        w.stop();
        amqp.close().await;
    });
}
