//! Shared pieces of `load`: settings, the per-run sandbox (own MySQL
//! database, RabbitMQ vhost, Elasticsearch index, Redis DB), the workload's
//! message shapes, a confirm-windowed publisher, and small statistics.
//!
//! Everything a run creates is named `perf_<pid>_<seq>_<tag>` and removed by
//! [`Sandbox::destroy`]; Redis is only touched in the configured database
//! (11 by default), which is flushed at creation and at removal.

use async_compat::Compat;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Pool};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::fmt::Display;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub type Res<T> = Result<T, String>;

/// Adds context to an error: `what: error`.
pub trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

// ---------------------------------------------------------------- settings

/// Connection settings and output folder, shared by every subcommand.
#[derive(Clone, Debug)]
pub struct Settings {
    pub db_host: String,
    pub db_port: u16,
    pub db_user: String,
    pub db_pass: String,
    /// `amqp://user:pass@host:port` (no vhost).
    pub amqp_base: String,
    /// `redis://host:port/<db>`; the db is flushed, so never 0.
    pub redis_url: String,
    pub es_url: String,
    pub out: PathBuf,
    /// RUST_LOG of the writer under test.
    pub writer_log: String,
    /// Give up waiting for a drain after this long.
    pub timeout: Duration,
    /// Keep the sandboxes (database, vhost, index) for inspection.
    pub keep: bool,
    /// Extra `KEY=VALUE` environment for the writer (`--writer-env`), e.g.
    /// `RABBITMQ_PREFETCH_COUNT=512`; applied after the sandbox's own, with
    /// `{sandbox}` in a value replaced by the sandbox's name (a vhost in a
    /// URL of `load tls`).
    pub writer_env: Vec<(String, String)>,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------- random data

/// xorshift64*: enough randomness for tokens and bodies, no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(extra: u64) -> Rng {
        let mut seed = now_us() ^ (u64::from(std::process::id()) << 32) ^ extra;
        seed ^= 0x9E37_79B9_7F4A_7C15;
        if seed == 0 {
            seed = 1;
        }
        let mut rng = Rng(seed);
        for _ in 0..8 {
            rng.next();
        }
        rng
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "meeting",
    "moved",
    "to",
    "three",
    "o'clock",
    "can",
    "you",
    "send",
    "me",
    "report",
    "before",
    "lunch",
    "I",
    "think",
    "we",
    "should",
    "ship",
    "it",
    "on",
    "Friday",
    "thanks",
    "for",
    "update",
    "build",
    "is",
    "green",
    "again",
    "deploy",
    "looks",
    "fine",
    "café",
    "naïve",
    "Zürich",
    "привет",
    "こんにちは",
    "😀",
    "👍",
    "🚀",
    "who",
    "call",
    "tonight",
    "please",
    "review",
    "my",
    "pull",
    "request",
    "coffee",
    "anyone",
    "weekend",
];

/// A chat body of 100..200 bytes (UTF-8, a few non-ASCII words and emoji):
/// the shape of the workload's `create_messages`.
pub fn make_body(rng: &mut Rng) -> String {
    let target = 100 + rng.below(101);
    let mut body = String::with_capacity(target + 16);
    while body.len() < target {
        if !body.is_empty() {
            body.push(' ');
        }
        body.push_str(WORDS[rng.below(WORDS.len())]);
    }
    while body.len() > 200 {
        body.pop();
    }
    body
}

// ---------------------------------------------------------------- workload

/// One `create_messages` of the workload, with its parent.
#[derive(Clone, Debug)]
pub struct Msg {
    pub chat_id: u64,
    pub token: String,
    pub chat_number: i64,
    pub number: i64,
    pub body: String,
    pub creator_id: Option<u64>,
}

impl Msg {
    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "chat_id": self.chat_id,
            "token": self.token,
            "chat_number": self.chat_number,
            "number": self.number,
            "body": self.body,
            "creator_id": self.creator_id,
        }))
        .unwrap_or_default()
    }

    pub fn doc_id(&self) -> String {
        format!("{}:{}:{}", self.token, self.chat_number, self.number)
    }
}

/// A seeded parent: application token, chat number, chat id.
#[derive(Clone, Debug)]
pub struct ChatRef {
    pub token: String,
    pub number: i64,
    pub id: u64,
}

/// Applications and chats seeded per run (the API creates both before any
/// message; here they are inserted directly).
pub const APPS: usize = 5;
pub const CHATS_PER_APP: usize = 10;

/// Builds `n` messages spread at random over `chats`, numbering them per
/// chat the way the API does (`INCR message_counter:<token>:<chat_number>`
/// and `SADD message_changes <token>:<chat_number>`, pipelined), so Redis
/// holds the counters and change sets the writer's count sync expects.
pub async fn make_messages(
    redis: &mut redis::aio::MultiplexedConnection,
    chats: &[ChatRef],
    n: usize,
    rng: &mut Rng,
) -> Res<Vec<Msg>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let k = 2000.min(n - out.len());
        let picks: Vec<usize> = (0..k).map(|_| rng.below(chats.len())).collect();
        let mut pipe = redis::pipe();
        for &c in &picks {
            let key = format!("{}:{}", chats[c].token, chats[c].number);
            pipe.incr(format!("message_counter:{key}"), 1)
                .sadd("message_changes", key)
                .ignore();
        }
        let numbers: Vec<i64> = pipe.query_async(redis).await.ctx("INCR message_counter")?;
        if numbers.len() != k {
            return Err("Redis returned too few counters".into());
        }
        for (&c, number) in picks.iter().zip(numbers) {
            let chat = &chats[c];
            let creator_id = if rng.below(10) == 0 {
                None
            } else {
                Some(1 + rng.below(1000) as u64)
            };
            out.push(Msg {
                chat_id: chat.id,
                token: chat.token.clone(),
                chat_number: chat.number,
                number,
                body: make_body(rng),
                creator_id,
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- sandbox

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The schema: the writer's own DDL (`chat-writer
/// migrate`), used when no writer binary is at hand (roofline).
pub const SCHEMA: &[&str] = chat_writer::mysql::TABLES;

/// The body creating the index with the mapping: the
/// writer's own, its backfill claim long stale (no writer runs on it).
pub fn index_body() -> String {
    chat_writer::elasticsearch::create_body(0)
}

/// One run's own resources: database, vhost and index share the name.
pub struct Sandbox {
    pub name: String,
    pub settings: Settings,
    pub pool: Pool,
}

fn rabbitmqctl(args: &[&str]) -> Res<()> {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ctx("running rabbitmqctl")?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn redis_db(url: &str) -> i64 {
    url.rsplit('/')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

impl Sandbox {
    /// Creates database, vhost and (empty) Redis DB. The schema comes from
    /// `writer migrate` when a writer is given, else from [`SCHEMA`]. The
    /// index is left to the writer (or created by the caller).
    pub async fn create(s: &Settings, tag: &str, writer: Option<&str>) -> Res<Sandbox> {
        if redis_db(&s.redis_url) == 0 {
            return Err(format!(
                "--redis {}: use a database of its own (not 0), it is flushed",
                s.redis_url
            ));
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("perf_{}_{seq}_{tag}", std::process::id()).to_lowercase();
        rabbitmqctl(&["add_vhost", &name])?;
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])?;
        let sb = Sandbox {
            pool: Pool::new(mysql_opts(s, Some(&name))),
            name,
            settings: s.clone(),
        };
        let made = async {
            match writer {
                Some(w) => {
                    let out = Command::new(w)
                        .arg("migrate")
                        .envs(sb.writer_env())
                        .env("RUST_LOG", "warn")
                        .stdin(Stdio::null())
                        .output()
                        .ctx(&format!("running {w} migrate"))?;
                    if !out.status.success() {
                        return Err(format!(
                            "{w} migrate: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                }
                None => {
                    let mut c = Conn::new(mysql_opts(s, None)).await.ctx("MySQL")?;
                    c.query_drop(format!(
                        "CREATE DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
                        sb.name
                    ))
                    .await
                    .ctx("CREATE DATABASE")?;
                    c.query_drop(format!("USE `{}`", sb.name))
                        .await
                        .ctx("USE")?;
                    for t in SCHEMA {
                        c.query_drop(*t).await.ctx("CREATE TABLE")?;
                    }
                    let _ = c.disconnect().await;
                }
            }
            sb.flush_redis().await
        }
        .await;
        match made {
            Ok(()) => Ok(sb),
            Err(e) => {
                sb.destroy().await;
                Err(e)
            }
        }
    }

    /// The writer's environment (the README's variables) for this sandbox.
    pub fn writer_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        [
            ("DATABASE_HOST", s.db_host.clone()),
            ("DATABASE_PORT", s.db_port.to_string()),
            ("DATABASE_USERNAME", s.db_user.clone()),
            ("DATABASE_PASSWORD", s.db_pass.clone()),
            ("DATABASE_NAME", self.name.clone()),
            ("REDIS_URL", s.redis_url.clone()),
            ("RABBITMQ_URL", self.amqp_url()),
            ("ELASTICSEARCH_URL", s.es_url.clone()),
            ("ELASTICSEARCH_INDEX", self.name.clone()),
            ("HTTP_ADDR", String::new()),
            ("RUST_LOG", s.writer_log.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            s.writer_env
                .iter()
                .map(|(k, v)| (k.clone(), v.replace("{sandbox}", &self.name))),
        )
        .collect()
    }

    /// False when `--writer-env ELASTICSEARCH_URL=` disables indexing: the
    /// MySQL path is then measured alone.
    pub fn indexing(&self) -> bool {
        !self
            .settings
            .writer_env
            .iter()
            .any(|(k, v)| k == "ELASTICSEARCH_URL" && v.is_empty())
    }

    pub fn amqp_url(&self) -> String {
        format!("{}/{}", self.settings.amqp_base, self.name)
    }

    pub fn index_url(&self) -> String {
        format!("{}/{}", self.settings.es_url, self.name)
    }

    async fn flush_redis(&self) -> Res<()> {
        let client = redis::Client::open(self.settings.redis_url.as_str()).ctx("REDIS_URL")?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .ctx("Redis")?;
        redis::cmd("FLUSHDB")
            .query_async::<()>(&mut c)
            .await
            .ctx("FLUSHDB")
    }

    pub async fn redis(&self) -> Res<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.settings.redis_url.as_str()).ctx("REDIS_URL")?;
        client
            .get_multiplexed_async_connection()
            .await
            .ctx("connecting to Redis")
    }

    pub async fn amqp(&self) -> Res<Connection> {
        Connection::connect(&self.amqp_url(), ConnectionProperties::default())
            .await
            .ctx("connecting to RabbitMQ")
    }

    /// Inserts [`APPS`] applications with [`CHATS_PER_APP`] chats each, and
    /// sets `chat_counter:<token>` / `chat_changes` as the API would.
    pub async fn seed_chats(&self, rng: &mut Rng) -> Res<Vec<ChatRef>> {
        let mut db = self.pool.get_conn().await.ctx("MySQL")?;
        let mut redis = self.redis().await?;
        let mut chats = Vec::new();
        for a in 0..APPS {
            let token = format!("perf{:016x}", rng.next());
            db.exec_drop(
                "INSERT INTO applications (token, name, chats_count, created_at, updated_at) \
                 VALUES (?, ?, 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                (token.as_str(), format!("perf app {a}")),
            )
            .await
            .ctx("seeding applications")?;
            let app_id = db.last_insert_id().ok_or("no insert id")?;
            for number in 1..=CHATS_PER_APP as i64 {
                db.exec_drop(
                    "INSERT INTO chats (application_id, token, number, messages_count, creator_id, \
                     created_at, updated_at) VALUES (?, ?, ?, 0, 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                    (app_id, token.as_str(), number),
                )
                .await
                .ctx("seeding chats")?;
                let id = db.last_insert_id().ok_or("no insert id")?;
                chats.push(ChatRef {
                    token: token.clone(),
                    number,
                    id,
                });
            }
            redis::pipe()
                .set(format!("chat_counter:{token}"), CHATS_PER_APP)
                .sadd("chat_changes", &token)
                .query_async::<()>(&mut redis)
                .await
                .ctx("seeding chat counters")?;
        }
        Ok(chats)
    }

    /// Rows in `messages`.
    pub async fn count_messages(&self) -> Res<u64> {
        let mut db = self.pool.get_conn().await.ctx("MySQL")?;
        let n: Option<u64> = db
            .query_first("SELECT COUNT(*) FROM messages")
            .await
            .ctx("COUNT messages")?;
        Ok(n.unwrap_or(0))
    }

    /// Removes database, vhost, index and this DB's Redis keys (unless
    /// `--keep`). Errors are printed, not returned: cleanup goes on.
    pub async fn destroy(&self) {
        if self.settings.keep {
            eprintln!("load: keeping sandbox {}", self.name);
            return;
        }
        let _ = self.pool.clone().disconnect().await;
        match Conn::new(mysql_opts(&self.settings, None)).await {
            Ok(mut c) => {
                if let Err(e) = c
                    .query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name))
                    .await
                {
                    eprintln!("load: DROP DATABASE {}: {e}", self.name);
                }
                let _ = c.disconnect().await;
            }
            Err(e) => eprintln!("load: MySQL: {e}"),
        }
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("load: {e}");
        }
        let _ = http_request(&http_agent(), "DELETE", &self.index_url(), None).await;
        if let Err(e) = self.flush_redis().await {
            eprintln!("load: {e}");
        }
    }
}

pub fn mysql_opts(s: &Settings, db: Option<&str>) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(s.db_host.clone())
        .tcp_port(s.db_port)
        .user(Some(s.db_user.clone()))
        .pass(Some(s.db_pass.clone()))
        .db_name(db.map(str::to_string))
        .prefer_socket(false)
        .init(vec!["SET NAMES utf8mb4"])
}

/// Runs `f` on the current thread with the tokio context mysql_async needs.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(Compat::new(f))
}

// ---------------------------------------------------------------- RabbitMQ

/// Declares `queue` durable without arguments unless it exists, as the
/// writer does (its own `ensure_queue`).
pub async fn ensure_queue(conn: &Connection, queue: &str) -> Res<()> {
    chat_writer::amqp::topology::ensure_queue(conn, queue)
        .await
        .ctx(&format!("declaring {queue}"))
}

/// (messages ready, consumers) of `queue`, or None if it does not exist.
pub async fn queue_state(conn: &Connection, queue: &str) -> Res<Option<(u32, u32)>> {
    let ch = conn.create_channel().await.ctx("opening a channel")?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => {
            let _ = ch.close(200, "OK".into()).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        Err(_) => Ok(None),
    }
}

pub async fn delete_queue(conn: &Connection, queue: &str) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
        let _ = ch.close(200, "OK".into()).await;
    }
}

/// A publisher-confirm channel with at most `window` confirms in flight.
pub struct Publisher {
    pub channel: Channel,
    pending: VecDeque<PublisherConfirm>,
    window: usize,
}

impl Publisher {
    pub async fn open(conn: &Connection, window: usize) -> Res<Publisher> {
        let channel = conn.create_channel().await.ctx("opening a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .ctx("confirm_select")?;
        Ok(Publisher {
            channel,
            pending: VecDeque::new(),
            window,
        })
    }

    /// Publishes like the API: default exchange, JSON, persistent, AMQP
    /// timestamp (seconds); `published_us` also goes in `x-published-us`.
    pub async fn publish(
        &mut self,
        queue: &str,
        body: &[u8],
        published_us: Option<u64>,
    ) -> Res<()> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(now_us() / 1_000_000);
        if let Some(us) = published_us {
            let mut headers = FieldTable::default();
            headers.insert("x-published-us".into(), AMQPValue::LongLongInt(us as i64));
            props = props.with_headers(headers);
        }
        self.publish_props(queue, body, props).await
    }

    /// Publishes JSON, persistent, without an AMQP timestamp or headers
    /// (`load edits`: the writer then versions each edit by the time it
    /// received it, in delivery order).
    pub async fn publish_untimed(&mut self, queue: &str, body: &[u8]) -> Res<()> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.publish_props(queue, body, props).await
    }

    /// Publishes to `queue` on the default exchange with `props`.
    pub async fn publish_props(
        &mut self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Res<()> {
        while self.pending.len() >= self.window {
            self.settle_one().await?;
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .ctx(&format!("publishing to {queue}"))?;
        self.pending.push_back(confirm);
        Ok(())
    }

    async fn settle_one(&mut self) -> Res<()> {
        if let Some(c) = self.pending.pop_front() {
            let conf = c.await.ctx("publisher confirm")?;
            if !conf.is_ack() {
                return Err("the broker nacked a message".into());
            }
        }
        Ok(())
    }

    /// Settles confirms that have already arrived, without waiting.
    pub async fn settle_ready(&mut self) -> Res<()> {
        while let Some(front) = self.pending.front_mut() {
            match smol::future::poll_once(front).await {
                Some(r) => {
                    self.pending.pop_front();
                    if !r.ctx("publisher confirm")?.is_ack() {
                        return Err("the broker nacked a message".into());
                    }
                }
                None => break,
            }
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Res<()> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

/// Publishes `msgs` to `create_messages` with confirms; returns msgs/s.
pub async fn prepublish(conn: &Connection, queue: &str, msgs: &[Msg]) -> Res<f64> {
    let mut p = Publisher::open(conn, 2000).await?;
    let t = std::time::Instant::now();
    for m in msgs {
        p.publish(queue, &m.payload(), None).await?;
    }
    p.flush().await?;
    let _ = p.channel.close(200, "OK".into()).await;
    Ok(msgs.len() as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

// ---------------------------------------------------------------- HTTP

pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Sends a request with an optional body (JSON or NDJSON); returns status
/// and the body text. Runs on smol's blocking pool.
pub async fn http_request(
    agent: &ureq::Agent,
    method: &'static str,
    url: &str,
    body: Option<Vec<u8>>,
) -> Res<(u16, String)> {
    let agent = agent.clone();
    let url = url.to_string();
    smol::unblock(move || http_blocking(&agent, method, &url, body)).await
}

/// The same as [`http_request`], on the calling thread.
pub fn http_blocking(
    agent: &ureq::Agent,
    method: &'static str,
    url: &str,
    body: Option<Vec<u8>>,
) -> Res<(u16, String)> {
    let what = format!("{method} {url}");
    let resp = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        ("PUT", b) => agent
            .put(url)
            .header("Content-Type", "application/json")
            .send(b.unwrap_or_default()),
        (_, b) => agent
            .post(url)
            .header("Content-Type", "application/x-ndjson")
            .send(b.unwrap_or_default()),
    };
    let mut resp = resp.ctx(&what)?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()
        .ctx(&what)?;
    Ok((status, text))
}

/// Documents in the index (`_count`; 0 if the index does not exist yet).
pub fn es_count(agent: &ureq::Agent, index_url: &str) -> Res<u64> {
    let (status, text) = http_blocking(agent, "GET", &format!("{index_url}/_count"), None)?;
    if status == 404 {
        return Ok(0);
    }
    if status != 200 {
        return Err(format!("{index_url}/_count: HTTP {status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).ctx("_count answer")?;
    Ok(v["count"].as_u64().unwrap_or(0))
}

// ---------------------------------------------------------------- statistics

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of an ascending slice (`p` in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A number for a table cell: thousands separators for big values.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes `<out>/<name>.json` and `<out>/<name>.md`.
pub fn write_outputs(s: &Settings, name: &str, json: &Value, md: &str) -> Res<()> {
    std::fs::create_dir_all(&s.out).ctx(&format!("creating {}", s.out.display()))?;
    let j = s.out.join(format!("{name}.json"));
    std::fs::write(&j, serde_json::to_string_pretty(json).unwrap_or_default())
        .ctx(&format!("writing {}", j.display()))?;
    let m = s.out.join(format!("{name}.md"));
    std::fs::write(&m, md).ctx(&format!("writing {}", m.display()))?;
    eprintln!("load: wrote {} and {}", j.display(), m.display());
    Ok(())
}

/// Context of a run for the JSON: date, machine load, host.
pub fn run_context() -> Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({
        "unix_time": now_us() / 1_000_000,
        "loadavg_at_end": load.trim(),
        "cpus": cpus,
    })
}
