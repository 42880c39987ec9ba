//! Timestamps as microseconds since the Unix epoch (UTC).
//!
//! The writer needs exactly three conversions: the AMQP `timestamp` property
//! (seconds) or "now" into a row's `created_at`, a MySQL `DATETIME(6)`
//! literal, and the RFC 3339 form of docs/elasticsearch.md
//! (`2026-11-29T12:00:00.123456Z`). The civil-date arithmetic is Howard
//! Hinnant's `civil_from_days`, exact for the proleptic Gregorian calendar.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

/// The current time in microseconds.
pub fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as Micros)
        .unwrap_or(0)
}

/// `created_at` for a delivery: the AMQP `timestamp` (seconds) when the
/// publisher set one and it fits MySQL's DATETIME range (years 1000..9999),
/// else `now` (docs/queues-and-payloads.md).
pub fn created_at(amqp_timestamp: Option<u64>, now: Micros) -> Micros {
    const MIN: i64 = -30_610_224_000; // 1000-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    match amqp_timestamp {
        Some(s) if (s as i128) <= MAX as i128 && (s as i64) >= MIN => s as i64 * 1_000_000,
        _ => now,
    }
}

/// Splits into (year, month, day, hour, minute, second, microsecond).
fn civil(micros: Micros) -> (i64, u32, u32, u32, u32, u32, u32) {
    let secs = micros.div_euclid(1_000_000);
    let us = micros.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, sod / 3600, sod / 60 % 60, sod % 60, us)
}

/// Appends `YYYY-MM-DD HH:MM:SS.ffffff`, the MySQL `DATETIME(6)` literal
/// (without quotes).
pub fn push_mysql_datetime(out: &mut String, micros: Micros) {
    use std::fmt::Write;
    let (y, mo, d, h, mi, s, us) = civil(micros);
    let _ = write!(out, "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}");
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-29T12:00:00.123456Z`
/// (docs/elasticsearch.md).
pub fn rfc3339(micros: Micros) -> String {
    let (y, mo, d, h, mi, s, us) = civil(micros);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2026-11-29T12:00:00.123456Z
        let t = 1_795_953_600_123_456;
        assert_eq!(rfc3339(t), "2026-11-29T12:00:00.123456Z");
        let mut s = String::new();
        push_mysql_datetime(&mut s, t);
        assert_eq!(s, "2026-11-29 12:00:00.123456");
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn created_at_prefers_the_amqp_timestamp() {
        assert_eq!(created_at(Some(1_795_953_600), 5), 1_795_953_600_000_000);
        assert_eq!(created_at(None, 5), 5);
        assert_eq!(created_at(Some(u64::MAX), 5), 5);
        assert_eq!(created_at(Some(300_000_000_000), 5), 5);
    }
}
