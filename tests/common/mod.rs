//! Test harness for the chat-writer integration tests.
//!
//! Every test builds a [`TestEnv`]: its own MySQL database, RabbitMQ vhost,
//! Redis DB number and Elasticsearch index, all torn down in `Drop` (also when
//! the test panics). The writer runs as a child process ([`Writer`]) with its
//! stderr captured to a log file under the cargo target dir; the log is
//! printed when a test fails.
//!
//! Real services only (no mocks): MariaDB/MySQL 127.0.0.1:3306 (root, empty
//! password), Redis 127.0.0.1:6379, RabbitMQ 127.0.0.1:5672 (guest/guest,
//! `rabbitmqctl` on PATH) and an `osmem-server` (Elasticsearch compatible),
//! started once per test process.
#![allow(dead_code)]

pub mod amqp;
pub mod db;
pub mod es;
pub mod faults;
pub mod kv;
pub mod load;
pub mod metrics;
pub mod time;
pub mod tls;
pub mod writer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use amqp::{Amqp, Got};
pub use db::{Db, MessageRow};
pub use es::Es;
pub use kv::Kv;
pub use writer::Writer;

/// The writer binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_chat-writer");

/// Parent rows the cases file asks for.
pub const APP_ID: i64 = 7;
pub const TOKEN: &str = "app_x";
pub const CHAT_ID: i64 = 1;

/// The three work queues of the contract (section 3).
pub const WORK_QUEUES: [&str; 3] = ["create_chats", "create_messages", "update_messages"];

pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306";
pub const AMQP_BASE: &str = "amqp://guest:guest@127.0.0.1:5672";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Directory for writer logs and other artefacts of this test run.
pub fn artefact_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-writer-it");
    std::fs::create_dir_all(&dir).expect("create artefact dir");
    dir
}

/// Process-wide set-up done once: the osmem-server and a sweep of resources
/// left behind by test processes that were killed.
struct Global {
    es_url: String,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

fn global() -> &'static Global {
    GLOBAL.get_or_init(|| {
        sweep_stale();
        Global {
            es_url: es::start_osmem_server(),
        }
    })
}

/// A short tag of this host (container), so a sweep never touches the
/// resources of test processes on another host sharing the services.
fn host_tag() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    // FNV-1a, 24 bits
    let mut h: u32 = 0x811c_9dc5;
    for b in name.trim().bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h & 0xff_ffff)
}

/// Drops `cwt_<pid>_<n>_<host>` databases and vhosts of this host whose test
/// process is gone (a killed run).
fn sweep_stale() {
    let host = host_tag();
    let dead = |name: &str| -> bool {
        let parts: Vec<&str> = name.split('_').collect();
        if parts.len() != 4 || parts[0] != "cwt" || parts[3] != host {
            return false;
        }
        match parts[1].parse::<u32>() {
            Ok(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => false,
        }
    };
    let dbs: Vec<String> = smol::block_on(Db::server().query("SHOW DATABASES LIKE 'cwt\\_%'"));
    for d in dbs.iter().filter(|d| dead(d)) {
        smol::block_on(Db::server().exec(&format!("DROP DATABASE IF EXISTS `{d}`")));
    }
    if let Ok(out) = Command::new("rabbitmqctl")
        .args(["-q", "list_vhosts", "--no-table-headers"])
        .output()
    {
        for v in String::from_utf8_lossy(&out.stdout).lines() {
            let v = v.trim();
            if dead(v) {
                let _ = rabbitmqctl(&["delete_vhost", v]);
            }
        }
    }
}

/// Runs `rabbitmqctl -q <args>` and returns stdout; panics on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis DB number (1..=15) held for the lifetime of a test, across test
/// processes, with an advisory lock on /tmp/chat-writer-test-redis-<n>.lock.
struct RedisSlot {
    db: u8,
    _lock: File,
}

/// Takes the first free slot, preferring one whose DB is empty: a non-empty
/// DB is either left by a killed test run (flushed when nothing else is free)
/// or used by someone who does not take the lock (left alone if possible).
#[allow(clippy::incompatible_msrv)] // File::try_lock: Rust 1.89; tests run on the CI toolchain
fn acquire_redis_slot() -> RedisSlot {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut fallback: Option<RedisSlot> = None;
        for db in 1..=15u8 {
            let path = format!("/tmp/chat-writer-test-redis-{db}.lock");
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {path}: {e}"));
            if file.try_lock().is_err() {
                continue;
            }
            let size: i64 = smol::block_on(Kv::new(db).cmd(&["DBSIZE"]));
            if size == 0 {
                return RedisSlot { db, _lock: file };
            }
            if fallback.is_none() {
                fallback = Some(RedisSlot { db, _lock: file });
            }
        }
        if let Some(slot) = fallback {
            return slot;
        }
        assert!(
            Instant::now() < deadline,
            "no free Redis DB (1..15) within 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Resources owned by one test.
pub struct TestEnv {
    /// Unique name: `cwt_<pid>_<n>_<host tag>`; used for the database, vhost
    /// and index.
    pub name: String,
    /// The test's short tag, used in log file names.
    pub tag: String,
    pub db_name: String,
    pub vhost: String,
    pub index: String,
    pub es_url: String,
    pub db: Db,
    pub kv: Kv,
    pub es: Es,
    redis: RedisSlot,
    spawned: AtomicUsize,
    started: Instant,
}

impl TestEnv {
    pub fn new(tag: &str) -> TestEnv {
        let g = global();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("cwt_{}_{}_{}", std::process::id(), n, host_tag());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let redis = acquire_redis_slot();
        let kv = Kv::new(redis.db);
        smol::block_on(kv.flushdb());
        TestEnv {
            db: Db::new(&name),
            kv,
            es: Es::new(&g.es_url, &name),
            db_name: name.clone(),
            vhost: name.clone(),
            index: name.clone(),
            es_url: g.es_url.clone(),
            tag: tag.to_string(),
            name,
            redis,
            spawned: AtomicUsize::new(0),
            started: Instant::now(),
        }
    }

    pub fn redis_db(&self) -> u8 {
        self.redis.db
    }

    pub fn amqp_url(&self) -> String {
        format!("{AMQP_BASE}/{}", self.vhost)
    }

    pub async fn amqp(&self) -> Amqp {
        Amqp::connect(&self.amqp_url(), &self.vhost).await
    }

    /// The full, valid environment for the writer (README, "Configuration"), with
    /// test-friendly intervals.
    pub fn writer_env(&self) -> BTreeMap<String, String> {
        let http_port = free_port();
        [
            ("DATABASE_HOST", "127.0.0.1".to_string()),
            ("DATABASE_PORT", "3306".to_string()),
            ("DATABASE_USERNAME", "root".to_string()),
            ("DATABASE_PASSWORD", String::new()),
            ("DATABASE_NAME", self.db_name.clone()),
            (
                "REDIS_URL",
                format!("redis://127.0.0.1:6379/{}", self.redis.db),
            ),
            ("RABBITMQ_URL", self.amqp_url()),
            ("ELASTICSEARCH_URL", self.es_url.clone()),
            ("ELASTICSEARCH_INDEX", self.index.clone()),
            ("COUNT_SYNC_INTERVAL", "200ms".to_string()),
            ("COUNT_RECONCILE_INTERVAL", "1h".to_string()),
            ("RABBITMQ_PREFETCH_COUNT", "64".to_string()),
            ("DB_MAX_OPEN_CONNS", "10".to_string()),
            ("DB_MAX_IDLE_CONNS", "5".to_string()),
            ("SHUTDOWN_TIMEOUT", "20s".to_string()),
            ("RUST_LOG", "info".to_string()),
            // Not in section 2; keeps parallel writers off a shared default port.
            ("HTTP_ADDR", format!("127.0.0.1:{http_port}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Spawns `chat-writer <args>` with the test environment plus `extra`.
    pub fn spawn(&self, args: &[&str], extra: &[(&str, &str)]) -> Writer {
        let mut vars = self.writer_env();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        self.spawn_vars(args, &vars)
    }

    /// Spawns `chat-writer <args>` with exactly the environment `vars`.
    pub fn spawn_vars(&self, args: &[&str], vars: &BTreeMap<String, String>) -> Writer {
        let k = self.spawned.fetch_add(1, Ordering::SeqCst);
        let what = if args.is_empty() {
            "run".to_string()
        } else {
            args.join("-").replace("--", "")
        };
        let log = artefact_dir().join(format!("{}-{}-{k}-{what}.log", self.name, self.tag));
        Writer::spawn(args, vars, &log)
    }

    /// Starts the service (no subcommand).
    pub fn start_writer(&self, extra: &[(&str, &str)]) -> Writer {
        self.spawn(&[], extra)
    }

    /// Runs `chat-writer migrate` and expects exit 0 within 30 s.
    pub fn migrate(&self) {
        let mut m = self.spawn(&["migrate"], &[]);
        let exit = m.wait_exit(Duration::from_secs(30));
        assert_eq!(
            exit.code,
            Some(0),
            "`chat-writer migrate` should exit 0; log {}:\n{}",
            m.log_path.display(),
            m.log()
        );
    }

    /// Migrates, then seeds application 7 "app_x" and chat 1 (number 1), as
    /// the cases file asks.
    pub async fn migrate_and_seed(&self) {
        self.migrate();
        self.db.seed_app(APP_ID, TOKEN, 0).await;
        self.db.seed_chat(CHAT_ID, APP_ID, TOKEN, 1, 0).await;
    }

    /// Waits until every work queue has a consumer: the writer is consuming.
    pub async fn wait_consuming(&self, w: &mut Writer) {
        let amqp = self.amqp().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut all = true;
            for q in WORK_QUEUES {
                match amqp.queue_info(q).await {
                    Some((_, consumers)) if consumers > 0 => {}
                    _ => all = false,
                }
            }
            if all {
                break;
            }
            w.assert_running();
            assert!(
                Instant::now() < deadline,
                "the writer did not consume all work queues within 20 s"
            );
            smol::Timer::after(Duration::from_millis(100)).await;
        }
        amqp.close().await;
    }

    /// `name messages consumers` of every queue in the vhost (messages =
    /// ready + unacknowledged).
    pub fn list_queues(&self) -> BTreeMap<String, (u64, u64)> {
        let out = rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.vhost,
            "--no-table-headers",
            "name",
            "messages",
            "consumers",
        ]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() != 3 {
                    return None;
                }
                Some((f[0].to_string(), (f[1].parse().ok()?, f[2].parse().ok()?)))
            })
            .collect()
    }
}

impl TestEnv {
    /// `(ready, unacknowledged, consumers)` of `queue` per rabbitmqctl.
    pub fn queue_stats(&self, queue: &str) -> Option<(u64, u64, u64)> {
        let out = rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.vhost,
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ]);
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 4 && f[0] == queue {
                Some((f[1].parse().ok()?, f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
    }

    /// Waits until `queue` has no consumer and no unacknowledged delivery
    /// (after a consumer's connection closed, the broker requeues).
    pub fn wait_queue_settled(&self, queue: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let stats = self.queue_stats(queue);
            if let Some((_, 0, 0)) = stats {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} not settled (ready, unacked, consumers) = {stats:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A pausable proxy to the test MySQL (127.0.0.1:3306).
pub fn mysql_proxy() -> faults::Proxy {
    faults::Proxy::start("127.0.0.1:3306".parse().expect("address"))
}

impl TestEnv {
    /// Starts the service on a free HTTP address, with `extra`; returns it and that address.
    pub fn start_writer_at(&self, extra: &[(&str, &str)]) -> (Writer, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut vars = vec![("HTTP_ADDR", addr.as_str())];
        vars.extend_from_slice(extra);
        (self.start_writer(&vars), addr)
    }

    /// A writer on a free HTTP address, with `extra`, once it consumes every work queue.
    pub async fn consuming_writer(&self, extra: &[(&str, &str)]) -> (Writer, String) {
        let (mut w, addr) = self.start_writer_at(extra);
        self.wait_consuming(&mut w).await;
        (w, addr)
    }

    /// A consuming writer whose MySQL goes through a pausable proxy, with that proxy and its HTTP address.
    pub async fn consuming_writer_behind_proxy(
        &self,
        prefetch: &str,
        requeue_after: &str,
    ) -> (faults::Proxy, Writer, String) {
        let mysql = mysql_proxy();
        let port = mysql.port.to_string();
        let (w, addr) = self
            .consuming_writer(&[
                ("DATABASE_PORT", port.as_str()),
                ("RABBITMQ_PREFETCH_COUNT", prefetch),
                ("MYSQL_REQUEUE_AFTER", requeue_after),
            ])
            .await;
        (mysql, w, addr)
    }

    /// Waits until every queue of `queues` has `n` consumers (passive declares, every `poll`).
    pub async fn wait_queue_consumers(
        &self,
        queues: &[&str],
        n: u32,
        timeout: Duration,
        poll: Duration,
    ) {
        let amqp = self.amqp().await;
        let a = &amqp;
        wait_for(
            &format!("{n} consumer(s) on {queues:?}"),
            timeout,
            poll,
            move || async move {
                let mut seen = Vec::new();
                for q in queues {
                    seen.push(a.queue_info(q).await);
                }
                if seen.iter().all(|i| i.map(|i| i.1) == Some(n)) {
                    Ok(())
                } else {
                    Err(format!("(ready, consumers) {seen:?}"))
                }
            },
        )
        .await;
        amqp.close().await;
    }

    /// Waits until `(ready, unacked, consumers)` of `queue` satisfies `ok`; returns it.
    pub async fn wait_queue_stats(
        &self,
        queue: &str,
        what: &str,
        timeout: Duration,
        poll: Duration,
        ok: impl Fn((u64, u64, u64)) -> bool,
    ) -> (u64, u64, u64) {
        let ok = &ok;
        wait_for(what, timeout, poll, move || async move {
            match self.queue_stats(queue) {
                Some(s) if ok(s) => Ok(s),
                other => Err(format!("(ready, unacked, consumers) {other:?}")),
            }
        })
        .await
    }

    /// Nothing in a `.dlq`, nothing left in a delay tier.
    pub fn assert_nothing_dead_or_retrying(&self) {
        assert_eq!(
            self.dead_and_retrying(),
            (0, 0),
            "(dead letters, in delay tiers): queues {:?}",
            self.list_queues()
        );
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Run the async clean-up on its own thread: Drop may run inside a
        // block_on (or during a panic unwinding out of one).
        let db = self.db.clone();
        let kv = self.kv.clone();
        let es = self.es.clone();
        let db_name = self.db_name.clone();
        let cleanup = std::thread::spawn(move || {
            smol::block_on(async move {
                Db::server()
                    .exec(&format!("DROP DATABASE IF EXISTS `{db_name}`"))
                    .await;
                kv.flushdb().await;
                drop(db);
            });
            es.delete_index();
        });
        if let Err(e) = cleanup.join() {
            eprintln!("test env clean-up of {} failed: {e:?}", self.name);
        }
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.vhost])
            .output();
        eprintln!(
            "[chat-writer-it] {} ({}) took {:.1?}{}",
            self.tag,
            self.name,
            self.started.elapsed(),
            if std::thread::panicking() {
                " FAILED"
            } else {
                ""
            }
        );
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that no other
/// caller in this test process has been given.
///
/// Ports come from 21000..25000, below the kernel's ephemeral range
/// (32768..60999 here), so neither `bind(0)` in another server nor an
/// outbound connection of a writer can take the port between this check
/// and its use. Asking the kernel for port 0 instead once handed two
/// replicas the same port (CI, replicas test). The start is spread by the
/// process id so two test runs at once rarely probe the same ports.
pub fn free_port() -> u16 {
    const FIRST: u32 = 21_000;
    const SPAN: u32 = 4_000;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let start = (std::process::id().wrapping_mul(7_919) + given.len() as u32) % SPAN;
    for i in 0..SPAN {
        let port = (FIRST + (start + i) % SPAN) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// Polls `check` every `poll` until it returns `Some`, or panics after
/// `timeout` naming `what` and the last observed value.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, poll: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
                }
            }
        }
        smol::Timer::after(poll).await;
    }
}

/// Polls `cond` until it is true or panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, poll: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(what, timeout, poll, || {
        let f = cond();
        async move {
            if f.await {
                Ok(())
            } else {
                Err("condition false".to_string())
            }
        }
    })
    .await
}

pub async fn sleep(d: Duration) {
    smol::Timer::after(d).await;
}

/// Decodes standard base64 (with or without padding).
pub fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("invalid base64 character {c:?}"),
        }
    }
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The document the writer must index for `row` (docs/elasticsearch.md).
pub fn expected_source(row: &MessageRow) -> serde_json::Value {
    serde_json::json!({
        "token": row.token,
        "chat_number": row.chat_number,
        "number": row.number,
        "body": String::from_utf8(row.body.clone()).expect("stored body is UTF-8"),
        "created_at": time::rfc3339_micros(row.created_us),
    })
}

/// Waits until the document of `row` has `_version` == `row.updated_us`,
/// then asserts its id and whole `_source`. Returns the response.
pub async fn assert_indexed(env: &TestEnv, row: &MessageRow) -> serde_json::Value {
    let id = format!("{}:{}:{}", row.token, row.chat_number, row.number);
    let want_version = row.updated_us;
    let doc = wait_for(
        &format!("document {id} with _version {want_version}"),
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let id = id.clone();
            async move {
                match env.es.doc(&id).await {
                    Some(d) if d["_version"].as_i64() == Some(want_version) => Ok(d),
                    Some(d) => Err(format!("{d}")),
                    None => Err("no document".to_string()),
                }
            }
        },
    )
    .await;
    assert_eq!(doc["_id"], serde_json::Value::String(id.clone()), "{doc}");
    assert_eq!(
        doc["_source"],
        expected_source(row),
        "_source of {id} (row {row:?})"
    );
    doc
}

/// Checks the headers of a dead letter taken from `<queue>.dlq`.
pub fn check_dead_letter(g: &Got, queue: &str, mentions: Option<&str>) -> Result<(), String> {
    let mut problems = Vec::new();
    match g.header_str("x-error") {
        None => problems.push("no x-error header (string)".to_string()),
        Some(e) if e.trim().is_empty() => problems.push("x-error is empty".to_string()),
        Some(e) if e.contains('\n') => problems.push(format!("x-error is not one line: {e:?}")),
        Some(e) => {
            if let Some(m) = mentions {
                if !e.contains(m) {
                    problems.push(format!("x-error {e:?} does not name `{m}`"));
                }
            }
        }
    }
    if g.header_int("x-retry-count") != Some(0) {
        problems.push(format!(
            "x-retry-count should be 0, is {:?}",
            g.headers.get("x-retry-count")
        ));
    }
    if g.header_str("x-original-queue").as_deref() != Some(queue) {
        problems.push(format!(
            "x-original-queue should be {queue:?}, is {:?}",
            g.headers.get("x-original-queue")
        ));
    }
    match g.header_int("x-first-failure") {
        Some(t) if (t - time::now_secs() as i64).abs() < 600 => {}
        other => problems.push(format!(
            "x-first-failure should be unix seconds near now, is {other:?}"
        )),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
