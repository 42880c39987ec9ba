//! The writer's four services behind TLS, made from the test rig
//! (`tests/common/tls.rs`, included by the binary as `crate::tls`): shared by
//! `tls-rig` (the demo's `--tls`) and `load tls` (the footprint).
//!
//! - RabbitMQ: a [`TlsProxy`] in front of the plain broker, demanding a
//!   client certificate (mutual TLS);
//! - the search server: an HTTP [`TlsProxy`] in front of the plain one,
//!   accepting one API key;
//! - Redis: a private TLS-only `redis-server` ([`RedisTls`]) demanding a
//!   client certificate (mutual TLS), plus its unix socket for our own reads;
//! - MySQL: a private MariaDB with `require_secure_transport=ON`
//!   ([`MariaDb`]), plus its unix socket.
//!
//! Every certificate comes from one throw-away [`Pki`]; the writer trusts it
//! through the `…_TLS_CA_FILE` variables and checks host names
//! (`DATABASE_SSL_MODE=verify_identity`). [`Rig::status`] says, from the
//! servers' side, how many TLS connections each service saw.

// Each binary uses part of it.
#![allow(dead_code)]

use crate::tls::{EsAuth, MariaDb, Pki, RedisTls, TlsProxy};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::Async;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The API key the search server's proxy accepts.
pub const API_KEY: &str = "Y2hhdC13cml0ZXI6cmlnLWtleQ==";

/// MariaDB's count of completed TLS handshakes.
const SSL_ACCEPTS: &str = "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
                           WHERE VARIABLE_NAME = 'SSL_FINISHED_ACCEPTS'";

/// A 127.0.0.1 port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

pub struct Rig {
    pub pki: Pki,
    pub amqp: TlsProxy,
    pub es: TlsProxy,
    pub redis: RedisTls,
    pub db: MariaDb,
    /// `DATABASE_PASSWORD_FILE` and `ELASTICSEARCH_API_KEY_FILE`.
    pub db_password_file: PathBuf,
    pub api_key_file: PathBuf,
    /// Set by [`Rig::allow_plain`].
    pub redis_plain_port: Option<u16>,
    /// Statements of our own through the `mariadb` client (which does a TLS
    /// handshake of its own, over the unix socket too): taken off
    /// `Ssl_finished_accepts`.
    own_sql: AtomicU64,
    /// `Ssl_finished_accepts` once started (the start-up's own statements).
    tls_base: u64,
}

/// What the servers saw, read by [`Rig::status`].
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub amqp_handshakes: usize,
    pub amqp_open: usize,
    pub amqp_errors: usize,
    pub es_handshakes: usize,
    pub es_forwarded: usize,
    pub es_refused: usize,
    /// Clients connected to Redis's TLS port now.
    pub redis_tls_clients: usize,
    /// MariaDB `Ssl_finished_accepts` (completed TLS handshakes), less
    /// those of the rig's own statements.
    pub mysql_tls_accepts: u64,
    /// MariaDB connections over TCP now.
    pub mysql_tcp_connections: u64,
}

impl Status {
    /// One service per line, `KEY=VALUE`, for shell scripts.
    pub fn to_env(&self) -> String {
        format!(
            "amqp_tls_handshakes={}\namqp_open={}\namqp_handshake_errors={}\n\
             es_tls_handshakes={}\nes_forwarded={}\nes_refused={}\n\
             redis_tls_clients={}\nmysql_tls_accepts={}\nmysql_tcp_connections={}\n",
            self.amqp_handshakes,
            self.amqp_open,
            self.amqp_errors,
            self.es_handshakes,
            self.es_forwarded,
            self.es_refused,
            self.redis_tls_clients,
            self.mysql_tls_accepts,
            self.mysql_tcp_connections
        )
    }

    pub fn line(&self) -> String {
        format!(
            "RabbitMQ proxy: {} TLS handshakes (client certificate required), {} open, {} failed; \
             search proxy: {} TLS handshakes, {} requests forwarded with the API key, {} refused; \
             Redis (TLS port, client certificate required): {} clients now; \
             MariaDB (require_secure_transport): {} TLS handshakes, {} TCP connections now",
            self.amqp_handshakes,
            self.amqp_open,
            self.amqp_errors,
            self.es_handshakes,
            self.es_forwarded,
            self.es_refused,
            self.redis_tls_clients,
            self.mysql_tls_accepts,
            self.mysql_tcp_connections
        )
    }
}

impl Rig {
    /// Starts everything: proxies to `amqp` (plain RabbitMQ) and `es` (plain
    /// search server), a private Redis and MariaDB.
    pub fn start(amqp: SocketAddr, es: SocketAddr) -> Rig {
        let pki = Pki::new();
        let ca = pki.ca_file();
        let amqp_proxy = TlsProxy::start(amqp, &pki.server);
        amqp_proxy.require_client_cert(Some(&ca));
        let es_proxy = TlsProxy::start_http(es, &pki.server, EsAuth::api_key(API_KEY));
        let redis = RedisTls::start(&pki, free_port(), &pki.server, &ca, "yes");
        let db = MariaDb::start(&pki, free_port(), &pki.server, &ca);
        let db_password_file = pki.file("db_password", &format!("{}\n", db.password));
        let api_key_file = pki.file("es_api_key", &format!("{API_KEY}\n"));
        Rig {
            pki,
            amqp: amqp_proxy,
            es: es_proxy,
            redis,
            db,
            db_password_file,
            api_key_file,
            redis_plain_port: None,
            own_sql: AtomicU64::new(0),
            tls_base: 0,
        }
        .with_tls_base()
    }

    fn with_tls_base(mut self) -> Rig {
        let out = self
            .db
            .sql(SSL_ACCEPTS)
            .unwrap_or_else(|e| panic!("{SSL_ACCEPTS}: {e}"));
        self.tls_base = out.trim().parse().unwrap_or(0);
        self
    }

    /// Opens the private servers to plain clients as well (for a plain
    /// writer against the same servers): MariaDB `require_secure_transport`
    /// off, Redis also on a plain port (returned). TLS clients are not
    /// affected.
    pub fn allow_plain(&mut self) -> u16 {
        self.own_sql.fetch_add(1, Ordering::SeqCst);
        self.db
            .sql("SET GLOBAL require_secure_transport = OFF")
            .unwrap_or_else(|e| panic!("require_secure_transport off: {e}"));
        let port = free_port();
        let reply = self
            .redis
            .command(&["CONFIG", "SET", "port", &port.to_string()]);
        assert_eq!(reply, "+OK", "CONFIG SET port");
        self.redis_plain_port = Some(port);
        port
    }

    /// The writer's variables for all four services over TLS. `vhost` goes
    /// in the AMQP URL as written; `files`: the password and API key as
    /// `…_FILE` variables.
    pub fn writer_env(&self, vhost: &str, redis_db: u8, files: bool) -> Vec<(String, String)> {
        let ca = self.pki.ca_file().display().to_string();
        let client = &self.pki.client;
        let (cert, key) = (
            client.cert.display().to_string(),
            client.key.display().to_string(),
        );
        let mut v = vec![
            (
                "RABBITMQ_URL",
                format!("amqps://guest:guest@127.0.0.1:{}/{vhost}", self.amqp.port),
            ),
            ("RABBITMQ_TLS_CA_FILE", ca.clone()),
            ("RABBITMQ_TLS_CERT_FILE", cert.clone()),
            ("RABBITMQ_TLS_KEY_FILE", key.clone()),
            ("DATABASE_HOST", "127.0.0.1".to_string()),
            ("DATABASE_PORT", self.db.port.to_string()),
            ("DATABASE_USERNAME", "root".to_string()),
            ("DATABASE_SSL_MODE", "verify_identity".to_string()),
            ("DATABASE_TLS_CA_FILE", ca.clone()),
            ("REDIS_URL", self.redis.url("127.0.0.1", redis_db)),
            ("REDIS_TLS_CA_FILE", ca.clone()),
            ("REDIS_TLS_CERT_FILE", cert),
            ("REDIS_TLS_KEY_FILE", key),
            (
                "ELASTICSEARCH_URL",
                format!("https://127.0.0.1:{}", self.es.port),
            ),
            ("ELASTICSEARCH_TLS_CA_FILE", ca),
        ];
        if files {
            v.push((
                "DATABASE_PASSWORD_FILE",
                self.db_password_file.display().to_string(),
            ));
            v.push((
                "ELASTICSEARCH_API_KEY_FILE",
                self.api_key_file.display().to_string(),
            ));
        } else {
            v.push(("DATABASE_PASSWORD", self.db.password.clone()));
            v.push(("ELASTICSEARCH_API_KEY", API_KEY.to_string()));
        }
        v.into_iter().map(|(k, x)| (k.to_string(), x)).collect()
    }

    /// Counts from the servers' side.
    pub fn status(&self) -> Status {
        let (forwarded, r401, r403) = self.es.requests();
        let mut s = Status {
            amqp_handshakes: self.amqp.handshakes(),
            amqp_open: self.amqp.live_connections(),
            amqp_errors: self.amqp.handshake_errors().len(),
            es_handshakes: self.es.handshakes(),
            es_forwarded: forwarded,
            es_refused: r401 + r403,
            ..Status::default()
        };
        if let Some(list) = redis_bulk(&self.redis.socket, &["CLIENT", "LIST"]) {
            // A client of the TLS port shows `laddr=127.0.0.1:<tls port>`
            // (the plain port's and the unix socket's differ).
            let tls = format!(" laddr=127.0.0.1:{} ", self.redis.tls_port);
            s.redis_tls_clients = list.lines().filter(|l| l.contains(&tls)).count();
        }
        let q = format!(
            "SELECT ({SSL_ACCEPTS}), (SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE HOST LIKE '127.0.0.1:%')"
        );
        // This statement's own connection is counted in what it reads.
        let own = self.own_sql.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(out) = self.db.sql(&q) {
            let mut f = out
                .split_whitespace()
                .map(|x| x.parse::<u64>().unwrap_or(0));
            s.mysql_tls_accepts = f.next().unwrap_or(0).saturating_sub(self.tls_base + own);
            s.mysql_tcp_connections = f.next().unwrap_or(0);
        }
        s
    }
}

/// One Redis command over the unix socket, the payload of its bulk-string
/// reply (`CLIENT LIST`, `INFO`).
pub fn redis_bulk(socket: &std::path::Path, args: &[&str]) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).ok()?;
    let len: usize = head.trim_end().strip_prefix('$')?.parse().ok()?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// A plain TCP relay on 127.0.0.1 of the same shape as the TLS proxy (a
/// thread per connection, 32 KiB copies, each flushed), without TLS: puts
/// the proxy's extra hop on the plain side too, so a comparison can tell
/// the hop from TLS.
pub struct PlainRelay {
    pub port: u16,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl PlainRelay {
    pub fn start(upstream: SocketAddr) -> PlainRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (st, lv) = (stop.clone(), live.clone());
        let acceptor = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = up.set_nodelay(true);
                if let (Ok(a), Ok(b)) = (client.try_clone(), up.try_clone()) {
                    lv.lock().unwrap().extend([a, b]);
                }
                std::thread::spawn(move || {
                    let (Ok(c), Ok(u)) = (Async::new(client), Async::new(up)) else {
                        return;
                    };
                    smol::block_on(smol::future::or(relay(&c, &u), relay(&u, &c)));
                });
            }
        });
        PlainRelay {
            port,
            stop,
            live,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for PlainRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

async fn relay(from: &Async<TcpStream>, to: &Async<TcpStream>) {
    let (mut r, mut w) = (from, to);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
            break;
        }
    }
    let _ = to.get_ref().shutdown(std::net::Shutdown::Write);
}
