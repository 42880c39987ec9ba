//! Elasticsearch / OpenSearch: the HTTP client, the index and its mapping.
//!
//! ureq is a small blocking client; every request runs on smol's blocking
//! thread pool (`smol::unblock`) so the executor thread never waits on the
//! network (README, "Running it"). `encoder` turns rows into bulk lines,
//! `retry` classifies responses, `indexer` drains the internal index queue.

pub mod backfill;
pub mod encoder;
pub mod indexer;
pub mod retry;
pub mod watch;

use retry::BulkVerdict;
use std::sync::Arc;
use std::time::Duration;

/// The field mapping (docs/elasticsearch.md).
pub const PROPERTIES: &str = r#"{"token":{"type":"keyword"},"chat_number":{"type":"integer"},"number":{"type":"integer"},"body":{"type":"text"},"created_at":{"type":"date"}}"#;

/// The `_meta.chat_writer` object of an index whose backfill is not done:
/// `backfilled` turns true once every message row has been queued for
/// indexing into it (see `backfill`), so an index created while a backfill
/// could not finish is backfilled on a later check, by this process or the
/// next. `backfill_claimed_us` (microseconds since the epoch) says a writer
/// has requested the backfill and is working on it: it is set when the
/// index is created and refreshed while the backfill runs, so other
/// replicas do not request one of their own while it is recent (`watch`).
fn pending_meta(claimed_us: i64) -> String {
    format!(r#"{{"chat_writer":{{"backfilled":false,"backfill_claimed_us":{claimed_us}}}}}"#)
}

/// The body that creates the index: [`PROPERTIES`] and a pending
/// `_meta` claimed at `claimed_us`.
pub fn create_body(claimed_us: i64) -> String {
    format!(
        r#"{{"mappings":{{"_meta":{},"properties":{PROPERTIES}}}}}"#,
        pending_meta(claimed_us)
    )
}

/// What the mapping of the index says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexState {
    /// `token` is a `keyword` in every index behind the name (the
    /// contract's mapping).
    pub ours: bool,
    /// The mapping is what a `_bulk` of our documents makes Elasticsearch
    /// auto-create (`token` as `text` with a `keyword` sub-field) and has no
    /// marker: the index was created by a write racing its deletion.
    pub auto_created: bool,
    /// The `_meta.chat_writer.backfilled` marker, if the index has one.
    pub backfilled: Option<bool>,
    /// `_meta.chat_writer.backfill_claimed_us`: when a writer last said it
    /// works on this index's backfill (microseconds since the epoch).
    pub backfill_claimed_us: Option<i64>,
}

/// A client for one index at one base URL. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: Arc<str>,
    index: Arc<str>,
    auth: Arc<Auth>,
}

/// The `Authorization` header value: `ApiKey <key>`, with the file to read
/// it from again after a 401 or 403 (ELASTICSEARCH_API_KEY_FILE), or
/// `Basic <base64(user:password)>` from the base URL's user info.
struct Auth {
    header: std::sync::Mutex<Option<String>>,
    file: Option<std::path::PathBuf>,
}

impl Auth {
    fn header(&self) -> Option<String> {
        self.header.lock().map(|h| h.clone()).unwrap_or(None)
    }

    /// After a refusal: reads the key file again and uses its key if it
    /// changed (a rotated secret). Blocking; runs on the blocking pool.
    fn reload(&self) {
        let Some(file) = &self.file else { return };
        let read = crate::config::read_capped(file, crate::config::MAX_VALUE_FILE)
            .and_then(|b| String::from_utf8(b).map_err(|_| "not UTF-8".to_string()));
        let key = match read {
            Ok(text) => text
                .strip_suffix('\n')
                .unwrap_or(&text)
                .trim_end_matches('\r')
                .to_string(),
            Err(e) => {
                log::warn!(
                    "elasticsearch: cannot read ELASTICSEARCH_API_KEY_FILE {}: {e}",
                    file.display()
                );
                return;
            }
        };
        // The check made at start: a value that cannot be sent as a header
        // would stop every request (and so every later 401 that brings the
        // writer back here); keep the old key and read the file again at
        // the next refusal.
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            log::warn!(
                "elasticsearch: ELASTICSEARCH_API_KEY_FILE {} holds no usable key (empty, or not printable ASCII); keeping the previous one",
                file.display()
            );
            return;
        }
        let header = format!("ApiKey {key}");
        if let Ok(mut h) = self.header.lock() {
            if h.as_deref() != Some(header.as_str()) && !key.is_empty() {
                log::info!(
                    "elasticsearch: ELASTICSEARCH_API_KEY_FILE {} holds a new key; using it",
                    file.display()
                );
                *h = Some(header);
            }
        }
    }
}

/// The ureq agent for the search server: statuses as values (not errors),
/// `timeout` for a whole request, 5 s to connect, and for `https://` the
/// trust, client certificate and verification switch of `tls`
/// (ELASTICSEARCH_TLS_*).
pub fn agent(tls: &crate::tls::Settings, timeout: Duration) -> ureq::Agent {
    let builder = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(Duration::from_secs(5)).filter(|c| *c < timeout));
    #[cfg(feature = "tls")]
    let builder = builder.tls_config(tls_config(tls));
    #[cfg(not(feature = "tls"))]
    let _ = tls;
    builder.build().new_agent()
}

/// ureq's TLS configuration for `s`: rustls with the writer's provider;
/// the public roots (ureq's own) or, with a CA bundle, the public roots
/// (borrowed from the binary) and the bundle as one list (ureq takes a
/// list instead of adding to its roots). The files were checked at start.
#[cfg(feature = "tls")]
fn tls_config(s: &crate::tls::Settings) -> ureq::tls::TlsConfig {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
    let mut b = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .disable_verification(s.insecure);
    if let Some(ca) = &s.ca {
        // The public roots stay where the binary has them; only the
        // bundle's certificates are copied.
        let mut certs: Vec<Certificate<'static>> = crate::tls::public_root_certificates()
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()))
            .collect();
        let extra = crate::tls::certificates(&ca.pem).unwrap_or_default();
        certs.extend(
            extra
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
        );
        b = b.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let Some((cert, key)) = &s.identity {
        let chain: Vec<Certificate<'static>> = crate::tls::certificates(&cert.pem)
            .unwrap_or_default()
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        if let Ok(key) = PrivateKey::from_pem(&key.pem) {
            b = b.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
    }
    b.build()
}

impl Client {
    /// `base` like `http://127.0.0.1:9200` (no trailing slash), `index` the
    /// index or alias name; plain HTTP (or `https://` with the public
    /// roots), no API key. Requests time out after 60 s.
    pub fn new(base: &str, index: &str) -> Client {
        Client::with(
            base,
            index,
            &crate::tls::Settings::default(),
            None,
            REQUEST_TIMEOUT,
        )
    }

    /// The writer's client: [`Client::new`] with the TLS settings of
    /// ELASTICSEARCH_TLS_*, the API key of ELASTICSEARCH_API_KEY (or its
    /// file, read again after a 401 or 403), and `timeout` per request.
    pub fn with(
        base: &str,
        index: &str,
        tls: &crate::tls::Settings,
        api_key: Option<&crate::config::ApiKey>,
        timeout: Duration,
    ) -> Client {
        // User info is taken off the URL and sent as Basic by the client
        // itself, percent-decoded (ureq would encode `p%40ss` as it is);
        // an API key, when set, is sent instead.
        let (base, basic) = split_user_info(base);
        let header = match api_key {
            Some(k) => Some(format!("ApiKey {}", k.value)),
            None => basic,
        };
        Client {
            agent: agent(tls, timeout),
            base: base.into(),
            index: index.into(),
            auth: Arc::new(Auth {
                header: std::sync::Mutex::new(header),
                file: api_key.and_then(|k| k.file.clone()),
            }),
        }
    }

    /// The writer's client for `cfg` (`None` when indexing is off), with
    /// requests timing out after 60 s.
    pub fn from_config(cfg: &crate::config::Config) -> Option<Client> {
        let base = cfg.elasticsearch_url.as_deref()?;
        Some(Client::with(
            base,
            &cfg.elasticsearch_index,
            &cfg.tls.elasticsearch,
            cfg.elasticsearch_api_key.as_ref(),
            REQUEST_TIMEOUT,
        ))
    }

    /// `GET /<index>/_mapping`, a request the writer needs the rights for
    /// anyway (`GET /` needs cluster privileges an API key scoped to the
    /// index does not have): `Ok` when the server answers 2xx, or 404 (no
    /// index yet).
    ///
    /// Errors, as one line: `"<status> <type>: <reason>"` for another
    /// answer (401 and 403 also make the client read its key file again),
    /// or the transport's error (a TLS failure names its reason).
    pub async fn ping(&self) -> Result<(), (Option<u16>, String)> {
        let this = self.clone();
        smol::unblock(move || {
            let url = format!("{}/{}/_mapping", this.base, this.index);
            let mut req = this.agent.get(&url);
            if let Some(h) = this.auth.header() {
                req = req.header("Authorization", h);
            }
            let mut resp = req.call().map_err(|e| {
                (
                    None,
                    format!("GET {}: {e}", crate::config::redact_url(&url)),
                )
            })?;
            let status = resp.status().as_u16();
            if (200..300).contains(&status) || status == 404 {
                return Ok(());
            }
            let text = resp
                .body_mut()
                .with_config()
                .limit(64 << 10)
                .read_to_vec()
                .unwrap_or_default();
            this.refused(status);
            Err((Some(status), answer_line(status, &text)))
        })
        .await
    }

    /// After a 401 or 403: the key file is read again.
    fn refused(&self, status: u16) {
        if matches!(status, 401 | 403) {
            self.auth.reload();
        }
    }

    /// The index name.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// Runs a blocking request on smol's blocking pool: `(status, body)`.
    async fn request(
        &self,
        method: &'static str,
        path: String,
        body: Option<String>,
    ) -> Result<(u16, String), String> {
        let this = self.clone();
        smol::unblock(move || {
            let url = format!("{}/{}{path}", this.base, this.index);
            let auth = this.auth.header();
            let result = match (method, body) {
                ("PUT", Some(b)) => {
                    let mut req = this
                        .agent
                        .put(&url)
                        .header("Content-Type", "application/json");
                    if let Some(h) = auth {
                        req = req.header("Authorization", h);
                    }
                    req.send(b.as_bytes())
                }
                ("DELETE", _) => {
                    let mut req = this.agent.delete(&url);
                    if let Some(h) = auth {
                        req = req.header("Authorization", h);
                    }
                    req.call()
                }
                _ => {
                    let mut req = this.agent.get(&url);
                    if let Some(h) = auth {
                        req = req.header("Authorization", h);
                    }
                    req.call()
                }
            };
            let mut resp =
                result.map_err(|e| format!("{method} {}: {e}", crate::config::redact_url(&url)))?;
            let status = resp.status().as_u16();
            this.refused(status);
            let text = resp
                .body_mut()
                .with_config()
                .limit(16 << 20)
                .read_to_string()
                .unwrap_or_default();
            Ok((status, text))
        })
        .await
    }

    /// The identity (`index.uuid`) of the index behind the name, `None`
    /// when it does not exist. For an alias over several indices, the first.
    ///
    /// Errors: unreachable, or an unexpected answer, as one line.
    pub async fn index_uuid(&self) -> Result<Option<String>, String> {
        let (status, text) = self
            .request(
                "GET",
                "/_settings/index.uuid?flat_settings=true".into(),
                None,
            )
            .await?;
        match status {
            404 => Ok(None),
            200 => {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("settings: {e}"))?;
                let uuid = v
                    .as_object()
                    .and_then(|o| o.values().next())
                    .and_then(|i| i.pointer("/settings/index.uuid"))
                    .and_then(|u| u.as_str())
                    .ok_or_else(|| format!("settings without index.uuid: {}", one_line(&text)))?;
                Ok(Some(uuid.to_string()))
            }
            s => Err(format!(
                "GET {}/_settings: HTTP {s}: {}",
                self.index,
                one_line(&text)
            )),
        }
    }

    /// Reads the mapping: whether it is ours, auto-created, backfilled.
    ///
    /// Errors: unreachable, or an unexpected answer.
    pub async fn inspect(&self) -> Result<IndexState, String> {
        let (status, text) = self.request("GET", "/_mapping".into(), None).await?;
        if status != 200 {
            return Err(format!(
                "GET {}/_mapping: HTTP {status}: {}",
                self.index,
                one_line(&text)
            ));
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("mapping: {e}"))?;
        let indices: Vec<&serde_json::Value> = v
            .as_object()
            .ok_or("mapping is not an object")?
            .values()
            .map(|i| &i["mappings"])
            .collect();
        let token_type = |m: &serde_json::Value| {
            m.pointer("/properties/token/type")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        };
        let backfilled = indices
            .first()
            .and_then(|m| m.pointer("/_meta/chat_writer/backfilled"))
            .and_then(|b| b.as_bool());
        let backfill_claimed_us = indices
            .first()
            .and_then(|m| m.pointer("/_meta/chat_writer/backfill_claimed_us"))
            .and_then(|b| b.as_i64());
        let ours = !indices.is_empty()
            && indices
                .iter()
                .all(|m| token_type(m).as_deref() == Some("keyword"));
        let auto_created = backfilled.is_none()
            && indices.len() == 1
            && token_type(indices[0]).as_deref() == Some("text")
            && indices[0]
                .pointer("/properties/token/fields/keyword")
                .is_some();
        Ok(IndexState {
            ours,
            auto_created,
            backfilled,
            backfill_claimed_us,
        })
    }

    /// Sets the `_meta.chat_writer.backfilled` marker to true.
    ///
    /// Errors: unreachable, or an unexpected answer.
    pub async fn mark_backfilled(&self) -> Result<(), String> {
        self.put_meta(r#"{"chat_writer":{"backfilled":true}}"#.to_string())
            .await
    }

    /// Sets `_meta.chat_writer` to "backfill pending, claimed now": done
    /// before requesting a backfill and repeated while it runs, so other
    /// replicas leave it to this one.
    ///
    /// Returns the claim written (microseconds since the epoch).
    /// Errors: unreachable, or an unexpected answer.
    pub async fn claim_backfill(&self) -> Result<i64, String> {
        let claimed_us = crate::time::now_micros();
        self.put_meta(pending_meta(claimed_us)).await?;
        Ok(claimed_us)
    }

    /// Replaces the index's `_meta` with `meta` (a JSON object).
    async fn put_meta(&self, meta: String) -> Result<(), String> {
        let body = format!(r#"{{"_meta":{meta}}}"#);
        let (status, text) = self.request("PUT", "/_mapping".into(), Some(body)).await?;
        match status {
            200 => Ok(()),
            s => Err(format!(
                "PUT {}/_mapping: HTTP {s}: {}",
                self.index,
                one_line(&text)
            )),
        }
    }

    /// Creates the index with the mapping ([`create_body`]), its backfill
    /// claimed by this writer. Returns `false` if it already existed
    /// (someone else won the race, and holds the claim).
    ///
    /// Errors: unreachable, or an unexpected answer.
    pub async fn create_index(&self) -> Result<bool, String> {
        let body = create_body(crate::time::now_micros());
        let (status, text) = self.request("PUT", String::new(), Some(body)).await?;
        match status {
            200 | 201 => Ok(true),
            400 if text.contains("resource_already_exists_exception") => Ok(false),
            s => Err(format!("PUT {}: HTTP {s}: {}", self.index, one_line(&text))),
        }
    }

    /// Deletes the index (used only for an index that was auto-created with
    /// a dynamic mapping by a write that raced its deletion).
    ///
    /// Errors: unreachable, or an unexpected answer.
    pub async fn delete_index(&self) -> Result<(), String> {
        let (status, text) = self.request("DELETE", String::new(), None).await?;
        match status {
            200 | 404 => Ok(()),
            s => Err(format!(
                "DELETE {}: HTTP {s}: {}",
                self.index,
                one_line(&text)
            )),
        }
    }

    /// Sends `body` (NDJSON holding `docs` documents) to `/<index>/_bulk`
    /// and classifies the answer. Returns the body buffer for reuse.
    pub async fn bulk(&self, body: Vec<u8>, docs: usize) -> (Vec<u8>, BulkVerdict) {
        let this = self.clone();
        smol::unblock(move || {
            let url = format!("{}/{}/_bulk", this.base, this.index);
            let mut req = this
                .agent
                .post(&url)
                .header("Content-Type", "application/x-ndjson");
            if let Some(h) = this.auth.header() {
                req = req.header("Authorization", h);
            }
            let verdict = match req.send(&body[..]) {
                Err(e) => {
                    BulkVerdict::RetryAll(format!("POST {}: {e}", crate::config::redact_url(&url)))
                }
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    match resp.body_mut().with_config().limit(256 << 20).read_to_vec() {
                        Ok(text) => retry::classify(status, &text, docs),
                        Err(e) => {
                            this.refused(status);
                            BulkVerdict::RetryAll(format!("reading bulk response: {e}"))
                        }
                    }
                }
            };
            // A 401 or 403, for the request or for one of its items: the
            // key file is read again.
            if verdict.refusal().is_some() {
                this.auth.reload();
            }
            (body, verdict)
        })
        .await
    }
}

/// `base` without the `user:password@` of its authority, and the
/// `Basic` header value for them, user and password percent-decoded
/// (`None` without user info).
fn split_user_info(base: &str) -> (String, Option<String>) {
    let start = base.find("://").map_or(0, |i| i + 3);
    let rest = &base[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return (base.to_string(), None);
    };
    let info = &authority[..at];
    let (user, password) = info.split_once(':').unwrap_or((info, ""));
    let mut credentials = percent_decode(user);
    credentials.push(b':');
    credentials.extend(percent_decode(password));
    let stripped = format!("{}{}", &base[..start], &rest[at + 1..]);
    (stripped, Some(format!("Basic {}", base64(&credentials))))
}

/// `%XX` sequences turned into their bytes; anything else (a `%` not
/// followed by two hex digits included) kept as it is.
fn percent_decode(s: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(s).collect()
}

/// Standard base64 with padding (the `Basic` scheme's encoding).
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// How long a request of the writer's client may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `"<status> <type>: <reason>"` of an error answer (Elasticsearch's
/// `{"error":{"type","reason"}}`), or the status and the start of the body.
fn answer_line(status: u16, body: &[u8]) -> String {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match v.as_ref().and_then(|v| v.get("error")) {
        Some(e) => {
            let (kind, reason) = retry::error_text(Some(e));
            one_line(&format!("{status} {kind}: {reason}"))
        }
        None => one_line(&format!("{status}: {}", String::from_utf8_lossy(body))),
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ").chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_taken_off_and_sent_percent_decoded() {
        assert_eq!(
            split_user_info("https://user:p%40ss@es.example:9200"),
            (
                "https://es.example:9200".to_string(),
                Some(format!("Basic {}", base64(b"user:p@ss")))
            )
        );
        assert_eq!(base64(b"user:p@ss"), "dXNlcjpwQHNz");
        assert_eq!(
            split_user_info("http://a%3Ab:%2F%zz%4@h/x"),
            (
                "http://h/x".to_string(),
                Some(format!("Basic {}", base64(b"a:b:/%zz%4")))
            )
        );
        assert_eq!(
            split_user_info("http://only-user@h:9200").1,
            Some(format!("Basic {}", base64(b"only-user:")))
        );
        assert_eq!(
            split_user_info("http://es:9200"),
            ("http://es:9200".to_string(), None)
        );
        for (raw, b64) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
        ] {
            assert_eq!(base64(raw), b64);
        }
    }
}
