//! `chat-writer` command line: the service, `migrate`, `--help`,
//! `--version` (README, "Running it"), and `--env-file PATH` before the
//! subcommand. Exit codes: 0 clean, 1 fatal error, 2 bad
//! configuration or usage; `healthcheck` exits only 0 or 1, usage errors
//! included (README, "Running it").

use chat_writer::config::{Config, VARIABLES};
use chat_writer::env_file::EnvFile;
use chat_writer::tls::Service;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn help() -> String {
    let mut s = format!(
        "{}\n\nThe write side of the chat platform: consumes create_chats, create_messages and\n\
         update_messages from RabbitMQ into MySQL and Elasticsearch, and syncs Redis counters\n\
         into MySQL counts.\n\n\
         USAGE:\n  chat-writer              run the service (stop with SIGTERM or SIGINT)\n  \
         chat-writer migrate      create DATABASE_NAME if missing and its schema, then exit\n  \
         chat-writer healthcheck  GET /healthz of the running writer at HTTP_ADDR; exit 0 or 1\n  \
         chat-writer reindex      rebuild the Elasticsearch index from MySQL (progress on stderr)\n  \
         chat-writer dlq show <queue> [N]    print up to N (10) dead letters of <queue>.dlq, keep them\n  \
         chat-writer dlq replay <queue> [N]  move up to N (all) dead letters back to <queue>\n  \
         chat-writer --help       this text\n  chat-writer --version    version, commit and build date\n\n\
         OPTIONS (before the subcommand):\n  \
         --env-file PATH          read KEY=VALUE lines (# comments, optional export, quotes) from PATH;\n                           \
         real environment variables win over the file, the file over the defaults\n\n\
         ENVIRONMENT (a variable set to the empty string wins over its default):\n",
        chat_writer::version_line()
    );
    let width = VARIABLES.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for v in VARIABLES {
        let default = if v.default.is_empty() {
            "\"\"".to_string()
        } else {
            v.default.to_string()
        };
        s.push_str(&format!(
            "  {:width$}  {}  (default: {default})\n",
            v.name, v.help
        ));
    }
    s.push_str(
        "\nAny variable NAME may instead be given as NAME_FILE, the path of a file holding its\n\
         value (one trailing newline dropped; Docker and Kubernetes secrets); not both.\n",
    );
    s.push_str("\nEXIT CODES: 0 clean shutdown, 1 fatal error, 2 bad configuration or usage;\n");
    s.push_str(
        "  healthcheck: 0 healthy, 1 anything else (bad configuration and usage errors included).\n",
    );
    s
}

/// The configuration: the environment, then the `--env-file` if one was
/// given, then the defaults. A file that cannot be read or parsed, or a bad
/// value, is printed as one line and gives exit code 2.
fn config(env_file: Option<&Path>) -> Result<Config, ExitCode> {
    let bad = |e: &dyn std::fmt::Display| {
        eprintln!("chat-writer: {e}");
        ExitCode::from(2)
    };
    let file = match env_file.map(EnvFile::load).transpose() {
        Ok(f) => f,
        Err(e) => return Err(bad(&e)),
    };
    Config::from_env_and_file(file.as_ref()).map_err(|e| bad(&e))
}

/// Takes the leading `--env-file PATH` or `--env-file=PATH` off
/// `args`: returns the path, if any, and the arguments after it.
///
/// Errors: the message for a missing or empty path, or a second `--env-file`.
fn split_env_file(mut args: &[String]) -> Result<(Option<PathBuf>, &[String]), String> {
    let mut path = None;
    loop {
        let (value, rest) = match args {
            [flag, rest @ ..] if flag == "--env-file" => match rest {
                [value, rest @ ..] => (value.as_str(), rest),
                [] => return Err("--env-file needs a path: --env-file PATH".to_string()),
            },
            [flag, rest @ ..] if flag.starts_with("--env-file=") => {
                (&flag["--env-file=".len()..], rest)
            }
            _ => return Ok((path, args)),
        };
        if value.is_empty() {
            return Err("--env-file needs a path: --env-file PATH".to_string());
        }
        if path.is_some() {
            return Err("--env-file is given more than once".to_string());
        }
        path = Some(PathBuf::from(value));
        args = rest;
    }
}

/// The exit code of a usage error (bad arguments): 2, except when the
/// subcommand is `healthcheck`, which exits only 0 or 1 (README, "Running it";
/// Docker reserves 2). The subcommand is the first argument after the
/// leading `--env-file PATH` / `--env-file=PATH` options, as
/// [`split_env_file`] reads them.
fn usage_exit(args: &[OsString]) -> ExitCode {
    let mut rest = args;
    loop {
        rest = match rest {
            [flag, _path, tail @ ..] if flag == "--env-file" => tail,
            [flag, tail @ ..] if flag.as_encoded_bytes().starts_with(b"--env-file=") => tail,
            _ => break,
        };
    }
    if rest.first().is_some_and(|sub| sub == "healthcheck") {
        ExitCode::from(1)
    } else {
        ExitCode::from(2)
    }
}

/// `mysql HOST:PORT: <error>` for a subcommand's failure: the error in one
/// line, without the driver's doubled "Input/output error:" in front of an
/// I/O error's own words, a TLS or credential refusal named first.
fn mysql_failure(cfg: &Config, e: &mysql_async::Error) -> String {
    let text = match e {
        mysql_async::Error::Io(mysql_async::IoError::Io(io)) => io.to_string(),
        e => e.to_string(),
    };
    format!(
        "mysql {}:{}: {}",
        cfg.database_host,
        cfg.database_port,
        chat_writer::tls::explain(&text)
    )
}

/// Logs the start-up warnings about the TLS variables of the services a
/// subcommand connects to ([`Config::tls_warnings`]).
fn warn_tls(cfg: &Config, services: &[Service]) {
    for warning in cfg.tls_warnings(services) {
        log::warn!("{warning}");
    }
}

fn init_logging(level: log::LevelFilter) {
    let _ = simple_logger::SimpleLogger::new()
        .with_level(log::LevelFilter::Warn)
        .with_module_level("chat_writer", level)
        .with_utc_timestamps()
        .init();
}

fn main() -> ExitCode {
    #[cfg(feature = "tls")]
    chat_writer::tls::install_provider();
    let raw_args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let usage = || usage_exit(&raw_args);
    let mut all_args = Vec::new();
    for arg in &raw_args {
        match arg.to_str() {
            Some(a) => all_args.push(a.to_string()),
            None => {
                eprintln!("chat-writer: argument {arg:?} is not valid UTF-8");
                return usage();
            }
        }
    }
    let (env_file, args) = match split_env_file(&all_args) {
        Ok(split) => split,
        Err(e) => {
            eprintln!("chat-writer: {e}");
            return usage();
        }
    };
    let load_config = || config(env_file.as_deref());
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--help" | "-h" | "help"] => {
            print!("{}", help());
            ExitCode::SUCCESS
        }
        ["--version" | "-V" | "version"] => {
            println!("{}", chat_writer::version_line());
            ExitCode::SUCCESS
        }
        ["migrate"] => {
            let cfg = match load_config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_level);
            warn_tls(&cfg, &[Service::Mysql]);
            match smol::block_on(chat_writer::mysql::migrate(&cfg)) {
                Ok(()) => {
                    log::info!(
                        "migrate: database {} and its schema are in place",
                        cfg.database_name
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    log::error!("migrate failed: {}", mysql_failure(&cfg, &e));
                    ExitCode::from(1)
                }
            }
        }
        ["healthcheck"] => {
            // 0 or 1 only (README, "Running it"; Docker reserves 2): bad
            // configuration is reported the same way, then counts as
            // unhealthy.
            let cfg = match load_config() {
                Ok(c) => c,
                Err(_) => return ExitCode::from(1),
            };
            let Some(addr) = cfg.http_addr else {
                eprintln!("chat-writer healthcheck: HTTP_ADDR is empty, the endpoint is disabled");
                return ExitCode::from(1);
            };
            match chat_writer::http::healthcheck(addr) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("chat-writer healthcheck: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ["reindex"] => {
            let cfg = match load_config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_level);
            let Some(client) = chat_writer::elasticsearch::Client::from_config(&cfg) else {
                eprintln!("chat-writer reindex: ELASTICSEARCH_URL is empty, indexing is disabled");
                return ExitCode::from(2);
            };
            warn_tls(&cfg, &[Service::Mysql, Service::Elasticsearch]);
            let store = chat_writer::mysql::Store::new(&cfg);
            let result = smol::block_on(async {
                // The pool's connects have no time limit of their own; a
                // connection of the writer's own (10 s) finds a MySQL that
                // does not answer before the pool would wait on it.
                let first = async_compat::Compat::new(async {
                    chat_writer::mysql::connect(&cfg, Some(&cfg.database_name))
                        .await?
                        .disconnect()
                        .await
                })
                .await;
                if let Err(e) = first {
                    return Err(mysql_failure(&cfg, &e));
                }
                let r = chat_writer::elasticsearch::backfill::reindex(&store, &client).await;
                store.close().await;
                r
            });
            match result {
                Ok(n) => {
                    eprintln!(
                        "reindex: done, {n} documents in {}",
                        cfg.elasticsearch_index
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("reindex failed: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ["dlq", action @ ("show" | "replay"), queue, rest @ ..] if rest.len() <= 1 => {
            let cfg = match load_config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_level);
            let n = match rest.first().map(|s| s.parse::<usize>()) {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => {
                    eprintln!(
                        "chat-writer dlq: N must be a whole number, got {:?}",
                        rest[0]
                    );
                    return ExitCode::from(2);
                }
            };
            warn_tls(&cfg, &[Service::Rabbitmq]);
            let url = cfg.rabbitmq_url.clone();
            let result = smol::block_on(async {
                if *action == "show" {
                    chat_writer::amqp::dlq::show(&url, &cfg.tls.rabbitmq, queue, n.unwrap_or(10))
                        .await
                } else {
                    chat_writer::amqp::dlq::replay(&url, &cfg.tls.rabbitmq, queue, n).await
                }
            });
            match result {
                Ok(count) => {
                    if *action == "replay" {
                        println!("moved {count} messages from {queue}.dlq to {queue}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("chat-writer dlq {action}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        [] => {
            let cfg = match load_config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_level);
            ExitCode::from(chat_writer::service::run(cfg) as u8)
        }
        other if other.iter().any(|a| a.starts_with("--env-file")) => {
            eprintln!(
                "chat-writer: --env-file PATH goes before the subcommand; see chat-writer --help"
            );
            usage()
        }
        other => {
            eprintln!("chat-writer: unknown arguments {other:?}; see chat-writer --help");
            usage()
        }
    }
}
