//! The command line: --version, --help, migrate, bad configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::{artefact_dir, TestEnv, Writer};

/// Every variable of README, "Configuration".
const VARIABLES: [&str; 16] = [
    "DATABASE_HOST",
    "DATABASE_PORT",
    "DATABASE_USERNAME",
    "DATABASE_PASSWORD",
    "DATABASE_NAME",
    "REDIS_URL",
    "RABBITMQ_URL",
    "ELASTICSEARCH_URL",
    "ELASTICSEARCH_INDEX",
    "COUNT_SYNC_INTERVAL",
    "COUNT_RECONCILE_INTERVAL",
    "RABBITMQ_PREFETCH_COUNT",
    "DB_MAX_OPEN_CONNS",
    "DB_MAX_IDLE_CONNS",
    "SHUTDOWN_TIMEOUT",
    "RUST_LOG",
];

fn run_plain(args: &[&str]) -> (Option<i32>, String, String) {
    let log = artefact_dir().join(format!(
        "cli-{}-{}.log",
        std::process::id(),
        args.join("_").replace('-', "")
    ));
    let mut w = Writer::spawn(args, &BTreeMap::new(), &log);
    let exit = w.wait_exit(Duration::from_secs(10));
    (exit.code, w.stdout(), w.log())
}

#[test]
fn version_and_help() {
    let (code, out, err) = run_plain(&["--version"]);
    assert_eq!(code, Some(0), "--version exit code; stderr: {err}");
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "--version should print version {}: {out:?}",
        env!("CARGO_PKG_VERSION")
    );

    let (code, out, err) = run_plain(&["--help"]);
    assert_eq!(code, Some(0), "--help exit code; stderr: {err}");
    let text = format!("{out}{err}");
    let missing: Vec<&str> = VARIABLES
        .iter()
        .copied()
        .filter(|v| !text.contains(v))
        .collect();
    assert!(
        missing.is_empty(),
        "--help does not list {missing:?}:\n{text}"
    );
    for sub in ["migrate", "healthcheck"] {
        assert!(
            text.contains(sub),
            "--help does not list subcommand {sub}:\n{text}"
        );
    }
    assert!(
        text.contains("--env-file PATH") && text.contains("real environment variables win"),
        "--help does not describe --env-file PATH:\n{text}"
    );
    assert!(
        text.contains("Any variable NAME may instead be given as NAME_FILE"),
        "--help does not describe NAME_FILE:\n{text}"
    );
    for (var, words) in [
        (
            "RUST_LOG",
            "log level: off, error, warn, info, debug, trace",
        ),
        (
            "RETRY_DELAYS",
            "each at least 1ms; empty = no delayed retry (dead-lettered at once)",
        ),
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(var) && l.contains(words)),
            "--help line of {var} should say {words:?}:\n{text}"
        );
    }
}

/// One column as `type [NULL|NOT NULL][ DEFAULT x]`, integer display widths dropped.
type Columns = BTreeMap<String, String>;

async fn columns(env: &TestEnv, table: &str) -> Columns {
    type Column = (String, String, String, Option<String>, Option<String>);
    let rows: Vec<Column> = env
        .db
        .query(&format!(
            "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, CHARACTER_SET_NAME \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = '{table}'",
            env.db_name
        ))
        .await;
    rows.into_iter()
        .map(|(name, ty, nullable, default, charset)| {
            let mut ty = ty.to_lowercase();
            if ty.starts_with("int(") || ty.starts_with("bigint(") {
                ty.truncate(ty.find('(').unwrap());
            }
            let mut s = format!(
                "{ty} {}",
                if nullable == "YES" {
                    "NULL"
                } else {
                    "NOT NULL"
                }
            );
            match default.as_deref() {
                Some("NULL") | None => {}
                Some(d) => s.push_str(&format!(" DEFAULT {}", d.trim_matches('\''))),
            }
            if let Some(cs) = charset {
                s.push_str(&format!(" {cs}"));
            }
            (name, s)
        })
        .collect()
}

async fn unique_keys(env: &TestEnv, table: &str) -> BTreeSet<String> {
    let rows: Vec<(String, i64, String)> = env
        .db
        .query(&format!(
            "SELECT INDEX_NAME, NON_UNIQUE, GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX) \
             FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = '{table}' \
             GROUP BY INDEX_NAME, NON_UNIQUE",
            env.db_name
        ))
        .await;
    rows.into_iter().filter(|r| r.1 == 0).map(|r| r.2).collect()
}

async fn all_keys(env: &TestEnv, table: &str) -> Vec<String> {
    let rows: Vec<(String, String)> = env
        .db
        .query(&format!(
            "SELECT INDEX_NAME, GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX) \
             FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = '{table}' \
             GROUP BY INDEX_NAME",
            env.db_name
        ))
        .await;
    rows.into_iter().map(|r| r.1).collect()
}

async fn assert_schema(env: &TestEnv) {
    let map = |pairs: &[(&str, &str)]| -> Columns {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        columns(env, "applications").await,
        map(&[
            ("id", "bigint NOT NULL"),
            ("token", "varchar(255) NOT NULL utf8mb4"),
            ("name", "varchar(255) NOT NULL utf8mb4"),
            ("chats_count", "int NOT NULL DEFAULT 0"),
            ("created_at", "datetime(6) NOT NULL"),
            ("updated_at", "datetime(6) NOT NULL"),
        ]),
        "applications columns"
    );
    assert_eq!(
        columns(env, "chats").await,
        map(&[
            ("id", "bigint NOT NULL"),
            ("application_id", "bigint NOT NULL"),
            ("token", "varchar(255) NOT NULL utf8mb4"),
            ("number", "int NOT NULL"),
            ("messages_count", "int NOT NULL DEFAULT 0"),
            ("creator_id", "bigint NULL"),
            ("created_at", "datetime(6) NOT NULL"),
            ("updated_at", "datetime(6) NOT NULL"),
        ]),
        "chats columns"
    );
    assert_eq!(
        columns(env, "messages").await,
        map(&[
            ("id", "bigint NOT NULL"),
            ("chat_id", "bigint NOT NULL"),
            ("token", "varchar(255) NOT NULL utf8mb4"),
            ("chat_number", "int NOT NULL"),
            ("number", "int NOT NULL"),
            ("body", "text NOT NULL utf8mb4"),
            ("creator_id", "bigint NULL"),
            ("created_at", "datetime(6) NOT NULL"),
            ("updated_at", "datetime(6) NOT NULL"),
            ("edit_version", "bigint NOT NULL DEFAULT 0"),
        ]),
        "messages columns"
    );
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|s| s.to_string()).collect() };
    assert_eq!(
        unique_keys(env, "applications").await,
        set(&["id", "token"])
    );
    assert_eq!(
        unique_keys(env, "chats").await,
        set(&["id", "application_id,number"])
    );
    assert_eq!(
        unique_keys(env, "messages").await,
        set(&["id", "chat_id,number"])
    );
    let chats = all_keys(env, "chats").await;
    assert!(
        chats.iter().any(|k| k.starts_with("token,number")),
        "chats: INDEX (token, number) missing: {chats:?}"
    );
    let messages = all_keys(env, "messages").await;
    assert!(
        messages.iter().any(|k| k.starts_with("token,chat_number")),
        "messages: INDEX (token, chat_number) missing: {messages:?}"
    );

    let tables: Vec<(String, String, String)> = env
        .db
        .query(&format!(
            "SELECT TABLE_NAME, ENGINE, TABLE_COLLATION FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME IN ('applications', 'chats', 'messages')",
            env.db_name
        ))
        .await;
    assert_eq!(tables.len(), 3, "{tables:?}");
    for (t, engine, collation) in &tables {
        assert_eq!(engine, "InnoDB", "{t} engine");
        assert!(
            collation.starts_with("utf8mb4"),
            "{t} collation {collation}"
        );
    }
    let fks: BTreeSet<(String, String, String, String)> = env
        .db
        .query::<(String, String, String, String)>(&format!(
            "SELECT TABLE_NAME, COLUMN_NAME, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME \
             FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = '{}' AND REFERENCED_TABLE_NAME IS NOT NULL",
            env.db_name
        ))
        .await
        .into_iter()
        .collect();
    let want: BTreeSet<(String, String, String, String)> = [
        ("chats", "application_id", "applications", "id"),
        ("messages", "chat_id", "chats", "id"),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
    .collect();
    assert_eq!(fks, want, "foreign keys");
}

#[test]
fn migrate_twice_is_harmless() {
    let env = TestEnv::new("migrate_twice");
    smol::block_on(async {
        // The database does not exist yet: migrate creates it.
        env.migrate();
        assert_schema(&env).await;
        env.db.seed_app(7, "app_x", 3).await;
        env.db.seed_chat(1, 7, "app_x", 1, 2).await;
        env.migrate();
        assert_schema(&env).await;
        let app = env.db.app(7).await.expect("application kept");
        assert_eq!((app.token.as_str(), app.chats_count), ("app_x", 3));
        let chat = env.db.chat(7, 1).await.expect("chat kept");
        assert_eq!(chat.messages_count, 2);
    });
}

#[test]
fn bad_configuration_exits_2_naming_the_variable() {
    let env = TestEnv::new("bad_config");
    let cases = [
        ("RABBITMQ_PREFETCH_COUNT", "abc"),
        ("RABBITMQ_PREFETCH_COUNT", "-1"),
        ("COUNT_SYNC_INTERVAL", "soon"),
        ("COUNT_RECONCILE_INTERVAL", "often"),
        ("SHUTDOWN_TIMEOUT", "forever"),
        ("DATABASE_PORT", "99999"),
        ("DATABASE_PORT", "abc"),
        ("DB_MAX_OPEN_CONNS", "many"),
    ];
    let mut failures = Vec::new();
    for (var, value) in cases {
        let mut w = env.spawn(&[], &[(var, value)]);
        let exit = w.wait_exit(Duration::from_secs(15));
        let err = w.log();
        if exit.code != Some(2) {
            failures.push(format!(
                "{var}={value:?}: exit {:?}, want 2; stderr: {err}",
                exit.code
            ));
        } else if !err.contains(var) {
            failures.push(format!(
                "{var}={value:?}: stderr does not name {var}: {err}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// README, "Running it": `chat-writer healthcheck` asks the running writer's
/// `/healthz` at HTTP_ADDR: 0 while it runs, 1 when nothing answers.
#[test]
fn healthcheck_asks_the_running_writer() {
    let env = TestEnv::new("healthcheck");
    smol::block_on(async {
        env.migrate();
        let addr = format!("127.0.0.1:{}", crate::common::free_port());
        let http = [("HTTP_ADDR", addr.as_str())];
        let mut w = env.start_writer(&http);
        env.wait_consuming(&mut w).await;
        let mut h = env.spawn(&["healthcheck"], &http);
        let exit = h.wait_exit(Duration::from_secs(10));
        assert_eq!(
            exit.code,
            Some(0),
            "healthcheck of a running writer at {addr}; its stderr: {}",
            h.log()
        );
        w.stop();
        let mut h = env.spawn(&["healthcheck"], &http);
        let exit = h.wait_exit(Duration::from_secs(10));
        assert_eq!(
            exit.code,
            Some(1),
            "healthcheck with no writer at {addr}; its stderr: {}",
            h.log()
        );
    });
}

// ---- `--env-file PATH` ----

static ENV_FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// An env file under the test artefact dir with a unique name, deleted on
/// drop (also when the test panics).
struct EnvFile(std::path::PathBuf);

impl EnvFile {
    fn new(tag: &str, text: &str) -> EnvFile {
        let n = ENV_FILES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = artefact_dir().join(format!("envfile-{}-{n}-{tag}.env", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        EnvFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("artefact dir is UTF-8")
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `chat-writer <args>` with exactly `vars` (plus PATH); returns the
/// exit code and stderr.
fn run_with(tag: &str, args: &[&str], vars: &BTreeMap<String, String>) -> (Option<i32>, String) {
    let n = ENV_FILES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let log = artefact_dir().join(format!("cli-{}-{n}-{tag}.log", std::process::id()));
    let mut w = Writer::spawn(args, vars, &log);
    let exit = w.wait_exit(Duration::from_secs(30));
    (exit.code, w.log())
}

/// Tables of `db` (none when the database does not exist).
async fn table_count(db: &str) -> i64 {
    let n: Vec<i64> = crate::common::Db::server()
        .query(&format!(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}'"
        ))
        .await;
    n[0]
}

/// The whole configuration can come from the file: the environment holds
/// only PATH, and `migrate` creates the test's database named in the file
/// (with `export`, quotes, comments, an unknown key and `KEY=` for the
/// empty password, which must win over the default "password").
#[test]
fn env_file_supplies_the_configuration() {
    let env = TestEnv::new("env_file_used");
    let mut text =
        String::from("# chat-writer, shared with other services\n\nOTHER_SERVICE_TOKEN=abc\n");
    for (k, v) in env.writer_env() {
        match k.as_str() {
            "DATABASE_NAME" => text.push_str(&format!("export DATABASE_NAME=\"{v}\"\n")),
            "DATABASE_PASSWORD" => text.push_str("  DATABASE_PASSWORD=\n"),
            _ => text.push_str(&format!("{k}='{v}'\n")),
        }
    }
    let file = EnvFile::new("used", &text);
    smol::block_on(async {
        assert_eq!(
            table_count(&env.db_name).await,
            0,
            "no schema before migrate"
        );
        let arg = format!("--env-file={}", file.path());
        let (code, err) = run_with("envfile-used", &[&arg, "migrate"], &BTreeMap::new());
        assert_eq!(
            code,
            Some(0),
            "migrate with {arg}; stderr: {err}\nfile:\n{text}"
        );
        assert!(
            err.contains(&env.db_name),
            "migrate names the database: {err}"
        );
        assert_eq!(
            table_count(&env.db_name).await,
            3,
            "schema of {}",
            env.db_name
        );
    });
}

/// A variable set in the environment wins over the file, also when it is
/// set to the empty string: were the file's values used, DATABASE_NAME
/// would be refused (exit 2) and the password would be wrong (exit 1).
#[test]
fn environment_wins_over_env_file() {
    let env = TestEnv::new("env_file_env_wins");
    let file = EnvFile::new(
        "env-wins",
        "DATABASE_NAME=not`a`valid`name\nDATABASE_PASSWORD=wrong-password\n",
    );
    let mut vars = env.writer_env();
    vars.insert("DATABASE_PASSWORD".to_string(), String::new());
    smol::block_on(async {
        let (code, err) = run_with(
            "envfile-env-wins",
            &["--env-file", file.path(), "migrate"],
            &vars,
        );
        assert_eq!(code, Some(0), "migrate; stderr: {err}");
        assert_eq!(
            table_count(&env.db_name).await,
            3,
            "schema of {}",
            env.db_name
        );
    });
}

/// A malformed line exits 2 with one line naming the file and the line; a
/// bad value of one of our variables names the variable, the file and the
/// line. Nothing is connected to, so no test environment is needed.
#[test]
fn env_file_bad_line_exits_2_naming_file_and_line() {
    // (name, file content, expected stderr with {} for the file's path)
    let cases = [
        (
            "bad-line",
            "# comment\nSOMETHING_ELSE=1\n\nthis is not an assignment\n",
            "chat-writer: --env-file {} line 4: expected KEY=VALUE, got \"this is not an assignment\"\n",
        ),
        (
            "bad-key",
            "DATABASE-NAME=x\n",
            "chat-writer: --env-file {} line 1: invalid key \"DATABASE-NAME\": expected [A-Za-z_][A-Za-z0-9_]*\n",
        ),
        (
            "bad-value",
            "DATABASE_HOST=127.0.0.1\nRABBITMQ_PREFETCH_COUNT=many\n",
            "chat-writer: invalid configuration: RABBITMQ_PREFETCH_COUNT=\"many\": \
             expected an integer from 1 to 65535 (from --env-file {} line 2)\n",
        ),
    ];
    for (name, content, expected) in cases {
        let file = EnvFile::new(name, content);
        let (code, err) = run_with(
            &format!("envfile-{name}"),
            &["--env-file", file.path(), "migrate"],
            &BTreeMap::new(),
        );
        assert_eq!(code, Some(2), "{name}: stderr: {err}");
        assert_eq!(err, expected.replace("{}", file.path()), "{name}");
    }
}

/// A file that does not exist exits 2 naming the path and the OS error;
/// `--env-file` without a path exits 2 too.
#[test]
fn env_file_missing_exits_2_naming_the_path() {
    let missing = {
        let f = EnvFile::new("missing", "");
        f.path().to_string()
    }; // deleted here
    assert!(!std::path::Path::new(&missing).exists());
    let (code, err) = run_with(
        "envfile-missing",
        &["--env-file", &missing, "migrate"],
        &BTreeMap::new(),
    );
    assert_eq!(code, Some(2), "stderr: {err}");
    assert_eq!(
        err,
        format!("chat-writer: --env-file {missing}: cannot read it: No such file or directory (os error 2)\n")
    );

    let (code, err) = run_with("envfile-no-path", &["--env-file"], &BTreeMap::new());
    assert_eq!(code, Some(2), "stderr: {err}");
    assert_eq!(
        err,
        "chat-writer: --env-file needs a path: --env-file PATH\n"
    );
}

/// Runs `chat-writer <args>` with exactly `vars` (plus PATH), arguments and
/// values as raw bytes; returns the exit code and stderr. Nothing answers
/// at HTTP_ADDR 127.0.0.1:9 (discard), so no case can be healthy.
fn run_raw(args: &[&[u8]], vars: &[(&str, &[u8])]) -> (Option<i32>, String) {
    use std::os::unix::ffi::OsStrExt;
    let out = std::process::Command::new(crate::common::BIN)
        .args(args.iter().map(|a| std::ffi::OsStr::from_bytes(a)))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HTTP_ADDR", "127.0.0.1:9")
        .envs(
            vars.iter()
                .map(|(k, v)| (k, std::ffi::OsStr::from_bytes(v))),
        )
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run chat-writer");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A variable set to bytes that are not UTF-8 is a configuration error
/// naming it (exit 2), not an unset variable that a file or default fills;
/// `healthcheck` reports it the same way but exits 1 (README, "Running it":
/// 0 or 1; Docker reserves 2), and so it does for every usage error: an
/// extra argument, a misplaced or missing `--env-file` path, a file over
/// 1 MiB, an argument that is not UTF-8. The same usage errors with another
/// subcommand still exit 2.
#[test]
fn non_utf8_environment_value_exits_2() {
    for (sub, code) in [("migrate", 2), ("healthcheck", 1)] {
        let (got, stderr) = run_raw(&[sub.as_bytes()], &[("HTTP_ADDR", b"127.0.0.1:\xff")]);
        assert_eq!(got, Some(code), "{sub}: {stderr}");
        assert_eq!(
            stderr,
            "chat-writer: invalid configuration: HTTP_ADDR=\"127.0.0.1:\u{fffd}\": expected valid UTF-8\n",
            "{sub}"
        );
    }
    let cases: [(&[&[u8]], &str); 6] = [
        (
            &[b"healthcheck", b"extra"],
            "chat-writer: unknown arguments [\"healthcheck\", \"extra\"]; see chat-writer --help\n",
        ),
        (
            &[b"healthcheck", b"--env-file", b"/dev/null"],
            "chat-writer: --env-file PATH goes before the subcommand; see chat-writer --help\n",
        ),
        (
            &[b"--env-file=", b"healthcheck"],
            "chat-writer: --env-file needs a path: --env-file PATH\n",
        ),
        (
            &[
                b"--env-file",
                b"/dev/null",
                b"--env-file=/dev/null",
                b"healthcheck",
            ],
            "chat-writer: --env-file is given more than once\n",
        ),
        (
            &[b"--env-file", b"/dev/zero", b"healthcheck"],
            "chat-writer: --env-file /dev/zero: larger than 1 MiB\n",
        ),
        (
            &[b"healthcheck", b"x\xff"],
            "chat-writer: argument \"x\\xFF\" is not valid UTF-8\n",
        ),
    ];
    for (args, want) in cases {
        let shown: Vec<_> = args.iter().map(|a| String::from_utf8_lossy(a)).collect();
        let (code, stderr) = run_raw(args, &[]);
        assert_eq!(code, Some(1), "healthcheck {shown:?}: {stderr}");
        assert_eq!(stderr, want, "healthcheck {shown:?}");
        // The same mistake with `migrate` is a usage error: exit 2.
        let args: Vec<&[u8]> = args
            .iter()
            .map(|a| {
                if *a == b"healthcheck" {
                    b"migrate" as &[u8]
                } else {
                    a
                }
            })
            .collect();
        let (code, stderr) = run_raw(&args, &[]);
        assert_eq!(code, Some(2), "migrate {shown:?}: {stderr}");
        assert_eq!(
            stderr,
            want.replace("\"healthcheck\"", "\"migrate\""),
            "migrate {shown:?}"
        );
    }
}

/// A bad URL is printed with its password replaced by `***` (user and host
/// kept), from the environment or from an env file; a DATABASE_PASSWORD that
/// is not UTF-8 is printed as `***`.
#[test]
fn configuration_errors_never_print_a_password() {
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "REDIS_URL",
            b"redis://:secretpw@host:6379/x",
            "REDIS_URL=\"redis://:***@host:6379/x\": \
             expected a redis://host:port/db or rediss://host:port/db URL",
        ),
        (
            "RABBITMQ_URL",
            b"amqp://writer:secretpw@rabbitmq:99999/",
            "RABBITMQ_URL=\"amqp://writer:***@rabbitmq:99999/\": \
             expected an amqp://user:pass@host:port/vhost or amqps://... URL",
        ),
        (
            "ELASTICSEARCH_URL",
            b"ftp://elastic:secretpw@es:9200",
            "ELASTICSEARCH_URL=\"ftp://elastic:***@es:9200\": \
             expected an http:// or https:// URL with a host, or empty",
        ),
        (
            "DATABASE_PASSWORD",
            b"secretpw\xff",
            "DATABASE_PASSWORD=\"***\": expected valid UTF-8",
        ),
    ];
    for (var, value, want) in cases {
        let (code, stderr) = run_raw(&[b"migrate"], &[(var, value)]);
        assert_eq!(code, Some(2), "{var}: {stderr}");
        assert_eq!(
            stderr,
            format!("chat-writer: invalid configuration: {want}\n"),
            "{var}"
        );
        let Ok(text) = std::str::from_utf8(value) else {
            continue; // an env file must be UTF-8
        };
        let file = EnvFile::new("secret", &format!("DATABASE_HOST=h\n{var}={text}\n"));
        let (code, stderr) = run_raw(&[b"--env-file", file.path().as_bytes(), b"migrate"], &[]);
        assert_eq!(code, Some(2), "{var} from the file: {stderr}");
        assert_eq!(
            stderr,
            format!(
                "chat-writer: invalid configuration: {want} (from --env-file {} line 2)\n",
                file.path()
            ),
            "{var} from the file"
        );
    }
}

/// RETRY_DELAYS tiers under 1 ms would be delay queues with TTL 0 named
/// `<queue>.retry.0ms`: refused with exit 2 naming the variable.
#[test]
fn retry_delays_under_1ms_exit_2() {
    for value in ["0.1ms", "1s,0.5ms,5s", "0"] {
        let (code, stderr) = run_raw(&[b"migrate"], &[("RETRY_DELAYS", value.as_bytes())]);
        assert_eq!(code, Some(2), "{value}: {stderr}");
        assert_eq!(
            stderr,
            format!(
                "chat-writer: invalid configuration: RETRY_DELAYS={value:?}: expected \
                 comma-separated durations of at least 1ms like 1s,5s,30s,2m,10m, or empty\n"
            ),
            "{value}"
        );
    }
}

/// `--env-file` reads at most 1 MiB: `/dev/zero` (endless) or a file one
/// byte over exits 2 at once with one line naming the file.
#[test]
fn env_file_over_1_mib_exits_2() {
    let over = EnvFile::new("big", &format!("A={}\n", "x".repeat(1 << 20)));
    for path in ["/dev/zero", over.path()] {
        let (code, stderr) = run_raw(&[b"--env-file", path.as_bytes(), b"migrate"], &[]);
        assert_eq!(code, Some(2), "{path}: {stderr}");
        assert_eq!(
            stderr,
            format!("chat-writer: --env-file {path}: larger than 1 MiB\n")
        );
    }
}
