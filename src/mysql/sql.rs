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

/// One literal of a row in a multi-row statement.
#[derive(Debug, Clone, Copy)]
pub enum Lit<'a> {
    /// An integer.
    Int(i64),
    /// An integer or `NULL`.
    OptInt(Option<i64>),
    /// A string (quoted, escaped).
    Str(&'a str),
    /// A `DATETIME(6)` value.
    DateTime(Micros),
}

/// Appends one literal.
pub fn push_lit(out: &mut String, v: Lit<'_>) {
    match v {
        Lit::Int(i) => push_int(out, i),
        Lit::OptInt(i) => push_opt_int(out, i),
        Lit::Str(s) => push_str(out, s),
        Lit::DateTime(t) => push_datetime(out, t),
    }
}

/// Appends `(a,b,…),(c,d,…)` for `INSERT … VALUES`.
pub fn push_tuples<'a, R: AsRef<[Lit<'a>]>>(out: &mut String, rows: impl IntoIterator<Item = R>) {
    for (i, row) in rows.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('(');
        for (j, v) in row.as_ref().iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            push_lit(out, *v);
        }
        out.push(')');
    }
}

/// Appends a derived table of literal rows,
/// `SELECT a AS c1, b AS c2 UNION ALL SELECT c, d …`, for
/// `UPDATE … JOIN (<this>) u ON …`. `columns` name the first row's values.
pub fn push_union_table<'a, R: AsRef<[Lit<'a>]>>(
    out: &mut String,
    columns: &[&str],
    rows: impl IntoIterator<Item = R>,
) {
    for (i, row) in rows.into_iter().enumerate() {
        out.push_str(if i == 0 {
            "SELECT "
        } else {
            " UNION ALL SELECT "
        });
        for (j, v) in row.as_ref().iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            push_lit(out, *v);
            if i == 0 {
                out.push_str(" AS ");
                out.push_str(columns[j]);
            }
        }
    }
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

    #[test]
    fn rows() {
        let rows = [
            [Lit::Int(1), Lit::Str("a"), Lit::OptInt(None)],
            [Lit::Int(2), Lit::Str("b'"), Lit::OptInt(Some(3))],
        ];
        let mut s = String::new();
        push_tuples(&mut s, rows);
        assert_eq!(s, r"(1,'a',NULL),(2,'b\'',3)");
        let mut s = String::new();
        push_union_table(&mut s, &["id", "name", "n"], rows);
        assert_eq!(
            s,
            r"SELECT 1 AS id,'a' AS name,NULL AS n UNION ALL SELECT 2,'b\'',3"
        );
    }
}
