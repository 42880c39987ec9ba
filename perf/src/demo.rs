//! `demo`: the "main job" demo for `chat-writer`, a publisher and verifier.
//!
//! It plays the part of the API in front of a running `chat-writer`:
//!
//! 1. creates `--apps` rows in MySQL `applications` (the API does that
//!    itself), each with a fresh random token `demo_<hex>`;
//! 2. for each of `--chats-per-app` chats per application: `INCR
//!    chat_counter:<token>` and `SADD chat_changes <token>` in Redis, then
//!    publishes `create_chats`;
//! 3. waits until those chats rows exist (a message needs its `chat_id`), then
//!    for each of `--messages` messages (spread at random over the chats):
//!    `INCR message_counter:<token>:<chat_number>`, `SADD message_changes
//!    <token>:<chat_number>`, and publishes `create_messages` with a realistic
//!    body (varied length, some non-ASCII and emoji);
//! 4. waits until those messages rows exist, then publishes `update_messages`
//!    for `--updates` distinct random messages with a new body;
//! 5. polls MySQL, Redis and Elasticsearch until everything has landed: rows
//!    per table for its own tokens, every body (created or updated) byte for
//!    byte in MySQL and in the index, no foreign message filed under one of
//!    its chats (token or chat number disagreeing with the chat: leftovers of
//!    an earlier database in the queues), `applications.chats_count` and
//!    `chats.messages_count` equal to the Redis counters (the writer syncs them
//!    every COUNT_SYNC_INTERVAL), or until `--timeout` seconds have passed;
//! 6. prints a summary table and exits 0 only if every number equals what it
//!    published; on timeout it prints what is missing and exits 1.
//!
//! Publishing follows the writer's interface (README, "How it works"):
//! JSON, content type `application/json`, persistent (delivery mode 2), AMQP
//! timestamp = now in seconds, default exchange, routing key = queue name,
//! `mandatory` set and publisher confirms on. Publishes are pipelined: up to
//! `--window` confirms are outstanding at once, the oldest one is awaited when
//! the window is full. A nack or a returned (unroutable) message is an error.
//!
//! The demo declares nothing but the three work queues, and only those that
//! are missing (durable, no arguments): it declares each one passively first,
//! because a queue may already exist with other arguments.
//!
//! Its tokens are random, so it shares Redis DB, database and index with
//! anything else without clashing. At the end it deletes its own Redis
//! counters and change markers (and nothing else).
//!
//! # Environment (same variables and defaults as the writer)
//!
//! | variable | default |
//! |---|---|
//! | DATABASE_HOST | db |
//! | DATABASE_PORT | 3306 |
//! | DATABASE_USERNAME | root |
//! | DATABASE_PASSWORD | password (set but empty = empty password) |
//! | DATABASE_NAME | auth_api_development |
//! | REDIS_URL | redis://redis:6379/0 |
//! | RABBITMQ_URL | amqp://guest:guest@rabbitmq:5672/ |
//! | ELASTICSEARCH_URL | http://elasticsearch:9200 (empty: skip the index checks) |
//! | ELASTICSEARCH_INDEX | messages |
//! | DEMO_DATABASE_SOCKET | (empty) the demo's own: MySQL over this unix socket instead of DATABASE_HOST:DATABASE_PORT (`perf/demo.sh --tls`, where the writer alone uses TCP and TLS) |
//!
//! REDIS_URL may be `redis+unix:///path/to/redis.sock?db=0`.
//!
//! # Flags
//!
//! | flag | default | meaning |
//! |---|---|---|
//! | `--messages N` | 5000 | messages to create |
//! | `--apps N` | 5 | applications to create |
//! | `--chats-per-app N` | 10 | chats per application |
//! | `--updates N` | 500 | distinct messages to update (at most `--messages`) |
//! | `--timeout SECS` | 120 | give up waiting after this many seconds (per wait) |
//! | `--window N` | 1000 | publisher confirms outstanding at once |
//! | `-h`, `--help` | | print this help |
//!
//! Exit codes: 0 all landed and verified; 1 timeout, mismatch or a
//! connection error; 2 bad flag or environment value.

use async_compat::Compat;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Params, Pool, Value};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "\
usage: demo [--messages N] [--apps N] [--chats-per-app N] [--updates N]
            [--timeout SECS] [--window N]

Publishes create_chats, create_messages and update_messages like the API
would, then waits until chat-writer has stored everything (MySQL rows, bodies,
synced counts, Elasticsearch documents) and prints a summary.

flags:
  --messages N        messages to create (default 5000)
  --apps N            applications to create (default 5)
  --chats-per-app N   chats per application (default 10)
  --updates N         distinct messages to update (default 500)
  --timeout SECS      give up waiting after SECS seconds (default 120)
  --window N          publisher confirms outstanding at once (default 1000)

environment (same as chat-writer): DATABASE_HOST, DATABASE_PORT,
DATABASE_USERNAME, DATABASE_PASSWORD, DATABASE_NAME, REDIS_URL, RABBITMQ_URL,
ELASTICSEARCH_URL (empty: skip the index checks), ELASTICSEARCH_INDEX;
DEMO_DATABASE_SOCKET: MySQL over this unix socket instead of TCP";

const QUEUES: [&str; 3] = ["create_chats", "create_messages", "update_messages"];
/// Redis commands per pipeline round trip.
const REDIS_BATCH: usize = 1000;
/// Documents per `_mget` request.
const MGET_BATCH: usize = 500;
const POLL: Duration = Duration::from_millis(250);

type Res<T> = Result<T, String>;

/// Adds context to an error: `what: error`.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

// ---------------------------------------------------------------- config

struct Config {
    db_host: String,
    db_port: u16,
    db_user: String,
    db_pass: String,
    db_name: String,
    db_socket: Option<String>,
    redis_url: String,
    amqp_url: String,
    es_url: String,
    es_index: String,
    messages: usize,
    apps: usize,
    chats_per_app: usize,
    updates: usize,
    timeout: Duration,
    window: usize,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn parse_count(flag: &str, value: Option<String>, min: usize) -> Res<usize> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    match value.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!(
            "{flag}: expected an integer >= {min}, got {value:?}"
        )),
    }
}

/// `Ok(None)` means `--help` was asked for.
fn parse_config() -> Res<Option<Config>> {
    let db_port = env_or("DATABASE_PORT", "3306");
    let db_port = db_port
        .parse::<u16>()
        .map_err(|_| format!("DATABASE_PORT: expected a port number 1..65535, got {db_port:?}"))?;
    let mut cfg = Config {
        db_host: env_or("DATABASE_HOST", "db"),
        db_port,
        db_user: env_or("DATABASE_USERNAME", "root"),
        db_pass: env_or("DATABASE_PASSWORD", "password"),
        db_name: env_or("DATABASE_NAME", "auth_api_development"),
        db_socket: std::env::var("DEMO_DATABASE_SOCKET")
            .ok()
            .filter(|s| !s.is_empty()),
        redis_url: env_or("REDIS_URL", "redis://redis:6379/0"),
        amqp_url: env_or("RABBITMQ_URL", "amqp://guest:guest@rabbitmq:5672/"),
        es_url: env_or("ELASTICSEARCH_URL", "http://elasticsearch:9200")
            .trim_end_matches('/')
            .to_string(),
        es_index: env_or("ELASTICSEARCH_INDEX", "messages"),
        messages: 5000,
        apps: 5,
        chats_per_app: 10,
        updates: 500,
        timeout: Duration::from_secs(120),
        window: 1000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // Accept both `--flag N` and `--flag=N`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--messages" => cfg.messages = parse_count(&flag, value(), 1)?,
            "--apps" => cfg.apps = parse_count(&flag, value(), 1)?,
            "--chats-per-app" => cfg.chats_per_app = parse_count(&flag, value(), 1)?,
            "--updates" => cfg.updates = parse_count(&flag, value(), 0)?,
            "--timeout" => {
                cfg.timeout = Duration::from_secs(parse_count(&flag, value(), 1)? as u64)
            }
            "--window" => cfg.window = parse_count(&flag, value(), 1)?,
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        }
    }
    if cfg.updates > cfg.messages {
        return Err(format!(
            "--updates {} exceeds --messages {}: updates go to distinct messages",
            cfg.updates, cfg.messages
        ));
    }
    Ok(Some(cfg))
}

// ---------------------------------------------------------------- random data

/// xorshift64*: enough randomness for tokens, bodies and picks, no extra crate.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        if seed == 0 {
            seed = 1;
        }
        let mut rng = Rng(seed);
        for _ in 0..8 {
            rng.next();
        }
        rng
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough integer in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const WORDS: &[&str] = &[
    "the", "meeting", "moved", "to", "three", "o'clock", "can", "you", "send", "me", "the",
    "report", "before", "lunch", "I", "think", "we", "should", "ship", "it", "on", "Friday",
    "thanks", "for", "the", "update", "the", "build", "is", "green", "again", "deploy", "looks",
    "fine", "from", "here", "who", "is", "on", "call", "tonight", "please", "review", "my", "pull",
    "request", "coffee", "anyone", "running", "late", "traffic", "is", "terrible", "invoice",
    "attached", "customer", "asked", "about", "the", "refund", "ticket", "closed", "weekend",
    "plans", "sounds", "good", "let's", "sync", "tomorrow", "morning",
];

const FLAVOUR: &[&str] = &[
    "café",
    "naïve",
    "über",
    "façade",
    "jalapeño",
    "smörgåsbord",
    "Zürich",
    "São Paulo",
    "مرحبا",
    "شكرا جزيلا",
    "שלום",
    "привет",
    "спасибо",
    "こんにちは",
    "ありがとう",
    "日本語",
    "你好",
    "谢谢",
    "안녕하세요",
    "γειά σου",
    "नमस्ते",
    "😀",
    "👍",
    "🚀",
    "🎉",
    "❤️",
    "🙏",
    "🔥",
    "👨‍👩‍👧‍👦",
    "🇪🇬",
    "✅",
    "😂",
    "¯\\_(ツ)_/¯",
    "€42,50",
    "½ price",
    "→",
];

/// A chat-like body: mostly short, some medium, a few long; about a third
/// carry non-ASCII words or emoji.
fn make_body(rng: &mut Rng) -> String {
    let roll = rng.below(100);
    let words = match roll {
        0..=59 => 1 + rng.below(12),
        60..=89 => 20 + rng.below(60),
        90..=97 => 200 + rng.below(400),
        _ => 1200 + rng.below(400),
    };
    let flavoured = rng.below(3) == 0;
    let mut body = String::new();
    for i in 0..words {
        if i > 0 {
            body.push(if rng.below(14) == 0 { '\n' } else { ' ' });
        }
        if flavoured && rng.below(5) == 0 {
            body.push_str(rng.pick(FLAVOUR));
        } else {
            body.push_str(rng.pick(WORDS));
        }
    }
    match rng.below(6) {
        0 => body.push('?'),
        1 => body.push('!'),
        2 => body.push('.'),
        _ => {}
    }
    // Stay well inside the 65535-byte limit of the contract.
    if body.len() > 16_000 {
        let mut cut = 16_000;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    body
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- model

struct App {
    id: u64,
    token: String,
}

struct Chat {
    app: usize,
    number: i64,
    id: u64,
    creator_id: u64,
}

struct Message {
    chat: usize,
    number: i64,
    body: String,
    /// The body after `update_messages`, if this message was updated.
    updated: Option<String>,
}

impl Message {
    fn final_body(&self) -> &str {
        self.updated.as_deref().unwrap_or(&self.body)
    }
}

struct Demo {
    cfg: Config,
    apps: Vec<App>,
    chats: Vec<Chat>,
    messages: Vec<Message>,
    /// (token, chat_number, number) -> index into `messages`.
    by_key: HashMap<(String, i64, i64), usize>,
}

impl Demo {
    fn tokens(&self) -> Vec<String> {
        self.apps.iter().map(|a| a.token.clone()).collect()
    }

    fn chat_token(&self, chat: usize) -> &str {
        &self.apps[self.chats[chat].app].token
    }

    fn doc_id(&self, m: &Message) -> String {
        format!(
            "{}:{}:{}",
            self.chat_token(m.chat),
            self.chats[m.chat].number,
            m.number
        )
    }
}

// ---------------------------------------------------------------- RabbitMQ

/// A publisher-confirm channel with at most `window` confirms in flight.
struct Publisher {
    channel: Channel,
    pending: VecDeque<PublisherConfirm>,
    window: usize,
    published: usize,
}

impl Publisher {
    async fn publish(&mut self, queue: &str, payload: &serde_json::Value) -> Res<()> {
        if self.pending.len() >= self.window {
            self.settle_one().await?;
        }
        let body = serde_json::to_vec(payload).ctx("encoding a payload")?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(now_secs());
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .channel
            .basic_publish("".into(), queue.into(), opts, &body, props)
            .await
            .ctx(&format!("publishing to {queue}"))?;
        self.pending.push_back(confirm);
        self.published += 1;
        Ok(())
    }

    async fn settle_one(&mut self) -> Res<()> {
        if let Some(confirm) = self.pending.pop_front() {
            let confirmation = confirm.await.ctx("waiting for a publisher confirm")?;
            if !confirmation.is_ack() {
                return Err("the broker nacked a published message".into());
            }
            if let Some(returned) = confirmation.take_message() {
                return Err(format!(
                    "the broker returned a message to {:?} as unroutable: {}",
                    returned.delivery.routing_key.as_str(),
                    returned.reply_text.as_str()
                ));
            }
        }
        Ok(())
    }

    /// Waits for every outstanding confirm.
    async fn flush(&mut self) -> Res<()> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

/// Declares each work queue that does not exist yet (durable, no
/// arguments), with the writer's own passive-first declare.
async fn ensure_queues(conn: &Connection) -> Res<()> {
    for queue in QUEUES {
        chat_writer::amqp::topology::ensure_queue(conn, queue)
            .await
            .ctx(&format!("declaring queue {queue}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- MySQL

fn in_list(n: usize) -> String {
    vec!["?"; n].join(",")
}

fn token_params(tokens: &[String]) -> Params {
    Params::Positional(tokens.iter().map(|t| Value::from(t.as_str())).collect())
}

async fn count_rows(db: &mut Conn, table: &str, tokens: &[String]) -> Res<u64> {
    let sql = format!(
        "SELECT COUNT(*) FROM {table} WHERE token IN ({})",
        in_list(tokens.len())
    );
    let n: Option<u64> = db
        .exec_first(sql, token_params(tokens))
        .await
        .ctx(&format!("counting {table}"))?;
    Ok(n.unwrap_or(0))
}

async fn create_apps(db: &mut Conn, demo: &mut Demo, rng: &mut Rng) -> Res<()> {
    for i in 0..demo.cfg.apps {
        let token = format!("demo_{:016x}{:08x}", rng.next(), rng.next() as u32);
        let name = format!("Demo app {} ({})", i + 1, &token[5..13]);
        db.exec_drop(
            "INSERT INTO applications (token, name, chats_count, created_at, updated_at) \
             VALUES (?, ?, 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
            (token.as_str(), name.as_str()),
        )
        .await
        .ctx("inserting into applications (did `chat-writer migrate` run?)")?;
        let id = db
            .last_insert_id()
            .ok_or("inserting into applications: no insert id")?;
        demo.apps.push(App { id, token });
    }
    Ok(())
}

// ---------------------------------------------------------------- Elasticsearch

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// POSTs JSON, returns (status, parsed body).
async fn es_post(
    agent: &ureq::Agent,
    url: String,
    body: serde_json::Value,
) -> Res<(u16, serde_json::Value)> {
    let agent = agent.clone();
    smol::unblock(move || {
        let mut resp = agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .ctx(&format!("POST {url}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_to_string()
            .ctx(&format!("reading the answer of POST {url}"))?;
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    })
    .await
}

// ---------------------------------------------------------------- verification

#[derive(Default, Clone)]
struct Observed {
    apps: u64,
    chats: u64,
    messages: u64,
    /// Messages whose MySQL body equals the body it should have now.
    bodies_ok: usize,
    /// Updated messages whose MySQL body is the updated body.
    updated_ok: usize,
    /// Documents in the index for the demo's tokens (None: ES disabled).
    es_docs: Option<u64>,
    /// Documents whose indexed body equals the current body.
    es_bodies_ok: Option<usize>,
    apps_synced: usize,
    chats_synced: usize,
    /// Messages stored under one of the demo's chats whose token or chat
    /// number disagree with that chat (leftovers of another database, or a
    /// wrong `chat_id`).
    misfiled: u64,
    /// Human-readable notes on what is still missing.
    notes: Vec<String>,
}

struct Expected {
    apps: u64,
    chats: u64,
    messages: u64,
    updates: usize,
}

impl Observed {
    fn complete(&self, exp: &Expected, es_enabled: bool) -> bool {
        self.apps == exp.apps
            && self.chats == exp.chats
            && self.messages == exp.messages
            && self.bodies_ok == exp.messages as usize
            && self.updated_ok == exp.updates
            && self.apps_synced == exp.apps as usize
            && self.chats_synced == exp.chats as usize
            && self.misfiled == 0
            && (!es_enabled
                || (self.es_docs == Some(exp.messages)
                    && self.es_bodies_ok == Some(exp.messages as usize)))
    }
}

struct Clients {
    pool: Pool,
    redis: redis::aio::MultiplexedConnection,
    http: ureq::Agent,
}

async fn observe(demo: &Demo, cl: &mut Clients) -> Res<Observed> {
    let tokens = demo.tokens();
    let mut o = Observed::default();
    let mut db = cl.pool.get_conn().await.ctx("connecting to MySQL")?;
    o.apps = count_rows(&mut db, "applications", &tokens).await?;
    o.chats = count_rows(&mut db, "chats", &tokens).await?;
    o.messages = count_rows(&mut db, "messages", &tokens).await?;

    // Bodies, only once every row is there (one read of all bodies).
    if o.messages == demo.messages.len() as u64 {
        let rows: Vec<(String, i64, i64, String)> = db
            .exec(
                format!(
                    "SELECT token, chat_number, number, body FROM messages WHERE token IN ({})",
                    in_list(tokens.len())
                ),
                token_params(&tokens),
            )
            .await
            .ctx("reading message bodies")?;
        let mut wrong = 0usize;
        for (token, chat_number, number, body) in rows {
            let Some(&i) = demo.by_key.get(&(token, chat_number, number)) else {
                wrong += 1;
                continue;
            };
            let m = &demo.messages[i];
            if body == m.final_body() {
                o.bodies_ok += 1;
                if m.updated.is_some() {
                    o.updated_ok += 1;
                }
            } else {
                wrong += 1;
            }
        }
        if wrong > 0 {
            o.notes.push(format!(
                "{wrong} message bodies in MySQL differ from the expected body"
            ));
        }
    }

    // Counts: MySQL vs the Redis counters vs what was published.
    let app_counts: Vec<(String, i64)> = db
        .exec(
            format!(
                "SELECT token, chats_count FROM applications WHERE token IN ({})",
                in_list(tokens.len())
            ),
            token_params(&tokens),
        )
        .await
        .ctx("reading applications.chats_count")?;
    let chat_counts: Vec<(String, i64, i64)> = db
        .exec(
            format!(
                "SELECT token, number, messages_count FROM chats WHERE token IN ({})",
                in_list(tokens.len())
            ),
            token_params(&tokens),
        )
        .await
        .ctx("reading chats.messages_count")?;
    let misfiled: Option<u64> = db
        .exec_first(
            format!(
                "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.token IN ({}) AND (m.token <> c.token OR m.chat_number <> c.number)",
                in_list(tokens.len())
            ),
            token_params(&tokens),
        )
        .await
        .ctx("checking messages against their chats")?;
    o.misfiled = misfiled.unwrap_or(0);
    drop(db);

    let mut pipe = redis::pipe();
    for t in &tokens {
        pipe.get(format!("chat_counter:{t}"));
    }
    for c in 0..demo.chats.len() {
        pipe.get(format!(
            "message_counter:{}:{}",
            demo.chat_token(c),
            demo.chats[c].number
        ));
    }
    let counters: Vec<Option<i64>> = pipe
        .query_async(&mut cl.redis)
        .await
        .ctx("reading the Redis counters")?;
    let mut published_msgs: HashMap<usize, i64> = HashMap::new();
    for m in &demo.messages {
        *published_msgs.entry(m.chat).or_default() += 1;
    }
    let app_db: HashMap<&str, i64> = app_counts.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    for (i, app) in demo.apps.iter().enumerate() {
        let counter = counters[i];
        let published = demo.chats.iter().filter(|c| c.app == i).count() as i64;
        if app_db.get(app.token.as_str()).copied() == counter && counter == Some(published) {
            o.apps_synced += 1;
        }
    }
    let chat_db: HashMap<(&str, i64), i64> = chat_counts
        .iter()
        .map(|(t, n, c)| ((t.as_str(), *n), *c))
        .collect();
    for (c, chat) in demo.chats.iter().enumerate() {
        let counter = counters[tokens.len() + c];
        let published = published_msgs.get(&c).copied().unwrap_or(0);
        let stored = chat_db.get(&(demo.chat_token(c), chat.number)).copied();
        if stored == counter && counter == Some(published) {
            o.chats_synced += 1;
        }
    }

    // Elasticsearch: documents for the demo's tokens, then their bodies.
    if !demo.cfg.es_url.is_empty() {
        let base = format!("{}/{}", demo.cfg.es_url, demo.cfg.es_index);
        let (status, answer) = es_post(
            &cl.http,
            format!("{base}/_count"),
            json!({"query": {"terms": {"token": tokens}}}),
        )
        .await?;
        let docs = match status {
            200 => answer["count"].as_u64().unwrap_or(0),
            404 => {
                o.notes
                    .push(format!("index {} does not exist", demo.cfg.es_index));
                0
            }
            _ => {
                o.notes
                    .push(format!("{base}/_count answered HTTP {status}"));
                0
            }
        };
        o.es_docs = Some(docs);
        let mut bodies_ok = 0usize;
        if docs == demo.messages.len() as u64 {
            let mut stale = 0usize;
            for chunk in demo.messages.chunks(MGET_BATCH) {
                let ids: Vec<String> = chunk.iter().map(|m| demo.doc_id(m)).collect();
                let (status, answer) =
                    es_post(&cl.http, format!("{base}/_mget"), json!({ "ids": ids })).await?;
                if status != 200 {
                    o.notes.push(format!("{base}/_mget answered HTTP {status}"));
                    break;
                }
                let empty = Vec::new();
                let docs = answer["docs"].as_array().unwrap_or(&empty);
                for (m, doc) in chunk.iter().zip(docs) {
                    if doc["_source"]["body"].as_str() == Some(m.final_body()) {
                        bodies_ok += 1;
                    } else {
                        stale += 1;
                    }
                }
            }
            if stale > 0 {
                o.notes.push(format!(
                    "{stale} indexed documents are missing or have a stale body"
                ));
            }
        }
        o.es_bodies_ok = Some(bodies_ok);
    }
    Ok(o)
}

/// Polls until `ready` holds for the observation, or the deadline passes.
async fn wait_until<F>(
    demo: &Demo,
    cl: &mut Clients,
    deadline: Instant,
    ready: F,
) -> Res<(bool, Observed)>
where
    F: Fn(&Observed) -> bool,
{
    loop {
        let o = observe(demo, cl).await?;
        if ready(&o) {
            return Ok((true, o));
        }
        if Instant::now() >= deadline {
            return Ok((false, o));
        }
        smol::Timer::after(POLL).await;
    }
}

/// Waits for the chats rows and records their ids.
async fn wait_for_chats(demo: &mut Demo, pool: &Pool, deadline: Instant) -> Res<bool> {
    let tokens = demo.tokens();
    let app_of: HashMap<String, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i))
        .collect();
    loop {
        let mut db = pool.get_conn().await.ctx("connecting to MySQL")?;
        let rows: Vec<(String, i64, u64)> = db
            .exec(
                format!(
                    "SELECT token, number, id FROM chats WHERE token IN ({})",
                    in_list(tokens.len())
                ),
                token_params(&tokens),
            )
            .await
            .ctx("reading chats")?;
        drop(db);
        let ids: HashMap<(usize, i64), u64> = rows
            .into_iter()
            .filter_map(|(t, n, id)| app_of.get(&t).map(|&a| ((a, n), id)))
            .collect();
        let found = demo
            .chats
            .iter()
            .filter(|c| ids.contains_key(&(c.app, c.number)))
            .count();
        if found == demo.chats.len() {
            for c in &mut demo.chats {
                c.id = ids[&(c.app, c.number)];
            }
            return Ok(true);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "demo: timed out waiting for chats rows: {found} of {} exist",
                demo.chats.len()
            );
            return Ok(false);
        }
        smol::Timer::after(POLL).await;
    }
}

// ---------------------------------------------------------------- main flow

async fn run(cfg: Config) -> Res<bool> {
    let mut rng = Rng::seeded();
    let opts = OptsBuilder::default()
        .ip_or_hostname(cfg.db_host.clone())
        .tcp_port(cfg.db_port)
        .user(Some(cfg.db_user.clone()))
        .pass(Some(cfg.db_pass.clone()))
        .db_name(Some(cfg.db_name.clone()))
        .prefer_socket(cfg.db_socket.is_some())
        .socket(cfg.db_socket.clone());
    let pool = Pool::new(opts);
    let result = run_with_pool(cfg, &pool, &mut rng).await;
    let _ = pool.disconnect().await;
    result
}

async fn run_with_pool(cfg: Config, pool: &Pool, rng: &mut Rng) -> Res<bool> {
    let at = match &cfg.db_socket {
        Some(sock) => format!("socket {sock}"),
        None => format!("{}:{}", cfg.db_host, cfg.db_port),
    };
    let mut db = pool.get_conn().await.ctx(&format!(
        "connecting to MySQL {at} database {}",
        cfg.db_name
    ))?;
    let redis_client = redis::Client::open(cfg.redis_url.as_str())
        .ctx(&format!("REDIS_URL {:?}", cfg.redis_url))?;
    let redis = redis_client
        .get_multiplexed_async_connection()
        .await
        .ctx("connecting to Redis")?;
    let amqp = Connection::connect(&cfg.amqp_url, ConnectionProperties::default())
        .await
        .ctx("connecting to RabbitMQ")?;
    ensure_queues(&amqp).await?;
    let channel = amqp.create_channel().await.ctx("opening a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .ctx("enabling publisher confirms")?;
    let mut publisher = Publisher {
        channel,
        pending: VecDeque::new(),
        window: cfg.window,
        published: 0,
    };
    let mut cl = Clients {
        pool: pool.clone(),
        redis,
        http: http_agent(),
    };
    if !cfg.es_url.is_empty() {
        let url = cfg.es_url.clone();
        let agent = cl.http.clone();
        smol::unblock(move || agent.get(&url).call().map(|_| ()))
            .await
            .ctx(&format!("reaching Elasticsearch at {}", cfg.es_url))?;
    }

    let mut demo = Demo {
        cfg,
        apps: Vec::new(),
        chats: Vec::new(),
        messages: Vec::new(),
        by_key: HashMap::new(),
    };
    create_apps(&mut db, &mut demo, rng).await?;
    drop(db);
    println!(
        "demo: {} applications created: {}",
        demo.apps.len(),
        demo.tokens().join(" ")
    );
    let timeout = demo.cfg.timeout;
    let exp = Expected {
        apps: demo.cfg.apps as u64,
        chats: (demo.cfg.apps * demo.cfg.chats_per_app) as u64,
        messages: demo.cfg.messages as u64,
        updates: demo.cfg.updates,
    };

    // ---- chats
    let started = Instant::now();
    let mut pipe = redis::pipe();
    for app in &demo.apps {
        for _ in 0..demo.cfg.chats_per_app {
            pipe.incr(format!("chat_counter:{}", app.token), 1)
                .sadd("chat_changes", &app.token)
                .ignore();
        }
    }
    let numbers: Vec<i64> = pipe
        .query_async(&mut cl.redis)
        .await
        .ctx("INCR chat_counter in Redis")?;
    let mut numbers = numbers.into_iter();
    for a in 0..demo.apps.len() {
        for _ in 0..demo.cfg.chats_per_app {
            let number = numbers.next().ok_or("Redis returned too few counters")?;
            let creator_id = 1 + rng.below(1000) as u64;
            demo.chats.push(Chat {
                app: a,
                number,
                id: 0,
                creator_id,
            });
        }
    }
    for chat in &demo.chats {
        let app = &demo.apps[chat.app];
        publisher
            .publish(
                "create_chats",
                &json!({
                    "application_id": app.id,
                    "token": app.token,
                    "number": chat.number,
                    "creator_id": chat.creator_id,
                }),
            )
            .await?;
    }
    publisher.flush().await?;
    println!(
        "demo: published {} create_chats; waiting for the chats rows",
        demo.chats.len()
    );
    if !wait_for_chats(&mut demo, pool, Instant::now() + timeout).await? {
        let o = observe(&demo, &mut cl).await?;
        print_summary(&demo, &exp, &o, started.elapsed(), false);
        return Ok(false);
    }
    let chats_landed = started.elapsed();

    // ---- messages, in batches: one Redis round trip, then the publishes
    let publish_started = Instant::now();
    let total = demo.cfg.messages;
    let mut done = 0usize;
    while done < total {
        let n = REDIS_BATCH.min(total - done);
        let picks: Vec<usize> = (0..n).map(|_| rng.below(demo.chats.len())).collect();
        let mut pipe = redis::pipe();
        for &c in &picks {
            let key = format!("{}:{}", demo.chat_token(c), demo.chats[c].number);
            pipe.incr(format!("message_counter:{key}"), 1)
                .sadd("message_changes", key)
                .ignore();
        }
        let numbers: Vec<i64> = pipe
            .query_async(&mut cl.redis)
            .await
            .ctx("INCR message_counter in Redis")?;
        if numbers.len() != n {
            return Err("Redis returned too few counters".into());
        }
        for (&c, number) in picks.iter().zip(numbers) {
            let body = make_body(rng);
            let chat = &demo.chats[c];
            let token = demo.apps[chat.app].token.clone();
            let creator_id = if rng.below(10) == 0 {
                serde_json::Value::Null
            } else {
                json!(1 + rng.below(1000))
            };
            publisher
                .publish(
                    "create_messages",
                    &json!({
                        "chat_id": chat.id,
                        "token": token,
                        "chat_number": chat.number,
                        "number": number,
                        "body": body,
                        "creator_id": creator_id,
                    }),
                )
                .await?;
            demo.by_key
                .insert((token, chat.number, number), demo.messages.len());
            demo.messages.push(Message {
                chat: c,
                number,
                body,
                updated: None,
            });
        }
        done += n;
    }
    publisher.flush().await?;
    let publish_time = publish_started.elapsed();
    println!(
        "demo: published {total} create_messages in {:.2}s ({:.0}/s confirmed); waiting for the rows",
        publish_time.as_secs_f64(),
        total as f64 / publish_time.as_secs_f64().max(1e-9)
    );

    // ---- updates go to messages that exist, as the API's would
    let tokens = demo.tokens();
    let deadline = Instant::now() + timeout;
    loop {
        let mut db = pool.get_conn().await.ctx("connecting to MySQL")?;
        let n = count_rows(&mut db, "messages", &tokens).await?;
        drop(db);
        if n == total as u64 {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("demo: timed out waiting for messages rows: {n} of {total} exist");
            let o = observe(&demo, &mut cl).await?;
            print_summary(&demo, &exp, &o, started.elapsed(), false);
            return Ok(false);
        }
        smol::Timer::after(POLL).await;
    }
    let messages_landed = started.elapsed();
    println!(
        "demo: all {total} messages rows exist after {:.2}s; publishing {} update_messages",
        messages_landed.as_secs_f64(),
        demo.cfg.updates
    );
    let mut order: Vec<usize> = (0..demo.messages.len()).collect();
    for i in 0..demo.cfg.updates {
        let j = i + rng.below(order.len() - i);
        order.swap(i, j);
    }
    for &i in &order[..demo.cfg.updates] {
        let new_body = format!("(edited) {}", make_body(rng));
        let m = &demo.messages[i];
        let chat = &demo.chats[m.chat];
        publisher
            .publish(
                "update_messages",
                &json!({
                    "chat_id": chat.id,
                    "token": demo.apps[chat.app].token,
                    "chat_number": chat.number,
                    "number": m.number,
                    "body": new_body,
                }),
            )
            .await?;
        demo.messages[i].updated = Some(new_body);
    }
    publisher.flush().await?;
    let _ = publisher.channel.close(200, "OK".into()).await;
    let _ = amqp.close(200, "OK".into()).await;

    // ---- everything landed?
    println!(
        "demo: waiting until everything has landed (timeout {}s)",
        timeout.as_secs()
    );
    let es_enabled = !demo.cfg.es_url.is_empty();
    let (ok, o) = wait_until(&demo, &mut cl, Instant::now() + timeout, |o| {
        o.complete(&exp, es_enabled)
    })
    .await?;
    let elapsed = started.elapsed();
    println!(
        "demo: phases: chats landed {:.2}s, messages landed {:.2}s, all landed {:.2}s",
        chats_landed.as_secs_f64(),
        messages_landed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    print_summary(&demo, &exp, &o, elapsed, ok);
    remove_redis_keys(&demo, &mut cl).await;
    Ok(ok)
}

/// Deletes the demo's counters and change markers once everything is
/// verified, so repeated runs leave nothing behind in a shared Redis DB.
async fn remove_redis_keys(demo: &Demo, cl: &mut Clients) {
    let mut pipe = redis::pipe();
    for app in &demo.apps {
        pipe.del(format!("chat_counter:{}", app.token))
            .srem("chat_changes", &app.token)
            .ignore();
    }
    for chat in &demo.chats {
        let member = format!("{}:{}", demo.apps[chat.app].token, chat.number);
        pipe.del(format!("message_counter:{member}"))
            .srem("message_changes", &member)
            .ignore();
    }
    if let Err(e) = pipe.query_async::<()>(&mut cl.redis).await {
        eprintln!("demo: could not remove its Redis keys: {e}");
    }
}

fn print_summary(demo: &Demo, exp: &Expected, o: &Observed, elapsed: Duration, ok: bool) {
    let mut lines: Vec<String> = Vec::new();
    let mut row = |what: &str, want: String, got: String| {
        let mark = if want == got { "ok" } else { "MISSING" };
        lines.push(format!("  {what:<40} {want:>10} {got:>10}  {mark}"));
    };
    row(
        "applications rows",
        exp.apps.to_string(),
        o.apps.to_string(),
    );
    row("chats rows", exp.chats.to_string(), o.chats.to_string());
    row(
        "messages rows",
        exp.messages.to_string(),
        o.messages.to_string(),
    );
    row(
        "message bodies as published (MySQL)",
        exp.messages.to_string(),
        o.bodies_ok.to_string(),
    );
    row(
        "messages updated (MySQL)",
        exp.updates.to_string(),
        o.updated_ok.to_string(),
    );
    row(
        "foreign messages under its chats",
        "0".into(),
        o.misfiled.to_string(),
    );
    match (o.es_docs, o.es_bodies_ok) {
        (Some(docs), Some(bodies)) => {
            row(
                &format!("documents in index {}", demo.cfg.es_index),
                exp.messages.to_string(),
                docs.to_string(),
            );
            row(
                "documents with current body (ES)",
                exp.messages.to_string(),
                bodies.to_string(),
            );
        }
        _ => row(
            "Elasticsearch checks (ELASTICSEARCH_URL empty)",
            "skipped".into(),
            "skipped".into(),
        ),
    }
    row(
        "apps: chats_count = counter",
        exp.apps.to_string(),
        o.apps_synced.to_string(),
    );
    row(
        "chats: messages_count = counter",
        exp.chats.to_string(),
        o.chats_synced.to_string(),
    );
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "\n== chat-writer demo summary ({} apps, tokens demo_…) ==",
        demo.apps.len()
    );
    let _ = writeln!(
        stdout,
        "  {:<40} {:>10} {:>10}",
        "what", "expected", "landed"
    );
    for line in &lines {
        let _ = writeln!(stdout, "{line}");
    }
    let secs = elapsed.as_secs_f64();
    let label = if ok {
        "elapsed, first publish to all landed"
    } else {
        "elapsed, first publish to giving up"
    };
    let _ = writeln!(stdout, "  {label:<40} {secs:>10.2} s");
    if ok {
        let _ = writeln!(
            stdout,
            "  {:<40} {:>10.0}",
            "messages per second (messages / elapsed)",
            exp.messages as f64 / secs.max(1e-9)
        );
    }
    for note in &o.notes {
        let _ = writeln!(stdout, "  note: {note}");
    }
    let _ = writeln!(
        stdout,
        "  result: {}",
        if ok {
            "PASS, everything landed"
        } else {
            "FAIL, see the MISSING rows"
        }
    );
    let _ = stdout.flush();
}

fn main() -> ExitCode {
    let cfg = match parse_config() {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    // Compat gives mysql_async the tokio context it needs; lapin and redis
    // run on smol.
    match smol::block_on(Compat::new(run(cfg))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}
