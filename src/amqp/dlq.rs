//! `chat-writer dlq show|replay <queue> [N]`: inspecting and replaying
//! dead letters without a management plugin.
//!
//! `show` reads up to N messages of `<queue>.dlq` with `basic.get`, prints
//! their failure headers and body, and acks none: closing the channel puts
//! them back. Bodies and headers come from whoever published them, so they
//! are printed through [`escape_for_terminal`]: no escape sequence or line
//! break of theirs reaches the operator's terminal. `replay` moves up to N messages (default: as many as the
//! queue held when it started, so a message that fails again is not looped)
//! from `<queue>.dlq` back to `<queue>`: each is published (confirmed) with
//! the body and properties kept and the failure headers removed, so it gets
//! fresh delay tiers, and only then acked in the `.dlq`.

use super::republish::{Outgoing, Republisher, BROKER_COUNT_HEADERS};
use super::{connect, dead_letter_queue};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

/// Headers the writer sets on a failed message; replay removes them, and
/// the broker's count headers ([`BROKER_COUNT_HEADERS`]) of a quorum
/// `.dlq`. An edit keeps its `x-edit-version`, so a replayed old edit
/// never overwrites a newer one.
const FAILURE_HEADERS: [&str; 5] = [
    "x-retry-count",
    "x-original-queue",
    "x-error",
    "x-first-failure",
    "x-death",
];

async fn open(
    url: &str,
    tls: &crate::tls::Settings,
    queue: &str,
) -> Result<(Connection, Channel, u32), String> {
    let conn = connect(url, tls)
        .await
        .map_err(|e| format!("connect: {}", crate::tls::explain(&e.to_string())))?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let dlq = dead_letter_queue(queue);
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
        .await
        .map_err(|e| format!("{dlq}: {e}"))?;
    Ok((conn, ch, q.message_count()))
}

/// One message of `<queue>.dlq` (`basic.get`, manual ack), if any.
async fn next(
    ch: &Channel,
    queue: &str,
) -> Result<Option<lapin::message::BasicGetMessage>, String> {
    ch.basic_get(
        dead_letter_queue(queue).as_str().into(),
        BasicGetOptions { no_ack: false },
    )
    .await
    .map_err(|e| e.to_string())
}

/// A header value as one line of terminal-safe text.
fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => escape_for_terminal(s.as_bytes()),
        AMQPValue::ShortString(s) => escape_for_terminal(s.as_str().as_bytes()),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        other => escape_for_terminal(format!("{other:?}").as_bytes()),
    }
}

/// How many characters of a body `show` prints (an invalid byte counts as
/// one).
const BODY_CHARS: usize = 500;

/// `bytes` as text that is safe to print on a terminal and stays on one
/// line: printable UTF-8 (emoji included) is kept as is; `\n`, `\r` and
/// `\t` become those two-character escapes; other ASCII control characters
/// (ESC, BEL, NUL, DEL, …) become `\xNN`; C1 controls (U+0080..U+009F),
/// bidirectional-text controls and the line/paragraph separators
/// U+2028/U+2029 become `\u{NN}`; each byte that is not valid UTF-8
/// becomes `\xNN` (80..FF, so never confused with an ASCII control).
/// A backslash of the input is kept as is.
pub fn escape_for_terminal(bytes: &[u8]) -> String {
    escape_prefix(bytes, usize::MAX).0
}

/// [`escape_for_terminal`] of the first `max` characters of `bytes` (an
/// invalid byte counts as one), and whether anything was left out.
fn escape_prefix(bytes: &[u8], max: usize) -> (String, bool) {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len().min(max.saturating_mul(4)));
    let mut taken = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if taken == max {
                return (out, true);
            }
            taken += 1;
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_ascii_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || is_invisible_layout(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            if taken == max {
                return (out, true);
            }
            taken += 1;
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    (out, false)
}

/// Characters that are not control characters but move or reorder what a
/// terminal shows (bidirectional overrides, line and paragraph separators),
/// so a body could make its line look like something else. The zero-width
/// joiner and variation selectors of emoji are not among them.
fn is_invisible_layout(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// Prints up to `n` dead letters of `<queue>.dlq` to stdout, leaving them
/// in the queue. Returns how many were printed.
///
/// Errors: the broker is unreachable or `<queue>.dlq` does not exist.
pub async fn show(
    url: &str,
    tls: &crate::tls::Settings,
    queue: &str,
    n: usize,
) -> Result<usize, String> {
    let (conn, ch, depth) = open(url, tls, queue).await?;
    println!("{}: {depth} messages", dead_letter_queue(queue));
    let mut shown = 0;
    while shown < n {
        let Some(got) = next(&ch, queue).await? else {
            break;
        };
        shown += 1;
        let d = got.delivery;
        println!("#{shown}");
        if let Some(h) = d.properties.headers() {
            for name in [
                "x-error",
                "x-retry-count",
                "x-first-failure",
                "x-original-queue",
            ] {
                if let Some(v) = h.inner().get(name) {
                    println!("  {name}: {}", header_text(v));
                }
            }
        }
        let (body, cut) = escape_prefix(&d.data, BODY_CHARS);
        println!(
            "  body ({} bytes): {body}{}",
            d.data.len(),
            if cut { "…" } else { "" }
        );
    }
    // Unacked gets return to the queue when the channel closes.
    let _ = ch.close(200, "shown".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(shown)
}

/// Moves up to `n` (default: the depth at start) messages from
/// `<queue>.dlq` back to `<queue>`. Returns how many were moved.
///
/// Errors: the broker is unreachable, `<queue>.dlq` does not exist, or a
/// publish was not confirmed (that message stays in the `.dlq`).
pub async fn replay(
    url: &str,
    tls: &crate::tls::Settings,
    queue: &str,
    n: Option<usize>,
) -> Result<usize, String> {
    let (conn, ch, depth) = open(url, tls, queue).await?;
    let publisher = Republisher::open(&conn).await.map_err(|e| e.to_string())?;
    let limit = n.unwrap_or(depth as usize).min(depth as usize);
    let mut moved = 0;
    while moved < limit {
        let Some(got) = next(&ch, queue).await? else {
            break;
        };
        let d = got.delivery;
        publisher
            .publish_all(&[Outgoing {
                queue: queue.to_string(),
                data: &d.data,
                properties: without_failure(&d.properties),
            }])
            .await?;
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        moved += 1;
    }
    let _ = conn.close(200, "replayed".into()).await;
    Ok(moved)
}

fn without_failure(p: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            if !FAILURE_HEADERS.contains(&k.as_str()) && !BROKER_COUNT_HEADERS.contains(&k.as_str())
            {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    p.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::republish::{failure_properties, headers_of, retry_count};

    #[test]
    fn control_characters_are_escaped_and_printable_text_kept() {
        assert_eq!(
            escape_for_terminal(b"\x1b[2J\x1b]0;owned\x07fake\r\nline\ttab\x00\x7f"),
            "\\x1b[2J\\x1b]0;owned\\x07fake\\r\\nline\\ttab\\x00\\x7f"
        );
        // Printable UTF-8 stays, emoji sequences (ZWJ, variation selector)
        // included; backslashes and quotes are kept as written.
        let text = "héllo 世界 👩\u{200d}💻 ❤\u{fe0f} {\"a\":\"x\\ny\"}";
        assert_eq!(escape_for_terminal(text.as_bytes()), text);
        // Invalid UTF-8 bytes, alone or cutting a character short.
        assert_eq!(
            escape_for_terminal(b"a\xffb\xc3(\xe2\x82"),
            "a\\xffb\\xc3(\\xe2\\x82"
        );
        // C1 controls (CSI as UTF-8), bidi overrides, line separators.
        assert_eq!(
            escape_for_terminal("x\u{9b}31m\u{85}\u{202e}abc\u{2066}\u{2028}\u{2029}y".as_bytes()),
            "x\\u{9b}31m\\u{85}\\u{202e}abc\\u{2066}\\u{2028}\\u{2029}y"
        );
        assert_eq!(escape_for_terminal(b""), "");
    }

    #[test]
    fn a_long_body_is_cut_at_whole_characters() {
        assert_eq!(escape_prefix(b"a\nb", 3), ("a\\nb".to_string(), false));
        assert_eq!(escape_prefix(b"a\nbc", 3), ("a\\nb".to_string(), true));
        assert_eq!(
            escape_prefix(b"\xc3\xa9\xff\xf0\x9f\x98\x80x", 3),
            ("é\\xff😀".to_string(), true)
        );
        assert_eq!(
            escape_prefix(b"\xe9\xff\x1bx", 3),
            ("\\xe9\\xff\\x1b".to_string(), true)
        );
        let long = "😀".repeat(BODY_CHARS + 1);
        let (shown, cut) = escape_prefix(long.as_bytes(), BODY_CHARS);
        assert_eq!((shown.chars().count(), cut), (BODY_CHARS, true));
    }

    #[test]
    fn header_values_are_escaped() {
        assert_eq!(
            header_text(&AMQPValue::LongString(
                b"bad\r\n\x1b[31mx\xff".to_vec().into()
            )),
            "bad\\r\\n\\x1b[31mx\\xff"
        );
        assert_eq!(
            header_text(&AMQPValue::ShortString("q\x1b".into())),
            "q\\x1b"
        );
        assert_eq!(header_text(&AMQPValue::LongLongInt(-3)), "-3");
    }

    #[test]
    fn replay_strips_only_the_failure_headers() {
        let orig = BasicProperties::default()
            .with_timestamp(5)
            .with_headers(headers_of(&[("trace", AMQPValue::LongString("t".into()))]));
        let failed = failure_properties(&orig, "create_chats", "chat not found", 5, 100);
        let clean = without_failure(&failed);
        assert_eq!(retry_count(&clean), 0);
        assert_eq!(*clean.timestamp(), Some(5));
        let h = clean.headers().as_ref().unwrap().inner();
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("trace"), Some(&AMQPValue::LongString("t".into())));
    }
}
