//! The retry decision for `_bulk`, written as an explicit classification of
//! responses (README, "Failure semantics"; docs/elasticsearch.md).
//!
//! A bulk request can fail as a whole (transport error, 429, 5xx, index
//! missing) or answer 200 with `"errors": true` and a status per item. Items
//! are classified one by one: 2xx done; 409 (an equal or newer version is
//! already stored, `external_gte`) done; 429 and 5xx retried alone; a missing
//! index recreated then retried; 401 and 403 (the writer's credentials)
//! retried and reported as refusals; anything else (400 mapping error, …) is
//! refused for good and dead-lettered rather than retried forever.

use serde::Deserialize;

/// What to do with one document of a bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemVerdict {
    /// Stored, or superseded by a newer version (409).
    Done,
    /// Transient (429, 5xx): send this document again after a backoff.
    Retry(String),
    /// 401 or 403: the writer's credentials or their privileges (an API
    /// key without `index` on this index), never the document's fault:
    /// sent again after a backoff, once the key file is read again.
    Refused(String),
    /// The index does not exist: create it, then send again.
    IndexMissing,
    /// Refused for good (400 and other 4xx): dead-letter with the reason.
    Reject(String),
}

/// What to do with a whole bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkVerdict {
    /// Every item done (`"errors": false`).
    AllDone,
    /// Per-item verdicts, in request order.
    Items(Vec<ItemVerdict>),
    /// The request failed as a whole for a transient reason: send it all
    /// again after a backoff.
    RetryAll(String),
    /// The index is missing: create it, then send it all again.
    IndexMissing,
    /// The request was refused as a whole (400): dead-letter every item.
    RejectAll(String),
    /// 401 or 403 for the whole request: the writer's credentials, never
    /// the documents' fault; send it all again after a backoff, once the
    /// key file is read again.
    Refused(String),
    /// 413: the request is over the server's size limit; send it in
    /// smaller pieces (a single document that is still too large is refused).
    TooLarge,
}

#[derive(Deserialize)]
struct BulkHead {
    #[serde(default)]
    errors: bool,
}

#[derive(Deserialize)]
struct BulkBody {
    #[serde(default)]
    items: Vec<serde_json::Map<String, serde_json::Value>>,
}

pub(crate) fn error_text(v: Option<&serde_json::Value>) -> (String, String) {
    let Some(e) = v else {
        return (String::new(), String::new());
    };
    let kind = e
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    let reason = e
        .get("reason")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    (kind, reason)
}

fn item_verdict(status: u16, kind: &str, reason: &str) -> ItemVerdict {
    match status {
        200..=299 | 409 => ItemVerdict::Done,
        404 if kind == "index_not_found_exception" => ItemVerdict::IndexMissing,
        // 401/403: the credentials or their privileges (an API key without
        // `index` on this index, a read-only block), never the document's
        // fault.
        401 | 403 => ItemVerdict::Refused(one_line(&format!("{status} {kind}: {reason}"))),
        // 429 and 5xx pass.
        429 | 500..=599 => ItemVerdict::Retry(format!("{status} {kind}: {reason}")),
        _ => ItemVerdict::Reject(one_line(&format!("{status} {kind}: {reason}"))),
    }
}

impl BulkVerdict {
    /// The reason of the first 401 or 403 in this answer, for the whole
    /// request or for one of its items.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            BulkVerdict::Refused(r) => Some(r),
            BulkVerdict::Items(items) => items.iter().find_map(|i| match i {
                ItemVerdict::Refused(r) => Some(r.as_str()),
                _ => None,
            }),
            _ => None,
        }
    }
}

/// `s` on one line (a reason goes into a log line and an `x-error` header),
/// whole: a rejected document's reason is not cut.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Classifies an HTTP answer to `POST /<index>/_bulk` for `expected` items.
pub fn classify(status: u16, body: &[u8], expected: usize) -> BulkVerdict {
    let top_error = || -> (String, String) {
        let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        error_text(v.as_ref().and_then(|v| v.get("error")))
    };
    match status {
        200 => {}
        404 => {
            let (kind, reason) = top_error();
            return if kind == "index_not_found_exception" {
                BulkVerdict::IndexMissing
            } else {
                BulkVerdict::RetryAll(format!("404 {kind}: {reason}"))
            };
        }
        413 => return BulkVerdict::TooLarge,
        400 => {
            let (kind, reason) = top_error();
            return BulkVerdict::RejectAll(one_line(&format!("400 {kind}: {reason}")));
        }
        // 401/403 are configuration problems an operator fixes, never the
        // documents' fault: retry, with the reason the probe would give.
        401 | 403 => {
            let (kind, reason) = top_error();
            return BulkVerdict::Refused(one_line(&format!("{status} {kind}: {reason}")));
        }
        // 429 and 5xx pass: retry.
        _ => {
            let (kind, reason) = top_error();
            return BulkVerdict::RetryAll(format!("HTTP {status} {kind}: {reason}"));
        }
    }
    // The common answer, "errors": false, is decided without building the
    // items (thousands of small maps for a large bulk).
    match serde_json::from_slice::<BulkHead>(body) {
        Ok(head) if !head.errors => return BulkVerdict::AllDone,
        Ok(_) => {}
        Err(e) => return BulkVerdict::RetryAll(format!("unreadable bulk response: {e}")),
    }
    let parsed: BulkBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return BulkVerdict::RetryAll(format!("unreadable bulk response: {e}")),
    };
    if parsed.items.len() != expected {
        return BulkVerdict::RetryAll(format!(
            "bulk response has {} items for {expected} documents",
            parsed.items.len()
        ));
    }
    let verdicts = parsed
        .items
        .iter()
        .map(|item| {
            // Each item is {"index": {...}} (or create/update/delete).
            let Some(inner) = item.values().next() else {
                return ItemVerdict::Retry("empty bulk item".into());
            };
            let status = inner.get("status").and_then(|s| s.as_u64()).unwrap_or(0) as u16;
            let (kind, reason) = error_text(inner.get("error"));
            item_verdict(status, &kind, &reason)
        })
        .collect();
    BulkVerdict::Items(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real bodies: osmem-server 0.1.6 (OpenSearch API 3.8.0) and Elasticsearch 8.
    const PARTIAL: &str = r#"{"errors":true,"items":[{"index":{"_id":"a:1:1","_index":"t1","_primary_term":1,"_seq_no":0,"_shards":{"failed":0,"successful":1,"total":2},"_version":5,"result":"created","status":201}},{"index":{"_id":"a:1:1","_index":"t1","error":{"index":"t1","index_uuid":"_na_","reason":"[a:1:1]: version conflict, current version [5] is higher than the one provided [3]","shard":"0","type":"version_conflict_engine_exception"},"status":409}},{"index":{"_index":"messages","_id":"a:1:2","status":429,"error":{"type":"es_rejected_execution_exception","reason":"rejected execution of coordinating operation"}}},{"index":{"_index":"messages","_id":"a:1:3","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [chat_number] of type [integer]"}}},{"index":{"_index":"messages","_id":"a:1:4","status":503,"error":{"type":"unavailable_shards_exception","reason":"primary shard is not active"}}},{"index":{"_index":"messages","_id":"a:1:5","status":404,"error":{"type":"index_not_found_exception","reason":"no such index [messages]"}}}]}"#;

    #[test]
    fn partial_failures_are_classified_per_item() {
        let BulkVerdict::Items(v) = classify(200, PARTIAL.as_bytes(), 6) else {
            panic!()
        };
        assert_eq!(v[0], ItemVerdict::Done);
        assert_eq!(v[1], ItemVerdict::Done);
        assert!(
            matches!(&v[2], ItemVerdict::Retry(r) if r.starts_with("429 es_rejected_execution_exception"))
        );
        assert!(matches!(&v[3], ItemVerdict::Reject(r) if r.contains("mapper_parsing_exception")));
        assert!(matches!(&v[4], ItemVerdict::Retry(r) if r.starts_with("503")));
        assert_eq!(v[5], ItemVerdict::IndexMissing);
    }

    /// Refusals are never the documents' fault: an API key without the
    /// privilege on the index (Elasticsearch 8, per item) and a refused
    /// request (401 at the top) are retried, not dead-lettered.
    #[test]
    fn refusals_are_retried() {
        let item = r#"{"errors":true,"items":[{"index":{"_index":"messages","_id":"a:1:1","status":403,"error":{"type":"security_exception","reason":"action [indices:data/write/bulk[s]] is unauthorized for API key id [VuaCfGcBCdbkQm-e5aOx] of user [elastic] on indices [messages], this action is granted by the index privileges [create_doc,create,index,write,all]"}}}]}"#;
        let BulkVerdict::Items(v) = classify(200, item.as_bytes(), 1) else {
            panic!()
        };
        assert!(
            matches!(&v[0], ItemVerdict::Refused(r) if r.starts_with("403 security_exception: action [indices:data/write/bulk[s]] is unauthorized")),
            "{v:?}"
        );
        assert_eq!(
            classify(200, item.as_bytes(), 1).refusal(),
            Some("403 security_exception: action [indices:data/write/bulk[s]] is unauthorized for API key id [VuaCfGcBCdbkQm-e5aOx] of user [elastic] on indices [messages], this action is granted by the index privileges [create_doc,create,index,write,all]")
        );
        let top = r#"{"error":{"root_cause":[{"type":"security_exception","reason":"unable to authenticate with provided credentials and anonymous access is not allowed for this request","additional_unsuccessful_credentials":"API key: api key [VuaCfGcBCdbkQm-e5aOx] has been invalidated"}],"type":"security_exception","reason":"unable to authenticate with provided credentials and anonymous access is not allowed for this request"},"status":401}"#;
        assert_eq!(
            classify(401, top.as_bytes(), 1),
            BulkVerdict::Refused("401 security_exception: unable to authenticate with provided credentials and anonymous access is not allowed for this request".into())
        );
        assert_eq!(classify(200, PARTIAL.as_bytes(), 6).refusal(), None);
    }

    #[test]
    fn whole_request_outcomes() {
        let ok = r#"{"errors":false,"items":[{"index":{"_id":"a:1:1","status":201,"result":"created"}}],"took":1}"#;
        assert_eq!(classify(200, ok.as_bytes(), 1), BulkVerdict::AllDone);
        let missing = r#"{"error":{"root_cause":[{"type":"index_not_found_exception","reason":"no such index [m]"}],"type":"index_not_found_exception","reason":"no such index [m]","index":"m"},"status":404}"#;
        assert_eq!(
            classify(404, missing.as_bytes(), 1),
            BulkVerdict::IndexMissing
        );
        let busy = r#"{"error":{"type":"es_rejected_execution_exception","reason":"rejected execution"},"status":429}"#;
        assert!(
            matches!(classify(429, busy.as_bytes(), 1), BulkVerdict::RetryAll(r) if r.contains("429"))
        );
        assert!(matches!(
            classify(502, b"<html>bad gateway</html>", 1),
            BulkVerdict::RetryAll(_)
        ));
        let bad = r#"{"error":{"type":"illegal_argument_exception","reason":"Malformed action/metadata line [1]"},"status":400}"#;
        assert!(
            matches!(classify(400, bad.as_bytes(), 1), BulkVerdict::RejectAll(r) if r.contains("Malformed"))
        );
        assert!(matches!(
            classify(200, b"{\"errors\":true,\"items\":[]}", 1),
            BulkVerdict::RetryAll(_)
        ));
        assert!(matches!(
            classify(200, b"not json", 1),
            BulkVerdict::RetryAll(_)
        ));
    }
}
