//! `chat-writer` command line: the service, `migrate`, `--help`,
//! `--version` (CONTRACT section 1). Exit codes: 0 clean, 1 fatal error,
//! 2 bad configuration or usage.

use chat_writer::config::{Config, VARIABLES};
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
    s.push_str("\nEXIT CODES: 0 clean shutdown, 1 fatal error, 2 bad configuration or usage.\n");
    s
}

fn config() -> Result<Config, ExitCode> {
    Config::from_env().map_err(|e| {
        eprintln!("chat-writer: {e}");
        ExitCode::from(2)
    })
}

fn init_logging(level: log::LevelFilter) {
    let _ = simple_logger::SimpleLogger::new()
        .with_level(log::LevelFilter::Warn)
        .with_module_level("chat_writer", level)
        .with_utc_timestamps()
        .init();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
            let cfg = match config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_level);
            match smol::block_on(chat_writer::mysql::migrate(&cfg)) {
                Ok(()) => {
                    log::info!(
                        "migrate: database {} and its schema are in place",
                        cfg.database_name
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    log::error!("migrate failed: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ["healthcheck"] => {
            let cfg = match config() {
                Ok(c) => c,
                Err(code) => return code,
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
            let cfg = match config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_level);
            let Some(url) = cfg.elasticsearch_url.as_deref() else {
                eprintln!("chat-writer reindex: ELASTICSEARCH_URL is empty, indexing is disabled");
                return ExitCode::from(2);
            };
            let store = chat_writer::mysql::Store::new(&cfg);
            let client = chat_writer::elasticsearch::Client::new(url, &cfg.elasticsearch_index);
            let result = smol::block_on(async {
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
            let cfg = match config() {
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
            let url = cfg.rabbitmq_url.clone();
            let result = smol::block_on(async {
                if *action == "show" {
                    chat_writer::amqp::dlq::show(&url, queue, n.unwrap_or(10)).await
                } else {
                    chat_writer::amqp::dlq::replay(&url, queue, n).await
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
            let cfg = match config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_level);
            ExitCode::from(chat_writer::service::run(cfg) as u8)
        }
        other => {
            eprintln!("chat-writer: unknown arguments {other:?}; see chat-writer --help");
            ExitCode::from(2)
        }
    }
}
