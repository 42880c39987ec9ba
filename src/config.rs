//! Configuration from the environment (README, "Configuration").
//!
//! This file owns the list of variables, their defaults and the parsing of
//! each value. Nothing else reads the environment. A bad value becomes a
//! [`ConfigError`] that names the variable and the accepted form; `main`
//! turns it into exit code 2 (README, "Running it").
//!
//! Each variable is taken from the first layer that sets it: the
//! process environment, then the `--env-file` ([`crate::env_file`]), then
//! the default of [`VARIABLES`].

use std::fmt;
use std::time::Duration;

use crate::env_file::EnvFile;
use crate::tls::{self, Service, SslMode};

/// One documented variable: name, default, meaning. `--help` and the README
/// print this table, so the list cannot drift from the parser.
pub struct Variable {
    /// Environment variable name.
    pub name: &'static str,
    /// Default used when the variable is not set at all.
    pub default: &'static str,
    /// One line for `--help`.
    pub help: &'static str,
}

/// Every variable the writer reads, in `--help` order (README, "Configuration",
/// plus `RETRY_DELAYS` from section 3 "Topology", `MYSQL_REQUEUE_AFTER`
/// from section 6 and `HTTP_ADDR` from section 1, `chat-writer healthcheck`).
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "DATABASE_HOST",
        default: "db",
        help: "MySQL host",
    },
    Variable {
        name: "DATABASE_PORT",
        default: "3306",
        help: "MySQL port (1..65535)",
    },
    Variable {
        name: "DATABASE_USERNAME",
        default: "root",
        help: "MySQL user",
    },
    Variable {
        name: "DATABASE_PASSWORD",
        default: "password",
        help: "MySQL password; set to empty for none",
    },
    Variable {
        name: "DATABASE_NAME",
        default: "auth_api_development",
        help: "MySQL database",
    },
    Variable {
        name: "REDIS_URL",
        default: "redis://redis:6379/0",
        help: "Redis URL, database number in the path",
    },
    Variable {
        name: "RABBITMQ_URL",
        default: "amqp://guest:guest@rabbitmq:5672/",
        help: "AMQP URL, vhost in the path (%2f = /)",
    },
    Variable {
        name: "ELASTICSEARCH_URL",
        default: "http://elasticsearch:9200",
        help: "Elasticsearch/OpenSearch base URL; empty disables indexing",
    },
    Variable {
        name: "ELASTICSEARCH_INDEX",
        default: "messages",
        help: "index (or alias) name",
    },
    Variable {
        name: "ELASTICSEARCH_API_KEY",
        default: "",
        help: "sent as `Authorization: ApiKey <value>`; empty: none (user info in ELASTICSEARCH_URL is sent as Basic)",
    },
    Variable {
        name: "DATABASE_SSL_MODE",
        default: "preferred",
        help: "MySQL TLS: disabled, preferred (TLS if the server offers it, unverified), required (unverified), verify_ca, verify_identity",
    },
    Variable {
        name: "RABBITMQ_TLS_CA_FILE",
        default: "",
        help: "PEM bundle of CAs trusted for amqps:// besides the public roots",
    },
    Variable {
        name: "RABBITMQ_TLS_CERT_FILE",
        default: "",
        help: "client certificate (PEM) for mutual TLS; with RABBITMQ_TLS_KEY_FILE",
    },
    Variable {
        name: "RABBITMQ_TLS_KEY_FILE",
        default: "",
        help: "client private key (PEM) for mutual TLS; with RABBITMQ_TLS_CERT_FILE",
    },
    Variable {
        name: "RABBITMQ_TLS_INSECURE",
        default: "false",
        help: "true: do not verify the broker's certificate (test rigs only)",
    },
    Variable {
        name: "DATABASE_TLS_CA_FILE",
        default: "",
        help: "PEM bundle of CAs trusted for MySQL besides the public roots",
    },
    Variable {
        name: "DATABASE_TLS_CERT_FILE",
        default: "",
        help: "client certificate (PEM) for mutual TLS; with DATABASE_TLS_KEY_FILE",
    },
    Variable {
        name: "DATABASE_TLS_KEY_FILE",
        default: "",
        help: "client private key (PEM) for mutual TLS; with DATABASE_TLS_CERT_FILE",
    },
    Variable {
        name: "DATABASE_TLS_INSECURE",
        default: "false",
        help: "true: do not verify MySQL's certificate, whatever DATABASE_SSL_MODE says (test rigs only)",
    },
    Variable {
        name: "REDIS_TLS_CA_FILE",
        default: "",
        help: "PEM bundle of CAs trusted for rediss:// besides the public roots",
    },
    Variable {
        name: "REDIS_TLS_CERT_FILE",
        default: "",
        help: "client certificate (PEM) for mutual TLS; with REDIS_TLS_KEY_FILE",
    },
    Variable {
        name: "REDIS_TLS_KEY_FILE",
        default: "",
        help: "client private key (PEM) for mutual TLS; with REDIS_TLS_CERT_FILE",
    },
    Variable {
        name: "REDIS_TLS_INSECURE",
        default: "false",
        help: "true: do not verify Redis's certificate (test rigs only)",
    },
    Variable {
        name: "ELASTICSEARCH_TLS_CA_FILE",
        default: "",
        help: "PEM bundle of CAs trusted for https:// besides the public roots",
    },
    Variable {
        name: "ELASTICSEARCH_TLS_CERT_FILE",
        default: "",
        help: "client certificate (PEM) for mutual TLS; with ELASTICSEARCH_TLS_KEY_FILE",
    },
    Variable {
        name: "ELASTICSEARCH_TLS_KEY_FILE",
        default: "",
        help: "client private key (PEM) for mutual TLS; with ELASTICSEARCH_TLS_CERT_FILE",
    },
    Variable {
        name: "ELASTICSEARCH_TLS_INSECURE",
        default: "false",
        help: "true: do not verify the search server's certificate (test rigs only)",
    },
    Variable {
        name: "COUNT_SYNC_INTERVAL",
        default: "10s",
        help: "count sync period: 500ms, 10s, 2m, 1h or bare seconds",
    },
    Variable {
        name: "COUNT_RECONCILE_INTERVAL",
        default: "60s",
        help: "full SCAN of the counters; same forms",
    },
    Variable {
        name: "RABBITMQ_PREFETCH_COUNT",
        default: "256",
        help: "unacked deliveries per consumer (1..65535); a work-queue batch takes up to half",
    },
    Variable {
        name: "DB_MAX_OPEN_CONNS",
        default: "10",
        help: "MySQL pool size (1..1000)",
    },
    Variable {
        name: "DB_MAX_IDLE_CONNS",
        default: "5",
        help: "MySQL connections kept open when idle (0..DB_MAX_OPEN_CONNS)",
    },
    Variable {
        name: "SHUTDOWN_TIMEOUT",
        default: "30s",
        help: "hard deadline for graceful shutdown; same forms",
    },
    Variable {
        name: "MYSQL_REQUEUE_AFTER",
        default: "30s",
        help: "a batch MySQL has failed for this long goes back to its queue and the consumer pauses until MySQL answers (another replica takes it); same forms",
    },
    Variable {
        name: "RETRY_DELAYS",
        default: "1s,5s,30s,2m,10m",
        help: "delayed-retry tiers for a missing parent or row, comma separated, each at least 1ms; empty = no delayed retry (dead-lettered at once)",
    },
    Variable {
        name: "HTTP_ADDR",
        default: "0.0.0.0:9464",
        help: "HTTP endpoint address (GET /healthz, /readyz, /metrics; `chat-writer healthcheck`); empty disables",
    },
    Variable {
        name: "RUST_LOG",
        default: "info",
        help: "log level: off, error, warn, info, debug, trace",
    },
];

/// A configuration value that cannot be used. `Display` gives
/// `VARIABLE=value: expected <accepted form>`; the value never holds a
/// secret (see [`ConfigError::value`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable at fault (`NAME_FILE` when its file, or the value read
    /// from it, is at fault).
    pub variable: String,
    /// The value seen, with secrets hidden: the password of a URL variable
    /// replaced by `***` ([`redact_url`]), a [`SECRET_VARIABLES`] value
    /// replaced by `***` altogether.
    pub value: String,
    /// The accepted form, in words.
    pub expected: String,
    /// Where the value came from when it was not the environment or the
    /// default: `--env-file PATH line N`.
    pub origin: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {}={:?}: expected {}",
            self.variable, self.value, self.expected
        )?;
        if let Some(origin) = &self.origin {
            write!(f, " (from {origin})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The writer's whole configuration, parsed and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// MySQL host name or address.
    pub database_host: String,
    /// MySQL TCP port.
    pub database_port: u16,
    /// MySQL user.
    pub database_username: String,
    /// MySQL password (empty means none).
    pub database_password: String,
    /// MySQL database (schema) name.
    pub database_name: String,
    /// Redis connection URL.
    pub redis_url: String,
    /// AMQP connection URL.
    pub rabbitmq_url: String,
    /// Elasticsearch base URL without a trailing slash; `None` disables indexing.
    pub elasticsearch_url: Option<String>,
    /// Index or alias name.
    pub elasticsearch_index: String,
    /// Period of the change-set count sync.
    pub count_sync_interval: Duration,
    /// Period of the full SCAN reconciliation.
    pub count_reconcile_interval: Duration,
    /// Prefetch per consumer; a work-queue batch takes up to half of it.
    pub prefetch: u16,
    /// MySQL pool maximum.
    pub db_max_open_conns: usize,
    /// MySQL connections kept when idle.
    pub db_max_idle_conns: usize,
    /// Hard deadline for graceful shutdown.
    pub shutdown_timeout: Duration,
    /// How long a batch may fail to reach MySQL before its consumer hands
    /// its deliveries back to the queue and pauses (`MYSQL_REQUEUE_AFTER`).
    pub mysql_requeue_after: Duration,
    /// Delayed-retry tiers, shortest first.
    pub retry_delays: Vec<Duration>,
    /// Address of the health endpoint; `None` disables it.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Log level.
    pub log_level: log::LevelFilter,
    /// DATABASE_SSL_MODE.
    pub database_ssl_mode: SslMode,
    /// The `<S>_TLS_*` settings of each service.
    pub tls: TlsSettings,
    /// ELASTICSEARCH_API_KEY, if set.
    pub elasticsearch_api_key: Option<ApiKey>,
}

/// The TLS settings of the four services (`<S>_TLS_CA_FILE`,
/// `<S>_TLS_CERT_FILE`, `<S>_TLS_KEY_FILE`, `<S>_TLS_INSECURE`).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// RABBITMQ_TLS_*.
    pub rabbitmq: tls::Settings,
    /// DATABASE_TLS_*.
    pub mysql: tls::Settings,
    /// REDIS_TLS_*.
    pub redis: tls::Settings,
    /// ELASTICSEARCH_TLS_*.
    pub elasticsearch: tls::Settings,
}

impl TlsSettings {
    /// The settings of `service`.
    pub fn of(&self, service: Service) -> &tls::Settings {
        match service {
            Service::Rabbitmq => &self.rabbitmq,
            Service::Mysql => &self.mysql,
            Service::Redis => &self.redis,
            Service::Elasticsearch => &self.elasticsearch,
        }
    }

    fn of_mut(&mut self, service: Service) -> &mut tls::Settings {
        match service {
            Service::Rabbitmq => &mut self.rabbitmq,
            Service::Mysql => &mut self.mysql,
            Service::Redis => &mut self.redis,
            Service::Elasticsearch => &mut self.elasticsearch,
        }
    }
}

/// The Elasticsearch API key and, when it came from
/// `ELASTICSEARCH_API_KEY_FILE`, that file: the client reads it again
/// after a 401 or 403, so a rotated secret takes effect without a restart.
#[derive(Clone)]
pub struct ApiKey {
    /// The key as read at start.
    pub value: String,
    /// The file it was read from, if any.
    pub file: Option<std::path::PathBuf>,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(***, file: {:?})", self.file)
    }
}

impl Config {
    /// Reads every variable of [`VARIABLES`] from the process environment.
    ///
    /// Errors: the first variable whose value does not parse.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_env_and_file(None)
    }

    /// Reads every variable of [`VARIABLES`] from the process environment,
    /// then from `file` for those the environment does not set:
    /// a variable set in the environment, even to "", wins over the file.
    /// The process environment is only read, never changed.
    ///
    /// Errors: as [`Config::from_env`]; a bad value taken from the file has
    /// [`ConfigError::origin`] set to its file and line.
    pub fn from_env_and_file(file: Option<&EnvFile>) -> Result<Config, ConfigError> {
        // A variable set to bytes that are not UTF-8 is set, not absent: it
        // must not fall through to the file or the default.
        for v in VARIABLES {
            for name in [v.name.to_string(), format!("{}_FILE", v.name)] {
                if let Some(raw) = std::env::var_os(&name) {
                    if let Err(raw) = raw.into_string() {
                        return Err(err(&name, &raw.to_string_lossy(), "valid UTF-8"));
                    }
                }
            }
        }
        Config::from_layers(|name| std::env::var(name).ok(), file)
    }

    /// Same as [`Config::from_env_and_file`] with an explicit environment
    /// lookup, for tests.
    pub fn from_layers(
        env: impl Fn(&str) -> Option<String>,
        file: Option<&EnvFile>,
    ) -> Result<Config, ConfigError> {
        let from_file = |name: &str| file.and_then(|f| f.get(name));
        // `NAME` and `NAME_FILE` come from the same layer: the first that
        // sets either of them.
        let env_sets = |name: &str| env(name).is_some() || env(&format!("{name}_FILE")).is_some();
        Config::from_lookup(|name| {
            let base = name.strip_suffix(FILE_SUFFIX).unwrap_or(name);
            if env_sets(base) {
                env(name)
            } else {
                from_file(name).map(|e| e.value.clone())
            }
        })
        .map_err(|mut e| {
            // The file's line only when the variable at fault came from the
            // file (its layer), not when the environment set it or its
            // `NAME_FILE` twin.
            let base = e.variable.strip_suffix(FILE_SUFFIX).unwrap_or(&e.variable);
            if let (false, Some(f), Some(entry)) = (env_sets(base), file, from_file(&e.variable)) {
                e.origin = Some(format!(
                    "--env-file {} line {}",
                    f.path().display(),
                    entry.line
                ));
            }
            e
        })
    }

    /// Same as [`Config::from_env`] with an explicit lookup, for tests.
    /// A variable that is set (even to "") wins over its default.
    ///
    /// Each variable `NAME` may instead be given as `NAME_FILE`, the path
    /// of a file holding the value (one trailing newline dropped).
    ///
    /// Errors: both `NAME` and `NAME_FILE` set, a `NAME_FILE` that cannot
    /// be read, or the first value that does not parse.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut values = std::collections::HashMap::with_capacity(VARIABLES.len());
        let mut files = std::collections::HashMap::new();
        for v in VARIABLES {
            let file_var = format!("{}{FILE_SUFFIX}", v.name);
            let value = match (lookup(v.name), lookup(&file_var)) {
                (Some(given), Some(_)) => {
                    return Err(err(
                        v.name,
                        &given,
                        &format!("either {} or {file_var}, not both", v.name),
                    ))
                }
                (Some(given), None) => given,
                (None, Some(path)) => {
                    let value = read_value_file(&file_var, &path)?;
                    files.insert(v.name, std::path::PathBuf::from(path));
                    value
                }
                (None, None) => v.default.to_string(),
            };
            values.insert(v.name, value);
        }
        // A value read from `NAME_FILE` that does not parse is reported as
        // that file's fault: `NAME_FILE=path`, not `NAME`.
        parse_values(&values)
            .map_err(|e| match files.get(e.variable.as_str()) {
                Some(path) => value_file_error(e, path),
                None => e,
            })
            .map(|mut c| {
                if let Some(key) = c.elasticsearch_api_key.as_mut() {
                    key.file = files.get("ELASTICSEARCH_API_KEY").cloned();
                }
                c
            })
    }
}

/// The error for a value read from a `NAME_FILE` (at `path`) that does
/// not parse: it names `NAME_FILE` and the path, then what the file must
/// hold and (unless the variable is a secret) what it holds.
fn value_file_error(e: ConfigError, path: &std::path::Path) -> ConfigError {
    let expected = if SECRET_VARIABLES.contains(&e.variable.as_str()) {
        format!("a file holding {}", e.expected)
    } else {
        format!("a file holding {} (it holds {:?})", e.expected, e.value)
    };
    ConfigError {
        variable: format!("{}{FILE_SUFFIX}", e.variable),
        value: path.display().to_string(),
        expected,
        origin: None,
    }
}

/// Parses every value of `values` (one per [`VARIABLES`] entry, from
/// whichever layer or file it came).
fn parse_values(
    values: &std::collections::HashMap<&'static str, String>,
) -> Result<Config, ConfigError> {
    {
        let get = |name: &'static str| -> String {
            values
                .get(name)
                .cloned()
                .expect("every variable read is listed in VARIABLES")
        };
        let non_empty = |name: &'static str| -> Result<String, ConfigError> {
            let v = get(name);
            if v.is_empty() {
                Err(err(name, &v, "a non-empty value"))
            } else {
                Ok(v)
            }
        };
        let es = get("ELASTICSEARCH_URL");
        let es_ok = |u: &str| {
            (u.starts_with("http://") || (TLS && u.starts_with("https://")))
                && u.parse::<ureq::http::Uri>()
                    .is_ok_and(|uri| uri.host().is_some_and(|h| !h.is_empty()))
        };
        let elasticsearch_url = if es.is_empty() {
            None
        } else if !TLS && es.starts_with("https://") {
            return Err(err("ELASTICSEARCH_URL", &es, NO_TLS_HTTP));
        } else if es_ok(&es) {
            Some(es.trim_end_matches('/').to_string())
        } else {
            return Err(err(
                "ELASTICSEARCH_URL",
                &es,
                "an http:// or https:// URL with a host, or empty",
            ));
        };
        let redis_url = non_empty("REDIS_URL")?;
        if !TLS && redis_url.starts_with("rediss://") {
            return Err(err("REDIS_URL", &redis_url, NO_TLS_REDIS));
        }
        // A rediss:// URL is redis-rs's plain form over a TLS stream the
        // writer opens itself, so it is checked in that form.
        let plain_form = match redis_url.strip_prefix("rediss://") {
            Some(rest) => format!("redis://{rest}"),
            None => redis_url.clone(),
        };
        if !(redis_url.starts_with("redis://") || redis_url.starts_with("rediss://"))
            || redis::Client::open(plain_form.as_str()).is_err()
        {
            return Err(err(
                "REDIS_URL",
                &redis_url,
                "a redis://host:port/db or rediss://host:port/db URL",
            ));
        }
        // redis-rs's URLs take a `#insecure` fragment as "do not verify the
        // certificate"; here verification has one switch per service, the
        // variable, which is warned at start, so the fragment is refused
        // rather than silently ignored.
        if insecure_fragment(&redis_url) {
            return Err(err(
                "REDIS_URL",
                &redis_url,
                "a rediss:// URL without #insecure (to skip verification set REDIS_TLS_INSECURE=true, which is warned at start)",
            ));
        }
        let rabbitmq_url = non_empty("RABBITMQ_URL")?;
        if !TLS && rabbitmq_url.starts_with("amqps://") {
            return Err(err("RABBITMQ_URL", &rabbitmq_url, NO_TLS_AMQP));
        }
        if !(rabbitmq_url.starts_with("amqp://") || rabbitmq_url.starts_with("amqps://"))
            || rabbitmq_url.parse::<lapin::uri::AMQPUri>().is_err()
        {
            return Err(err(
                "RABBITMQ_URL",
                &rabbitmq_url,
                "an amqp://user:pass@host:port/vhost or amqps://... URL",
            ));
        }
        let index = non_empty("ELASTICSEARCH_INDEX")?;
        if index.contains(['/', '\\', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':'])
            || index.starts_with(['-', '_', '+'])
            || index != index.to_lowercase()
        {
            return Err(err(
                "ELASTICSEARCH_INDEX",
                &index,
                "a lowercase index name without spaces or /\\*?\"<>|,#:",
            ));
        }
        let db_max_open_conns =
            int("DB_MAX_OPEN_CONNS", &get("DB_MAX_OPEN_CONNS"), 1, 1000)? as usize;
        let db_max_idle_conns = int(
            "DB_MAX_IDLE_CONNS",
            &get("DB_MAX_IDLE_CONNS"),
            0,
            db_max_open_conns as u64,
        )? as usize;
        let retry_raw = get("RETRY_DELAYS");
        let mut retry_delays = Vec::new();
        for part in retry_raw
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let d = parse_duration(part).ok_or_else(|| {
                err(
                    "RETRY_DELAYS",
                    &retry_raw,
                    "comma-separated durations like 1s,5s,30s,2m,10m",
                )
            })?;
            // A tier under 1 ms would be a delay queue with TTL 0 named
            // `<queue>.retry.0ms` (TTL and name are whole milliseconds).
            if d < Duration::from_millis(1) {
                return Err(err(
                    "RETRY_DELAYS",
                    &retry_raw,
                    "comma-separated durations of at least 1ms like 1s,5s,30s,2m,10m, or empty",
                ));
            }
            retry_delays.push(d);
        }
        let level_raw = get("RUST_LOG");
        let log_level = match level_raw.trim().to_ascii_lowercase().as_str() {
            "off" => log::LevelFilter::Off,
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "info" | "" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            _ => {
                return Err(err(
                    "RUST_LOG",
                    &level_raw,
                    "one of off, error, warn, info, debug, trace",
                ))
            }
        };
        let mode_raw = get("DATABASE_SSL_MODE");
        let database_ssl_mode = SslMode::parse(&mode_raw).ok_or_else(|| {
            err(
                "DATABASE_SSL_MODE",
                &mode_raw,
                "one of disabled, preferred, required, verify_ca, verify_identity",
            )
        })?;
        if !TLS && !matches!(database_ssl_mode, SslMode::Disabled | SslMode::Preferred) {
            return Err(err("DATABASE_SSL_MODE", &mode_raw, NO_TLS_MYSQL));
        }
        let mut tls = TlsSettings::default();
        for service in Service::ALL {
            *tls.of_mut(service) = tls_settings(service, &get)?;
        }
        let key_raw = get("ELASTICSEARCH_API_KEY");
        let elasticsearch_api_key = if key_raw.is_empty() {
            None
        } else if key_raw.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            Some(ApiKey {
                value: key_raw,
                file: None,
            })
        } else {
            return Err(err(
                "ELASTICSEARCH_API_KEY",
                &key_raw,
                "printable ASCII (the encoded key Elasticsearch hands out)",
            ));
        };
        let http_raw = get("HTTP_ADDR");
        let http_addr = crate::http::parse_addr(&http_raw)
            .map_err(|expected| err("HTTP_ADDR", &http_raw, expected))?;
        Ok(Config {
            database_host: non_empty("DATABASE_HOST")?,
            database_port: int("DATABASE_PORT", &get("DATABASE_PORT"), 1, 65535)? as u16,
            database_username: non_empty("DATABASE_USERNAME")?,
            database_password: get("DATABASE_PASSWORD"),
            database_name: database_name(get("DATABASE_NAME"))?,
            redis_url,
            rabbitmq_url,
            elasticsearch_url,
            elasticsearch_index: index,
            count_sync_interval: duration("COUNT_SYNC_INTERVAL", &get("COUNT_SYNC_INTERVAL"))?,
            count_reconcile_interval: duration(
                "COUNT_RECONCILE_INTERVAL",
                &get("COUNT_RECONCILE_INTERVAL"),
            )?,
            prefetch: int(
                "RABBITMQ_PREFETCH_COUNT",
                &get("RABBITMQ_PREFETCH_COUNT"),
                1,
                65535,
            )? as u16,
            db_max_open_conns,
            db_max_idle_conns,
            shutdown_timeout: duration("SHUTDOWN_TIMEOUT", &get("SHUTDOWN_TIMEOUT"))?,
            mysql_requeue_after: duration("MYSQL_REQUEUE_AFTER", &get("MYSQL_REQUEUE_AFTER"))?,
            retry_delays,
            http_addr,
            log_level,
            database_ssl_mode,
            tls,
            elasticsearch_api_key,
        })
    }
}

/// Whether `url` carries redis-rs's `#insecure` fragment, which other
/// redis-rs programs read as "do not verify the server's certificate".
fn insecure_fragment(url: &str) -> bool {
    // A URL's fragment is what follows its first `#` (a `#` in a password
    // is percent-encoded); redis-rs compares it whole.
    url.split_once('#')
        .is_some_and(|(_, fragment)| fragment == "insecure")
}

impl Config {
    /// The warnings to log at start about the TLS variables of `services`
    /// (those a subcommand connects to): `<S>_TLS_INSECURE=true` on a TLS
    /// connection turns verification off; TLS variables set for a plain
    /// connection (`amqp://`, `redis://`, `http://`, no search server,
    /// `DATABASE_SSL_MODE=disabled`) have no effect.
    pub fn tls_warnings(&self, services: &[Service]) -> Vec<String> {
        let mut out = Vec::new();
        for &service in services {
            let s = self.tls.of(service);
            let p = service.prefix();
            let plain = match service {
                Service::Rabbitmq => (!self.rabbitmq_url.starts_with("amqps://"))
                    .then(|| "RABBITMQ_URL is amqp:// (plain)".to_string()),
                Service::Mysql => (self.database_ssl_mode == SslMode::Disabled)
                    .then(|| "DATABASE_SSL_MODE=disabled (plain)".to_string()),
                Service::Redis => (!self.redis_url.starts_with("rediss://"))
                    .then(|| "REDIS_URL is redis:// (plain)".to_string()),
                Service::Elasticsearch => match self.elasticsearch_url.as_deref() {
                    None => Some("ELASTICSEARCH_URL is empty (indexing disabled)".to_string()),
                    Some(u) if !u.starts_with("https://") => {
                        Some("ELASTICSEARCH_URL is http:// (plain)".to_string())
                    }
                    Some(_) => None,
                },
            };
            match plain {
                Some(why) => {
                    let mut set = Vec::new();
                    if s.ca.is_some() {
                        set.push(format!("{p}_TLS_CA_FILE"));
                    }
                    if s.identity.is_some() {
                        set.push(format!("{p}_TLS_CERT_FILE"));
                        set.push(format!("{p}_TLS_KEY_FILE"));
                    }
                    if s.insecure {
                        set.push(format!("{p}_TLS_INSECURE"));
                    }
                    if !set.is_empty() {
                        out.push(format!(
                            "{} set, but {why}: no effect, the connection to {} does not use TLS",
                            set.join(", "),
                            service.name()
                        ));
                    }
                }
                None if s.insecure => out.push(format!(
                    "{p}_TLS_INSECURE=true: the certificate of {} is NOT verified; anyone on the path can read and change the traffic (for test rigs only)",
                    service.name()
                )),
                None => {}
            }
        }
        out
    }
}

/// Variables holding a URL that may carry `user:password@`: their values
/// appear in messages only through [`redact_url`].
const URL_VARIABLES: [&str; 3] = ["REDIS_URL", "RABBITMQ_URL", "ELASTICSEARCH_URL"];

/// Variables whose whole value is a secret: messages show `***` instead.
pub const SECRET_VARIABLES: [&str; 2] = ["DATABASE_PASSWORD", "ELASTICSEARCH_API_KEY"];

/// `value` of `variable` as it may appear in a message or a log line.
fn shown_value(variable: &str, value: &str) -> String {
    if SECRET_VARIABLES.contains(&variable) {
        "***".to_string()
    } else if URL_VARIABLES.contains(&variable) {
        redact_url(value)
    } else {
        value.to_string()
    }
}

/// `url` with the password of its `user:password@` part replaced by `***`,
/// for messages and logs: `amqp://guest:***@rabbitmq:5672/`. The user, host,
/// port and path stay, so an operator can see what is wrong with the URL.
///
/// Also for values that are not valid URLs (these are what error messages
/// show): without `://` the user part starts at the beginning, and the
/// user part ends at the last `@` before the first `/`, `?` or `#` after
/// the scheme, or, if there is none there, at the last `@` of the whole
/// value (an unencoded `/` in a password), which may hide more than the
/// password but never shows it. Text without `@`, or a user part without
/// `:` (a user name alone), is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@').or_else(|| rest.rfind('@')) else {
        return url.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_string();
    };
    format!("{}***{}", &url[..start + colon + 1], &rest[at..])
}

/// Whether this build speaks TLS (the `tls` cargo feature, on by default).
const TLS: bool = cfg!(feature = "tls");

/// The suffix of the variable that names a file holding a variable's value
/// (`DATABASE_PASSWORD_FILE`), the Docker and Kubernetes secrets convention.
pub const FILE_SUFFIX: &str = "_FILE";

/// The largest `NAME_FILE` read (a value, a key or an API key, not a bundle).
pub const MAX_VALUE_FILE: u64 = 1 << 20;

/// The largest `<S>_TLS_CA_FILE` read: a CA bundle (a whole system bundle
/// is about 220 KiB).
pub const MAX_CA_FILE: u64 = 4 << 20;

/// The largest `<S>_TLS_CERT_FILE` or `<S>_TLS_KEY_FILE` read.
pub const MAX_CERT_FILE: u64 = 1 << 20;

/// A build without the `tls` feature refuses TLS at start rather than
/// failing on every connection attempt.
const NO_TLS_HTTP: &str = "an http:// URL (this build has no TLS: built without the `tls` feature)";
const NO_TLS_REDIS: &str =
    "a redis:// URL (this build has no TLS: built without the `tls` feature)";
const NO_TLS_AMQP: &str = "an amqp:// URL (this build has no TLS: built without the `tls` feature)";
const NO_TLS_MYSQL: &str =
    "disabled or preferred (this build has no TLS: built without the `tls` feature)";

/// The value held by the file `path` named by `file_var` (`NAME_FILE`),
/// one trailing newline (`\n` or `\r\n`) dropped.
///
/// Errors: the file cannot be read, holds over 1 MiB (whatever the file,
/// see [`read_capped`]) or is not UTF-8; the error names `file_var` and
/// the path.
fn read_value_file(file_var: &str, path: &str) -> Result<String, ConfigError> {
    let bytes = read_capped(std::path::Path::new(path), MAX_VALUE_FILE)
        .map_err(|why| err(file_var, path, &format!("a readable file ({why})")))?;
    let mut text =
        String::from_utf8(bytes).map_err(|_| err(file_var, path, "a readable file (not UTF-8)"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// The bytes of the file at `path`, at most `cap` of them: a regular file
/// larger than `cap` is refused by its size, and any other file (a device
/// such as `/dev/zero`, a pipe) is read no further than `cap + 1` bytes.
///
/// Errors, in words: the file cannot be read, or holds more than `cap`
/// bytes (`"over 1 MiB"`).
pub fn read_capped(path: &std::path::Path, cap: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let over = |size: Option<u64>| {
        let limit = if cap % (1 << 20) == 0 {
            format!("{} MiB", cap >> 20)
        } else {
            format!("{cap} bytes")
        };
        match size {
            Some(n) => format!("{n} bytes, over {limit}"),
            None => format!("over {limit}"),
        }
    };
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_file() && meta.len() > cap {
        return Err(over(Some(meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > cap {
        return Err(over(None));
    }
    Ok(bytes)
}

/// A PEM file named by `variable`, read whole (at most `cap` bytes).
/// Errors name the variable and the file.
fn read_pem(variable: &str, path: &str, cap: u64) -> Result<tls::PemFile, ConfigError> {
    let pem = read_capped(std::path::Path::new(path), cap)
        .map_err(|e| err(variable, path, &format!("a readable PEM file ({e})")))?;
    Ok(tls::PemFile {
        path: path.into(),
        pem: pem.into(),
    })
}

/// The `<S>_TLS_*` variables of `service`, with every file read and
/// parsed now, so that a bad file stops the writer at start (exit 2)
/// instead of failing each connection attempt.
fn tls_settings(
    service: Service,
    get: &impl Fn(&'static str) -> String,
) -> Result<tls::Settings, ConfigError> {
    let p = service.prefix();
    let [ca_var, cert_var, key_var, insecure_var] = match service {
        Service::Rabbitmq => [
            "RABBITMQ_TLS_CA_FILE",
            "RABBITMQ_TLS_CERT_FILE",
            "RABBITMQ_TLS_KEY_FILE",
            "RABBITMQ_TLS_INSECURE",
        ],
        Service::Mysql => [
            "DATABASE_TLS_CA_FILE",
            "DATABASE_TLS_CERT_FILE",
            "DATABASE_TLS_KEY_FILE",
            "DATABASE_TLS_INSECURE",
        ],
        Service::Redis => [
            "REDIS_TLS_CA_FILE",
            "REDIS_TLS_CERT_FILE",
            "REDIS_TLS_KEY_FILE",
            "REDIS_TLS_INSECURE",
        ],
        Service::Elasticsearch => [
            "ELASTICSEARCH_TLS_CA_FILE",
            "ELASTICSEARCH_TLS_CERT_FILE",
            "ELASTICSEARCH_TLS_KEY_FILE",
            "ELASTICSEARCH_TLS_INSECURE",
        ],
    };
    debug_assert!(ca_var.starts_with(p));
    let insecure_raw = get(insecure_var);
    let insecure = match insecure_raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => true,
        "false" | "0" | "no" | "" => false,
        _ => return Err(err(insecure_var, &insecure_raw, "true or false")),
    };
    let (ca, cert, key) = (get(ca_var), get(cert_var), get(key_var));
    if !TLS {
        for (var, value) in [(ca_var, &ca), (cert_var, &cert), (key_var, &key)] {
            if !value.is_empty() {
                return Err(err(
                    var,
                    value,
                    "unset (this build has no TLS: built without the `tls` feature)",
                ));
            }
        }
        if insecure {
            return Err(err(
                insecure_var,
                &insecure_raw,
                "false (this build has no TLS: built without the `tls` feature)",
            ));
        }
        return Ok(tls::Settings::default());
    }
    let mut settings = tls::Settings {
        insecure,
        ..tls::Settings::default()
    };
    if !ca.is_empty() {
        let file = read_pem(ca_var, &ca, MAX_CA_FILE)?;
        check(ca_var, &ca, tls_check_certificates(&file))?;
        settings.ca = Some(file);
    }
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => {}
        (false, true) => return Err(err(key_var, "", &format!("set together with {cert_var}"))),
        (true, false) => return Err(err(cert_var, "", &format!("set together with {key_var}"))),
        (false, false) => {
            let (c, k) = (
                read_pem(cert_var, &cert, MAX_CERT_FILE)?,
                read_pem(key_var, &key, MAX_CERT_FILE)?,
            );
            check(cert_var, &cert, tls_check_certificates(&c))?;
            check(key_var, &key, tls_check_key(&k))?;
            settings.identity = Some((c, k));
        }
    }
    // The whole configuration once, as the AMQP connection will build it:
    // a key that does not match its certificate is found here.
    check(cert_var, &cert, tls_check_config(&settings))?;
    Ok(settings)
}

fn check(variable: &str, path: &str, r: Result<(), String>) -> Result<(), ConfigError> {
    r.map_err(|why| err(variable, path, &format!("a usable PEM file: {why}")))
}

#[cfg(feature = "tls")]
fn tls_check_certificates(f: &tls::PemFile) -> Result<(), String> {
    tls::certificates(&f.pem).map(drop)
}

#[cfg(feature = "tls")]
fn tls_check_key(f: &tls::PemFile) -> Result<(), String> {
    tls::private_key(&f.pem).map(drop)
}

#[cfg(feature = "tls")]
fn tls_check_config(s: &tls::Settings) -> Result<(), String> {
    tls::client_config(s).map(drop)
}

#[cfg(not(feature = "tls"))]
fn tls_check_certificates(_: &tls::PemFile) -> Result<(), String> {
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn tls_check_key(_: &tls::PemFile) -> Result<(), String> {
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn tls_check_config(_: &tls::Settings) -> Result<(), String> {
    Ok(())
}

fn err(variable: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError {
        variable: variable.to_string(),
        value: shown_value(variable, value),
        expected: expected.to_string(),
        origin: None,
    }
}

fn int(name: &'static str, raw: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    match raw.trim().parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(err(name, raw, &format!("an integer from {min} to {max}"))),
    }
}

fn duration(name: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    match parse_duration(raw) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(err(
            name,
            raw,
            "a duration above zero: 500ms, 10s, 2m, 1h or bare seconds",
        )),
    }
}

fn database_name(name: String) -> Result<String, ConfigError> {
    // Quoted with backticks in `CREATE DATABASE`; MySQL allows 64 characters.
    if name.is_empty() || name.len() > 64 || name.contains(['`', '\0', '/', '\\', '.']) {
        return Err(err(
            "DATABASE_NAME",
            &name,
            "1..64 characters without backtick, slash, backslash or dot",
        ));
    }
    Ok(name)
}

/// Parses `500ms`, `10s`, `2m`, `1h` or bare (possibly fractional) seconds.
/// Returns `None` for anything else, including negative values.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let s = raw.trim();
    let (num, unit_secs) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let num = num.trim();
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let v: f64 = num.parse().ok()?;
    let secs = v * unit_secs;
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

/// Formats a duration the way the variables accept it (`500ms`, `10s`, `2m`),
/// used for delay-queue names such as `create_messages.retry.5s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// README's configuration table lists exactly [`VARIABLES`], each with
    /// its default, in the same order (`--help` prints the same list).
    #[test]
    fn readme_table_matches_variables() {
        let readme = include_str!("../README.md");
        let rows: Vec<(&str, &str)> = readme
            .lines()
            .skip_while(|l| *l != "| variable | default | meaning |")
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let (name, default) = (cells.next()?, cells.next()?);
                Some((name, if default == "(empty)" { "" } else { default }))
            })
            .collect();
        let want: Vec<(&str, &str)> = VARIABLES.iter().map(|v| (v.name, v.default)).collect();
        assert_eq!(rows, want);
    }

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.database_host, "db");
        assert_eq!(c.database_port, 3306);
        assert_eq!(c.database_username, "root");
        assert_eq!(c.database_password, "password");
        assert_eq!(c.database_name, "auth_api_development");
        assert_eq!(c.redis_url, "redis://redis:6379/0");
        assert_eq!(c.rabbitmq_url, "amqp://guest:guest@rabbitmq:5672/");
        assert_eq!(
            c.elasticsearch_url.as_deref(),
            Some("http://elasticsearch:9200")
        );
        assert_eq!(c.elasticsearch_index, "messages");
        assert_eq!(c.count_sync_interval, Duration::from_secs(10));
        assert_eq!(c.count_reconcile_interval, Duration::from_secs(60));
        assert_eq!(c.prefetch, 256);
        assert_eq!(c.db_max_open_conns, 10);
        assert_eq!(c.db_max_idle_conns, 5);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.mysql_requeue_after, Duration::from_secs(30));
        assert_eq!(
            c.retry_delays,
            [1, 5, 30, 120, 600].map(Duration::from_secs).to_vec()
        );
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert_eq!(c.http_addr, Some("0.0.0.0:9464".parse().unwrap()));
    }

    #[test]
    fn empty_values_win_over_defaults() {
        let c = cfg(&[("DATABASE_PASSWORD", ""), ("ELASTICSEARCH_URL", "")]).unwrap();
        assert_eq!(c.database_password, "");
        assert_eq!(c.elasticsearch_url, None);
        assert_eq!(cfg(&[("HTTP_ADDR", "")]).unwrap().http_addr, None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("0.25"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "soon", "-1s", "1d", "s", "1.2.3s", "NaN"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, val) in [
            ("DATABASE_PORT", "99999"),
            ("DATABASE_PORT", "x"),
            ("RABBITMQ_PREFETCH_COUNT", "0"),
            ("RABBITMQ_PREFETCH_COUNT", "abc"),
            ("COUNT_SYNC_INTERVAL", "soon"),
            ("COUNT_RECONCILE_INTERVAL", "0s"),
            ("SHUTDOWN_TIMEOUT", "-3"),
            ("MYSQL_REQUEUE_AFTER", "0"),
            ("DB_MAX_OPEN_CONNS", "0"),
            ("DB_MAX_IDLE_CONNS", "11"),
            ("RUST_LOG", "loud"),
            ("ELASTICSEARCH_URL", "ftp://x"),
            ("ELASTICSEARCH_INDEX", "Bad Index"),
            ("RABBITMQ_URL", "http://x"),
            ("RABBITMQ_URL", "amqp://[bad"),
            ("ELASTICSEARCH_URL", "http://"),
            ("REDIS_URL", "redis://h:99999/0"),
            ("REDIS_URL", ""),
            ("DATABASE_NAME", "a`b"),
            ("RETRY_DELAYS", "1s,never"),
            ("HTTP_ADDR", "9464"),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.variable, var);
            assert!(e.to_string().contains(var), "{e}");
        }
    }

    /// Without the `tls` feature TLS URLs are refused at start with the
    /// reason, instead of failing on every connection attempt; with it
    /// they are taken as they are.
    #[test]
    fn tls_urls_need_the_tls_feature() {
        for (var, val, form) in [
            ("ELASTICSEARCH_URL", "https://es:9200", NO_TLS_HTTP),
            ("RABBITMQ_URL", "amqps://u:p@mq:5671/", NO_TLS_AMQP),
            ("REDIS_URL", "rediss://cache:6380/0", NO_TLS_REDIS),
            ("DATABASE_SSL_MODE", "verify_identity", NO_TLS_MYSQL),
        ] {
            if TLS {
                assert!(cfg(&[(var, val)]).is_ok(), "{var}={val}");
            } else {
                let e = cfg(&[(var, val)]).unwrap_err();
                assert_eq!(e.variable, var);
                assert_eq!(e.expected, form);
                assert!(e.to_string().contains("this build has no TLS"), "{e}");
            }
        }
    }

    /// A unique scratch directory for one test's files.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("chat-writer-config-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn any_variable_may_come_from_a_file() {
        let d = scratch("file");
        let pw = d.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let pw = pw.to_str().unwrap();
        let c = cfg(&[("DATABASE_PASSWORD_FILE", pw)]).unwrap();
        assert_eq!(
            c.database_password, "s3cret",
            "one trailing newline dropped"
        );
        let crlf = d.join("crlf");
        std::fs::write(&crlf, "42\r\n").unwrap();
        let c = cfg(&[("RABBITMQ_PREFETCH_COUNT_FILE", crlf.to_str().unwrap())]).unwrap();
        assert_eq!(c.prefetch, 42);
        let two = d.join("two");
        std::fs::write(&two, "k\n\n").unwrap();
        let c = cfg(&[("ELASTICSEARCH_API_KEY_FILE", two.to_str().unwrap())]);
        assert_eq!(
            c.unwrap_err().to_string(),
            format!(
                "invalid configuration: ELASTICSEARCH_API_KEY_FILE={:?}: expected a file \
                 holding printable ASCII (the encoded key Elasticsearch hands out)",
                two.to_str().unwrap()
            ),
            "only one newline dropped; the file is named, its secret is not shown"
        );
        let key = d.join("key");
        std::fs::write(&key, "a2V5OnNlY3JldA==").unwrap();
        let c = cfg(&[("ELASTICSEARCH_API_KEY_FILE", key.to_str().unwrap())]).unwrap();
        let k = c.elasticsearch_api_key.unwrap();
        assert_eq!(
            (k.value.as_str(), k.file.as_deref()),
            ("a2V5OnNlY3JldA==", Some(key.as_path()))
        );
        assert!(!format!("{:?}", c.database_password).is_empty());

        let e = cfg(&[("DATABASE_PASSWORD", "x"), ("DATABASE_PASSWORD_FILE", pw)]).unwrap_err();
        assert_eq!(e.variable, "DATABASE_PASSWORD");
        assert_eq!(
            e.expected,
            "either DATABASE_PASSWORD or DATABASE_PASSWORD_FILE, not both"
        );
        assert!(
            !e.to_string().contains("\"x\""),
            "the secret is not shown: {e}"
        );

        let missing = d.join("missing");
        let e = cfg(&[("DATABASE_PASSWORD_FILE", missing.to_str().unwrap())]).unwrap_err();
        assert_eq!(e.variable, "DATABASE_PASSWORD_FILE");
        assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A value read from `NAME_FILE` that does not parse names
    /// `NAME_FILE` and the file, whichever layer set `NAME_FILE`, and never
    /// a `NAME` of the --env-file that was not used.
    #[test]
    fn a_bad_value_from_a_file_names_the_file() {
        let d = scratch("badvalue");
        let port = d.join("port");
        std::fs::write(&port, "99999\n").unwrap();
        let port = port.to_str().unwrap().to_string();
        let want = format!(
            "invalid configuration: DATABASE_PORT_FILE={port:?}: expected a file holding \
             an integer from 1 to 65535 (it holds \"99999\")"
        );
        let e = cfg(&[("DATABASE_PORT_FILE", &port)]).unwrap_err();
        assert_eq!(e.to_string(), want);
        assert_eq!(e.variable, "DATABASE_PORT_FILE");
        // NAME_FILE in the environment, NAME in the --env-file (unused).
        let e = layered(&[("DATABASE_PORT_FILE", &port)], "DATABASE_PORT=1\n").unwrap_err();
        assert_eq!(e.to_string(), want);
        // NAME_FILE in the --env-file: its line.
        let e = layered(&[], &format!("# x\nDATABASE_PORT_FILE={port}\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{want} (from --env-file /etc/cw.env line 2)")
        );
        // A URL's password stays hidden.
        let url = d.join("url");
        std::fs::write(&url, "ftp://elastic:secretpw@es:9200").unwrap();
        let e = cfg(&[("ELASTICSEARCH_URL_FILE", url.to_str().unwrap())]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "invalid configuration: ELASTICSEARCH_URL_FILE={:?}: expected a file holding \
                 an http:// or https:// URL with a host, or empty (it holds \"ftp://elastic:***@es:9200\")",
                url.to_str().unwrap()
            )
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Files are read up to their cap, devices and pipes included.
    #[test]
    fn files_are_read_up_to_a_cap() {
        for dev in ["/dev/zero", "/dev/urandom"] {
            let e = cfg(&[("DATABASE_PASSWORD_FILE", dev)]).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid configuration: DATABASE_PASSWORD_FILE={dev:?}: expected a readable file (over 1 MiB)"
                )
            );
        }
        let d = scratch("cap");
        let big = d.join("big");
        std::fs::write(&big, vec![b'a'; (1 << 20) + 1]).unwrap();
        let e = cfg(&[("DATABASE_NAME_FILE", big.to_str().unwrap())]).unwrap_err();
        assert_eq!(e.variable, "DATABASE_NAME_FILE");
        assert!(e.to_string().contains("1048577 bytes, over 1 MiB"), "{e}");
        assert_eq!(
            read_capped(&big, 1 << 20).unwrap_err(),
            "1048577 bytes, over 1 MiB"
        );
        assert_eq!(read_capped(&big, 2 << 20).unwrap().len(), (1 << 20) + 1);
        std::fs::remove_dir_all(&d).unwrap();
        if !TLS {
            return;
        }
        for (var, cap) in [
            ("REDIS_TLS_CA_FILE", "4 MiB"),
            ("RABBITMQ_TLS_CA_FILE", "4 MiB"),
        ] {
            let e = cfg(&[(var, "/dev/zero")]).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid configuration: {var}=\"/dev/zero\": expected a readable PEM file (over {cap})"
                )
            );
        }
        let e = cfg(&[
            ("DATABASE_TLS_CERT_FILE", "/dev/urandom"),
            ("DATABASE_TLS_KEY_FILE", "/dev/zero"),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: DATABASE_TLS_CERT_FILE=\"/dev/urandom\": expected a readable PEM file (over 1 MiB)"
        );
    }

    /// redis-rs's `#insecure` fragment is refused: REDIS_TLS_INSECURE is
    /// the one switch, and it is warned at start.
    #[test]
    fn the_insecure_fragment_of_redis_urls_is_refused() {
        if !TLS {
            return;
        }
        let e = cfg(&[("REDIS_URL", "rediss://:pw@cache:6380/0#insecure")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: REDIS_URL=\"rediss://:***@cache:6380/0#insecure\": expected a \
             rediss:// URL without #insecure (to skip verification set REDIS_TLS_INSECURE=true, \
             which is warned at start)"
        );
        assert!(cfg(&[("REDIS_URL", "rediss://cache:6380/0")]).is_ok());
    }

    #[test]
    fn tls_warnings_name_insecure_and_useless_variables() {
        assert_eq!(
            cfg(&[]).unwrap().tls_warnings(&Service::ALL),
            Vec::<String>::new()
        );
        if !TLS {
            return;
        }
        let c = cfg(&[
            ("RABBITMQ_TLS_INSECURE", "true"),
            ("DATABASE_SSL_MODE", "disabled"),
            ("DATABASE_TLS_INSECURE", "true"),
            ("REDIS_URL", "rediss://cache:6380/0"),
            ("REDIS_TLS_INSECURE", "true"),
            ("ELASTICSEARCH_URL", ""),
            ("ELASTICSEARCH_TLS_INSECURE", "yes"),
        ])
        .unwrap();
        assert_eq!(
            c.tls_warnings(&Service::ALL),
            [
                "RABBITMQ_TLS_INSECURE set, but RABBITMQ_URL is amqp:// (plain): no effect, the connection to rabbitmq does not use TLS",
                "DATABASE_TLS_INSECURE set, but DATABASE_SSL_MODE=disabled (plain): no effect, the connection to mysql does not use TLS",
                "REDIS_TLS_INSECURE=true: the certificate of redis is NOT verified; anyone on the path can read and change the traffic (for test rigs only)",
                "ELASTICSEARCH_TLS_INSECURE set, but ELASTICSEARCH_URL is empty (indexing disabled): no effect, the connection to elasticsearch does not use TLS",
            ]
        );
        assert_eq!(
            c.tls_warnings(&[Service::Redis]),
            [c.tls_warnings(&Service::ALL)[2].clone()]
        );
        let c = cfg(&[("DATABASE_TLS_INSECURE", "true")]).unwrap();
        assert_eq!(
            c.tls_warnings(&[Service::Mysql]),
            ["DATABASE_TLS_INSECURE=true: the certificate of mysql is NOT verified; anyone on the path can read and change the traffic (for test rigs only)"]
        );
    }

    #[test]
    fn the_environment_layer_sets_name_and_name_file_together() {
        let d = scratch("layers");
        let pw = d.join("pw");
        std::fs::write(&pw, "from-file").unwrap();
        let pw = pw.to_str().unwrap().to_string();
        // NAME_FILE in the environment wins over NAME in the --env-file.
        let c = layered(
            &[("DATABASE_PASSWORD_FILE", &pw)],
            "DATABASE_PASSWORD=in-env-file\n",
        )
        .unwrap();
        assert_eq!(c.database_password, "from-file");
        // Both in the --env-file: refused, with the file and line.
        let e = layered(
            &[],
            &format!("DATABASE_PASSWORD=a\nDATABASE_PASSWORD_FILE={pw}\n"),
        )
        .unwrap_err();
        assert_eq!(e.variable, "DATABASE_PASSWORD");
        assert_eq!(e.origin.as_deref(), Some("--env-file /etc/cw.env line 1"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn tls_files_are_checked_at_start() {
        if !TLS {
            let e = cfg(&[("REDIS_TLS_CA_FILE", "/x.pem")]).unwrap_err();
            assert_eq!(e.variable, "REDIS_TLS_CA_FILE");
            return;
        }
        let d = scratch("tls");
        let not_pem = d.join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let not_pem = not_pem.to_str().unwrap();
        let e = cfg(&[("REDIS_TLS_CA_FILE", not_pem)]).unwrap_err();
        assert_eq!(e.variable, "REDIS_TLS_CA_FILE");
        assert!(e.to_string().contains(not_pem), "{e}");
        assert!(e.to_string().contains("no PEM CERTIFICATE block"), "{e}");

        let missing = d.join("nope.pem");
        let missing = missing.to_str().unwrap();
        let e = cfg(&[("RABBITMQ_TLS_CA_FILE", missing)]).unwrap_err();
        assert_eq!(e.variable, "RABBITMQ_TLS_CA_FILE");
        assert!(e.to_string().contains(missing), "{e}");

        let e = cfg(&[("DATABASE_TLS_CERT_FILE", not_pem)]).unwrap_err();
        assert_eq!(e.variable, "DATABASE_TLS_KEY_FILE");
        assert_eq!(e.expected, "set together with DATABASE_TLS_CERT_FILE");
        let e = cfg(&[("ELASTICSEARCH_TLS_KEY_FILE", not_pem)]).unwrap_err();
        assert_eq!(e.variable, "ELASTICSEARCH_TLS_CERT_FILE");

        let e = cfg(&[("REDIS_TLS_INSECURE", "maybe")]).unwrap_err();
        assert_eq!(e.variable, "REDIS_TLS_INSECURE");
        assert!(
            cfg(&[("REDIS_TLS_INSECURE", "true")])
                .unwrap()
                .tls
                .redis
                .insecure
        );
        assert!(!cfg(&[]).unwrap().tls.redis.insecure);

        let e = cfg(&[("DATABASE_SSL_MODE", "on")]).unwrap_err();
        assert_eq!(e.variable, "DATABASE_SSL_MODE");
        assert_eq!(cfg(&[]).unwrap().database_ssl_mode, SslMode::Preferred);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn redact_url_hides_only_the_password() {
        for (url, shown) in [
            (
                "amqp://guest:guest@rabbitmq:5672/",
                "amqp://guest:***@rabbitmq:5672/",
            ),
            ("redis://:secretpw@host:6379/x", "redis://:***@host:6379/x"),
            (
                "https://elastic:secretpw@es.example:9200",
                "https://elastic:***@es.example:9200",
            ),
            ("amqp://u:@h/", "amqp://u:***@h/"),
            // `@`, `/`, `#` or `?` in the password (valid or not).
            ("amqp://u:se@cret@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqp://u:se/cret@h:5672/", "amqp://u:***@h:5672/"),
            ("redis://u:se#cret@h/0", "redis://u:***@h/0"),
            // No scheme, or a broken one: still hidden.
            ("u:secretpw@h:6379/0", "u:***@h:6379/0"),
            ("amqp//u:secretpw@h/", "amqp//u:***@h/"),
            // Nothing to hide.
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            ("http://elasticsearch:9200", "http://elasticsearch:9200"),
            ("https://user@h", "https://user@h"),
            ("amqp://[bad", "amqp://[bad"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    /// A bad URL is shown with its password replaced by `***` (user, host
    /// and path kept), from the environment and from an env file.
    #[test]
    fn url_errors_hide_the_password() {
        for (var, val, want) in [
            (
                "REDIS_URL",
                "redis://:secretpw@host:6379/x",
                "invalid configuration: REDIS_URL=\"redis://:***@host:6379/x\": \
                 expected a redis://host:port/db or rediss://host:port/db URL",
            ),
            (
                "RABBITMQ_URL",
                "amqp://user:secretpw@host:99999/",
                "invalid configuration: RABBITMQ_URL=\"amqp://user:***@host:99999/\": \
                 expected an amqp://user:pass@host:port/vhost or amqps://... URL",
            ),
            (
                "RABBITMQ_URL",
                "user:secretpw@host:5672/",
                "invalid configuration: RABBITMQ_URL=\"user:***@host:5672/\": \
                 expected an amqp://user:pass@host:port/vhost or amqps://... URL",
            ),
            (
                "ELASTICSEARCH_URL",
                "ftp://elastic:secretpw@es:9200",
                "invalid configuration: ELASTICSEARCH_URL=\"ftp://elastic:***@es:9200\": \
                 expected an http:// or https:// URL with a host, or empty",
            ),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.to_string(), want, "{var}={val}");
            assert!(!format!("{e:?}").contains("secretpw"), "{e:?}");
            let e = layered(&[], &format!("# x\n{var}={val}\n")).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{want} (from --env-file /etc/cw.env line 2)"),
                "{var}={val} from the file"
            );
        }
    }

    #[test]
    fn retry_delays_empty_means_none_and_tiers_are_at_least_1ms() {
        assert_eq!(
            cfg(&[("RETRY_DELAYS", "")]).unwrap().retry_delays,
            Vec::<Duration>::new()
        );
        assert_eq!(
            cfg(&[("RETRY_DELAYS", "1ms, 0.002,1.5s")])
                .unwrap()
                .retry_delays,
            [
                Duration::from_millis(1),
                Duration::from_millis(2),
                Duration::from_millis(1500)
            ]
        );
        for bad in ["0.1ms", "1s,0.5ms", "0", "0s,1s", "0.0009"] {
            assert_eq!(
                cfg(&[("RETRY_DELAYS", bad)]).unwrap_err().to_string(),
                format!(
                    "invalid configuration: RETRY_DELAYS={bad:?}: expected comma-separated \
                     durations of at least 1ms like 1s,5s,30s,2m,10m, or empty"
                ),
                "{bad}"
            );
        }
        let help = VARIABLES.iter().find(|v| v.name == "RETRY_DELAYS").unwrap();
        assert!(
            help.help.contains("empty = no delayed retry"),
            "{}",
            help.help
        );
    }

    /// `--help` lists every level RUST_LOG accepts, `off` included.
    #[test]
    fn rust_log_help_lists_every_accepted_level() {
        let help = VARIABLES
            .iter()
            .find(|v| v.name == "RUST_LOG")
            .unwrap()
            .help;
        assert_eq!(help, "log level: off, error, warn, info, debug, trace");
        for (name, level) in [
            ("off", log::LevelFilter::Off),
            ("error", log::LevelFilter::Error),
            ("warn", log::LevelFilter::Warn),
            ("info", log::LevelFilter::Info),
            ("debug", log::LevelFilter::Debug),
            ("trace", log::LevelFilter::Trace),
        ] {
            assert_eq!(cfg(&[("RUST_LOG", name)]).unwrap().log_level, level);
            assert!(help.contains(name), "{help}");
        }
    }

    fn file(text: &str) -> EnvFile {
        let entries = crate::env_file::parse(text).unwrap();
        EnvFile::from_entries(std::path::Path::new("/etc/cw.env"), entries)
    }

    fn layered(env: &[(&str, &str)], text: &str) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_layers(|k| map.get(k).cloned(), Some(&file(text)))
    }

    #[test]
    fn env_file_is_under_the_environment_and_over_defaults() {
        let text = "DATABASE_NAME=from_file\nDATABASE_HOST=filehost\nELASTICSEARCH_URL=\nOTHER_SERVICE_KEY=x\n";
        let c = layered(
            &[("DATABASE_HOST", "envhost"), ("DATABASE_PASSWORD", "")],
            text,
        )
        .unwrap();
        assert_eq!(c.database_name, "from_file");
        assert_eq!(c.database_host, "envhost");
        assert_eq!(c.elasticsearch_url, None, "ELASTICSEARCH_URL= in the file");
        assert_eq!(c.database_password, "");
        assert_eq!(c.database_port, 3306, "default");
        // Set to "" in the environment: still wins over the file.
        let c = layered(&[("DATABASE_PASSWORD", "")], "DATABASE_PASSWORD=secret").unwrap();
        assert_eq!(c.database_password, "");
    }

    #[test]
    fn a_bad_value_from_the_file_names_the_variable_and_the_line() {
        let e = layered(&[], "# x\nDATABASE_PORT=99999\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: DATABASE_PORT=\"99999\": expected an integer from 1 to 65535 \
             (from --env-file /etc/cw.env line 2)"
        );
        // The same bad value from the environment names no file.
        let e = layered(&[("DATABASE_PORT", "99999")], "DATABASE_PORT=1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: DATABASE_PORT=\"99999\": expected an integer from 1 to 65535"
        );
    }
}
