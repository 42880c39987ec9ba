//! Payload decoding and validation (docs/queues-and-payloads.md).
//!
//! A delivery body becomes one of [`CreateChat`], [`CreateMessage`] or
//! [`UpdateMessage`], or a [`Malformed`] reason that goes into the
//! dead letter's `x-error` header. Decoding never panics. The JSON parser is
//! serde_json (strict: a number with a fraction or exponent is not an
//! integer, a lone surrogate escape and trailing bytes are errors); the field
//! visitor below is ours so that every error names its field.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::fmt;

/// Largest accepted payload, in bytes (docs/queues-and-payloads.md).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Largest accepted `body`, in bytes of UTF-8 (the `TEXT` column).
pub const MAX_BODY_BYTES: usize = 65_535;
/// Largest accepted `token`, in bytes.
pub const MAX_TOKEN_BYTES: usize = 255;
/// Largest `number` / `chat_number` (MySQL `INT`).
pub const MAX_NUMBER: i64 = 2_147_483_647;

/// Why a payload is malformed: one line, safe for an AMQP header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `create_chats` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateChat {
    /// `applications.id` of the parent, >= 1.
    pub application_id: i64,
    /// Application token, 1..255 bytes.
    pub token: String,
    /// Chat number within the application, 1..2147483647.
    pub number: i32,
    /// Creating user, >= 1, or none.
    pub creator_id: Option<i64>,
}

/// A `create_messages` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateMessage {
    /// `chats.id` of the parent, >= 1.
    pub chat_id: i64,
    /// Application token, 1..255 bytes.
    pub token: String,
    /// Chat number, 1..2147483647.
    pub chat_number: i32,
    /// Message number within the chat, 1..2147483647.
    pub number: i32,
    /// Message text, at most 65535 bytes (may be empty).
    pub body: String,
    /// Creating user, >= 1, or none.
    pub creator_id: Option<i64>,
}

/// An `update_messages` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateMessage {
    /// `chats.id` of the message's chat, >= 1.
    pub chat_id: i64,
    /// Application token, 1..255 bytes.
    pub token: String,
    /// Chat number, 1..2147483647.
    pub chat_number: i32,
    /// Message number, 1..2147483647.
    pub number: i32,
    /// New message text, at most 65535 bytes.
    pub body: String,
}

/// The union of all fields the three queues know; unknown fields are skipped.
/// `creator_id: Some(None)` is an explicit `null`.
#[derive(Default)]
struct Fields {
    application_id: Option<i64>,
    chat_id: Option<i64>,
    token: Option<String>,
    number: Option<i64>,
    chat_number: Option<i64>,
    body: Option<String>,
    creator_id: Option<Option<i64>>,
}

/// Reads the fields `known` to one queue; every other value is skipped,
/// whatever its type (docs/queues-and-payloads.md: unknown fields are ignored).
struct FieldsVisitor {
    known: &'static [&'static str],
}

fn field<'de, A: MapAccess<'de>, T: de::Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    name: &str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::custom(format_args!(
            "field `{name}` appears twice"
        )));
    }
    let v = map
        .next_value::<T>()
        .map_err(|e| de::Error::custom(format_args!("field `{name}`: {e}")))?;
    *slot = Some(v);
    Ok(())
}

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let key = key.as_ref();
            if !self.known.contains(&key) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match key {
                "application_id" => field(&mut map, &mut f.application_id, key)?,
                "chat_id" => field(&mut map, &mut f.chat_id, key)?,
                "token" => field(&mut map, &mut f.token, key)?,
                "number" => field(&mut map, &mut f.number, key)?,
                "chat_number" => field(&mut map, &mut f.chat_number, key)?,
                "body" => field(&mut map, &mut f.body, key)?,
                "creator_id" => field(&mut map, &mut f.creator_id, key)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(f)
    }
}

/// Deserializes [`Fields`] knowing only the given field names.
struct FieldsSeed {
    known: &'static [&'static str],
}

impl<'de> de::DeserializeSeed<'de> for FieldsSeed {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(FieldsVisitor { known: self.known })
    }
}

fn parse(data: &[u8], known: &'static [&'static str]) -> Result<Fields, Malformed> {
    if data.len() > MAX_PAYLOAD_BYTES {
        return Err(Malformed(format!(
            "payload is {} bytes, over the 1 MiB limit",
            data.len()
        )));
    }
    if data.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err(Malformed("payload starts with a byte-order mark".into()));
    }
    let text = std::str::from_utf8(data).map_err(|e| {
        Malformed(format!(
            "payload is not valid UTF-8 (byte {})",
            e.valid_up_to()
        ))
    })?;
    if !text.trim_start().starts_with('{') {
        return Err(Malformed("payload is not a JSON object".into()));
    }
    if let Some(at) = lone_surrogate(text.as_bytes()) {
        return Err(Malformed(format!("lone surrogate escape at byte {at}")));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de::DeserializeSeed::deserialize(FieldsSeed { known }, &mut de)
        .and_then(|f| de.end().map(|()| f))
        .map_err(|e| Malformed(format!("invalid JSON payload: {e}").replace(['\n', '\r'], " ")))
}

/// The offset of the first `\uD800`..`\uDFFF` escape that is not half of
/// a high+low pair, anywhere in the payload: serde_json checks this only in
/// the strings it decodes, not in the unknown members it skips, and the
/// contract makes a lone surrogate malformed wherever it is. Backslashes
/// only occur inside JSON strings, so each escape is read from the start.
fn lone_surrogate(b: &[u8]) -> Option<usize> {
    let unit = |at: usize| -> Option<u16> {
        let hex = b.get(at + 2..at + 6)?;
        if b.get(at..at + 2)? != b"\\u" {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        match unit(i) {
            Some(0xD800..=0xDBFF) => match unit(i + 6) {
                Some(0xDC00..=0xDFFF) => i += 12,
                _ => return Some(i),
            },
            Some(0xDC00..=0xDFFF) => return Some(i),
            Some(_) => i += 6,
            None => i += 2, // another escape (\\, \", \n, …): skip both bytes
        }
    }
    None
}

fn required<T>(v: Option<T>, name: &str) -> Result<T, Malformed> {
    v.ok_or_else(|| Malformed(format!("required field `{name}` is missing")))
}

fn id(v: Option<i64>, name: &str) -> Result<i64, Malformed> {
    let v = required(v, name)?;
    if v < 1 {
        return Err(Malformed(format!("field `{name}` is {v}, must be >= 1")));
    }
    Ok(v)
}

fn number(v: Option<i64>, name: &str) -> Result<i32, Malformed> {
    let v = required(v, name)?;
    if !(1..=MAX_NUMBER).contains(&v) {
        return Err(Malformed(format!(
            "field `{name}` is {v}, must be in 1..{MAX_NUMBER}"
        )));
    }
    Ok(v as i32)
}

fn token(v: Option<String>) -> Result<String, Malformed> {
    let t = required(v, "token")?;
    if t.is_empty() || t.len() > MAX_TOKEN_BYTES {
        return Err(Malformed(format!(
            "field `token` is {} bytes, must be 1..{MAX_TOKEN_BYTES}",
            t.len()
        )));
    }
    Ok(t)
}

fn body(v: Option<String>) -> Result<String, Malformed> {
    let b = required(v, "body")?;
    if b.len() > MAX_BODY_BYTES {
        return Err(Malformed(format!(
            "field `body` is {} bytes, over the {MAX_BODY_BYTES}-byte limit",
            b.len()
        )));
    }
    Ok(b)
}

fn creator(v: Option<Option<i64>>) -> Result<Option<i64>, Malformed> {
    match v.flatten() {
        Some(c) if c < 1 => Err(Malformed(format!(
            "field `creator_id` is {c}, must be >= 1 or null"
        ))),
        other => Ok(other),
    }
}

impl CreateChat {
    /// Decodes and validates a `create_chats` body.
    ///
    /// Errors: [`Malformed`] naming the field or the structural fault.
    pub fn decode(data: &[u8]) -> Result<CreateChat, Malformed> {
        let f = parse(data, &["application_id", "token", "number", "creator_id"])?;
        Ok(CreateChat {
            application_id: id(f.application_id, "application_id")?,
            token: token(f.token)?,
            number: number(f.number, "number")?,
            creator_id: creator(f.creator_id)?,
        })
    }
}

impl CreateMessage {
    /// Decodes and validates a `create_messages` body.
    ///
    /// Errors: [`Malformed`] naming the field or the structural fault.
    pub fn decode(data: &[u8]) -> Result<CreateMessage, Malformed> {
        let f = parse(
            data,
            &[
                "chat_id",
                "token",
                "chat_number",
                "number",
                "body",
                "creator_id",
            ],
        )?;
        Ok(CreateMessage {
            chat_id: id(f.chat_id, "chat_id")?,
            token: token(f.token)?,
            chat_number: number(f.chat_number, "chat_number")?,
            number: number(f.number, "number")?,
            body: body(f.body)?,
            creator_id: creator(f.creator_id)?,
        })
    }
}

impl UpdateMessage {
    /// Decodes and validates an `update_messages` body.
    ///
    /// Errors: [`Malformed`] naming the field or the structural fault.
    pub fn decode(data: &[u8]) -> Result<UpdateMessage, Malformed> {
        let f = parse(data, &["chat_id", "token", "chat_number", "number", "body"])?;
        Ok(UpdateMessage {
            chat_id: id(f.chat_id, "chat_id")?,
            token: token(f.token)?,
            chat_number: number(f.chat_number, "chat_number")?,
            number: number(f.number, "number")?,
            body: body(f.body)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(s: &str) -> Result<CreateChat, String> {
        CreateChat::decode(s.as_bytes()).map_err(|e| e.0)
    }
    fn msg(s: &str) -> Result<CreateMessage, String> {
        CreateMessage::decode(s.as_bytes()).map_err(|e| e.0)
    }

    #[test]
    fn valid_payloads() {
        assert_eq!(
            chat(
                r#"{"application_id":7,"token":"app_x","number":1,"creator_id":null,"x":[1,{"y":2}]}"#
            ),
            Ok(CreateChat {
                application_id: 7,
                token: "app_x".into(),
                number: 1,
                creator_id: None
            })
        );
        assert_eq!(
            chat(r#" {"application_id":7,"token":"t","number":2147483647,"creator_id":9} "#)
                .unwrap()
                .creator_id,
            Some(9)
        );
        let m =
            msg(r#"{"chat_id":1,"token":"app_x","chat_number":1,"number":2,"body":"a\u0000b 👋"}"#)
                .unwrap();
        assert_eq!(m.body, "a\0b 👋");
        assert_eq!(m.creator_id, None);
        assert_eq!(
            msg(r#"{"chat_id":1,"token":"a","chat_number":1,"number":2,"body":""}"#)
                .unwrap()
                .body,
            ""
        );
        let long = format!(
            r#"{{"chat_id":1,"token":"a","chat_number":1,"number":2,"body":"{}"}}"#,
            "a".repeat(MAX_BODY_BYTES)
        );
        assert_eq!(msg(&long).unwrap().body.len(), MAX_BODY_BYTES);
        let u = UpdateMessage::decode(
            br#"{"chat_id":1,"token":"a","chat_number":3,"number":2,"body":"x"}"#,
        )
        .unwrap();
        assert_eq!(
            (u.chat_id, u.chat_number, u.number, u.body.as_str()),
            (1, 3, 2, "x")
        );
    }

    #[test]
    fn malformed_payloads_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("this is not json", "not a JSON object"),
            ("[{\"chat_id\":1}]", "not a JSON object"),
            ("7", "not a JSON object"),
            (
                r#"{"chat_id":1,"token":"a","chat_number":1,"number":1}"#,
                "`body` is missing",
            ),
            (
                r#"{"chat_id":"1","token":"a","chat_number":1,"number":1,"body":"x"}"#,
                "`chat_id`",
            ),
            (
                r#"{"chat_id":1.0,"token":"a","chat_number":1,"number":1,"body":"x"}"#,
                "`chat_id`",
            ),
            (
                r#"{"chat_id":1e0,"token":"a","chat_number":1,"number":1,"body":"x"}"#,
                "`chat_id`",
            ),
            (
                r#"{"chat_id":0,"token":"a","chat_number":1,"number":1,"body":"x"}"#,
                "`chat_id` is 0",
            ),
            (
                r#"{"chat_id":1,"token":"","chat_number":1,"number":1,"body":"x"}"#,
                "`token` is 0 bytes",
            ),
            (
                r#"{"chat_id":1,"token":"a","chat_number":1,"number":2147483648,"body":"x"}"#,
                "`number` is 2147483648",
            ),
            (
                r#"{"chat_id":1,"token":"a","chat_number":-1,"number":1,"body":"x"}"#,
                "`chat_number` is -1",
            ),
            (
                r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":null}"#,
                "`body`",
            ),
            (
                r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"\ud800"}"#,
                "lone surrogate escape at byte 60",
            ),
            (
                r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"x"} x"#,
                "trailing",
            ),
            (
                r#"{"chat_id":1,"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"x"}"#,
                "twice",
            ),
            (
                r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"x","creator_id":0}"#,
                "`creator_id` is 0",
            ),
            (
                r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"x","creator_id":"5"}"#,
                "`creator_id`",
            ),
            (
                r#"{"chat_id":99999999999999999999,"token":"a","chat_number":1,"number":1,"body":"x"}"#,
                "`chat_id`",
            ),
        ];
        for (input, needle) in cases {
            let e = msg(input).unwrap_err();
            assert!(e.contains(needle), "{input} -> {e} (wanted {needle})");
            assert!(!e.contains('\n'));
        }
        let e = CreateMessage::decode(b"\xEF\xBB\xBF{}").unwrap_err().0;
        assert!(e.contains("byte-order mark"), "{e}");
        let e = CreateMessage::decode(b"{\"body\": \"bad \xff\xfe\"}")
            .unwrap_err()
            .0;
        assert!(e.contains("not valid UTF-8"), "{e}");
        let big = format!(r#"{{"body":"{}"}}"#, "a".repeat(MAX_PAYLOAD_BYTES));
        assert!(msg(&big).unwrap_err().contains("1 MiB"));
        let over = format!(
            r#"{{"chat_id":1,"token":"a","chat_number":1,"number":2,"body":"{}"}}"#,
            "a".repeat(MAX_BODY_BYTES + 1)
        );
        assert!(msg(&over).unwrap_err().contains("65535"));
        let e = msg(
            r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"x","x":{"k\ud800":1}}"#,
        )
        .unwrap_err();
        assert!(e.contains("lone surrogate escape at byte 70"), "{e}");
        // Escaped backslashes are not escapes; pairs are fine; numbers and
        // nesting inside unknown members are not checked.
        let ok = r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"\\ud800 \ud83d\ude00","x":[[[1e400]]]}"#;
        assert_eq!(msg(ok).unwrap().body, "\\ud800 😀");
        let low = r#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"\udc00x"}"#;
        assert!(msg(low).unwrap_err().contains("lone surrogate"));
        // Fields of other queues are unknown here, whatever their type.
        assert!(
            chat(r#"{"application_id":7,"token":"t","number":1,"chat_id":null,"body":669}"#)
                .is_ok()
        );
        let u =
            br#"{"chat_id":1,"token":"a","chat_number":1,"number":1,"body":"x","creator_id":1.0}"#;
        assert!(UpdateMessage::decode(u).is_ok());
        let e = chat(r#"{"application_id":"7","token":"app_x","number":1}"#).unwrap_err();
        assert!(e.contains("`application_id`"), "{e}");
        let e = chat(&format!(
            r#"{{"application_id":7,"token":"{}","number":1}}"#,
            "t".repeat(256)
        ))
        .unwrap_err();
        assert!(e.contains("256 bytes"), "{e}");
    }
}
