//! `tls-rig`: the writer's four services behind TLS on this machine, for
//! `perf/demo.sh --tls` (and by hand).
//!
//! It starts, from the TLS test rig (`tests/common/tls.rs`): a throw-away
//! PKI; a TLS proxy in front of the local RabbitMQ demanding a client
//! certificate; an HTTP TLS proxy in front of the search server accepting
//! one API key; a private TLS-only `redis-server` demanding a client
//! certificate; a private MariaDB with `require_secure_transport=ON`. Then
//! it writes a `KEY=VALUE` file for `chat-writer --env-file` (every
//! connection over TLS, verified against the rig's CA; the MySQL password
//! and the API key as `…_FILE` variables), prints what it started, and keeps
//! a status file up to date (handshakes and connections the servers saw,
//! `KEY=VALUE`) until SIGTERM, SIGINT or the end of its stdin; then it
//! stops its servers and removes the PKI directory.
//!
//! The env file also holds, under keys the writer ignores, what a verifier
//! needs for its own plain reads: `TLS_RIG_MYSQL_SOCKET` (root, no password),
//! `TLS_RIG_REDIS_SOCKET` and `TLS_RIG_STATUS_FILE`.

#[path = "../../tests/common/tls.rs"]
mod tls;

mod rig;

use async_signal::{Signal, Signals};
use smol::stream::StreamExt;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

const USAGE: &str = "\
usage: tls-rig --env-file PATH [--amqp HOST:PORT] [--es HOST:PORT] [--vhost NAME]
               [--redis-db N] [--status-file PATH] [--no-stdin-watch]

  --env-file PATH     where to write the writer's variables (required)
  --amqp HOST:PORT    the plain RabbitMQ behind the proxy (127.0.0.1:5672)
  --es HOST:PORT      the plain search server behind the proxy (127.0.0.1:9200)
  --vhost NAME        RabbitMQ vhost in RABBITMQ_URL, URL-encoded (%2f)
  --redis-db N        database in REDIS_URL (0)
  --status-file PATH  counts from the servers' side, rewritten every second
                      (default: <env-file>.status)
  --no-stdin-watch    do not stop at the end of stdin (only on SIGTERM/SIGINT)";

struct Args {
    env_file: PathBuf,
    status_file: PathBuf,
    amqp: SocketAddr,
    es: SocketAddr,
    vhost: String,
    redis_db: u8,
    stdin_watch: bool,
}

fn addr(flag: &str, v: Option<String>) -> Result<SocketAddr, String> {
    let v = v.ok_or_else(|| format!("{flag} needs HOST:PORT"))?;
    v.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("{flag}: expected HOST:PORT, got {v:?}"))
}

fn parse() -> Result<Option<Args>, String> {
    let mut it = std::env::args().skip(1);
    let (mut env_file, mut status_file) = (None, None);
    let mut a = Args {
        env_file: PathBuf::new(),
        status_file: PathBuf::new(),
        amqp: SocketAddr::from(([127, 0, 0, 1], 5672)),
        es: SocketAddr::from(([127, 0, 0, 1], 9200)),
        vhost: "%2f".to_string(),
        redis_db: 0,
        stdin_watch: true,
    };
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = || inline.clone().or_else(|| it.next());
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--env-file" => env_file = Some(PathBuf::from(val().ok_or("--env-file needs a path")?)),
            "--status-file" => {
                status_file = Some(PathBuf::from(val().ok_or("--status-file needs a path")?))
            }
            "--amqp" => a.amqp = addr(&flag, val())?,
            "--es" => a.es = addr(&flag, val())?,
            "--vhost" => a.vhost = val().ok_or("--vhost needs a name")?,
            "--redis-db" => {
                let v = val().ok_or("--redis-db needs a number")?;
                a.redis_db = v
                    .parse()
                    .map_err(|_| format!("--redis-db: expected 0..255, got {v:?}"))?;
            }
            "--no-stdin-watch" => a.stdin_watch = false,
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        }
    }
    a.env_file = env_file.ok_or("--env-file PATH is required")?;
    a.status_file = status_file.unwrap_or_else(|| {
        let mut s = a.env_file.clone().into_os_string();
        s.push(".status");
        PathBuf::from(s)
    });
    Ok(Some(a))
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// reader never sees half of it.
fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tls-rig: {e}");
            return ExitCode::from(2);
        }
    };
    // Handlers first: a SIGTERM during the start-up must not skip cleanup.
    let (tx, rx) = mpsc::channel::<&'static str>();
    match Signals::new([Signal::Term, Signal::Int]) {
        Ok(mut signals) => {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let why = match smol::block_on(signals.next()) {
                    Some(Ok(Signal::Int)) => "SIGINT",
                    _ => "SIGTERM",
                };
                let _ = tx.send(why);
            });
        }
        Err(e) => eprintln!("tls-rig: no signal handler ({e}): SIGTERM will not clean up"),
    }
    let rig = rig::Rig::start(a.amqp, a.es);
    let env = rig.writer_env(&a.vhost, a.redis_db, true);
    let mut text = format!(
        "# chat-writer --env-file: all four connections over TLS (tls-rig, pid {})\n",
        std::process::id()
    );
    for (k, v) in &env {
        text.push_str(&format!("{k}={v}\n"));
    }
    text.push_str(&format!(
        "# for the verifier's own plain reads (not the writer's):\n\
         TLS_RIG_MYSQL_SOCKET={}\nTLS_RIG_REDIS_SOCKET={}\nTLS_RIG_STATUS_FILE={}\n",
        rig.db.socket.display(),
        rig.redis.socket.display(),
        a.status_file.display()
    ));
    let _ = write_atomic(&a.status_file, &rig.status().to_env());
    if let Err(e) = write_atomic(&a.env_file, &text) {
        eprintln!("tls-rig: writing {}: {e}", a.env_file.display());
        return ExitCode::FAILURE;
    }
    println!(
        "tls-rig: PKI {} (CA {}, client certificate CN chat-writer)",
        rig.pki.dir.display(),
        rig.pki.ca_file().display()
    );
    println!(
        "tls-rig: RabbitMQ  amqps://127.0.0.1:{} -> {} (mutual TLS)",
        rig.amqp.port, a.amqp
    );
    println!(
        "tls-rig: search    https://127.0.0.1:{} -> http://{} (ApiKey required)",
        rig.es.port, a.es
    );
    println!(
        "tls-rig: Redis     rediss://127.0.0.1:{} (private redis-server, TLS only, mutual TLS; socket {})",
        rig.redis.tls_port,
        rig.redis.socket.display()
    );
    println!(
        "tls-rig: MariaDB   127.0.0.1:{} (private mariadbd, require_secure_transport=ON; socket {})",
        rig.db.port,
        rig.db.socket.display()
    );
    println!(
        "tls-rig: env file {}, status {}",
        a.env_file.display(),
        a.status_file.display()
    );
    println!("tls-rig: ready");
    if a.stdin_watch {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send("end of stdin");
        });
    }
    let why = loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(why) => break why,
            Err(mpsc::RecvTimeoutError::Disconnected) => break "no signal source",
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = write_atomic(&a.status_file, &rig.status().to_env());
            }
        }
    };
    let st = rig.status();
    let _ = write_atomic(&a.status_file, &st.to_env());
    println!("tls-rig: {why}: {}", st.line());
    drop(rig);
    println!("tls-rig: stopped");
    ExitCode::SUCCESS
}
