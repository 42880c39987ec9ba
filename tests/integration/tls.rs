//! TLS to all four services: the writer over amqps://, rediss://, https://
//! and MySQL with DATABASE_SSL_MODE, against servers the test owns (see
//! tests/common/tls.rs): the happy path, mutual TLS, refused certificates
//! and the recovery after they are fixed, an Elasticsearch API key, a
//! dropped broker connection, and bad TLS configuration.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::tls::{self, EsAuth, MariaDb, Pki, RedisTls, TlsProxy};
use crate::common::{free_port, Db, Kv};

const RABBITMQ: &str = "127.0.0.1:5672";

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
