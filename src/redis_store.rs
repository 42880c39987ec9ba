//! Redis: one multiplexed connection, reopened after a failure, and the
//! change markers the writer adds after inserting rows (CONTRACT section 5).
//!
//! Consumers never wait on Redis: after a commit they hand their markers to
//! [`MarkerSender`]; the [`run_marker_flusher`] task adds them to
//! `chat_changes` / `message_changes` with one pipelined `SADD` per round,
//! keeping them (deduplicated) and backing off while Redis is unreachable.
//! A marker still unsent when the process dies is covered by the SCAN
//! reconciliation at the next start.

use crate::backoff::Backoff;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisResult};
use smol::channel::{Receiver, Sender};
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Duration;

/// Set of application tokens whose chat counter changed.
pub const CHAT_CHANGES: &str = "chat_changes";
/// Set of `<token>:<chat_number>` whose message counter changed.
pub const MESSAGE_CHANGES: &str = "message_changes";

/// A lazily (re)connected Redis connection.
pub struct Redis {
    client: Client,
    conn: RefCell<Option<MultiplexedConnection>>,
}

impl Redis {
    /// Parses `url`; connects on first use. A `rediss://` URL connects
    /// over TLS with the trust, client certificate and verification switch
    /// of `tls` (REDIS_TLS_*); a `redis://` URL ignores them.
    ///
    /// Errors: the URL does not parse (reported as bad REDIS_URL).
    pub fn new(url: &str, tls: &crate::tls::Settings) -> RedisResult<Redis> {
        let client = if url.starts_with("rediss://") {
            tls_client(url, tls)?
        } else {
            Client::open(url)?
        };
        Ok(Redis {
            client,
            conn: RefCell::new(None),
        })
    }

    /// The shared connection, opened if needed (2 s connect and response
    /// timeouts, so an unreachable Redis fails fast instead of hanging).
    pub async fn conn(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.conn.borrow().as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.conn.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    /// `host:port` of the server, for messages.
    pub fn address(&self) -> String {
        self.client.get_connection_info().addr().to_string()
    }

    /// Forgets the connection after an error; the next call reconnects.
    pub fn reset(&self) {
        self.conn.borrow_mut().take();
    }
}

/// A `rediss://` client. redis-rs takes a CA bundle instead of its public
/// roots, so a REDIS_TLS_CA_FILE is handed over together with them.
#[cfg(feature = "tls")]
fn tls_client(url: &str, tls: &crate::tls::Settings) -> RedisResult<Client> {
    use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};
    let mut info = url.into_connection_info()?;
    if tls.insecure {
        if let ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone() {
            info = info.set_addr(ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params: None,
            });
        }
    }
    if tls.ca.is_none() && tls.identity.is_none() {
        return Client::open(info);
    }
    let invalid = |e: String| redis::RedisError::from(std::io::Error::other(e));
    let root_cert = match &tls.ca {
        Some(ca) => Some(crate::tls::root_bundle_pem(ca).map_err(invalid)?),
        None => None,
    };
    let client_tls = tls.identity.as_ref().map(|(cert, key)| ClientTlsConfig {
        client_cert: cert.pem.to_vec(),
        client_key: key.pem.to_vec(),
    });
    Client::build_with_tls(
        info,
        TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}

/// Without the `tls` feature `config` refuses `rediss://` at start.
#[cfg(not(feature = "tls"))]
fn tls_client(url: &str, _: &crate::tls::Settings) -> RedisResult<Client> {
    Client::open(url)
}

/// Markers of one committed batch.
#[derive(Debug, Default)]
pub struct Markers {
    /// Members for `chat_changes` (application tokens).
    pub chats: Vec<String>,
    /// Members for `message_changes` (`<token>:<chat_number>`).
    pub messages: Vec<String>,
}

/// Where consumers send their markers; never blocks.
pub type MarkerSender = Sender<Markers>;

/// Adds markers to Redis until every sender is dropped and all received
/// markers are written (or `give_up` says to stop retrying at shutdown).
pub async fn run_marker_flusher(
    redis: Rc<Redis>,
    rx: Receiver<Markers>,
    give_up: crate::shutdown::Shutdown,
) {
    let mut chats: HashSet<String> = HashSet::new();
    let mut messages: HashSet<String> = HashSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        if chats.is_empty() && messages.is_empty() {
            match rx.recv().await {
                Ok(m) => {
                    chats.extend(m.chats);
                    messages.extend(m.messages);
                }
                Err(_) => return,
            }
        }
        while let Ok(m) = rx.try_recv() {
            chats.extend(m.chats);
            messages.extend(m.messages);
        }
        match add_markers(&redis, &chats, &messages).await {
            Ok(()) => {
                chats.clear();
                messages.clear();
                backoff.reset();
            }
            Err(e) => {
                redis.reset();
                log::warn!(
                    "redis at {}: adding {} change markers failed, will retry: {}",
                    redis.address(),
                    chats.len() + messages.len(),
                    crate::tls::explain(&e.to_string())
                );
                if give_up.is_triggered() && rx.is_closed() && backoff.attempts() >= 2 {
                    log::warn!("redis: dropping unsent change markers at shutdown; the next start-up SCAN covers them");
                    return;
                }
                async_io::Timer::after(backoff.next_delay()).await;
            }
        }
    }
}

async fn add_markers(
    redis: &Redis,
    chats: &HashSet<String>,
    messages: &HashSet<String>,
) -> RedisResult<()> {
    let mut conn = redis.conn().await?;
    let mut pipe = redis::pipe();
    if !chats.is_empty() {
        pipe.cmd("SADD")
            .arg(CHAT_CHANGES)
            .arg(chats.iter().collect::<Vec<_>>())
            .ignore();
    }
    if !messages.is_empty() {
        pipe.cmd("SADD")
            .arg(MESSAGE_CHANGES)
            .arg(messages.iter().collect::<Vec<_>>())
            .ignore();
    }
    pipe.query_async::<()>(&mut conn).await
}
