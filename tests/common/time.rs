//! UTC formatting without a date crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD HH:MM:SS.ffffff` (how MySQL prints DATETIME(6)) of
/// microseconds since the epoch, UTC.
pub fn mysql_datetime(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{frac:06}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// RFC 3339 UTC with microseconds: `2026-11-29T12:00:00.123456Z`.
pub fn rfc3339_micros(us: i64) -> String {
    let mut s = mysql_datetime(us).replacen(' ', "T", 1);
    s.push('Z');
    s
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64
}

pub fn now_secs() -> u64 {
    (now_us() / 1_000_000) as u64
}

#[test]
fn formats() {
    assert_eq!(mysql_datetime(0), "1970-01-01 00:00:00.000000");
    assert_eq!(
        rfc3339_micros(1_795_953_600_123_456),
        "2026-11-29T12:00:00.123456Z"
    );
    assert_eq!(
        mysql_datetime(951_782_400_000_001),
        "2000-02-29 00:00:00.000001"
    );
}
