//! Elasticsearch / OpenSearch: the HTTP client, the index and its mapping.
//!
//! ureq is a small blocking client; every request runs on smol's blocking
//! thread pool (`smol::unblock`) so the executor thread never waits on the
//! network (CONTRACT section 1). `encoder` turns rows into bulk lines,
//! `retry` classifies responses, `indexer` drains the internal index queue.

pub mod encoder;
pub mod indexer;
pub mod retry;

use retry::BulkVerdict;
use std::sync::Arc;
use std::time::Duration;

/// The index mapping of the seed (CONTRACT section 7).
pub const MAPPING: &str = r#"{"mappings":{"properties":{"token":{"type":"keyword"},"chat_number":{"type":"integer"},"number":{"type":"integer"},"body":{"type":"text"},"created_at":{"type":"date"}}}}"#;

/// A client for one index at one base URL. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: Arc<str>,
    index: Arc<str>,
}

impl Client {
    /// `base` like `http://127.0.0.1:9200` (no trailing slash), `index` the
    /// index or alias name. Requests time out after 60 s.
    pub fn new(base: &str, index: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        Client {
            agent,
            base: base.into(),
            index: index.into(),
        }
    }

    /// The index name.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// Creates the index with [`MAPPING`] if it does not exist.
    ///
    /// Returns `true` if this call created it. Errors: a one-line reason
    /// (unreachable, unexpected status); the caller retries with backoff.
    pub async fn ensure_index(&self) -> Result<bool, String> {
        let this = self.clone();
        smol::unblock(move || {
            let url = format!("{}/{}", this.base, this.index);
            let head = this
                .agent
                .head(&url)
                .call()
                .map_err(|e| format!("HEAD {url}: {e}"))?;
            match head.status().as_u16() {
                200 => return Ok(false),
                404 => {}
                s => return Err(format!("HEAD {url}: HTTP {s}")),
            }
            let mut resp = this
                .agent
                .put(&url)
                .header("Content-Type", "application/json")
                .send(MAPPING)
                .map_err(|e| format!("PUT {url}: {e}"))?;
            let status = resp.status().as_u16();
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            match status {
                200 | 201 => Ok(true),
                400 if body.contains("resource_already_exists_exception") => Ok(false),
                s => Err(format!("PUT {url}: HTTP {s}: {}", body.replace('\n', " "))),
            }
        })
        .await
    }

    /// Sends `body` (NDJSON holding `docs` documents) to `/<index>/_bulk`
    /// and classifies the answer. Returns the body buffer for reuse.
    pub async fn bulk(&self, body: Vec<u8>, docs: usize) -> (Vec<u8>, BulkVerdict) {
        let this = self.clone();
        smol::unblock(move || {
            let url = format!("{}/{}/_bulk", this.base, this.index);
            let verdict = match this
                .agent
                .post(&url)
                .header("Content-Type", "application/x-ndjson")
                .send(&body[..])
            {
                Err(e) => BulkVerdict::RetryAll(format!("POST {url}: {e}")),
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    match resp.body_mut().with_config().limit(256 << 20).read_to_vec() {
                        Ok(text) => retry::classify(status, &text, docs),
                        Err(e) => BulkVerdict::RetryAll(format!("reading bulk response: {e}")),
                    }
                }
            };
            (body, verdict)
        })
        .await
    }
}
