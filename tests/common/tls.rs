//! The TLS test rig: a throw-away PKI and TLS servers the test owns.
//!
//! - [`Pki`]: two certificate authorities made at run time (one trusted by
//!   the writer through `S_TLS_CA_FILE`, one it has never seen) and the
//!   certificates the tests hand out, as PEM files in a temporary directory
//!   removed on drop.
//! - [`TlsProxy`]: a TLS-terminating TCP proxy on 127.0.0.1 (rustls with the
//!   ring provider) in front of a plain server (RabbitMQ, osmem-server). Its
//!   certificate can be swapped while it runs (same address), it can demand
//!   a client certificate, and it counts and closes its connections. The
//!   HTTP variant ([`TlsProxy::start_http`]) checks `Authorization` against
//!   [`EsAuth`] and answers 401/403 with an Elasticsearch-style error body.
//! - [`RedisTls`]: a private `redis-server` that listens only on a TLS port
//!   (and a unix socket for the test itself), its certificate changeable at
//!   run time.
//! - [`MariaDb`]: a private `mariadbd` with `--require-secure-transport=ON`,
//!   root reachable over TCP from 127.0.0.1 with a password (TLS only) and
//!   over its unix socket (the test's own reads).
//!
//! Private servers are watched by a small shell loop: if the test process
//! dies without dropping them, the server is killed and its directory
//! removed. Directories of killed test processes are also swept by the next
//! [`Pki::new`].
//!
//! Self-contained (std, rustls, futures-rustls, rcgen, smol) so the perf
//! crate can include it with `#[path]`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use smol::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use smol::Async;

/// The one crypto provider of the project: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------- PKI

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .unwrap_or_else(|e| panic!("read {}: {e:?}", self.cert.display()))
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(&self.key)
            .unwrap_or_else(|e| panic!("read {}: {e:?}", self.key.display()))
    }
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// Two CAs and the certificates the tests use, in `dir` (removed on drop).
///
/// | file | what |
/// |---|---|
/// | `ca.pem` | the trusted CA (give it to the writer as `S_TLS_CA_FILE`) |
/// | `other-ca.pem` | a CA nobody trusts |
/// | [`Pki::server`] | trusted CA, SAN `127.0.0.1` (IP) and `localhost` (DNS) |
/// | [`Pki::untrusted`] | the same names, issued by the other CA |
/// | [`Pki::wrong_name`] | trusted CA, SAN `wrong-host.invalid` only |
/// | [`Pki::expired`] | trusted CA, the right names, valid 2020 to 2021 |
/// | [`Pki::client`] | trusted CA, client authentication, CN `chat-writer` |
/// | [`Pki::other_client`] | the same from the other CA |
pub struct Pki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    other: CertifiedIssuer<'static, KeyPair>,
    pub server: CertFiles,
    pub untrusted: CertFiles,
    pub wrong_name: CertFiles,
    pub expired: CertFiles,
    pub client: CertFiles,
    pub other_client: CertFiles,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::default();
    p.distinguished_name.remove(DnType::CommonName);
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "chat-writer tests");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("CA key")).expect("CA certificate")
}

impl Pki {
    /// A fresh PKI in a new directory under the system temp dir.
    pub fn new() -> Pki {
        sweep_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "cwt-tls-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let ca = new_ca("chat-writer test CA");
        let other = new_ca("chat-writer untrusted CA");
        write(&dir.join("ca.pem"), &ca.pem());
        write(&dir.join("other-ca.pem"), &other.pem());
        let names = ["127.0.0.1", "localhost"];
        let server = issue(&dir, "server", &ca, &names, Usage::Server, None);
        let untrusted = issue(&dir, "untrusted", &other, &names, Usage::Server, None);
        let wrong_name = issue(
            &dir,
            "wrong-name",
            &ca,
            &["wrong-host.invalid"],
            Usage::Server,
            None,
        );
        let expired = issue(
            &dir,
            "expired",
            &ca,
            &names,
            Usage::Server,
            Some((2020, 2021)),
        );
        let client = issue(&dir, "client", &ca, &[], Usage::Client, None);
        let other_client = issue(&dir, "other-client", &other, &[], Usage::Client, None);
        Pki {
            dir,
            ca,
            other,
            server,
            untrusted,
            wrong_name,
            expired,
            client,
            other_client,
        }
    }

    /// The trusted CA's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The untrusted CA's certificate (PEM).
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// Another certificate from the trusted CA, files `<name>.pem` and `<name>.key`.
    pub fn issue(&self, name: &str, sans: &[&str], usage: Usage) -> CertFiles {
        issue(&self.dir, name, &self.ca, sans, usage, None)
    }

    /// A file in the PKI directory with `content` (for NAME_FILE variables
    /// and bad input).
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.join(name);
        write(&p, content);
        p
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn issue(
    dir: &Path,
    name: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    usage: Usage,
    years: Option<(i32, i32)>,
) -> CertFiles {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("certificate names");
    p.distinguished_name.remove(DnType::CommonName);
    let cn = match usage {
        Usage::Server => sans.first().copied().unwrap_or(name),
        Usage::Client => "chat-writer",
    };
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    p.use_authority_key_identifier_extension = true;
    let (from, to) = years.unwrap_or((2000, 2100));
    p.not_before = rcgen::date_time_ymd(from, 1, 1);
    p.not_after = rcgen::date_time_ymd(to, 1, 1);
    let key = KeyPair::generate().expect("key pair");
    let cert = p.signed_by(&key, issuer).expect("sign certificate");
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    write(&files.cert, &cert.pem());
    write(&files.key, &key.serialize_pem());
    files
}

/// Removes `cwt-tls-<pid>-*` directories of test processes that are gone.
fn sweep_stale_dirs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("cwt-tls-") else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
}

/// A root store with the CA certificates of `ca_file`.
pub fn roots(ca_file: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_file)
        .unwrap_or_else(|e| panic!("read {}: {e:?}", ca_file.display()))
    {
        roots.add(c.expect("CA certificate")).expect("add CA");
    }
    roots
}

/// A rustls client configuration trusting `ca_file`, with a client
/// certificate when given (for the rig's self-checks).
pub fn client_config(ca_file: &Path, client: Option<&CertFiles>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots(ca_file));
    Arc::new(match client {
        Some(c) => b
            .with_client_auth_cert(c.certs(), c.private_key())
            .expect("client certificate"),
        None => b.with_no_client_auth(),
    })
}

/// A blocking TLS client connection to `addr` verified as `server_name`
/// (handshake done), or the error that ended the handshake.
pub fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca_file: &Path,
    client: Option<&CertFiles>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(client_config(ca_file, client), name)
        .map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    // TLS 1.3: a refused client certificate shows on the first read.
    Ok(s)
}

// ---------------------------------------------------------------- watcher

/// A shell loop that kills `pid` and removes `dir` once this test process
/// is gone (a test process killed before it could drop its servers). It
/// ends by itself when `pid` ends first.
fn watch(pid: u32, dir: &Path) -> Option<Child> {
    Command::new("sh")
        .args([
            "-c",
            "while kill -0 \"$1\" 2>/dev/null && kill -0 \"$2\" 2>/dev/null; do sleep 1; done; \
             if ! kill -0 \"$1\" 2>/dev/null; then kill -9 \"$2\" 2>/dev/null; rm -rf \"$3\"; fi",
            "cwt-tls-watch",
            &std::process::id().to_string(),
            &pid.to_string(),
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn wait_port(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {addr}; log {}:\n{}",
            log.display(),
            tail(log, 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- proxy

/// Credentials the HTTP proxy accepts (`Authorization` header values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EsAuth {
    /// `ApiKey <value>` accepted.
    pub api_keys: Vec<String>,
    /// `Basic base64(user:password)` accepted.
    pub basic: Vec<(String, String)>,
    /// `ApiKey <value>` known but not allowed: 403.
    pub forbidden_api_keys: Vec<String>,
    /// `ApiKey <value>` that may read but not write: requests are
    /// forwarded, except `_bulk`, answered 200 with every item refused
    /// (403 `security_exception`), as Elasticsearch answers a key without
    /// the `index` privilege on the index.
    pub read_only_api_keys: Vec<String>,
}

impl EsAuth {
    pub fn api_key(key: &str) -> EsAuth {
        EsAuth {
            api_keys: vec![key.to_string()],
            ..EsAuth::default()
        }
    }

    pub fn basic(user: &str, password: &str) -> EsAuth {
        EsAuth {
            basic: vec![(user.to_string(), password.to_string())],
            ..EsAuth::default()
        }
    }

    /// 200 (forward), 401 or 403 for an `Authorization` header value.
    fn verdict(&self, header: Option<&str>) -> u16 {
        let Some(h) = header else { return 401 };
        let h = h.trim();
        if let Some(k) = h.strip_prefix("ApiKey ") {
            if self.api_keys.iter().any(|a| a == k) || self.read_only(header) {
                return 200;
            }
            if self.forbidden_api_keys.iter().any(|a| a == k) {
                return 403;
            }
            return 401;
        }
        if let Some(b) = h.strip_prefix("Basic ") {
            if self
                .basic
                .iter()
                .any(|(u, p)| base64_encode(format!("{u}:{p}").as_bytes()) == b)
            {
                return 200;
            }
        }
        401
    }
}

impl EsAuth {
    /// Whether the header carries one of [`EsAuth::read_only_api_keys`].
    fn read_only(&self, header: Option<&str>) -> bool {
        header
            .and_then(|h| h.trim().strip_prefix("ApiKey "))
            .is_some_and(|k| self.read_only_api_keys.iter().any(|a| a == k))
    }
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct ProxyShared {
    upstream: SocketAddr,
    cert: Mutex<CertFiles>,
    client_ca: Mutex<Option<PathBuf>>,
    config: Mutex<Arc<ServerConfig>>,
    /// `Some` for the HTTP variant.
    auth: Option<Mutex<EsAuth>>,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Sockets (client side, and upstream once connected) of live connections.
    live: Mutex<Vec<(u64, TcpStream)>>,
    accepted: AtomicUsize,
    handshakes: AtomicUsize,
    handshake_errors: Mutex<Vec<String>>,
    forwarded: AtomicUsize,
    refused_401: AtomicUsize,
    refused_403: AtomicUsize,
    /// `_bulk` items answered 403 for a read-only key.
    items_refused: AtomicUsize,
    auth_seen: Mutex<Vec<String>>,
}

impl ProxyShared {
    fn rebuild(&self) {
        let cert = self.cert.lock().unwrap().clone();
        let ca = self.client_ca.lock().unwrap().clone();
        *self.config.lock().unwrap() = Arc::new(server_config(&cert, ca.as_deref()));
    }

    fn track(&self, id: u64, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            self.live.lock().unwrap().push((id, c));
        }
    }

    fn untrack(&self, id: u64) {
        let mut live = self.live.lock().unwrap();
        for (_, s) in live.iter().filter(|(i, _)| *i == id) {
            let _ = s.shutdown(Shutdown::Both);
        }
        live.retain(|(i, _)| *i != id);
    }
}

/// A rustls server configuration (ring provider) presenting `cert`;
/// requiring a client certificate issued by `client_ca` when given.
pub fn server_config(cert: &CertFiles, client_ca: Option<&Path>) -> ServerConfig {
    let b = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let b = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)),
                provider(),
            )
            .build()
            .expect("client verifier");
            b.with_client_cert_verifier(verifier)
        }
        None => b.with_no_client_auth(),
    };
    b.with_single_cert(cert.certs(), cert.private_key())
        .expect("server certificate")
}

/// A TLS-terminating proxy on 127.0.0.1 in front of a plain server.
pub struct TlsProxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl TlsProxy {
    /// A TCP proxy: TLS on the outside, the bytes as they are to `upstream`.
    pub fn start(upstream: SocketAddr, cert: &CertFiles) -> TlsProxy {
        Self::spawn(upstream, cert, None)
    }

    /// An HTTP proxy: each request's `Authorization` is checked against
    /// `auth` before it goes to `upstream`; one request per connection.
    pub fn start_http(upstream: SocketAddr, cert: &CertFiles, auth: EsAuth) -> TlsProxy {
        Self::spawn(upstream, cert, Some(auth))
    }

    fn spawn(upstream: SocketAddr, cert: &CertFiles, auth: Option<EsAuth>) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind TLS proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(ProxyShared {
            upstream,
            cert: Mutex::new(cert.clone()),
            client_ca: Mutex::new(None),
            config: Mutex::new(Arc::new(server_config(cert, None))),
            auth: auth.map(Mutex::new),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            live: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            handshake_errors: Mutex::new(Vec::new()),
            forwarded: AtomicUsize::new(0),
            refused_401: AtomicUsize::new(0),
            refused_403: AtomicUsize::new(0),
            items_refused: AtomicUsize::new(0),
            auth_seen: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("tls-proxy-{port}"))
            .spawn(move || accept_loop(listener, sh))
            .expect("spawn proxy thread");
        TlsProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Presents `cert` to new connections from now on (same address).
    pub fn set_cert(&self, cert: &CertFiles) {
        *self.shared.cert.lock().unwrap() = cert.clone();
        self.shared.rebuild();
    }

    /// New connections must present a client certificate issued by
    /// `ca_file` (`None`: no client certificate asked for).
    pub fn require_client_cert(&self, ca_file: Option<&Path>) {
        *self.shared.client_ca.lock().unwrap() = ca_file.map(Path::to_path_buf);
        self.shared.rebuild();
    }

    /// The credentials the HTTP variant accepts from now on.
    pub fn set_auth(&self, auth: EsAuth) {
        *self
            .shared
            .auth
            .as_ref()
            .expect("set_auth on a TCP proxy")
            .lock()
            .unwrap() = auth;
    }

    /// Closes every live connection (both sides, no TLS close_notify: a
    /// dropped connection). Returns how many.
    pub fn close_connections(&self) -> usize {
        let live = std::mem::take(&mut *self.shared.live.lock().unwrap());
        let mut ids: Vec<u64> = live.iter().map(|(i, _)| *i).collect();
        for (_, s) in &live {
            let _ = s.shutdown(Shutdown::Both);
        }
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        let mut ids: Vec<u64> = self
            .shared
            .live
            .lock()
            .unwrap()
            .iter()
            .map(|(i, _)| *i)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Completed TLS handshakes so far.
    pub fn handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::SeqCst)
    }

    /// Why handshakes failed, in order (e.g. `received fatal alert: UnknownCA`).
    pub fn handshake_errors(&self) -> Vec<String> {
        self.shared.handshake_errors.lock().unwrap().clone()
    }

    /// HTTP requests forwarded, refused with 401, refused with 403.
    pub fn requests(&self) -> (usize, usize, usize) {
        (
            self.shared.forwarded.load(Ordering::SeqCst),
            self.shared.refused_401.load(Ordering::SeqCst),
            self.shared.refused_403.load(Ordering::SeqCst),
        )
    }

    /// `_bulk` items answered 403 because the key may only read.
    pub fn items_refused(&self) -> usize {
        self.shared.items_refused.load(Ordering::SeqCst)
    }

    /// Distinct `Authorization` values received (`<none>` for none).
    pub fn auth_seen(&self) -> Vec<String> {
        self.shared.auth_seen.lock().unwrap().clone()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.close_connections();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<ProxyShared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
                sh.track(id, &client);
                let config = sh.config.lock().unwrap().clone();
                let sh = sh.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("tls-conn-{id}"))
                    .spawn(move || {
                        smol::block_on(serve(client, id, config, &sh));
                        sh.untrack(id);
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

async fn serve(client: TcpStream, id: u64, config: Arc<ServerConfig>, sh: &ProxyShared) {
    let Ok(io) = Async::new(client) else { return };
    let accept = async { Some(futures_rustls::TlsAcceptor::from(config).accept(io).await) };
    let timeout = async {
        smol::Timer::after(Duration::from_secs(10)).await;
        None
    };
    let tls = match smol::future::or(accept, timeout).await {
        Some(Ok(tls)) => tls,
        Some(Err(e)) => {
            sh.handshake_errors.lock().unwrap().push(e.to_string());
            return;
        }
        None => {
            sh.handshake_errors
                .lock()
                .unwrap()
                .push("handshake timed out".to_string());
            return;
        }
    };
    sh.handshakes.fetch_add(1, Ordering::SeqCst);
    let Ok(up) = Async::<TcpStream>::connect(sh.upstream).await else {
        return;
    };
    let _ = up.get_ref().set_nodelay(true);
    {
        let mut live = sh.live.lock().unwrap();
        if live.iter().all(|(i, _)| *i != id) || sh.stop.load(Ordering::SeqCst) {
            // closed while connecting
            return;
        }
        if let Ok(c) = up.get_ref().try_clone() {
            live.push((id, c));
        }
    }
    match &sh.auth {
        None => {
            let (r, w) = smol::io::split(tls);
            smol::future::or(pump(r, &up), pump(&up, w)).await;
        }
        Some(auth) => http_exchange(tls, &up, auth, sh).await,
    }
}

/// Copies `r` to `w` (flushing each chunk) until EOF or an error.
async fn pump<R: smol::io::AsyncRead + Unpin, W: smol::io::AsyncWrite + Unpin>(mut r: R, mut w: W) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
            break;
        }
    }
    let _ = w.close().await;
}

/// The header block of an HTTP message, up to and including the empty line.
async fn read_head<R: smol::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<String>> {
    let mut lines = Vec::new();
    let mut size = 0;
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).await.ok()?;
        size += n;
        if n == 0 || size > 64 * 1024 {
            return None;
        }
        let line = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if line.is_empty() {
            return Some(lines);
        }
        lines.push(line);
    }
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// The head again, `Connection: close` instead of any `Connection` header.
fn with_close(lines: &[String]) -> String {
    let mut out = String::new();
    for l in lines {
        let is_conn = l
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"));
        if !is_conn {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// One HTTP request: refused (401/403) or sent to `up` with its body, the
/// response relayed; then the connection closes.
async fn http_exchange(
    tls: futures_rustls::server::TlsStream<Async<TcpStream>>,
    up: &Async<TcpStream>,
    auth: &Mutex<EsAuth>,
    sh: &ProxyShared,
) {
    let (r, mut w) = smol::io::split(tls);
    let mut r = smol::io::BufReader::new(r);
    let Some(head) = read_head(&mut r).await else {
        return;
    };
    let authz = header(&head, "authorization").map(str::to_string);
    {
        let seen = authz.clone().unwrap_or_else(|| "<none>".to_string());
        let mut s = sh.auth_seen.lock().unwrap();
        if !s.contains(&seen) {
            s.push(seen);
        }
    }
    let (verdict, read_only) = {
        let a = auth.lock().unwrap();
        (a.verdict(authz.as_deref()), a.read_only(authz.as_deref()))
    };
    let path = head[0].split(' ').nth(1).unwrap_or("/").to_string();
    if verdict == 200 && read_only && path.split('?').next().unwrap_or("").ends_with("/_bulk") {
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        let _ = r.read_exact(&mut body).await;
        let body = bulk_items_refused(&body);
        sh.items_refused
            .fetch_add(body.matches("\"status\":403").count(), Ordering::SeqCst);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = w.write_all(resp.as_bytes()).await;
        let _ = w.flush().await;
        let _ = w.close().await;
        return;
    }
    if verdict != 200 {
        // Read the body first, so closing does not reset the connection
        // before the client has read the answer.
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        let _ = r.read_exact(&mut body).await;
        let (status, text) = if verdict == 403 {
            sh.refused_403.fetch_add(1, Ordering::SeqCst);
            (403, "Forbidden")
        } else {
            sh.refused_401.fetch_add(1, Ordering::SeqCst);
            (401, "Unauthorized")
        };
        let body = es_error_body(status, authz.as_deref(), &path);
        let resp = format!(
            "HTTP/1.1 {status} {text}\r\nContent-Type: application/json\r\n\
             WWW-Authenticate: Basic realm=\"security\", charset=\"UTF-8\"\r\n\
             WWW-Authenticate: ApiKey\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = w.write_all(resp.as_bytes()).await;
        let _ = w.flush().await;
        let _ = w.close().await;
        return;
    }
    sh.forwarded.fetch_add(1, Ordering::SeqCst);
    let mut upw = up;
    if upw.write_all(with_close(&head).as_bytes()).await.is_err() {
        return;
    }
    // The body (whatever its framing) goes on while the response comes
    // back; the upstream closes after its response.
    let request_body = pump_open(r, up);
    let response = async {
        let mut ur = smol::io::BufReader::new(up);
        if let Some(h) = read_head(&mut ur).await {
            if w.write_all(with_close(&h).as_bytes()).await.is_ok() {
                let _ = smol::io::copy(ur, &mut w).await;
            }
        }
        let _ = w.flush().await;
        let _ = w.close().await;
    };
    smol::future::or(response, async {
        request_body.await;
        smol::future::pending::<()>().await
    })
    .await;
}

/// Like [`pump`] without closing the writer at the end.
async fn pump_open<R: smol::io::AsyncRead + Unpin>(mut r: R, mut w: &Async<TcpStream>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// The `_bulk` answer of Elasticsearch 8 to a key without the `index`
/// privilege: 200, `"errors":true`, each item 403 `security_exception`.
fn bulk_items_refused(ndjson: &[u8]) -> String {
    let text = String::from_utf8_lossy(ndjson);
    let items: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let id = v.get("index")?.get("_id")?.as_str()?.to_string();
            Some(serde_json::json!({"index": {"_index": "messages", "_id": id, "status": 403,
                "error": {"type": "security_exception",
                          "reason": "action [indices:data/write/bulk[s]] is unauthorized for API key id [chat-writer-test] of user [chat_writer] on indices [messages], this action is granted by the index privileges [create_doc,create,index,write,all]"}}})
            .to_string())
        })
        .collect();
    format!(
        r#"{{"errors":true,"took":1,"items":[{}]}}"#,
        items.join(",")
    )
}

/// The error body Elasticsearch answers with when security refuses a request.
pub fn es_error_body(status: u16, authz: Option<&str>, path: &str) -> String {
    let reason = match (status, authz) {
        (403, _) => format!(
            "action [{path}] is unauthorized for API key id [chat-writer-test] of user [chat_writer]"
        ),
        (_, None) => format!(
            "missing authentication credentials for REST request [{path}]"
        ),
        (_, Some(a)) if a.starts_with("ApiKey ") => {
            "unable to authenticate with provided credentials and anonymous access is not allowed for this request".to_string()
        }
        _ => "unable to authenticate user [chat_writer] for REST request".to_string(),
    };
    let reason = serde_json_escape(&reason);
    let header = if status == 401 {
        r#","header":{"WWW-Authenticate":["Basic realm=\"security\", charset=\"UTF-8\"","ApiKey"]}"#
    } else {
        ""
    };
    format!(
        r#"{{"error":{{"root_cause":[{{"type":"security_exception","reason":"{reason}"{header}}}],"type":"security_exception","reason":"{reason}"{header}}},"status":{status}}}"#
    )
}

fn serde_json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

// ---------------------------------------------------------------- redis

/// A private `redis-server` with TLS only on TCP (`--port 0 --tls-port P`),
/// plus a unix socket for the test itself; no persistence.
pub struct RedisTls {
    pub tls_port: u16,
    pub socket: PathBuf,
    dir: PathBuf,
    cert_dir: PathBuf,
    auth_clients: String,
    log: PathBuf,
    child: Option<Child>,
    watcher: Option<Child>,
    starts: usize,
}

impl RedisTls {
    /// Starts it on 127.0.0.1:`tls_port` presenting `cert`, clients checked
    /// against `ca_file`; `auth_clients` is `no`, `optional` or `yes`. Lives
    /// in `<pki dir>/redis-<port>`.
    pub fn start(
        pki: &Pki,
        tls_port: u16,
        cert: &CertFiles,
        ca_file: &Path,
        auth_clients: &str,
    ) -> RedisTls {
        let dir = pki.dir.join(format!("redis-{tls_port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let cert_dir = dir.clone();
        install_cert(&cert_dir, cert, Some(ca_file));
        let mut r = RedisTls {
            tls_port,
            socket: dir.join("redis.sock"),
            log: dir.join("redis.log"),
            dir,
            cert_dir,
            auth_clients: auth_clients.to_string(),
            child: None,
            watcher: None,
            starts: 0,
        };
        r.spawn();
        r.watcher = watch(r.pid(), &pki.dir);
        r
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn spawn(&mut self) {
        let d = &self.cert_dir;
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("redis log");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &self.tls_port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--unixsocket", &s(self.socket.clone())])
            .args(["--unixsocketperm", "700"])
            .args(["--tls-cert-file", &s(d.join("server-cert.pem"))])
            .args(["--tls-key-file", &s(d.join("server-key.pem"))])
            .args(["--tls-ca-cert-file", &s(d.join("ca.pem"))])
            .args(["--tls-auth-clients", &self.auth_clients])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "redis-server exited ({st}); log {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start; log:\n{}",
                tail(&self.log, 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_port(self.addr(), "redis-server (TLS)", &self.log);
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tls_port))
    }

    /// `rediss://<host>:<port>/<db>` for the writer.
    pub fn url(&self, host: &str, db: u8) -> String {
        format!("rediss://{host}:{}/{db}", self.tls_port)
    }

    /// The test's own plain connection (unix socket).
    pub fn socket_url(&self, db: u8) -> String {
        format!("redis+unix://{}?db={db}", self.socket.display())
    }

    /// One command over the unix socket, the raw RESP reply.
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = UnixStream::connect(&self.socket).expect("redis socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).expect("redis write");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("redis read");
        line.trim_end().to_string()
    }

    /// Presents `cert` to new connections from now on (CONFIG SET, the
    /// process and its data stay).
    pub fn set_cert(&self, cert: &CertFiles) {
        let d = &self.cert_dir;
        install_cert(d, cert, None);
        let reply = self.command(&[
            "CONFIG",
            "SET",
            "tls-cert-file",
            &d.join("server-cert.pem").to_string_lossy(),
            "tls-key-file",
            &d.join("server-key.pem").to_string_lossy(),
        ]);
        assert_eq!(reply, "+OK", "CONFIG SET tls-cert-file");
    }

    /// Stops and starts it again on the same port with `cert` (empty: no
    /// persistence).
    pub fn restart(&mut self, cert: &CertFiles) {
        stop_child(&mut self.child);
        stop_child(&mut self.watcher);
        install_cert(&self.cert_dir, cert, None);
        let _ = std::fs::remove_file(&self.socket);
        self.spawn();
        let pki_dir = self.dir.parent().expect("pki dir").to_path_buf();
        self.watcher = watch(self.pid(), &pki_dir);
    }
}

/// Copies `cert` (and the CA) to the fixed file names a server was started with.
fn install_cert(dir: &Path, cert: &CertFiles, ca_file: Option<&Path>) {
    let copy = |from: &Path, to: &str| {
        std::fs::copy(from, dir.join(to))
            .unwrap_or_else(|e| panic!("copy {} to {to}: {e}", from.display()));
    };
    copy(&cert.cert, "server-cert.pem");
    copy(&cert.key, "server-key.pem");
    if let Some(ca) = ca_file {
        copy(ca, "ca.pem");
    }
}

impl Drop for RedisTls {
    fn drop(&mut self) {
        stop_child(&mut self.child);
        stop_child(&mut self.watcher);
        if std::thread::panicking() {
            eprintln!(
                "redis-server (TLS port {}) log:\n{}",
                self.tls_port,
                tail(&self.log, 20)
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- mariadb

/// A private MariaDB server that accepts TCP only over TLS
/// (`--require-secure-transport=ON`): `root` from 127.0.0.1 with
/// [`MariaDb::password`]; the unix socket (`root`, no password) for the
/// test's own statements.
pub struct MariaDb {
    pub port: u16,
    pub socket: PathBuf,
    pub password: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    watcher: Option<Child>,
}

impl MariaDb {
    /// Initialises a data directory in `<pki dir>/mariadb-<port>` and starts
    /// the server on 127.0.0.1:`port` presenting `cert` (client
    /// certificates checked against `ca_file` when a user requires one).
    pub fn start(pki: &Pki, port: u16, cert: &CertFiles, ca_file: &Path) -> MariaDb {
        let dir = pki.dir.join(format!("mariadb-{port}"));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).expect("mariadb dir");
        install_cert(&dir, cert, Some(ca_file));
        let log = dir.join("mariadb.log");
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--innodb-log-file-size=8M",
            ])
            .args(user_arg())
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb-install-db (apt-get install mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.join("mysqld.sock");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .args(user_arg())
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", log.display()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--innodb-log-file-size=8M",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=2",
                "--require-secure-transport=ON",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_general_ci",
            ])
            .arg(format!(
                "--ssl-cert={}",
                dir.join("server-cert.pem").display()
            ))
            .arg(format!(
                "--ssl-key={}",
                dir.join("server-key.pem").display()
            ))
            .arg(format!("--ssl-ca={}", dir.join("ca.pem").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let watcher = watch(child.id(), &pki.dir);
        let mut m = MariaDb {
            port,
            socket,
            password: "tls-secret".to_string(),
            dir,
            log,
            child: Some(child),
            watcher,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while m.sql("SELECT 1").is_err() {
            if let Some(st) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mariadbd exited ({st}):\n{}", tail(&m.log, 30));
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start within 30 s:\n{}",
                tail(&m.log, 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let pw = m.password.clone();
        m.sql(&format!(
            "ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '{pw}'; \
             GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION"
        ))
        .unwrap_or_else(|e| panic!("set up root@127.0.0.1: {e}"));
        m
    }

    /// Runs `sql` with the `mariadb` client over the unix socket; stdout
    /// (tab separated, no headers) or stderr.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "--batch", "--skip-column-names", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run mariadb: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `mariadb` over TCP to 127.0.0.1 as root with the password, with
    /// `args` (e.g. `--skip-ssl`, or `--ssl-ca=… --ssl-verify-server-cert`).
    pub fn tcp_sql(&self, args: &[&str], sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .args(["-h127.0.0.1", &format!("-P{}", self.port), "-uroot"])
            .arg(format!("-p{}", self.password))
            .args(args)
            .args(["--batch", "--skip-column-names", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run mariadb: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A mysql_async URL over the unix socket (the test's own reads).
    pub fn socket_url(&self, db: &str) -> String {
        format!(
            "mysql://root@localhost/{db}?socket={}",
            self.socket.display()
        )
    }

    /// Presents `cert` to new connections from now on (`FLUSH SSL`).
    pub fn set_cert(&self, cert: &CertFiles) {
        install_cert(&self.dir, cert, None);
        self.sql("FLUSH SSL")
            .unwrap_or_else(|e| panic!("FLUSH SSL: {e}"));
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "mariadbd (port {}) log:\n{}",
                self.port,
                tail(&self.log, 20)
            );
        }
        stop_child(&mut self.child);
        stop_child(&mut self.watcher);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `--user=root` when running as root (mariadbd refuses root otherwise).
fn user_arg() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if root {
        vec!["--user=root".to_string()]
    } else {
        Vec::new()
    }
}

/// Reads what the peer sends until `want` appears or `timeout`; `Err` with
/// what was read on EOF, an error or the timeout.
pub fn read_until_contains<R: Read>(r: &mut R, want: &[u8]) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if got.windows(want.len()).any(|w| w == want) {
            return Ok(got);
        }
        match r.read(&mut buf) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&got))),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&got))),
        }
    }
}
