//! Bulk encoding of message documents (docs/elasticsearch.md).
//!
//! One document is two NDJSON lines: the action
//! `{"index":{"_id":"<token>:<chat_number>:<number>","version":<updated_at µs>,"version_type":"external_gte"}}`
//! and the whole source `{token, chat_number, number, body, created_at}`.
//! The target index comes from the request URL (`/<index>/_bulk`), so the
//! encoded lines stay valid if ELASTICSEARCH_INDEX changes between the
//! commit and the indexing.

use crate::mysql::MessageRow;
use crate::time::rfc3339;
use serde::Serialize;

#[derive(Serialize)]
struct Action<'a> {
    index: ActionMeta<'a>,
}

#[derive(Serialize)]
struct ActionMeta<'a> {
    _id: &'a str,
    version: i64,
    version_type: &'static str,
}

#[derive(Serialize)]
struct Source<'a> {
    token: &'a str,
    chat_number: i32,
    number: i32,
    body: &'a str,
    created_at: &'a str,
}

/// The document id: `<token>:<chat_number>:<number>`.
pub fn document_id(token: &str, chat_number: i32, number: i32) -> String {
    format!("{token}:{chat_number}:{number}")
}

/// Appends the two bulk lines (each ending in `\n`) for `row` to `out`.
pub fn push_document(out: &mut Vec<u8>, row: &MessageRow) {
    let id = document_id(&row.token, row.chat_number, row.number);
    let action = Action {
        index: ActionMeta {
            _id: &id,
            version: row.updated_at,
            version_type: "external_gte",
        },
    };
    let created_at = rfc3339(row.created_at);
    let source = Source {
        token: &row.token,
        chat_number: row.chat_number,
        number: row.number,
        body: &row.body,
        created_at: &created_at,
    };
    // Serializing these plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &action);
    out.push(b'\n');
    let _ = serde_json::to_writer(&mut *out, &source);
    out.push(b'\n');
}

/// Largest index message body, in bytes: a batch's documents are cut into
/// several messages above it (a full batch of 128 ordinary messages, ~40
/// KB, stays one), so no broker `max_message_size` is ever reached and the
/// indexer's prefetch (at most `indexer::PREFETCH_MAX` messages) holds at
/// most about 16 MiB even when the sizes change faster than the prefetch
/// follows them. A single document larger than this gets a message of its own.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

/// Encodes `rows` into bulk bodies of at most [`MAX_MESSAGE_BYTES`] each
/// (one document larger than that gets a body of its own).
pub fn encode_bodies(rows: &[MessageRow]) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    for r in rows {
        let start = body.len();
        push_document(&mut body, r);
        if start > 0 && body.len() > MAX_MESSAGE_BYTES {
            let tail = body.split_off(start);
            bodies.push(std::mem::replace(&mut body, tail));
        }
    }
    if !body.is_empty() {
        bodies.push(body);
    }
    bodies
}

/// Splits an NDJSON bulk body into its documents: byte ranges covering the
/// action line and the source line of each, in order. A trailing partial
/// document (odd line count) is returned as its own range so it is not lost.
pub fn split_documents(body: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut lines = 0;
    for (i, b) in body.iter().enumerate() {
        if *b == b'\n' {
            lines += 1;
            if lines == 2 {
                out.push(start..i + 1);
                start = i + 1;
                lines = 0;
            }
        }
    }
    if start < body.len() {
        out.push(start..body.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_whole_documents() {
        let row = MessageRow {
            id: 9,
            chat_id: 1,
            number: 2,
            token: "app\"x".into(),
            chat_number: 3,
            body: "hi 👋\n".into(),
            created_at: 1_795_953_600_123_456,
            updated_at: 1_795_953_601_000_001,
        };
        let mut out = Vec::new();
        push_document(&mut out, &row);
        push_document(&mut out, &row);
        let text = String::from_utf8(out.clone()).unwrap();
        let first = "{\"index\":{\"_id\":\"app\\\"x:3:2\",\"version\":1795953601000001,\"version_type\":\"external_gte\"}}\n\
             {\"token\":\"app\\\"x\",\"chat_number\":3,\"number\":2,\"body\":\"hi 👋\\n\",\"created_at\":\"2026-11-29T12:00:00.123456Z\"}\n";
        assert_eq!(text, format!("{first}{first}"));
        let docs = split_documents(&out);
        assert_eq!(docs, vec![0..first.len(), first.len()..2 * first.len()]);
        assert_eq!(split_documents(b"a\nb\nc"), vec![0..4, 4..5]);
    }

    #[test]
    fn bodies_stay_under_the_message_limit() {
        let big = MessageRow {
            id: 1,
            chat_id: 1,
            number: 1,
            token: "t".into(),
            chat_number: 1,
            body: "x".repeat(60_000),
            created_at: 0,
            updated_at: 0,
        };
        let rows = vec![big; 200];
        let bodies = encode_bodies(&rows);
        assert!(bodies.len() >= 12, "{}", bodies.len());
        assert!(bodies.iter().all(|b| b.len() <= MAX_MESSAGE_BYTES));
        assert_eq!(
            bodies
                .iter()
                .map(|b| split_documents(b).len())
                .sum::<usize>(),
            200
        );
        assert!(encode_bodies(&[]).is_empty());
    }
}
