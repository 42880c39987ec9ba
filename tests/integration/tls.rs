//! TLS to all four services: the writer over amqps://, rediss://, https://
//! and MySQL with DATABASE_SSL_MODE, against servers the test owns (see
//! tests/common/tls.rs): the happy path, mutual TLS, refused certificates
//! and the recovery after they are fixed, an Elasticsearch API key, a
//! dropped broker connection, and bad TLS configuration.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

use crate::common::metrics::{http_get, scrape};
use crate::common::time::mysql_datetime;
use crate::common::tls::{self, EsAuth, MariaDb, Pki, RedisTls, TlsProxy};
use crate::common::{
    assert_indexed, free_port, wait_for, wait_until, Amqp, Db, Kv, MessageRow, TestEnv, Writer,
    APP_ID, CHAT_ID, TOKEN,
};
use crate::consumers::T1;

const RABBITMQ: &str = "127.0.0.1:5672";
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const S: u64 = 1_000_000;

fn rabbitmq() -> SocketAddr {
    RABBITMQ.parse().expect("address")
}

fn es_upstream(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("ES address")
}

/// The process-wide PKI and MariaDB (initialising a server takes seconds);
/// tests that do not change its certificate share it, each in its own
/// database. Never dropped: its watcher removes it with the process.
struct Shared {
    pki: Pki,
    mysql: MariaDb,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let pki = Pki::new();
        let mysql = MariaDb::start(&pki, free_port(), &pki.server, &pki.ca_file());
        Shared { pki, mysql }
    })
}

/// The test's database on a TLS MariaDB (read over its unix socket),
/// dropped at the end.
struct TlsDb<'a> {
    mysql: &'a MariaDb,
    name: String,
    db: Db,
}

impl<'a> TlsDb<'a> {
    fn new(mysql: &'a MariaDb, name: &str) -> TlsDb<'a> {
        TlsDb {
            mysql,
            name: name.to_string(),
            db: Db::with_url(&mysql.socket_url(name)),
        }
    }
}

impl Drop for TlsDb<'_> {
    fn drop(&mut self) {
        let _ = self
            .mysql
            .sql(&format!("DROP DATABASE IF EXISTS `{}`", self.name));
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The writer's environment: the test's plain services
/// ([`TestEnv::writer_env`]), then one service after another moved to TLS.
struct Vars(BTreeMap<String, String>);

impl Vars {
    fn new(env: &TestEnv) -> Vars {
        Vars(env.writer_env())
    }

    fn set(mut self, k: &str, v: impl Into<String>) -> Vars {
        self.0.insert(k.to_string(), v.into());
        self
    }

    fn unset(mut self, k: &str) -> Vars {
        self.0.remove(k);
        self
    }

    /// RabbitMQ through `proxy`, reached as `host`.
    fn amqps(self, env: &TestEnv, proxy: &TlsProxy, host: &str, ca: &Path) -> Vars {
        self.set(
            "RABBITMQ_URL",
            format!("amqps://guest:guest@{host}:{}/{}", proxy.port, env.vhost),
        )
        .set("RABBITMQ_TLS_CA_FILE", path(ca))
    }

    /// MySQL on `mysql` as root (password in the environment), `mode`.
    fn mysql(self, env: &TestEnv, mysql: &MariaDb, mode: &str, ca: &Path) -> Vars {
        self.set("DATABASE_HOST", "127.0.0.1")
            .set("DATABASE_PORT", mysql.port.to_string())
            .set("DATABASE_USERNAME", "root")
            .set("DATABASE_PASSWORD", mysql.password.clone())
            .set("DATABASE_NAME", env.db_name.clone())
            .set("DATABASE_SSL_MODE", mode)
            .set("DATABASE_TLS_CA_FILE", path(ca))
    }

    /// Redis DB 0 of `redis`, reached as `host`.
    fn rediss(self, redis: &RedisTls, host: &str, ca: &Path) -> Vars {
        self.set("REDIS_URL", redis.url(host, 0))
            .set("REDIS_TLS_CA_FILE", path(ca))
    }

    /// Elasticsearch through `proxy` (no credentials yet).
    fn https(self, proxy: &TlsProxy, ca: &Path) -> Vars {
        self.set(
            "ELASTICSEARCH_URL",
            format!("https://127.0.0.1:{}", proxy.port),
        )
        .set("ELASTICSEARCH_TLS_CA_FILE", path(ca))
    }

    /// `<prefix>_TLS_CERT_FILE` and `<prefix>_TLS_KEY_FILE`.
    fn client_cert(self, prefix: &str, c: &tls::CertFiles) -> Vars {
        self.set(&format!("{prefix}_TLS_CERT_FILE"), path(&c.cert))
            .set(&format!("{prefix}_TLS_KEY_FILE"), path(&c.key))
    }

    fn http_addr(&self) -> String {
        self.0["HTTP_ADDR"].clone()
    }
}

/// `migrate` with `vars`, expecting exit 0.
fn migrate(env: &TestEnv, vars: &Vars) {
    let mut m = env.spawn_vars(&["migrate"], &vars.0);
    let exit = m.wait_exit(Duration::from_secs(60));
    assert_eq!(exit.code, Some(0), "migrate:\n{}", m.log_tail(40));
}

/// Application 7 "app_x" and its chat 1, as the plain tests seed them.
async fn seed(db: &Db) {
    db.seed_app(APP_ID, TOKEN, 0).await;
    db.seed_chat(CHAT_ID, APP_ID, TOKEN, 1, 0).await;
}

/// `/readyz`: status and body (0 and the error when nothing answers).
fn readyz(addr: &str) -> (u16, String) {
    match http_get(addr, "/readyz") {
        Ok((status, _, body)) => (status, body),
        Err(e) => (0, e),
    }
}

/// Waits until `/readyz` answers 503 naming `service` and `reason`, and a
/// line of the log names both too; returns the body.
async fn wait_refused(w: &mut Writer, addr: &str, service: &str, reason: &str) -> String {
    let what = format!("/readyz 503 naming {service} and {reason:?}, and a log line saying so");
    let w = &*w;
    wait_for(&what, WAIT, POLL, move || async move {
        let (status, body) = readyz(addr);
        let logged = w
            .log()
            .lines()
            .any(|l| l.contains(service) && l.contains(reason));
        if status == 503 && body.contains(service) && body.contains(reason) && logged {
            Ok(body)
        } else {
            Err(format!(
                "/readyz {status} {body:?}; log line found: {logged}; log tail:\n{}",
                w.log_tail(6)
            ))
        }
    })
    .await
}

async fn wait_ready(addr: &str) {
    wait_for("/readyz 200", WAIT, POLL, move || async move {
        match readyz(addr) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

fn message(number: i64) -> serde_json::Value {
    json!({"chat_id": CHAT_ID, "token": TOKEN, "chat_number": 1, "number": number,
           "body": format!("over TLS {number}")})
}

/// Publishes messages `numbers` of chat 1 (AMQP timestamp T1).
async fn publish(amqp: &Amqp, numbers: std::ops::RangeInclusive<i64>) {
    for n in numbers {
        amqp.publish_json("create_messages", &message(n), Some(T1))
            .await;
    }
}

/// Waits until chat 1 has `n` rows.
async fn wait_rows(db: &Db, n: i64) {
    wait_for(&format!("{n} rows"), WAIT, POLL, move || async move {
        match db.count("messages", "chat_id = 1").await {
            c if c == n => Ok(()),
            c => Err(format!("{c} rows")),
        }
    })
    .await
}

/// Chat 1 holds exactly messages 1..=n, each once with its body and
/// timestamp, each indexed once with its version and whole source.
async fn assert_exactly(env: &TestEnv, db: &Db, n: i64) {
    wait_rows(db, n).await;
    let rows: Vec<MessageRow> = db.messages_where("chat_id = 1").await;
    let numbers: Vec<i64> = rows.iter().map(|r| r.number).collect();
    assert_eq!(numbers, (1..=n).collect::<Vec<_>>(), "each message once");
    for r in &rows {
        assert_eq!(r.body_str(), format!("over TLS {}", r.number), "{r:?}");
        assert_eq!(r.created_at, mysql_datetime((T1 * S) as i64), "{r:?}");
        assert_eq!(r.updated_at, r.created_at, "{r:?}");
        assert_indexed(env, r).await;
    }
    let e = env;
    wait_for("the index count", WAIT, POLL, move || async move {
        match e.es.count().await {
            Some(c) if c == n as u64 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// (ready + unacked) of `queue`.
fn held(env: &TestEnv, queue: &str) -> u64 {
    env.queue_stats(queue).map(|(r, u, _)| r + u).unwrap_or(0)
}

// ---------------------------------------------------------------- the rig

#[test]
fn rig_proxy_swaps_certificates_requires_client_certs_and_closes() {
    let pki = Pki::new();
    let proxy = TlsProxy::start(rabbitmq(), &pki.untrusted);
    let ca = pki.ca_file();
    // AMQP 0-9-1 protocol header; the broker answers with connection.start.
    let hello = b"AMQP\x00\x00\x09\x01";

    let err = tls::tls_connect(proxy.addr(), "127.0.0.1", &ca, None).err();
    assert!(
        err.as_deref().is_some_and(|e| e.contains("UnknownIssuer")),
        "{err:?}"
    );
    proxy.set_cert(&pki.wrong_name);
    let err = tls::tls_connect(proxy.addr(), "127.0.0.1", &ca, None).err();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("not valid for name")),
        "{err:?}"
    );
    proxy.set_cert(&pki.expired);
    let err = tls::tls_connect(proxy.addr(), "localhost", &ca, None).err();
    assert!(
        err.as_deref().is_some_and(|e| e.contains("expired")),
        "{err:?}"
    );
    proxy.set_cert(&pki.server);
    for name in ["127.0.0.1", "localhost"] {
        let mut s = tls::tls_connect(proxy.addr(), name, &ca, None).expect("trusted");
        s.write_all(hello).unwrap();
        tls::read_until_contains(&mut s, b"PLAIN").expect("connection.start");
    }
    assert_eq!(proxy.handshakes(), 2);
    let errors = proxy.handshake_errors();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors.iter().all(|e| e.contains("alert")), "{errors:?}");

    // A client certificate is required: none, or one of the other CA, is refused.
    proxy.require_client_cert(Some(&ca));
    for client in [None, Some(&pki.other_client)] {
        let r = tls::tls_connect(proxy.addr(), "127.0.0.1", &ca, client).and_then(|mut s| {
            s.write_all(hello).map_err(|e| e.to_string())?;
            tls::read_until_contains(&mut s, b"PLAIN").map(|_| ())
        });
        assert!(r.is_err(), "client cert {client:?} accepted");
    }
    let mut s = tls::tls_connect(proxy.addr(), "127.0.0.1", &ca, Some(&pki.client)).unwrap();
    s.write_all(hello).unwrap();
    tls::read_until_contains(&mut s, b"PLAIN").expect("connection.start with client cert");
    assert_eq!(proxy.live_connections(), 1);
    assert_eq!(proxy.close_connections(), 1);
    let mut buf = [0u8; 64];
    let r = std::io::Read::read(&mut s, &mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(proxy.live_connections(), 0);
}

/// `GET <path>` through the HTTP proxy with `authorization`: status and body.
fn https_get(proxy: &TlsProxy, ca: &std::path::Path, authorization: Option<&str>) -> (u16, String) {
    let mut s = tls::tls_connect(proxy.addr(), "127.0.0.1", ca, None).expect("TLS");
    let mut req = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_string();
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut all = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut all);
    let text = String::from_utf8_lossy(&all).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn rig_http_proxy_checks_authorization() {
    let env = crate::common::TestEnv::new("tls_rig_http");
    let pki = Pki::new();
    let proxy = TlsProxy::start_http(es_upstream(&env.es_url), &pki.server, EsAuth::api_key("k1"));
    let ca = pki.ca_file();
    let (status, body) = https_get(&proxy, &ca, None);
    assert_eq!(status, 401, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(v["status"], 401);
    assert_eq!(v["error"]["type"], "security_exception");
    assert_eq!(https_get(&proxy, &ca, Some("ApiKey k2")).0, 401);
    let (status, body) = https_get(&proxy, &ca, Some("ApiKey k1"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("cluster_name") || body.contains("version"),
        "{body}"
    );
    proxy.set_auth(EsAuth {
        basic: vec![("elastic".into(), "p@ss:w".into())],
        forbidden_api_keys: vec!["k1".into()],
        ..EsAuth::default()
    });
    assert_eq!(https_get(&proxy, &ca, Some("ApiKey k1")).0, 403);
    let basic = format!("Basic {}", tls::base64_encode(b"elastic:p@ss:w"));
    assert_eq!(https_get(&proxy, &ca, Some(&basic)).0, 200);
    assert_eq!(proxy.requests(), (2, 2, 1));
    assert_eq!(
        proxy.auth_seen(),
        vec!["<none>", "ApiKey k2", "ApiKey k1", basic.as_str()]
    );
    assert_eq!(tls::base64_encode(b"ab"), "YWI=");
    assert_eq!(tls::base64_encode(b"abc"), "YWJj");
    assert_eq!(tls::base64_encode(b"a"), "YQ==");
}

#[test]
fn rig_redis_over_tls_only() {
    let pki = Pki::new();
    let ca = pki.ca_file();
    let mut redis = RedisTls::start(&pki, free_port(), &pki.server, &ca, "yes");
    // No plain TCP port: the TLS port refuses plain RESP.
    let kv = Kv::with_url(&redis.socket_url(3));
    smol::block_on(kv.set("k", 5));
    let addr = redis.addr();
    let ping = |client: Option<&tls::CertFiles>| -> Result<String, String> {
        let mut s = tls::tls_connect(addr, "127.0.0.1", &ca, client)?;
        s.write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n")
            .map_err(|e| e.to_string())?;
        let got = tls::read_until_contains(&mut s, b"PONG")?;
        Ok(String::from_utf8_lossy(&got).into_owned())
    };
    assert!(ping(None).is_err(), "no client certificate accepted");
    assert!(ping(Some(&pki.client)).is_ok());
    redis.set_cert(&pki.untrusted);
    let err = ping(Some(&pki.client)).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    redis.restart(&pki.server);
    assert!(ping(Some(&pki.client)).is_ok());
    drop(redis);
}

#[test]
fn rig_mariadb_refuses_plain_tcp() {
    let s = shared();
    let m = &s.mysql;
    let err = m
        .tcp_sql(&["--skip-ssl"], "SELECT 1")
        .expect_err("a plain TCP connection must be refused");
    eprintln!("plain TCP refused: {}", err.trim());
    let ca = s.pki.ca_file();
    let ca_arg = format!("--ssl-ca={}", ca.display());
    let out = m
        .tcp_sql(
            &["--ssl", &ca_arg, "--ssl-verify-server-cert"],
            "SHOW SESSION STATUS LIKE 'Ssl_version'",
        )
        .expect("TLS, verified");
    assert!(out.contains("TLSv1"), "{out}");
    let other = format!("--ssl-ca={}", s.pki.other_ca_file().display());
    assert!(m
        .tcp_sql(&["--ssl", &other, "--ssl-verify-server-cert"], "SELECT 1")
        .is_err());
    // mysql_async plain TCP: refused too.
    let url = format!("mysql://root:{}@127.0.0.1:{}/", m.password, m.port);
    let r = smol::block_on(async_compat::Compat::new(async move {
        mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap()).await
    }));
    assert!(r.is_err(), "mysql_async without TLS connected");
    // The test's own connection: the unix socket.
    let db = Db::with_url(&m.socket_url(""));
    let one: Vec<i64> = smol::block_on(db.query("SELECT 1"));
    assert_eq!(one, vec![1]);
}

// ---------------------------------------------------------------- the writer

/// All four over TLS at once: RabbitMQ through a TLS proxy, MySQL with
/// verify_identity (password from DATABASE_PASSWORD_FILE), Redis over
/// rediss:// reached by the name `localhost`, Elasticsearch over https://
/// with an API key from ELASTICSEARCH_API_KEY_FILE; each CA from
/// `<S>_TLS_CA_FILE`. Rows, documents and counts as in the plain happy paths.
#[test]
fn all_four_services_over_tls() {
    let env = TestEnv::new("tls_happy");
    let sh = shared();
    let (pki, ca) = (&sh.pki, sh.pki.ca_file());
    let tdb = TlsDb::new(&sh.mysql, &env.db_name);
    let db = &tdb.db;
    let broker = TlsProxy::start(rabbitmq(), &pki.server);
    let es = TlsProxy::start_http(
        es_upstream(&env.es_url),
        &pki.server,
        EsAuth::api_key("cw-api-key-1"),
    );
    let own = Pki::new();
    let redis = RedisTls::start(&own, free_port(), &pki.server, &ca, "optional");
    let kv = Kv::with_url(&redis.socket_url(0));
    // Values from files, with the trailing newline an editor leaves.
    let key_file = own.file("es-api-key", "cw-api-key-1\n");
    let password_file = own.file("db-password", &format!("{}\n", sh.mysql.password));
    let vars = Vars::new(&env)
        .amqps(&env, &broker, "127.0.0.1", &ca)
        .mysql(&env, &sh.mysql, "verify_identity", &ca)
        .unset("DATABASE_PASSWORD")
        .set("DATABASE_PASSWORD_FILE", path(&password_file))
        .rediss(&redis, "localhost", &ca)
        .https(&es, &ca)
        .set("ELASTICSEARCH_API_KEY_FILE", path(&key_file))
        .set("COUNT_SYNC_INTERVAL", "1h");
    let addr = vars.http_addr();
    smol::block_on(async {
        migrate(&env, &vars);
        seed(db).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        wait_ready(&addr).await;

        // create_chats
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 2, "creator_id": 42}),
            Some(T1),
        )
        .await;
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 3}),
            Some(T1 + 1),
        )
        .await;
        // create_messages
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
            Some(T1 + 2),
        )
        .await;
        let chats = wait_for("2 new chats", WAIT, POLL, || async {
            let rows = db.chats_where("application_id = 7 AND number > 1").await;
            if rows.len() == 2 {
                Ok(rows)
            } else {
                Err(format!("{rows:?}"))
            }
        })
        .await;
        let fields = |c: &crate::common::db::ChatRow| {
            (
                c.application_id,
                c.token.clone(),
                c.number,
                c.messages_count,
                c.creator_id,
            )
        };
        assert_eq!(fields(&chats[0]), (7, "app_x".into(), 2, 0, Some(42)));
        assert_eq!(chats[0].created_at, mysql_datetime((T1 * S) as i64));
        assert_eq!(chats[0].updated_at, chats[0].created_at);
        assert_eq!(fields(&chats[1]), (7, "app_x".into(), 3, 0, None));
        assert_eq!(chats[1].created_at, mysql_datetime(((T1 + 1) * S) as i64));
        assert_eq!(chats[1].updated_at, chats[1].created_at);

        let m1 = wait_for("message 1", WAIT, POLL, || async {
            db.message(CHAT_ID, 1).await.ok_or("no row".to_string())
        })
        .await;
        let m2 = wait_for("message 2", WAIT, POLL, || async {
            db.message(CHAT_ID, 2).await.ok_or("no row".to_string())
        })
        .await;
        assert_eq!(
            (m1.chat_id, m1.token.as_str(), m1.chat_number, m1.number),
            (1, "app_x", 1, 1)
        );
        assert_eq!(
            (m1.body_str().as_str(), m1.creator_id),
            ("Hello, world", Some(5))
        );
        assert_eq!(m1.created_at, mysql_datetime((T1 * S) as i64));
        assert_eq!(m1.updated_at, m1.created_at);
        assert_eq!((m2.body_str().as_str(), m2.creator_id), ("second", None));
        assert_eq!(m2.created_at, mysql_datetime(((T1 + 2) * S) as i64));
        let d1 = assert_indexed(&env, &m1).await;
        assert_eq!(d1["_source"]["created_at"], "2026-11-29T12:00:00.000000Z");
        assert_indexed(&env, &m2).await;

        // update_messages
        amqp.publish_json(
            "update_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                    "body": "after"}),
            Some(T1 + 500),
        )
        .await;
        let m1b = wait_for("message 1 updated", WAIT, POLL, || async {
            match db.message(CHAT_ID, 1).await {
                Some(m) if m.body == b"after" => Ok(m),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert_eq!(
            MessageRow {
                body: b"after".to_vec(),
                updated_at: m1b.updated_at.clone(),
                updated_us: m1b.updated_us,
                ..m1.clone()
            },
            m1b,
            "an update changes body and updated_at only"
        );
        assert!(m1b.updated_us > m1.updated_us);
        let d = assert_indexed(&env, &m1b).await;
        assert_eq!(d["_source"]["body"], "after");
        assert_eq!(env.es.count().await, Some(2));

        let hosts = sessions(&sh.mysql, &env.db_name);
        assert!(
            !hosts.is_empty() && hosts.iter().all(|h| h.starts_with("127.0.0.1:")),
            "the writer's MySQL sessions should all be TCP (TLS), are {hosts:?}"
        );

        // Change markers reached Redis over TLS; counts come back from it.
        let k = &kv;
        wait_until("change markers in Redis", WAIT, POLL, || async {
            k.smembers("chat_changes").await == vec!["app_x".to_string()]
                && k.smembers("message_changes").await
                    == vec![
                        "app_x:1".to_string(),
                        "app_x:2".to_string(),
                        "app_x:3".to_string(),
                    ]
        })
        .await;
        kv.set("chat_counter:app_x", 3).await;
        kv.set("message_counter:app_x:1", 2).await;
        // The final sync at shutdown writes them.
        w.stop();
        assert_eq!(db.chats_count(APP_ID).await, Some(3));
        assert_eq!(db.messages_count(CHAT_ID).await, Some(2));
        for n in [2, 3] {
            let c = db.chat(APP_ID, n).await.expect("chat");
            assert_eq!(c.messages_count, 0, "{c:?}");
        }
        assert!(kv.smembers("chat_changes").await.is_empty());
        assert!(kv.smembers("message_changes").await.is_empty());
        env.assert_nothing_dead_or_retrying();

        // Every connection was TLS: the proxies saw only good handshakes and
        // the API key, the database only TCP sessions (TLS-only server).
        assert!(broker.handshakes() >= 1 && es.handshakes() >= 1);
        assert_eq!(broker.handshake_errors(), Vec::<String>::new());
        assert_eq!(es.handshake_errors(), Vec::<String>::new());
        assert_eq!(es.auth_seen(), vec!["ApiKey cw-api-key-1".to_string()]);
        assert_eq!(es.requests().1 + es.requests().2, 0, "no request refused");
        amqp.close().await;
    });
}

/// The writer's sessions on `mysql` (database `name`): hosts as the server
/// sees them (`127.0.0.1:<port>` over TCP, `localhost` over the socket).
fn sessions(mysql: &MariaDb, name: &str) -> Vec<String> {
    let out = mysql
        .sql(&format!(
            "SELECT HOST FROM information_schema.PROCESSLIST \
             WHERE DB = '{name}' AND ID <> CONNECTION_ID()"
        ))
        .expect("processlist");
    out.lines().map(str::to_string).collect()
}

/// Mutual TLS on all four: the broker proxy, redis-server
/// (`--tls-auth-clients yes`), a MySQL user `REQUIRE X509` and the
/// Elasticsearch proxy all demand a client certificate of the trusted CA
/// (Elasticsearch with Basic credentials from the URL). Then the broker
/// connection is dropped under the writer: it reconnects with its
/// certificate and every message lands once.
#[test]
fn mutual_tls_and_a_dropped_broker_connection() {
    let env = TestEnv::new("tls_mutual");
    let sh = shared();
    let (pki, ca) = (&sh.pki, sh.pki.ca_file());
    let tdb = TlsDb::new(&sh.mysql, &env.db_name);
    let db = &tdb.db;
    let user = format!("x509_{}", env.name);
    sh.mysql
        .sql(&format!(
            "CREATE OR REPLACE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'cert-and-password' \
             REQUIRE X509; GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'127.0.0.1'",
            env.db_name
        ))
        .expect("create user");
    let broker = TlsProxy::start(rabbitmq(), &pki.server);
    broker.require_client_cert(Some(&ca));
    let es = TlsProxy::start_http(
        es_upstream(&env.es_url),
        &pki.server,
        EsAuth::basic("chat_writer", "es-s3cret"),
    );
    es.require_client_cert(Some(&ca));
    let own = Pki::new();
    let redis = RedisTls::start(&own, free_port(), &pki.server, &ca, "yes");
    let kv = Kv::with_url(&redis.socket_url(0));
    let vars = Vars::new(&env)
        .amqps(&env, &broker, "127.0.0.1", &ca)
        .client_cert("RABBITMQ", &pki.client)
        .mysql(&env, &sh.mysql, "verify_identity", &ca)
        .set("DATABASE_USERNAME", user.clone())
        .set("DATABASE_PASSWORD", "cert-and-password")
        .client_cert("DATABASE", &pki.client)
        .rediss(&redis, "127.0.0.1", &ca)
        .client_cert("REDIS", &pki.client)
        .https(&es, &ca)
        .set(
            "ELASTICSEARCH_URL",
            format!("https://chat_writer:es-s3cret@127.0.0.1:{}", es.port),
        )
        .client_cert("ELASTICSEARCH", &pki.client);
    let addr = vars.http_addr();
    smol::block_on(async {
        migrate(&env, &vars);
        seed(db).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        wait_ready(&addr).await;
        publish(&amqp, 1..=5).await;
        wait_rows(db, 5).await;

        // Drop the broker connection(s) under the writer.
        let before = broker.handshakes();
        assert!(broker.close_connections() >= 1);
        publish(&amqp, 6..=10).await;
        assert_exactly(&env, db, 10).await;
        env.wait_consuming(&mut w).await;
        assert!(
            broker.handshakes() > before,
            "the writer did not connect again ({} handshakes)",
            broker.handshakes()
        );
        wait_ready(&addr).await;

        kv.set_message_counter(TOKEN, 1, 10, true).await;
        kv.set_chat_counter(TOKEN, 1, true).await;
        wait_until("counts synced", WAIT, POLL, || async {
            db.messages_count(CHAT_ID).await == Some(10) && db.chats_count(APP_ID).await == Some(1)
        })
        .await;
        w.stop();
        env.assert_nothing_dead_or_retrying();
        assert_eq!(broker.handshake_errors(), Vec::<String>::new());
        assert_eq!(es.handshake_errors(), Vec::<String>::new());
        assert_eq!(
            es.auth_seen(),
            vec![format!(
                "Basic {}",
                tls::base64_encode(b"chat_writer:es-s3cret")
            )]
        );
        amqp.close().await;
    });
    let _ = sh
        .mysql
        .sql(&format!("DROP USER IF EXISTS '{user}'@'127.0.0.1'"));
}

/// RabbitMQ's certificate refused (other CA, wrong name; expired and a
/// client certificate the writer does not have, with a first writer):
/// nothing consumed, nothing acked, `/readyz` names rabbitmq and why. With
/// the trusted certificate on the same address the writer consumes
/// everything once.
#[test]
fn broker_certificate_refused_then_fixed() {
    let env = TestEnv::new("tls_broker_refused");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let broker = TlsProxy::start(rabbitmq(), &pki.expired);
    let vars = Vars::new(&env).amqps(&env, &broker, "127.0.0.1", &ca);
    let addr = vars.http_addr();
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        publish(&amqp, 1..=5).await;

        // A first writer (the reconnect backoff grows; a second one starts
        // from its shortest delay).
        let mut first = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut first, &addr, "rabbitmq", "expired").await;
        // Client certificates first: no connection in between gets through.
        broker.require_client_cert(Some(&ca));
        broker.set_cert(&pki.server);
        wait_refused(&mut first, &addr, "rabbitmq", "handshake refused").await;
        first.stop();
        assert_eq!(env.queue_stats("create_messages"), Some((5, 0, 0)));

        broker.require_client_cert(None);
        broker.set_cert(&pki.untrusted);
        let vars = vars.set("HTTP_ADDR", format!("127.0.0.1:{}", free_port()));
        let addr = vars.http_addr();
        let mut w = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut w, &addr, "rabbitmq", "unknown issuer").await;
        assert_eq!(env.queue_stats("create_messages"), Some((5, 0, 0)));
        broker.set_cert(&pki.wrong_name);
        wait_refused(&mut w, &addr, "rabbitmq", "name mismatch").await;
        assert_eq!(env.queue_stats("create_messages"), Some((5, 0, 0)));
        assert_eq!(env.db.count("messages", "1 = 1").await, 0);
        assert_eq!(broker.handshakes(), 0, "no handshake completed");

        broker.set_cert(&pki.server);
        assert_exactly(&env, &env.db, 5).await;
        wait_ready(&addr).await;
        publish(&amqp, 6..=7).await;
        assert_exactly(&env, &env.db, 7).await;
        let m = scrape(&addr);
        let q = [("queue", "create_messages")];
        assert_eq!(m.must("chat_writer_deliveries_stored_total", &q), 7.0);
        assert_eq!(m.must("chat_writer_deliveries_duplicate_total", &q), 0.0);
        w.stop();
        env.assert_nothing_dead_or_retrying();
        assert_eq!(held(&env, "create_messages"), 0);
        amqp.close().await;
    });
}

/// MySQL's certificate refused: the writer with verify_identity takes
/// nothing from the queue for good; `required` does not verify (migrate
/// passes with the untrusted certificate), `verify_ca` does not check the
/// name (migrate passes with the wrong-name certificate). With the trusted
/// certificate (FLUSH SSL, same server) everything lands once.
#[test]
fn mysql_certificate_refused_then_fixed() {
    let env = TestEnv::new("tls_mysql_refused");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let mysql = MariaDb::start(&pki, free_port(), &pki.untrusted, &ca);
    let db = Db::with_url(&mysql.socket_url(&env.db_name));
    let vars = Vars::new(&env).mysql(&env, &mysql, "verify_identity", &ca);
    let addr = vars.http_addr();
    smol::block_on(async {
        // `required` encrypts without verifying: the untrusted certificate passes.
        let required = Vars::new(&env).mysql(&env, &mysql, "required", &ca);
        migrate(&env, &required);
        seed(&db).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        publish(&amqp, 1..=5).await;
        let mut w = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut w, &addr, "mysql", "unknown issuer").await;
        assert_eq!(held(&env, "create_messages"), 5);
        assert_eq!(db.count("messages", "1 = 1").await, 0);

        mysql.set_cert(&pki.wrong_name);
        wait_refused(&mut w, &addr, "mysql", "name mismatch").await;
        let verify_ca = Vars::new(&env).mysql(&env, &mysql, "verify_ca", &ca);
        let mut m = env.spawn_vars(&["migrate"], &verify_ca.0);
        let exit = m.wait_exit(Duration::from_secs(60));
        assert_eq!(
            exit.code,
            Some(0),
            "DATABASE_SSL_MODE=verify_ca checks the CA, not the host name: migrate \
             should pass with a trusted certificate for another name:\n{}",
            m.log_tail(10)
        );
        assert_eq!(held(&env, "create_messages"), 5);
        assert_eq!(db.count("messages", "1 = 1").await, 0);

        mysql.set_cert(&pki.server);
        assert_exactly(&env, &db, 5).await;
        wait_ready(&addr).await;
        let m = scrape(&addr);
        let q = [("queue", "create_messages")];
        assert_eq!(m.must("chat_writer_deliveries_duplicate_total", &q), 0.0);
        w.stop();
        env.assert_nothing_dead_or_retrying();
        assert_eq!(held(&env, "create_messages"), 0);
        amqp.close().await;
    });
}

/// DATABASE_SSL_MODE=verify_ca takes a certificate of a trusted CA
/// "whatever name it carries" (README), also a wildcard name
/// (`*.db.internal`, which cannot itself be the name to check). A
/// certificate without any subjectAltName (a CN only, as MySQL's
/// auto-generated server certificates have) cannot pass with this TLS
/// library: it is refused with that reason, and `required` connects.
#[test]
fn mysql_verify_ca_takes_a_wildcard_and_names_the_cn_only_refusal() {
    let env = TestEnv::new("tls_mysql_verify_ca_names");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let wildcard = pki.issue("wildcard", &["*.db.internal"], tls::Usage::Server);
    let cn_only = pki.issue("cn-only", &[], tls::Usage::Server);
    let mysql = MariaDb::start(&pki, free_port(), &wildcard, &ca);
    let migrate = |mode: &str| {
        let vars = Vars::new(&env).mysql(&env, &mysql, mode, &ca);
        let mut m = env.spawn_vars(&["migrate"], &vars.0);
        let exit = m.wait_exit(Duration::from_secs(60));
        (exit.code, m.log())
    };
    let (code, log) = migrate("verify_ca");
    assert_eq!(
        code,
        Some(0),
        "verify_ca with a trusted wildcard certificate:\n{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("names \"*.db.internal\", not \"127.0.0.1\""))
            .count(),
        1,
        "{log}"
    );

    mysql.set_cert(&cn_only);
    let (code, log) = migrate("verify_ca");
    assert_eq!(
        code,
        Some(1),
        "verify_ca with a CN-only certificate:\n{log}"
    );
    let port = mysql.port;
    assert!(
        log.contains(&format!(
            "migrate failed: mysql 127.0.0.1:{port}: name mismatch: the server's certificate names no host in a subjectAltName (a CN alone is not checked) (",
        )),
        "{log}"
    );
    let (code, log) = migrate("required");
    assert_eq!(code, Some(0), "required with a CN-only certificate:\n{log}");
}

/// Redis's certificate refused: rows keep landing, counts wait; `/readyz`
/// names redis and why. With the trusted certificate (same server, data
/// kept) the markers and counts catch up.
#[test]
fn redis_certificate_refused_then_fixed() {
    let env = TestEnv::new("tls_redis_refused");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let redis = RedisTls::start(&pki, free_port(), &pki.untrusted, &ca, "no");
    let kv = Kv::with_url(&redis.socket_url(0));
    let vars = Vars::new(&env).rediss(&redis, "127.0.0.1", &ca);
    let addr = vars.http_addr();
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        kv.set_message_counter(TOKEN, 1, 5, true).await;
        kv.set_chat_counter(TOKEN, 1, true).await;
        let mut w = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut w, &addr, "redis", "unknown issuer").await;
        publish(&amqp, 1..=5).await;
        assert_exactly(&env, &env.db, 5).await;
        redis.set_cert(&pki.wrong_name);
        wait_refused(&mut w, &addr, "redis", "name mismatch").await;
        assert_eq!(env.db.messages_count(CHAT_ID).await, Some(0));
        assert_eq!(env.db.chats_count(APP_ID).await, Some(0));

        redis.set_cert(&pki.server);
        let e = &env;
        wait_until("counts synced", WAIT, POLL, || async {
            e.db.messages_count(CHAT_ID).await == Some(5)
                && e.db.chats_count(APP_ID).await == Some(1)
        })
        .await;
        wait_ready(&addr).await;
        let k = &kv;
        wait_until("change sets drained", WAIT, POLL, || async {
            k.smembers("chat_changes").await.is_empty()
                && k.smembers("message_changes").await.is_empty()
        })
        .await;
        w.stop();
        assert_exactly(&env, &env.db, 5).await;
        env.assert_nothing_dead_or_retrying();
        amqp.close().await;
    });
}

/// Elasticsearch's certificate refused: rows keep landing, index work
/// waits in its queue (nothing dead-lettered); `/readyz` names
/// elasticsearch and why. With the trusted certificate the index catches up.
#[test]
fn es_certificate_refused_then_fixed() {
    let env = TestEnv::new("tls_es_refused");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let es = TlsProxy::start_http(
        es_upstream(&env.es_url),
        &pki.untrusted,
        EsAuth::api_key("k-1"),
    );
    let vars = Vars::new(&env)
        .https(&es, &ca)
        .set("ELASTICSEARCH_API_KEY", "k-1");
    let addr = vars.http_addr();
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut w, &addr, "elasticsearch", "unknown issuer").await;
        publish(&amqp, 1..=5).await;
        wait_rows(&env.db, 5).await;
        es.set_cert(&pki.wrong_name);
        wait_refused(&mut w, &addr, "elasticsearch", "name mismatch").await;
        assert!(
            held(&env, "chat_writer.index") >= 1,
            "{:?}",
            env.list_queues()
        );
        assert_eq!(env.es.count().await, None, "no index yet");
        assert_eq!(es.requests(), (0, 0, 0));

        es.set_cert(&pki.server);
        assert_exactly(&env, &env.db, 5).await;
        wait_ready(&addr).await;
        w.stop();
        env.assert_nothing_dead_or_retrying();
        assert_eq!(held(&env, "chat_writer.index"), 0);
        amqp.close().await;
    });
}

/// The search server behind an HTTP TLS proxy that checks `auth`, and the
/// writer's variables for it with ELASTICSEARCH_API_KEY_FILE holding
/// `key`: (PKI, proxy, variables, the writer's HTTP address).
fn api_key_file_rig(env: &TestEnv, auth: EsAuth, key: &str) -> (Pki, TlsProxy, Vars, String) {
    let pki = Pki::new();
    let ca = pki.ca_file();
    let es = TlsProxy::start_http(es_upstream(&env.es_url), &pki.server, auth);
    let key_file = pki.file("api-key", &format!("{key}\n"));
    let vars = Vars::new(env)
        .https(&es, &ca)
        .set("ELASTICSEARCH_API_KEY_FILE", path(&key_file));
    let addr = vars.http_addr();
    (pki, es, vars, addr)
}

/// A key without the right (403, a first writer), then a wrong API key
/// (401) in ELASTICSEARCH_API_KEY_FILE: rows keep landing, no document is
/// dead-lettered, `/readyz` names elasticsearch and the status. Correcting
/// the file is enough: the writer reads it again and the index catches up.
#[test]
fn es_api_key_refused_then_corrected_in_its_file() {
    let env = TestEnv::new("tls_es_api_key");
    let auth = EsAuth {
        api_keys: vec!["right-key".into()],
        forbidden_api_keys: vec!["read-only-key".into()],
        ..EsAuth::default()
    };
    let (pki, es, vars, addr) = api_key_file_rig(&env, auth, "read-only-key");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut first = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut first, &addr, "elasticsearch", "403").await;
        first.stop();

        pki.file("api-key", "wrong-key\n");
        let vars = vars.set("HTTP_ADDR", format!("127.0.0.1:{}", free_port()));
        let addr = vars.http_addr();
        let mut w = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut w, &addr, "elasticsearch", "401").await;
        publish(&amqp, 1..=5).await;
        wait_rows(&env.db, 5).await;
        wait_until("index work waiting", WAIT, POLL, || async {
            held(&env, "chat_writer.index") >= 1
        })
        .await;
        assert_eq!(env.dead_and_retrying(), (0, 0), "{:?}", env.list_queues());
        assert_eq!(env.es.count().await, None, "no index yet");
        assert_eq!(es.requests().0, 0, "nothing forwarded");

        pki.file("api-key", "right-key\n");
        assert_exactly(&env, &env.db, 5).await;
        wait_ready(&addr).await;
        let m = scrape(&addr);
        assert_eq!(m.must("chat_writer_index_rejected_total", &[]), 0.0);
        w.stop();
        env.assert_nothing_dead_or_retrying();
        assert_eq!(held(&env, "chat_writer.index"), 0);
        let seen = es.auth_seen();
        for key in ["read-only-key", "wrong-key", "right-key"] {
            assert!(seen.contains(&format!("ApiKey {key}")), "{seen:?}");
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        amqp.close().await;
    });
}

/// A rotation that briefly leaves a value the start would refuse in
/// ELASTICSEARCH_API_KEY_FILE (here an extra blank line: `right-key\n\n`):
/// the writer reads it after a 401, and the header it makes cannot be sent,
/// so no request reaches the server and no further 401 makes it read the
/// file again. Once the file is corrected the index must still catch up
/// without a restart (README: "a rotated key takes effect without a
/// restart").
#[test]
fn es_api_key_file_with_a_bad_value_then_corrected() {
    let env = TestEnv::new("tls_es_api_key_bad_value");
    let (pki, _es, vars, addr) = api_key_file_rig(&env, EsAuth::api_key("right-key"), "wrong-key");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        wait_refused(&mut w, &addr, "elasticsearch", "401").await;
        publish(&amqp, 1..=3).await;
        wait_rows(&env.db, 3).await;

        // Mid-rotation: the right key with one newline too many, left long
        // enough for the writer to meet a 401 and read the file (the probe
        // runs every 5 s, the indexer retries within seconds).
        pki.file("api-key", "right-key\n\n");
        smol::Timer::after(Duration::from_secs(12)).await;

        // The operator corrects the file.
        pki.file("api-key", "right-key\n");
        assert_exactly(&env, &env.db, 3).await;
        wait_ready(&addr).await;
        w.stop();
        env.assert_nothing_dead_or_retrying();
        amqp.close().await;
    });
}

/// `<S>_TLS_INSECURE=true` skips verification (a certificate of an unknown
/// CA is taken) and says so at start, for Redis and Elasticsearch.
#[test]
fn insecure_skips_verification_and_warns() {
    let env = TestEnv::new("tls_insecure");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let redis = RedisTls::start(&pki, free_port(), &pki.untrusted, &ca, "no");
    let kv = Kv::with_url(&redis.socket_url(0));
    let es = TlsProxy::start_http(
        es_upstream(&env.es_url),
        &pki.untrusted,
        EsAuth::api_key("k-2"),
    );
    let vars = Vars::new(&env)
        .rediss(&redis, "127.0.0.1", &ca)
        .set("REDIS_TLS_INSECURE", "true")
        .https(&es, &ca)
        .set("ELASTICSEARCH_TLS_INSECURE", "true")
        .set("ELASTICSEARCH_API_KEY", "k-2");
    let addr = vars.http_addr();
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        kv.set_message_counter(TOKEN, 1, 3, true).await;
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        wait_ready(&addr).await;
        publish(&amqp, 1..=3).await;
        assert_exactly(&env, &env.db, 3).await;
        wait_until("count synced", WAIT, POLL, || async {
            env.db.messages_count(CHAT_ID).await == Some(3)
        })
        .await;
        w.stop();
        let log = w.log();
        for var in ["REDIS_TLS_INSECURE", "ELASTICSEARCH_TLS_INSECURE"] {
            assert!(
                log.lines().any(|l| l.contains("WARN") && l.contains(var)),
                "no warning naming {var}:\n{}",
                w.log_tail(30)
            );
        }
        for var in ["RABBITMQ_TLS_INSECURE", "DATABASE_TLS_INSECURE"] {
            assert!(!log.contains(var), "{var} is not set:\n{}", w.log_tail(30));
        }
        assert_eq!(es.handshake_errors(), Vec::<String>::new());
        amqp.close().await;
    });
}

/// Bad TLS configuration exits 2 at start, naming the variable (and the
/// file): a CA file that is not PEM, a missing key file, NAME with
/// NAME_FILE, a client certificate without its key, an unreadable
/// NAME_FILE.
#[test]
fn bad_tls_configuration_exits_2() {
    let env = TestEnv::new("tls_bad_config");
    let pki = Pki::new();
    let not_pem = pki.file("not-a-ca.pem", "this is not a certificate\n");
    let missing = pki.dir.join("no-such.key");
    let password_file = pki.file("password", "secret\n");
    let amqps = format!("amqps://guest:guest@127.0.0.1:{}/x", free_port());
    let cert = path(&pki.client.cert);
    // (variables set, what stderr must name)
    type Case = (Vec<(&'static str, String)>, Vec<String>);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("RABBITMQ_URL", amqps.clone()),
                ("RABBITMQ_TLS_CA_FILE", path(&not_pem)),
            ],
            vec!["RABBITMQ_TLS_CA_FILE".into(), path(&not_pem)],
        ),
        (
            vec![
                ("REDIS_TLS_CERT_FILE", cert.clone()),
                ("REDIS_TLS_KEY_FILE", path(&missing)),
            ],
            vec!["REDIS_TLS_KEY_FILE".into(), path(&missing)],
        ),
        (
            vec![
                ("DATABASE_PASSWORD", "secret".into()),
                ("DATABASE_PASSWORD_FILE", path(&password_file)),
            ],
            vec!["DATABASE_PASSWORD".into(), "DATABASE_PASSWORD_FILE".into()],
        ),
        (
            vec![("ELASTICSEARCH_TLS_CERT_FILE", cert.clone())],
            vec![
                "ELASTICSEARCH_TLS_CERT_FILE".into(),
                "ELASTICSEARCH_TLS_KEY_FILE".into(),
            ],
        ),
        (
            vec![("ELASTICSEARCH_API_KEY_FILE", path(&missing))],
            vec!["ELASTICSEARCH_API_KEY_FILE".into(), path(&missing)],
        ),
    ];
    for (set, named) in cases {
        let mut vars = Vars::new(&env);
        for (k, v) in &set {
            vars = vars.set(k, v.clone());
        }
        let mut w = env.spawn_vars(&[], &vars.0);
        let exit = w.wait_exit(Duration::from_secs(15));
        let log = w.log();
        assert_eq!(exit.code, Some(2), "{set:?}: exit {exit:?}\n{log}");
        for n in &named {
            assert!(
                log.contains(n.as_str()),
                "{set:?}: stderr does not name {n}:\n{log}"
            );
        }
    }
}

/// The reason the rig gives for each `_bulk` item of a read-only key.
const ITEM_REFUSED: &str = "403 security_exception: action [indices:data/write/bulk[s]] is unauthorized for API key id [chat-writer-test] of user [chat_writer] on indices [messages], this action is granted by the index privileges [create_doc,create,index,write,all]";

/// The lines of `log` that contain `what`.
fn lines_with(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

/// A key that may read but not write: `_bulk` answers 200 with every item
/// refused (403), as Elasticsearch does for a key without the `index`
/// privilege, while the probe's read passes. The refusal is treated like a
/// refused request: `/readyz` names elasticsearch and the reason, the log
/// says so once however often the bulk is retried, nothing is
/// dead-lettered, and the key file is read again after the refused items,
/// so correcting the file is enough.
#[test]
fn es_items_refused_read_the_key_file_again_and_make_the_writer_unready() {
    let env = TestEnv::new("tls_es_items_refused");
    let auth = EsAuth {
        api_keys: vec!["right-key".into()],
        read_only_api_keys: vec!["read-only-key".into()],
        ..EsAuth::default()
    };
    let (pki, es, vars, addr) = api_key_file_rig(&env, auth, "read-only-key");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        wait_ready(&addr).await;
        publish(&amqp, 1..=3).await;
        wait_rows(&env.db, 3).await;
        let body = wait_refused(&mut w, &addr, "elasticsearch", ITEM_REFUSED).await;
        assert_eq!(body, format!("elasticsearch: {ITEM_REFUSED}\n"));
        // Three refused rounds at least (each refuses one item or more; the
        // backoff is still short, so the corrected key is tried soon).
        wait_until("three refused bulks", WAIT, POLL, || async {
            es.items_refused() >= 3
        })
        .await;
        assert_eq!(readyz(&addr).0, 503, "still unready");
        let log = w.log();
        let said = lines_with(
            &log,
            "documents wait in the index queue until this is fixed",
        );
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(
            said[0].ends_with(&format!(
                "elasticsearch: {ITEM_REFUSED}; documents wait in the index queue until this is fixed"
            )),
            "{said:#?}"
        );
        assert_eq!(env.dead_and_retrying(), (0, 0), "{:?}", env.list_queues());
        assert!(held(&env, "chat_writer.index") >= 1);

        pki.file("api-key", "right-key\n");
        assert_exactly(&env, &env.db, 3).await;
        wait_ready(&addr).await;
        w.stop();
        let log = w.log();
        assert_eq!(
            lines_with(&log, "holds a new key; using it").len(),
            1,
            "{}",
            w.log_tail(30)
        );
        assert_eq!(lines_with(&log, "_bulk accepted again").len(), 1);
        env.assert_nothing_dead_or_retrying();
        assert_eq!(held(&env, "chat_writer.index"), 0);
        let seen = es.auth_seen();
        assert_eq!(seen, ["ApiKey read-only-key", "ApiKey right-key"]);
        assert_eq!(es.requests().1 + es.requests().2, 0, "no request refused");
        amqp.close().await;
    });
}

/// `https://user:password@host` with percent-encoded characters: the
/// server gets `Basic base64(user:password)` of the decoded values, and
/// the log never shows the password, encoded or not.
#[test]
fn es_url_credentials_are_percent_decoded() {
    let env = TestEnv::new("tls_es_basic_decoded");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let es = TlsProxy::start_http(
        es_upstream(&env.es_url),
        &pki.server,
        EsAuth::basic("wri:ter", "p@ss:w/rd %"),
    );
    let url = format!(
        "https://wri%3Ater:p%40ss%3Aw%2Frd%20%25@127.0.0.1:{}",
        es.port
    );
    let vars = Vars::new(&env)
        .https(&es, &ca)
        .set("ELASTICSEARCH_URL", url);
    let addr = vars.http_addr();
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        publish(&amqp, 1..=3).await;
        assert_exactly(&env, &env.db, 3).await;
        wait_ready(&addr).await;
        w.stop();
        assert_eq!(
            es.auth_seen(),
            [format!(
                "Basic {}",
                tls::base64_encode(b"wri:ter:p@ss:w/rd %")
            )]
        );
        assert_eq!((es.requests().1, es.requests().2), (0, 0));
        let log = w.log();
        for secret in ["p@ss", "p%40ss", "rd %", "rd%20"] {
            assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        }
        assert_eq!(
            lines_with(
                &log,
                &format!("elasticsearch=https://wri%3Ater:***@127.0.0.1:{} ", es.port)
            )
            .len(),
            1,
            "{}",
            w.log_tail(30)
        );
        amqp.close().await;
    });
}

/// A Redis TLS endpoint that completes the handshake and then never
/// answers (a hung server behind a TLS terminator): the connect, set-up
/// included, gives up within the connect timeout and is retried, like a
/// plain connection, instead of holding the count sync for good.
#[test]
fn redis_silent_after_the_handshake_times_out_and_is_retried() {
    let env = TestEnv::new("tls_redis_silent");
    let pki = Pki::new();
    let ca = pki.ca_file();
    // Takes TCP connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = TlsProxy::start(silent.local_addr().expect("address"), &pki.server);
    let vars = Vars::new(&env)
        .set("REDIS_URL", format!("rediss://127.0.0.1:{}/0", proxy.port))
        .set("REDIS_TLS_CA_FILE", path(&ca));
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        let gave_up = "redis: connection timed out (TCP, TLS handshake and AUTH/SELECT";
        let started = std::time::Instant::now();
        let wr = &w;
        wait_until("two connects given up", WAIT, POLL, || async {
            lines_with(&wr.log(), gave_up).len() >= 2
        })
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{}",
            w.log_tail(20)
        );
        assert!(proxy.handshakes() >= 2, "the handshakes completed");
        w.stop();
        amqp.close().await;
    });
    drop(silent);
}

/// redis-rs reads `rediss://…#insecure` as "do not verify the certificate"
/// (its own verifier, which also skips the handshake signatures). The
/// writer refuses it at start, for the service and the subcommands, and
/// points to REDIS_TLS_INSECURE, the switch that is warned about.
#[test]
fn redis_insecure_fragment_is_refused_at_start() {
    let env = TestEnv::new("tls_redis_fragment");
    let port = free_port();
    let url = format!("rediss://:secretpw@127.0.0.1:{port}/0#insecure");
    let vars = Vars::new(&env).set("REDIS_URL", url);
    for args in [&[][..], &["migrate"][..]] {
        let mut w = env.spawn_vars(args, &vars.0);
        let exit = w.wait_exit(Duration::from_secs(15));
        assert_eq!(exit.code, Some(2), "{args:?}: {}", w.log());
        assert_eq!(
            w.log(),
            format!(
                "chat-writer: invalid configuration: REDIS_URL=\"rediss://:***@127.0.0.1:{port}/0#insecure\": \
                 expected a rediss:// URL without #insecure (to skip verification set \
                 REDIS_TLS_INSECURE=true, which is warned at start)\n"
            ),
            "{args:?}"
        );
    }
}

/// The WARN lines of `log` that name a `_TLS_` variable, without their
/// timestamp and level.
fn tls_warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains("_TLS_"))
        .map(|l| l[l.find("] ").map_or(0, |i| i + 2)..].to_string())
        .collect()
}

/// `<S>_TLS_INSECURE=true` is warned by every command that connects to the
/// service (`migrate`, `reindex`, `dlq`, as the service itself), and TLS
/// variables set for a plain connection are said to have no effect rather
/// than to turn verification off.
#[test]
fn tls_variables_are_warned_by_subcommands_and_on_plain_connections() {
    let env = TestEnv::new("tls_warnings");
    let pki = Pki::new();
    let ca = pki.ca_file();
    let not_verified = |prefix: &str, name: &str| {
        format!(
            "{prefix}_TLS_INSECURE=true: the certificate of {name} is NOT verified; anyone on the path can read and change the traffic (for test rigs only)"
        )
    };
    smol::block_on(async {
        // The service, every connection plain.
        let vars = Vars::new(&env)
            .set("RABBITMQ_TLS_INSECURE", "true")
            .set("DATABASE_SSL_MODE", "disabled")
            .set("DATABASE_TLS_INSECURE", "true")
            .set("REDIS_TLS_CA_FILE", path(&ca))
            .client_cert("ELASTICSEARCH", &pki.client);
        let mut m = env.spawn_vars(&["migrate"], &vars.0);
        assert_eq!(m.wait_exit(Duration::from_secs(60)).code, Some(0));
        assert_eq!(
            tls_warnings(&m.log()),
            ["DATABASE_TLS_INSECURE set, but DATABASE_SSL_MODE=disabled (plain): no effect, the connection to mysql does not use TLS"]
        );
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        w.stop();
        assert_eq!(
            tls_warnings(&w.log()),
            [
                "RABBITMQ_TLS_INSECURE set, but RABBITMQ_URL is amqp:// (plain): no effect, the connection to rabbitmq does not use TLS",
                "DATABASE_TLS_INSECURE set, but DATABASE_SSL_MODE=disabled (plain): no effect, the connection to mysql does not use TLS",
                "REDIS_TLS_CA_FILE set, but REDIS_URL is redis:// (plain): no effect, the connection to redis does not use TLS",
                "ELASTICSEARCH_TLS_CERT_FILE, ELASTICSEARCH_TLS_KEY_FILE set, but ELASTICSEARCH_URL is http:// (plain): no effect, the connection to elasticsearch does not use TLS",
            ]
        );

        // migrate over TLS without verification; REDIS_TLS_INSECURE is not
        // its business.
        let mysql = &shared().mysql;
        let db = TlsDb::new(mysql, &format!("{}_warn", env.db_name));
        let vars = Vars::new(&env)
            .mysql(&env, mysql, "verify_identity", &ca)
            .set("DATABASE_NAME", db.name.clone())
            .set("DATABASE_TLS_INSECURE", "true")
            .set("REDIS_TLS_INSECURE", "true");
        let mut m = env.spawn_vars(&["migrate"], &vars.0);
        assert_eq!(
            m.wait_exit(Duration::from_secs(60)).code,
            Some(0),
            "{}",
            m.log()
        );
        assert_eq!(tls_warnings(&m.log()), [not_verified("DATABASE", "mysql")]);

        // dlq show through a broker certificate of an unknown CA.
        let amqps = TlsProxy::start(rabbitmq(), &pki.untrusted);
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let vars = Vars::new(&env)
            .amqps(&env, &amqps, "127.0.0.1", &ca)
            .set("RABBITMQ_TLS_INSECURE", "true");
        let mut d = env.spawn_vars(&["dlq", "show", "create_messages"], &vars.0);
        assert_eq!(
            d.wait_exit(Duration::from_secs(30)).code,
            Some(0),
            "{}",
            d.log()
        );
        assert_eq!(
            tls_warnings(&d.log()),
            [not_verified("RABBITMQ", "rabbitmq")]
        );
        assert!(amqps.handshakes() >= 1);

        // reindex through a search-server certificate of an unknown CA.
        env.migrate_and_seed().await;
        let es = TlsProxy::start_http(
            es_upstream(&env.es_url),
            &pki.untrusted,
            EsAuth::api_key("k-3"),
        );
        let vars = Vars::new(&env)
            .https(&es, &ca)
            .set("ELASTICSEARCH_API_KEY", "k-3")
            .set("ELASTICSEARCH_TLS_INSECURE", "true");
        let mut r = env.spawn_vars(&["reindex"], &vars.0);
        assert_eq!(
            r.wait_exit(Duration::from_secs(60)).code,
            Some(0),
            "{}",
            r.log()
        );
        assert_eq!(
            tls_warnings(&r.log()),
            [not_verified("ELASTICSEARCH", "elasticsearch")]
        );
        assert!(es.requests().0 >= 1);
        amqp.close().await;
    });
}

/// `migrate` against a MySQL host that accepts the connection and never
/// answers (as a blackholed address behind a middlebox does) gives up
/// after the connect timeout, naming mysql and the host; so does
/// `reindex`, whose pool alone would wait without limit.
#[test]
fn migrate_and_reindex_give_up_on_a_host_that_never_answers() {
    let env = TestEnv::new("tls_migrate_silent");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let vars = Vars::new(&env).set("DATABASE_PORT", port.to_string());
    for (args, failed_line) in [(["migrate"], "ERROR"), (["reindex"], "reindex failed")] {
        let mut m = env.spawn_vars(&args, &vars.0);
        let exit = m.wait_exit(Duration::from_secs(30));
        assert_eq!(exit.code, Some(1), "{args:?}: {}", m.log());
        assert!(
            exit.after >= Duration::from_secs(10) && exit.after < Duration::from_secs(20),
            "{args:?}: {exit:?}"
        );
        let failed = lines_with(&m.log(), failed_line);
        assert_eq!(failed.len(), 1, "{args:?}: {failed:#?}");
        assert!(
            failed[0].ends_with(&format!(
                "{} failed: mysql 127.0.0.1:{port}: no answer within 10 s",
                args[0]
            )),
            "{failed:#?}"
        );
    }
    drop(silent);
}

/// DATABASE_SSL_MODE=preferred (the default) and a server without TLS:
/// the pool and the probe's own connection both fall back to plain, and
/// the log says so once.
#[test]
fn preferred_falls_back_to_plain_with_one_warning() {
    let env = TestEnv::new("tls_preferred_once");
    let vars = Vars::new(&env).unset("DATABASE_SSL_MODE");
    let addr = vars.http_addr();
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.spawn_vars(&[], &vars.0);
        env.wait_consuming(&mut w).await;
        // Ready: the probe's connection is up; a row: the pool's is too.
        wait_ready(&addr).await;
        publish(&amqp, 1..=1).await;
        wait_rows(&env.db, 1).await;
        w.stop();
        let said = lines_with(&w.log(), "the server offers no TLS");
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(
            said[0].ends_with("WARN  [chat_writer::mysql] mysql: the server offers no TLS; DATABASE_SSL_MODE=preferred, so the connections are plain (set verify_identity to require TLS)"),
            "{said:#?}"
        );
        amqp.close().await;
    });
}

/// A value read from NAME_FILE that does not parse names NAME_FILE and
/// the file, not NAME (which the --env-file also sets, unused).
#[test]
fn a_bad_value_read_from_name_file_names_the_file() {
    let env = TestEnv::new("tls_bad_value_file");
    let pki = Pki::new();
    let port_file = pki.file("port", "99999\n");
    let env_file = pki.file("writer.env", "DATABASE_PORT=3306\n");
    let vars = Vars::new(&env)
        .unset("DATABASE_PORT")
        .set("DATABASE_PORT_FILE", path(&port_file));
    let env_arg = path(&env_file);
    let mut w = Writer::spawn(
        &["--env-file", &env_arg, "migrate"],
        &vars.0,
        &pki.dir.join("migrate.log"),
    );
    let exit = w.wait_exit(Duration::from_secs(15));
    assert_eq!(exit.code, Some(2), "{}", w.log());
    assert_eq!(
        w.log(),
        format!(
            "chat-writer: invalid configuration: DATABASE_PORT_FILE={:?}: expected a file holding \
             an integer from 1 to 65535 (it holds \"99999\")\n",
            path(&port_file)
        )
    );
}

/// NAME_FILE and the TLS files are read up to a cap whatever they are: a
/// device that never ends is refused at once (exit 2, naming the variable
/// and the file) instead of read without limit.
#[test]
fn value_and_tls_files_are_read_up_to_a_cap() {
    let env = TestEnv::new("tls_file_caps");
    let pki = Pki::new();
    let cases: [(Vec<(&str, String)>, String); 3] = [
        (
            vec![("DATABASE_PASSWORD_FILE", "/dev/zero".into())],
            "DATABASE_PASSWORD_FILE=\"/dev/zero\": expected a readable file (over 1 MiB)".into(),
        ),
        (
            vec![("REDIS_TLS_CA_FILE", "/dev/urandom".into())],
            "REDIS_TLS_CA_FILE=\"/dev/urandom\": expected a readable PEM file (over 4 MiB)".into(),
        ),
        (
            vec![
                ("RABBITMQ_TLS_CERT_FILE", path(&pki.client.cert)),
                ("RABBITMQ_TLS_KEY_FILE", "/dev/zero".into()),
            ],
            "RABBITMQ_TLS_KEY_FILE=\"/dev/zero\": expected a readable PEM file (over 1 MiB)".into(),
        ),
    ];
    for (set, want) in cases {
        let mut vars = Vars::new(&env).unset("DATABASE_PASSWORD");
        for (k, v) in &set {
            vars = vars.set(k, v.clone());
        }
        let mut w = env.spawn_vars(&[], &vars.0);
        let exit = w.wait_exit(Duration::from_secs(15));
        assert_eq!(exit.code, Some(2), "{set:?}: {}", w.log());
        assert_eq!(
            w.log(),
            format!("chat-writer: invalid configuration: {want}\n"),
            "{set:?}"
        );
    }
}
