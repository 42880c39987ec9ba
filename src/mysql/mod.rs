//! The MySQL store: the pool, the schema, and every batched statement.
//!
//! mysql_async is tokio-based; every future of it is polled inside
//! `async_compat::Compat`, which runs a small tokio runtime on one helper
//! thread for its I/O (README, "Running it" allows this adapter thread). All
//! statements of a batch share one transaction on one pooled connection.
//!
//! Errors are classified once, in [`classify`]: a fault of the message
//! itself (a value the database rejects, a missing parent) or of the
//! infrastructure (everything else: retried in place by the caller).

mod schema;
pub mod sql;
mod writes;

pub use schema::{migrate, TABLES};
pub use writes::{MessageRow, Outcome};

use crate::config::Config;
use crate::tls::SslMode;
use async_compat::Compat;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Statements run on every new connection: utf8mb4 end to end (emoji round-trip),
/// UTC, strict mode with backslash escapes (see `sql`), READ COMMITTED.
/// They hold for the connection's life: the pool does not reset returned
/// connections (see [`opts`]).
pub fn connection_init() -> Vec<String> {
    vec![
        "SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci".into(),
        "SET time_zone = '+00:00'".into(),
        "SET sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ENGINE_SUBSTITUTION'".into(),
        // Every transaction of the writer reads what is committed (no stale
        // snapshot, no gap locks between replicas); set once per connection
        // instead of once per transaction.
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".into(),
    ]
}

/// How a database error counts (README, "Failure semantics").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Connection refused/reset, server gone, deadlock, lock wait timeout,
    /// missing table, anything unknown: retry in place, never dead-letter.
    Infrastructure(String),
    /// The data itself is refused (bad value, FK failure): isolate the
    /// message and dead-letter it (or retry with delay for a missing parent).
    Message(String),
}

/// Classifies a mysql_async error. Only a short list of server error codes
/// (data and constraint errors) and an over-large statement count as the
/// messages' fault (the batch is bisected); everything else is
/// infrastructure, so an outage or a missing schema never dead-letters.
pub fn classify(e: &mysql_async::Error) -> Fault {
    // A statement over max_allowed_packet (client- or server-side, 1153):
    // splitting the batch makes it fit, so it takes the bisection path.
    let text = e.to_string();
    if text.contains("max_allowed_packet")
        || matches!(
            e,
            mysql_async::Error::Driver(mysql_async::DriverError::PacketTooLarge)
        )
        || matches!(e, mysql_async::Error::Server(s) if s.code == 1153)
    {
        return Fault::Message(format!(
            "statement too large for max_allowed_packet: {}",
            one_line(&text)
        ));
    }
    if let mysql_async::Error::Server(s) = e {
        // 1048 column null, 1264 out of range, 1292 bad datetime, 1366 bad
        // string value, 1406 data too long, 1452 foreign key, 4025 CHECK.
        if matches!(s.code, 1048 | 1264 | 1292 | 1366 | 1406 | 1452 | 4025) {
            return Fault::Message(format!("MySQL error {}: {}", s.code, s.message));
        }
    }
    // A TLS or credential refusal says so first (unknown issuer, name
    // mismatch, ...): the operator's checklist, not the driver's words.
    Fault::Infrastructure(crate::tls::explain(&one_line(&text)))
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The MySQL side of the writer: a pool sized by DB_MAX_OPEN_CONNS, keeping
/// DB_MAX_IDLE_CONNS connections when idle. Dead connections are replaced by
/// the pool on the next checkout.
///
/// The pool's TLS options adapt once to what the server presents (see
/// [`adapted`]): with DATABASE_SSL_MODE=preferred, a server without TLS
/// gets plain connections; with `verify_ca`, a certificate signed by a
/// trusted CA for another name than DATABASE_HOST is accepted.
#[derive(Clone)]
pub struct Store {
    /// The pool and the options it was built with.
    state: Arc<Mutex<(Pool, Opts)>>,
    mode: SslMode,
    known: Arc<Mutex<writes::KnownParents>>,
}

impl Store {
    /// Builds the pool; connects lazily on first use.
    pub fn new(cfg: &Config) -> Store {
        let opts = opts(cfg, Some(cfg.database_name.as_str()));
        Store {
            state: Arc::new(Mutex::new((Pool::new(opts.clone()), opts))),
            mode: cfg.database_ssl_mode,
            known: Default::default(),
        }
    }

    /// The pool as it is now (a cheap handle). Its `get_conn` does not
    /// adapt the TLS options: use [`Store::get_conn`].
    pub fn pool(&self) -> Pool {
        lock(&self.state).0.clone()
    }

    /// A pooled connection.
    ///
    /// Errors: the driver's; see [`classify`].
    pub async fn get_conn(&self) -> Result<mysql_async::Conn, mysql_async::Error> {
        match self.pool().get_conn().await {
            Err(e) if self.adapt(&e) => self.pool().get_conn().await,
            r => r,
        }
    }

    /// A transaction on a pooled connection (READ COMMITTED, set per
    /// connection in [`connection_init`]).
    pub async fn begin(&self) -> Result<mysql_async::Transaction<'static>, mysql_async::Error> {
        let tx = mysql_async::TxOpts::default();
        match self.pool().start_transaction(tx.clone()).await {
            Err(e) if self.adapt(&e) => self.pool().start_transaction(tx).await,
            r => r,
        }
    }

    /// True when `e` calls for other TLS options ([`adapted`]): the pool is
    /// replaced by one with them and the caller asks again.
    fn adapt(&self, e: &mysql_async::Error) -> bool {
        let mut state = lock(&self.state);
        let Some(next) = adapted(&state.1, self.mode, e) else {
            return false;
        };
        *state = (Pool::new(next.clone()), next);
        true
    }

    /// Closes every connection; waits for checked-out ones to come back.
    pub async fn close(self) {
        let pool = self.pool();
        let _ = Compat::new(pool.disconnect()).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The options to use instead of `opts` after the connection failed with
/// `e`, if DATABASE_SSL_MODE `mode` calls for a change (logged once):
///
/// - `preferred` and the server has no TLS (its handshake lacks
///   `CLIENT_SSL`): the same options without TLS, as MySQL's own client
///   does.
/// - `verify_ca` and the certificate, verified against the trusted CAs,
///   is for another name: the same options checking that name instead of
///   DATABASE_HOST. mysql_async 0.37's own switch for this
///   (`with_danger_skip_domain_validation`) misses the wording of current
///   rustls (blackbeam/mysql_async#404); rustls checks the chain before the
///   name, so a name error means the chain was trusted.
pub fn adapted(opts: &Opts, mode: SslMode, e: &mysql_async::Error) -> Option<Opts> {
    let ssl = opts.ssl_opts()?;
    if mode == SslMode::Preferred
        && matches!(
            e,
            mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer)
        )
    {
        // The pool and the probe's own connection each fall back: one
        // line for the process.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::warn!(
                "mysql: the server offers no TLS; DATABASE_SSL_MODE=preferred, so the connections are plain (set verify_identity to require TLS)"
            );
        }
        return Some(OptsBuilder::from_opts(opts.clone()).ssl_opts(None).into());
    }
    if mode == SslMode::VerifyCa {
        let name = presented_name(&e.to_string())?;
        // A wildcard is no name to check against; a name it covers is.
        let checked = match name.strip_prefix("*.") {
            Some(parent) => format!("verify-ca.{parent}"),
            None => name.clone(),
        };
        if ssl.tls_hostname_override() == Some(checked.as_str()) {
            return None;
        }
        log::info!(
            "mysql: the server's certificate is signed by a trusted CA and names {name:?}, not {:?}; DATABASE_SSL_MODE=verify_ca accepts it",
            opts.ip_or_hostname()
        );
        let ssl = ssl.clone().with_danger_tls_hostname_override(Some(checked));
        return Some(OptsBuilder::from_opts(opts.clone()).ssl_opts(ssl).into());
    }
    None
}

/// The first name the certificate is valid for, from rustls's
/// name-mismatch error: `certificate not valid for name "db"; certificate
/// is only valid for DnsName("mysql.internal")` (or `IpAddress(…)`).
fn presented_name(error: &str) -> Option<String> {
    let rest = &error[error.find("certificate is only valid for ")? + 30..];
    if let Some(dns) = rest.strip_prefix("DnsName(\"") {
        return Some(dns[..dns.find('"')?].to_string());
    }
    let ip = rest.strip_prefix("IpAddress(")?;
    let ip = &ip[..ip.find(')')?];
    ip.parse::<std::net::IpAddr>().ok().map(|a| a.to_string())
}

/// One connection of its own (not the pool's) with the options of `cfg`
/// and default database `db`, adapting them as [`Store`] does.
///
/// Errors: the driver's.
pub async fn connect(cfg: &Config, db: Option<&str>) -> Result<Conn, mysql_async::Error> {
    connect_with(&mut opts(cfg, db), cfg.database_ssl_mode).await
}

/// [`connect`] with prepared options, updated in place when they adapt.
/// Each attempt gives up after [`CONNECT_TIMEOUT`].
pub async fn connect_with(opts: &mut Opts, mode: SslMode) -> Result<Conn, mysql_async::Error> {
    match new_conn(opts).await {
        Err(e) => match adapted(opts, mode, &e) {
            Some(next) => {
                *opts = next;
                new_conn(opts).await
            }
            None => Err(e),
        },
        r => r,
    }
}

/// How long opening one connection of its own may take (TCP, TLS,
/// authentication), as for the AMQP connection: a host that drops packets
/// or accepts and never answers fails instead of hanging `migrate`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `Conn::new` within [`CONNECT_TIMEOUT`].
async fn new_conn(opts: &Opts) -> Result<Conn, mysql_async::Error> {
    smol::future::or(Conn::new(opts.clone()), async {
        async_io::Timer::after(CONNECT_TIMEOUT).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        )
        .into())
    })
    .await
}

/// TLS options for DATABASE_SSL_MODE and DATABASE_TLS_*; `None` for plain.
/// `preferred` and `required` do not verify the certificate, `verify_ca`
/// verifies it but not the host name, `verify_identity` both (MySQL's own
/// meanings); DATABASE_TLS_INSECURE turns verification off in every mode.
#[cfg(feature = "tls")]
fn ssl_opts(cfg: &Config) -> Option<mysql_async::SslOpts> {
    use mysql_async::{ClientIdentity, SslOpts};
    let s = &cfg.tls.mysql;
    let (verify_ca, verify_name) = match cfg.database_ssl_mode {
        SslMode::Disabled => return None,
        SslMode::Preferred | SslMode::Required => (false, false),
        SslMode::VerifyCa => (true, false),
        SslMode::VerifyIdentity => (true, true),
    };
    let buf = |pem: &Arc<[u8]>| pem.to_vec().into();
    let verify = verify_ca && !s.insecure;
    // mysql_async copies the public roots into each connector it builds
    // (twice); where nothing is verified they would only take memory.
    let mut o = SslOpts::default()
        .with_danger_accept_invalid_certs(!verify)
        .with_danger_skip_domain_validation(!verify || !verify_name)
        .with_disable_built_in_roots(!verify);
    if let Some(ca) = &s.ca {
        o = o.with_root_certs(vec![buf(&ca.pem)]);
    } else if !verify {
        // Its verifier refuses to be built without any root; one borrowed
        // from the binary serves, and is never consulted.
        let one = crate::tls::public_root_certificates()[..1].iter();
        o = o.with_root_certs(one.map(|c| c.as_ref().into()).collect());
    }
    if let Some((cert, key)) = &s.identity {
        o = o.with_client_identity(Some(ClientIdentity::new(buf(&cert.pem), buf(&key.pem))));
    }
    Some(o)
}

/// Without the `tls` feature every connection is plain (`config` refuses
/// the modes that need TLS).
#[cfg(not(feature = "tls"))]
fn ssl_opts(_: &Config) -> Option<mysql_async::SslOpts> {
    None
}

/// Connection options for `cfg`, with or without a default database.
pub fn opts(cfg: &Config, db: Option<&str>) -> Opts {
    let constraints = PoolConstraints::new(cfg.db_max_idle_conns, cfg.db_max_open_conns)
        .unwrap_or_else(|| PoolConstraints::new(0, cfg.db_max_open_conns).expect("max >= 1"));
    // No COM_RESET_CONNECTION when a connection returns to the pool: it
    // would put every session variable set by `connection_init` back to the
    // server's global value (REPEATABLE READ, SYSTEM time zone, …) and cost a
    // round trip per batch. The driver rolls back a transaction left open
    // by a dropped future itself, and the writer sets no other session state.
    let pool_opts = PoolOpts::default()
        .with_constraints(constraints)
        .with_inactive_connection_ttl(Duration::from_secs(60))
        .with_reset_connection(false);
    OptsBuilder::default()
        .ip_or_hostname(cfg.database_host.clone())
        .tcp_port(cfg.database_port)
        .user(Some(cfg.database_username.clone()))
        .pass(Some(cfg.database_password.clone()))
        .db_name(db.map(str::to_string))
        // Connect where DATABASE_HOST:DATABASE_PORT say; by default the
        // driver would switch a loopback connection to the server's Unix
        // socket, bypassing the configured port (and any proxy on it).
        .prefer_socket(false)
        // `setup`, not `init`: also re-run should a connection ever be reset.
        .setup(connection_init())
        .pool_opts(pool_opts)
        .ssl_opts(ssl_opts(cfg))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are read from rustls's own wording (0.23), as the driver
    /// passes it on.
    #[test]
    fn the_presented_name_comes_from_rustls_name_mismatch_error() {
        let dns = r#"Input/output error: Input/output error: invalid peer certificate: certificate not valid for name "127.0.0.1"; certificate is only valid for DnsName("wrong-host.invalid") or DnsName("other")"#;
        assert_eq!(presented_name(dns).as_deref(), Some("wrong-host.invalid"));
        let ip = r#"invalid peer certificate: certificate not valid for name "db"; certificate is only valid for IpAddress(10.0.0.7)"#;
        assert_eq!(presented_name(ip).as_deref(), Some("10.0.0.7"));
        assert_eq!(
            presented_name("invalid peer certificate: UnknownIssuer"),
            None
        );
        assert_eq!(
            presented_name("certificate is only valid for IpAddress(not-an-ip)"),
            None
        );
    }
}
