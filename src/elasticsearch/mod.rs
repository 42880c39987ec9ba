//! Elasticsearch / OpenSearch: the HTTP client, the index and its mapping.
//!
//! ureq is a small blocking client; every request runs on smol's blocking
//! thread pool (`smol::unblock`) so the executor thread never waits on the
//! network (CONTRACT section 1). `encoder` turns rows into bulk lines,
//! `retry` classifies responses, `indexer` drains the internal index queue.

pub mod backfill;
pub mod encoder;
pub mod indexer;
pub mod retry;
pub mod watch;

use retry::BulkVerdict;
use std::sync::Arc;
use std::time::Duration;

/// The field mapping of the seed (CONTRACT section 7).
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
            let result = match (method, body) {
                ("PUT", Some(b)) => this
                    .agent
                    .put(&url)
                    .header("Content-Type", "application/json")
                    .send(b.as_bytes()),
                ("DELETE", _) => this.agent.delete(&url).call(),
                _ => this.agent.get(&url).call(),
            };
            let mut resp = result.map_err(|e| format!("{method} {url}: {e}"))?;
            let status = resp.status().as_u16();
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

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ").chars().take(300).collect()
}
