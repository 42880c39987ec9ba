//! Redis: one multiplexed connection, reopened after a failure, and the
//! change markers the writer adds after inserting rows (docs/redis-and-counts.md).
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
    /// The URL's settings (address, database, user, password); for a
    /// `rediss://` URL those of the same URL with `redis://`, since the
    /// writer opens the TLS stream itself.
    client: Client,
    /// For `rediss://`: what the TLS stream is opened with.
    #[cfg(feature = "tls")]
    tls: Option<TlsTarget>,
    conn: RefCell<Option<MultiplexedConnection>>,
}

/// The server of a `rediss://` URL and the rustls configuration of
/// REDIS_TLS_* (built once: one set of roots for every reconnect).
#[cfg(feature = "tls")]
struct TlsTarget {
    host: String,
    port: u16,
    config: std::sync::Arc<rustls::ClientConfig>,
}

/// Connect and response timeouts of the shared connection: an unreachable
/// Redis fails fast instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Redis {
    /// Parses `url`; connects on first use. A `rediss://` URL connects over TLS with the trust, client certificate and
    /// verification switch of `tls` (REDIS_TLS_*), the certificate checked
    /// against the URL's host (a name or an IP address); a `redis://` URL
    /// ignores them.
    ///
    /// Errors: the URL does not parse (reported as bad REDIS_URL), or a
    /// TLS file that does not parse (checked at start already).
    pub fn new(url: &str, tls: &crate::tls::Settings) -> RedisResult<Redis> {
        match url.strip_prefix("rediss://") {
            Some(rest) => Self::over_tls(rest, tls),
            None => Ok(Redis {
                client: Client::open(url)?,
                #[cfg(feature = "tls")]
                tls: None,
                conn: RefCell::new(None),
            }),
        }
    }

    /// A `rediss://` URL (given without its scheme): redis-rs speaks RESP
    /// over a stream the writer opens, as the AMQP connection does, so the
    /// trust is the writer's own (the public roots it carries plus
    /// REDIS_TLS_CA_FILE), not a bundle handed to redis-rs.
    #[cfg(feature = "tls")]
    fn over_tls(rest: &str, tls: &crate::tls::Settings) -> RedisResult<Redis> {
        use redis::ConnectionAddr;
        // The same URL with the plain scheme: redis-rs's own default port
        // (6379) holds for both.
        let plain = format!("redis://{rest}");
        let client = Client::open(plain.as_str())?;
        let (host, port) = match client.get_connection_info().addr() {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            other => {
                return Err(invalid(format!("{other}: not a TCP address")));
            }
        };
        let config = crate::tls::client_config(tls).map_err(invalid)?;
        Ok(Redis {
            client,
            tls: Some(TlsTarget { host, port, config }),
            conn: RefCell::new(None),
        })
    }

    /// Without the `tls` feature `config` refuses `rediss://` at start.
    #[cfg(not(feature = "tls"))]
    fn over_tls(_: &str, _: &crate::tls::Settings) -> RedisResult<Redis> {
        Err(invalid(
            "rediss:// needs a build with the `tls` feature".into(),
        ))
    }

    /// The shared connection, opened if needed (2 s to connect, TLS
    /// handshake and set-up included; 5 s per response).
    ///
    /// Errors: redis-rs's (refused, authentication, timeout), or a TLS
    /// failure whose text names the reason (see [`crate::tls::refusal`]).
    pub async fn conn(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.conn.borrow().as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        #[cfg(feature = "tls")]
        let c = match &self.tls {
            Some(t) => self.open_tls(t, config).await?,
            None => {
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?
            }
        };
        #[cfg(not(feature = "tls"))]
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.conn.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    /// TCP connect, TLS handshake and redis-rs's set-up on the stream
    /// (AUTH, SELECT) within [`CONNECT_TIMEOUT`], as redis-rs bounds its
    /// own connect and set-up: a server that completes the handshake and
    /// then never answers fails like any other instead of holding the
    /// caller. The connection's driver runs on smol's global executor, as
    /// redis-rs runs its own.
    #[cfg(feature = "tls")]
    async fn open_tls(
        &self,
        t: &TlsTarget,
        config: AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        use smol::future::FutureExt;
        let open = async {
            let (host, port) = (t.host.clone(), t.port);
            let addrs = smol::unblock(move || {
                std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .map(|a| a.collect::<Vec<_>>())
            })
            .await?;
            let mut last = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: no address", t.host),
            );
            let mut stream = None;
            for addr in addrs {
                match async_io::Async::<std::net::TcpStream>::connect(addr).await {
                    Ok(s) => {
                        let _ = s.get_ref().set_nodelay(true);
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let stream = stream.ok_or(last)?;
            let connector = tcp_stream::RustlsConnector::from(t.config.clone());
            let stream = tcp_stream::AsyncTcpStream::Plain(stream)
                .into_rustls(&connector, &t.host)
                .await?;
            let settings = self.client.get_connection_info().redis_settings();
            MultiplexedConnection::new_with_config(
                settings,
                async_compat::Compat::new(stream),
                config,
            )
            .await
        };
        let timeout = async {
            async_io::Timer::after(CONNECT_TIMEOUT).await;
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection timed out (TCP, TLS handshake and AUTH/SELECT; a plain Redis port given as rediss:// does this too)",
            )))
        };
        let (conn, driver) = open.or(timeout).await?;
        smol::spawn(driver).detach();
        Ok(conn)
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

/// A configuration error in redis-rs's type, with `text` as its reason.
fn invalid(text: String) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other(text))
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
