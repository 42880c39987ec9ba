//! The HTTP endpoint: `/metrics` counts exactly what a test
//! published, stored and dead-lettered; `/readyz` follows the broker and
//! MySQL connections.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::common::faults::Proxy;
use crate::common::metrics::{http_get, scrape};
use crate::common::{free_port, wait_until, TestEnv, AMQP_BASE, CHAT_ID, TOKEN};
use crate::consumers::T1;

const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

fn message(chat_id: i64, number: i64) -> serde_json::Value {
    json!({"chat_id": chat_id, "token": TOKEN, "chat_number": 1, "number": number,
           "body": format!("body {number}")})
}

/// A proxy in front of the test's Elasticsearch-compatible server, and the
/// URL that goes through it.
fn es_proxy(env: &TestEnv) -> (Proxy, String) {
    let es = Proxy::start(
        env.es_url
            .trim_start_matches("http://")
            .parse::<SocketAddr>()
            .expect("ES address"),
    );
    let url = format!("http://127.0.0.1:{}", es.port);
    (es, url)
}

/// Waits until the writer has created the index and backfilled it from
/// MySQL (empty then), so no backfilled document is counted later.
async fn wait_empty_index(w: &crate::common::Writer) {
    wait_until(
        "index created and backfilled",
        WAIT,
        POLL,
        move || async move { w.log().contains("backfill: done, 0 documents") },
    )
    .await;
}

#[test]
fn metrics_count_what_was_published_stored_and_dead_lettered() {
    let env = TestEnv::new("metrics_counts");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[
            ("HTTP_ADDR", addr.as_str()),
            ("RETRY_DELAYS", "300ms"),
            ("COUNT_SYNC_INTERVAL", "1h"),
        ]);
        env.wait_consuming(&mut w).await;
        let e = &env;
        wait_empty_index(&w).await;

        // 10 new messages, then the same number 3 again (a duplicate), one
        // malformed payload, one message of a chat that never comes (one
        // delayed retry, then dead-lettered), one update.
        for n in 1..=10 {
            amqp.publish_json("create_messages", &message(CHAT_ID, n), Some(T1))
                .await;
        }
        wait_until("10 rows", WAIT, POLL, move || async move {
            e.db.count("messages", "1=1").await == 10
        })
        .await;
        amqp.publish_json("create_messages", &message(CHAT_ID, 3), Some(T1))
            .await;
        amqp.publish("create_messages", br#"{"chat_id": "one"}"#, Some(T1))
            .await;
        amqp.publish_json("create_messages", &message(99, 1), Some(T1))
            .await;
        amqp.publish_json(
            "update_messages",
            &json!({"chat_id": CHAT_ID, "token": TOKEN, "chat_number": 1, "number": 2,
                    "body": "edited"}),
            None,
        )
        .await;
        wait_until("2 dead letters", WAIT, POLL, move || async move {
            e.queue_stats("create_messages.dlq").map(|s| s.0) == Some(2)
        })
        .await;
        let a = addr.as_str();
        // Documents: 10 new, the duplicate's row again, the update.
        wait_until("12 documents indexed", WAIT, POLL, move || async move {
            scrape(a).value("chat_writer_index_documents_total", &[]) == Some(12.0)
        })
        .await;
        smol::Timer::after(Duration::from_millis(500)).await;

        let m = scrape(&addr);
        let cm = [("queue", "create_messages")];
        let um = [("queue", "update_messages")];
        let cc = [("queue", "create_chats")];
        // 10 + duplicate + malformed + the orphan twice (first try, retry).
        assert_eq!(m.must("chat_writer_deliveries_received_total", &cm), 14.0);
        assert_eq!(m.must("chat_writer_deliveries_stored_total", &cm), 11.0);
        assert_eq!(m.must("chat_writer_deliveries_duplicate_total", &cm), 1.0);
        assert_eq!(m.must("chat_writer_deliveries_retried_total", &cm), 1.0);
        assert_eq!(
            m.must("chat_writer_deliveries_dead_lettered_total", &cm),
            2.0
        );
        assert_eq!(m.must("chat_writer_batch_size_sum", &cm), 14.0);
        assert_eq!(m.must("chat_writer_deliveries_received_total", &um), 1.0);
        assert_eq!(m.must("chat_writer_deliveries_stored_total", &um), 1.0);
        assert_eq!(
            m.must("chat_writer_deliveries_dead_lettered_total", &um),
            0.0
        );
        assert_eq!(m.must("chat_writer_deliveries_received_total", &cc), 0.0);
        assert_eq!(m.must("chat_writer_index_documents_total", &[]), 12.0);
        assert_eq!(m.must("chat_writer_index_rejected_total", &[]), 0.0);
        assert_eq!(m.must("chat_writer_mysql_write_errors_total", &cm), 0.0);
        for dep in ["rabbitmq", "mysql", "redis", "elasticsearch"] {
            assert_eq!(
                m.must("chat_writer_up", &[("dependency", dep)]),
                1.0,
                "{dep}"
            );
        }
        assert_eq!(m.must("chat_writer_consuming", &[]), 1.0);
        let build = m
            .scrape
            .samples
            .iter()
            .find(|s| s.metric == "chat_writer_build_info")
            .unwrap_or_else(|| panic!("no build_info in\n{}", m.text));
        assert_eq!(build.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
        let commit = build.labels.get("commit").unwrap_or("");
        assert!(!commit.is_empty(), "{}", m.text);
        // The same commit as --version prints.
        assert!(version_mentions(commit), "commit {commit} not in --version");
        w.stop();
        amqp.close().await;
    });
}

fn version_mentions(commit: &str) -> bool {
    let out = std::process::Command::new(crate::common::BIN)
        .arg("--version")
        .output()
        .expect("chat-writer --version");
    String::from_utf8_lossy(&out.stdout).contains(commit)
}

/// `/readyz` status and body.
fn readyz(addr: &str) -> (u16, String) {
    match http_get(addr, "/readyz") {
        Ok((status, _, body)) => (status, body),
        Err(e) => (0, e),
    }
}

async fn wait_ready(addr: &str, want: (u16, &str)) {
    let mut last = (0, String::new());
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        last = readyz(addr);
        if last.0 == want.0 && last.1 == want.1 {
            return;
        }
        smol::Timer::after(Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {want:?}; last {last:?}");
}

/// Waits until `/readyz` answers `status` with a body starting with
/// `prefix`; returns the body.
async fn wait_ready_prefix(addr: &str, status: u16, prefix: &str) -> String {
    let mut last = (0, String::new());
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        last = readyz(addr);
        if last.0 == status && last.1.starts_with(prefix) {
            return last.1;
        }
        smol::Timer::after(Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {status} {prefix:?}...; last {last:?}");
}

#[test]
fn readyz_follows_the_broker_and_mysql_connections() {
    let env = TestEnv::new("metrics_readyz");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let broker = Proxy::start("127.0.0.1:5672".parse::<SocketAddr>().unwrap());
        let mysql = Proxy::start("127.0.0.1:3306".parse::<SocketAddr>().unwrap());
        let addr = format!("127.0.0.1:{}", free_port());
        let amqp_url = AMQP_BASE.replace("5672", &broker.port.to_string());
        let amqp_url = format!("{amqp_url}/{}", env.vhost);
        let mysql_port = mysql.port.to_string();
        let mut w = env.start_writer(&[
            ("HTTP_ADDR", addr.as_str()),
            ("RABBITMQ_URL", amqp_url.as_str()),
            ("DATABASE_PORT", mysql_port.as_str()),
        ]);
        wait_ready(&addr, (200, "ready\n")).await;
        assert_eq!(http_get(&addr, "/healthz").unwrap().2, "ok\n");

        broker.pause();
        // With the reason of the last failed attempt, naming the broker.
        let body = wait_ready_prefix(
            &addr,
            503,
            &format!(
                "rabbitmq: not connected: connect to amqp://guest:***@127.0.0.1:{}/",
                broker.port
            ),
        )
        .await;
        assert!(
            body.ends_with('\n') && body.lines().count() == 1,
            "{body:?}"
        );
        // Alive all the same.
        assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);
        broker.resume();
        wait_ready(&addr, (200, "ready\n")).await;

        mysql.pause();
        let body = wait_ready_prefix(
            &addr,
            503,
            &format!("mysql: not answering: 127.0.0.1:{mysql_port}: "),
        )
        .await;
        assert!(
            body.ends_with('\n') && body.lines().count() == 1,
            "{body:?}"
        );
        mysql.resume();
        wait_ready(&addr, (200, "ready\n")).await;

        let m = scrape(&addr);
        assert_eq!(m.must("chat_writer_up", &[("dependency", "rabbitmq")]), 1.0);
        assert_eq!(m.must("chat_writer_up", &[("dependency", "mysql")]), 1.0);
        w.stop_within(Duration::from_secs(20));
    });
}

/// A broker address that accepts the TCP connection and never answers the
/// AMQP handshake (nothing ever closes it) does not hang the writer: the
/// connect gives up after `CONNECT_TIMEOUT` (10 s), the writer backs off,
/// connects again and is ready, without a restart.
#[test]
fn a_broker_that_never_answers_the_handshake_is_retried() {
    let env = TestEnv::new("metrics_handshake");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let broker = Proxy::start("127.0.0.1:5672".parse::<SocketAddr>().unwrap());
        broker.hold_new();
        let addr = format!("127.0.0.1:{}", free_port());
        let amqp_url = AMQP_BASE.replace("5672", &broker.port.to_string());
        let amqp_url = format!("{amqp_url}/{}", env.vhost);
        let mut w = env.start_writer(&[
            ("HTTP_ADDR", addr.as_str()),
            ("RABBITMQ_URL", amqp_url.as_str()),
        ]);
        wait_ready(&addr, (503, "rabbitmq: not connected\n")).await;
        let b = &broker;
        wait_until(
            "the writer's connection held",
            WAIT,
            POLL,
            move || async move { b.held() == 1 },
        )
        .await;
        broker.resume();
        wait_ready(&addr, (200, "ready\n")).await;
        assert_eq!(broker.held(), 1);
        let log = w.log();
        assert!(
            log.contains("no AMQP handshake within 10 s; reconnecting"),
            "{log}"
        );
        w.stop_within(Duration::from_secs(20));
    });
}

/// The endpoint cannot be flooded: of 300 idle connections, exactly
/// MAX_CONNECTIONS (256) are held and the other 44 closed at once; once
/// they go, it answers again. A request whose headers are larger than one
/// read (a long bearer token) gets its whole answer, with no reset.
#[test]
fn http_endpoint_caps_connections_and_reads_whole_heads() {
    use std::io::{Read, Write};
    let env = TestEnv::new("metrics_http_limits");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[("HTTP_ADDR", addr.as_str())]);
        wait_ready(&addr, (200, "ready\n")).await;

        // A 2,000-byte header: the answer arrives whole, then EOF (no RST).
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let token = "a".repeat(2000);
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .expect("the whole answer, then EOF, no reset");
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse()
            .unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert_eq!(body.len(), length);
        assert!(body.ends_with("# EOF\n"));
        // The server lingers up to 1 s on a connection for the client's
        // close: let this one go before counting.
        drop(s);
        smol::Timer::after(Duration::from_millis(1500)).await;

        let held: Vec<std::net::TcpStream> = (0..300)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        smol::Timer::after(Duration::from_millis(1000)).await;
        let mut closed = 0;
        for c in &held {
            c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut b = [0u8; 1];
            if matches!((&*c).read(&mut b), Ok(0)) {
                closed += 1;
            }
        }
        assert_eq!(closed, 300 - 256);
        drop(held);
        wait_ready(&addr, (200, "ready\n")).await;
        let log = w.log();
        assert!(
            log.contains("http: 256 connections open; closed 1 more at once"),
            "{log}"
        );
        w.stop_within(Duration::from_secs(20));
    });
}

/// Elasticsearch that accepts connections and never answers reads as down
/// within seconds (the monitor's 2 s probe every 5 s), not only after the
/// indexer's 60 s request timeout, and as up again once it answers.
#[test]
fn elasticsearch_that_hangs_reads_as_down_within_seconds() {
    let env = TestEnv::new("metrics_es_hang");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let (es, es_url) = es_proxy(&env);
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[
            ("HTTP_ADDR", addr.as_str()),
            ("ELASTICSEARCH_URL", es_url.as_str()),
        ]);
        env.wait_consuming(&mut w).await;
        wait_empty_index(&w).await;
        let a = addr.as_str();
        let up = [("dependency", "elasticsearch")];
        wait_until("elasticsearch up", WAIT, POLL, move || async move {
            scrape(a).value("chat_writer_up", &up) == Some(1.0)
        })
        .await;
        es.freeze();
        wait_until(
            "elasticsearch down while it hangs",
            Duration::from_secs(15),
            POLL,
            move || async move { scrape(a).value("chat_writer_up", &up) == Some(0.0) },
        )
        .await;
        es.resume();
        wait_until("elasticsearch up again", WAIT, POLL, move || async move {
            scrape(a).value("chat_writer_up", &up) == Some(1.0)
        })
        .await;
        w.stop_within(Duration::from_secs(20));
    });
}

/// While Elasticsearch is unreachable, the index backlog counts what the
/// indexer holds and the index lag grows with the oldest held message; once
/// it is back and everything is indexed, the idle indexer reports lag 0.
#[test]
fn index_backlog_and_lag_move_while_elasticsearch_is_down() {
    let env = TestEnv::new("metrics_index_lag");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let (es, es_url) = es_proxy(&env);
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = env.start_writer(&[
            ("HTTP_ADDR", addr.as_str()),
            ("ELASTICSEARCH_URL", es_url.as_str()),
        ]);
        env.wait_consuming(&mut w).await;
        wait_empty_index(&w).await;

        es.pause();
        let cut = std::time::Instant::now();
        for n in 1..=5 {
            amqp.publish_json("create_messages", &message(CHAT_ID, n), Some(T1))
                .await;
        }
        let e = &env;
        wait_until("5 rows", WAIT, POLL, move || async move {
            e.db.count("messages", "1=1").await == 5
        })
        .await;
        let a = addr.as_str();
        // The monitor ages the held messages every 5 s.
        wait_until("index lag >= 6 s while down", WAIT, POLL, move || async move {
            scrape(a).value("chat_writer_index_lag_seconds", &[]) >= Some(6.0)
        })
        .await;
        let m = scrape(&addr);
        let backlog = m.must("chat_writer_index_backlog_messages", &[]);
        // One index message per committed batch: 1 to 5 of them, all held.
        assert!(
            (1.0..=5.0).contains(&backlog),
            "backlog {backlog}\n{}",
            m.text
        );
        let lag = m.must("chat_writer_index_lag_seconds", &[]);
        assert!(
            lag <= cut.elapsed().as_secs_f64() + 0.5,
            "lag {lag} s exceeds the outage {:?}",
            cut.elapsed()
        );
        assert_eq!(
            m.must("chat_writer_up", &[("dependency", "elasticsearch")]),
            0.0
        );
        assert_eq!(m.must("chat_writer_index_documents_total", &[]), 0.0);

        es.resume();
        wait_until("5 documents indexed", WAIT, POLL, move || async move {
            scrape(a).value("chat_writer_index_documents_total", &[]) == Some(5.0)
        })
        .await;
        // Idle (nothing received for 3 s): backlog and lag read 0.
        wait_until(
            "idle: lag 0 and backlog 0",
            WAIT,
            POLL,
            move || async move {
                let m = scrape(a);
                m.value("chat_writer_index_lag_seconds", &[]) == Some(0.0)
                    && m.value("chat_writer_index_backlog_messages", &[]) == Some(0.0)
            },
        )
        .await;
        assert_eq!(
            scrape(&addr).must("chat_writer_up", &[("dependency", "elasticsearch")]),
            1.0
        );
        w.stop();
        amqp.close().await;
    });
}

/// A batch taken while MySQL hangs and then cut off by a broker
/// disconnection is counted as abandoned; its redelivery is received again
/// and stored once, so `received = stored + retried + dead_lettered +
/// abandoned` still holds exactly.
#[test]
fn abandoned_deliveries_keep_the_received_identity() {
    let env = TestEnv::new("metrics_abandoned");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let mysql = Proxy::start("127.0.0.1:3306".parse::<SocketAddr>().unwrap());
        let addr = format!("127.0.0.1:{}", free_port());
        let mysql_port = mysql.port.to_string();
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[
            ("HTTP_ADDR", addr.as_str()),
            ("DATABASE_PORT", mysql_port.as_str()),
        ]);
        env.wait_consuming(&mut w).await;
        let a = addr.as_str();
        let cm = [("queue", "create_messages")];

        mysql.pause();
        for n in 1..=3 {
            amqp.publish_json("create_messages", &message(CHAT_ID, n), Some(T1))
                .await;
        }
        wait_until(
            "a batch taken (and stuck on MySQL)",
            WAIT,
            POLL,
            move || async move {
                scrape(a).value("chat_writer_deliveries_received_total", &cm) >= Some(1.0)
            },
        )
        .await;
        assert!(crate::common::faults::close_writer_connections(&env.vhost, "test") >= 1);
        wait_until(
            "the stuck batch counted as abandoned",
            WAIT,
            POLL,
            move || async move {
                scrape(a).value("chat_writer_deliveries_abandoned_total", &cm) >= Some(1.0)
            },
        )
        .await;
        mysql.resume();
        let e = &env;
        wait_until("3 rows", WAIT, POLL, move || async move {
            e.db.count("messages", "1=1").await == 3
        })
        .await;
        wait_until("3 stored", WAIT, POLL, move || async move {
            scrape(a).value("chat_writer_deliveries_stored_total", &cm) == Some(3.0)
        })
        .await;
        let m = scrape(&addr);
        let abandoned = m.must("chat_writer_deliveries_abandoned_total", &cm);
        assert!((1.0..=3.0).contains(&abandoned), "{}", m.text);
        assert_eq!(
            m.must("chat_writer_deliveries_received_total", &cm),
            3.0 + abandoned,
            "{}",
            m.text
        );
        assert_eq!(m.must("chat_writer_deliveries_retried_total", &cm), 0.0);
        assert_eq!(
            m.must("chat_writer_deliveries_dead_lettered_total", &cm),
            0.0
        );
        w.stop();
        amqp.close().await;
    });
}
