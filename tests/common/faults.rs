//! Fault injection on resources the test owns (never the shared services):
//!
//! - [`Proxy`]: a pausable TCP proxy on 127.0.0.1 in front of any server
//!   (MySQL, Redis, osmem-server). `pause()` drops every live connection and
//!   closes new ones at once; `freeze()` keeps connections open but passes
//!   nothing on (a server that hangs); `hold_new()` accepts new connections
//!   and never answers them, with no connection to the server behind (a
//!   load balancer in front of a dead server: nothing ever closes them);
//!   `resume()` forwards again.
//! - [`RedisServer`]: a private `redis-server` on a free port, no persistence.
//! - [`OsmemServer`]: a private osmem-server on a fixed free port that can be
//!   stopped and restarted (empty) on the same port.
//! - [`close_writer_connections`] / [`close_consumer_channels`]: close the
//!   AMQP connections or consuming channels of the test's own vhost (a broker
//!   restart / `consumer_timeout` seen from the client), sparing the test's
//!   own connections.
//! - [`Rng`]: a small deterministic PRNG (splitmix64).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::amqp::HARNESS_CONNECTION_NAME;
use super::{artefact_dir, free_port, rabbitmqctl};

// ---------------------------------------------------------------- proxy

struct ProxyShared {
    paused: AtomicBool,
    /// Bytes are read but not passed on: the peer sees a server (or client)
    /// that stopped answering, connections stay open.
    frozen: AtomicBool,
    stop: AtomicBool,
    /// New connections are accepted and held, never answered.
    holding: AtomicBool,
    /// Connections held by `hold_new`, closed when the proxy is dropped.
    held: Mutex<Vec<TcpStream>>,
    /// Both sockets of every live forwarded connection.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

impl ProxyShared {
    fn drop_all(&self) {
        let conns: Vec<(TcpStream, TcpStream)> =
            std::mem::take(&mut *self.live.lock().expect("proxy lock"));
        for (a, b) in conns {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

/// A TCP proxy `127.0.0.1:<port>` → `target`, with std threads.
pub struct Proxy {
    pub port: u16,
    pub target: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener
            .set_nonblocking(true)
            .expect("proxy listener nonblocking");
        let port = listener.local_addr().expect("proxy addr").port();
        let shared = Arc::new(ProxyShared {
            paused: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            live: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, target, sh))
            .expect("spawn proxy thread");
        Proxy {
            port,
            target,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Drops every live connection; new ones are closed as soon as accepted.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        self.shared.drop_all();
    }

    /// Forwards new connections again (and thaws a frozen proxy). Held
    /// connections stay held.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        self.shared.frozen.store(false, Ordering::SeqCst);
        self.shared.holding.store(false, Ordering::SeqCst);
    }

    /// Accepts new connections and holds them open without a word and
    /// without connecting to the server: a peer that never completes a
    /// handshake and never closes.
    pub fn hold_new(&self) {
        self.shared.holding.store(true, Ordering::SeqCst);
    }

    /// Connections held so far by [`Proxy::hold_new`].
    pub fn held(&self) -> usize {
        self.shared.held.lock().expect("proxy lock").len()
    }

    /// Stops passing bytes on, keeping every connection open: a server that
    /// hangs instead of refusing (a silent network, a stuck process).
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at once because the proxy was paused.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.drop_all();
        for c in std::mem::take(&mut *self.shared.held.lock().expect("proxy lock")) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, sh: Arc<ProxyShared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if sh.paused.load(Ordering::SeqCst) {
                    sh.refused.fetch_add(1, Ordering::SeqCst);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                if sh.holding.load(Ordering::SeqCst) {
                    sh.held.lock().expect("proxy lock").push(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let server = match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                };
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                {
                    let mut live = sh.live.lock().expect("proxy lock");
                    if sh.paused.load(Ordering::SeqCst) {
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = server.shutdown(Shutdown::Both);
                        continue;
                    }
                    live.push((c3, s3));
                }
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                let (sh1, sh2) = (sh.clone(), sh.clone());
                std::thread::spawn(move || pump(client, s2, sh1));
                std::thread::spawn(move || pump(server, c2, sh2));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Copies `from` → `to` until EOF or an error, then shuts both down.
/// While the proxy is frozen, what was read is held back.
fn pump(mut from: TcpStream, mut to: TcpStream, sh: Arc<ProxyShared>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                while sh.frozen.load(Ordering::SeqCst) && !sh.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------- redis

/// A private `redis-server` (no persistence) on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let log = std::fs::File::create(artefact_dir().join(format!("redis-{port}.log")))
            .expect("create redis log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_port(addr, "redis-server");
        RedisServer { port, child }
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 15 s until `addr` accepts a TCP connection.
pub fn wait_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- osmem

/// A private osmem-server on a fixed port; `stop()` kills it (its data is
/// in memory, so a `start()` after it is an empty cluster on the same port).
pub struct OsmemServer {
    pub port: u16,
    child: Option<Child>,
    starts: usize,
}

impl OsmemServer {
    pub fn start() -> OsmemServer {
        let mut s = OsmemServer {
            port: free_port(),
            child: None,
            starts: 0,
        };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// Kills the server (no-op when stopped).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (empty) on the same port; stops it first if running.
    pub fn restart(&mut self) {
        self.stop();
        let bin = super::es::osmem_bin();
        let log = std::fs::File::create(
            artefact_dir().join(format!("osmem-{}-{}.log", self.port, self.starts)),
        )
        .expect("create osmem log");
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut child = Command::new(&bin)
                .args([
                    "-addr",
                    &format!("127.0.0.1:{}", self.port),
                    "-no-stdin-watch",
                    "-parent-pid",
                    &std::process::id().to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log.try_clone().expect("clone log"))
                .spawn()
                .unwrap_or_else(|e| panic!("start {bin}: {e}"));
            let mut out = BufReader::new(child.stdout.take().expect("stdout"));
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            if line.contains("\"url\"") {
                std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = out.read_to_end(&mut sink);
                });
                self.child = Some(child);
                wait_port(self.addr(), "osmem-server");
                return;
            }
            // The port may still be held for a moment: try again.
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "osmem-server did not start on port {} within 15 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for OsmemServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- rabbitmq

/// `(pid, client_properties)` of every connection of `vhost`.
fn vhost_connections(vhost: &str) -> Vec<(String, String)> {
    let out = rabbitmqctl(&[
        "list_connections",
        "--no-table-headers",
        "pid",
        "vhost",
        "client_properties",
    ]);
    out.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            let pid = f.next()?.trim().to_string();
            let vh = f.next()?.trim();
            let props = f.next().unwrap_or_default().to_string();
            (vh == vhost && pid.starts_with('<')).then_some((pid, props))
        })
        .collect()
}

/// Connections of `vhost` that are not the test harness's own.
pub fn writer_connections(vhost: &str) -> Vec<String> {
    vhost_connections(vhost)
        .into_iter()
        .filter(|(_, props)| !props.contains(HARNESS_CONNECTION_NAME))
        .map(|(pid, _)| pid)
        .collect()
}

/// Closes every connection of `vhost` except the harness's own (as
/// `rabbitmqctl close_connection` does during a broker restart or by an
/// operator). Returns how many it closed.
pub fn close_writer_connections(vhost: &str, reason: &str) -> usize {
    let pids = writer_connections(vhost);
    let mut closed = 0;
    for pid in &pids {
        // The connection may be gone already: ignore failures.
        let ok = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, reason])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            closed += 1;
        }
    }
    closed
}

/// Closes every channel of `vhost` that has a consumer with a channel-level
/// 406 PRECONDITION_FAILED, the way `consumer_timeout` does: the broker's
/// channel process is made to process a `basic.ack` of an unknown delivery
/// tag. The connection stays open; the channel's unacked deliveries return
/// to their queues. Returns how many channels it hit. A channel of another
/// test that closes while it is looked at is skipped (`catch`), not an
/// error.
pub fn close_consumer_channels(vhost: &str) -> usize {
    assert!(
        vhost.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "vhost {vhost:?}"
    );
    let expr = format!(
        "length([rabbit_channel:do(P, {{'basic.ack', 4294967295, false}}) \
         || P <- rabbit_channel:list_local(), \
            [{{vhost, V}}, {{consumer_count, C}}] <- [catch rabbit_channel:info(P, [vhost, consumer_count])], \
            V =:= <<\"{vhost}\">>, C > 0])."
    );
    let out = rabbitmqctl(&["eval", &expr]);
    out.trim().parse().unwrap_or(0)
}

/// Kills (exit reason `kill`) every channel process of `vhost` that has a
/// consumer. RabbitMQ answers a killed channel by closing its connection
/// with 541 INTERNAL_ERROR. Returns how many it killed.
pub fn kill_consumer_channels(vhost: &str) -> usize {
    assert!(
        vhost.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "vhost {vhost:?}"
    );
    let expr = format!(
        "length([exit(P, kill) \
         || P <- rabbit_channel:list_local(), \
            [{{vhost, V}}, {{consumer_count, C}}] <- [catch rabbit_channel:info(P, [vhost, consumer_count])], \
            V =:= <<\"{vhost}\">>, C > 0])."
    );
    let out = rabbitmqctl(&["eval", &expr]);
    out.trim().parse().unwrap_or(0)
}

// ---------------------------------------------------------------- prng

/// splitmix64: small, fast, deterministic for a seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The seed from `CW_TEST_SEED` if set, else from the clock; printed so
    /// a failing run can be repeated.
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("CW_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| super::time::now_us() as u64);
        eprintln!("[{what}] seed {seed} (set CW_TEST_SEED={seed} to repeat)");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}
