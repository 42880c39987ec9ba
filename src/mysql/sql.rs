//! SQL text building for batched statements.
//!
//! Batches go over the text protocol as one statement each (one round trip,
//! no prepare per batch size). Values are written as literals by these
//! helpers into one growing buffer. The rules match the session this writer
//! sets up (see `mysql::connection_init`): utf8mb4, backslash escapes on (no
//! `NO_BACKSLASH_ESCAPES` in `sql_mode`). Strings here are always valid UTF-8
//! (they come from decoded JSON), so no multi-byte escape trick applies.

use crate::time::{push_mysql_datetime, Micros};
use std::fmt::Write;

/// Appends `s` as a quoted string literal, escaping `\0 \n \r \\ ' " \x1a`.
pub fn push_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('\'');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            0 => "\\0",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\\' => "\\\\",
            b'\'' => "\\'",
            b'"' => "\\\"",
            0x1a => "\\Z",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        out.push_str(esc);
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('\'');
}

/// Appends an integer literal.
pub fn push_int(out: &mut String, v: i64) {
    let _ = write!(out, "{v}");
}

/// Appends an optional integer literal (`NULL` for none).
pub fn push_opt_int(out: &mut String, v: Option<i64>) {
    match v {
        Some(v) => push_int(out, v),
        None => out.push_str("NULL"),
    }
}

/// Appends a quoted `DATETIME(6)` literal.
pub fn push_datetime(out: &mut String, micros: Micros) {
    out.push('\'');
    push_mysql_datetime(out, micros);
    out.push('\'');
}

/// Appends `v1,v2,…` for integers.
pub fn push_int_list(out: &mut String, values: impl IntoIterator<Item = i64>) {
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_int(out, v);
    }
}

/// Appends a quoted identifier (backticks doubled).
pub fn push_ident(out: &mut String, name: &str) {
    out.push('`');
    out.push_str(&name.replace('`', "``"));
    out.push('`');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let mut s = String::new();
        push_str(&mut s, "a'b\"c\\d\0e\nf\rg\x1ah 👋");
        assert_eq!(s, r#"'a\'b\"c\\d\0e\nf\rg\Zh 👋'"#);
        let mut s = String::new();
        push_opt_int(&mut s, None);
        s.push(' ');
        push_int_list(&mut s, [1, -2, 3]);
        s.push(' ');
        push_datetime(&mut s, 1_795_953_600_123_456);
        s.push(' ');
        push_ident(&mut s, "we`ird");
        assert_eq!(s, "NULL 1,-2,3 '2026-11-29 12:00:00.123456' `we``ird`");
    }
}
