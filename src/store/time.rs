//! Timestamps: stored as Unix epoch milliseconds, rendered as RFC 3339 UTC
//! with millisecond precision (`2026-11-24T01:52:46.123Z`).

use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::macros::format_description;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// Milliseconds of 9999-12-31T23:59:59.999Z, the last instant with a
/// four-digit year.
const MAX_FAST_MS: i64 = 253_402_300_799_999;

impl Timestamp {
    pub fn to_rfc3339(self) -> String {
        let mut buf = [0u8; 24];
        match self.write_rfc3339(&mut buf) {
            Some(s) => s.to_owned(),
            None => self.to_rfc3339_slow(),
        }
    }

    /// Renders into `buf` without allocating, for years 1970..=9999 (every
    /// timestamp the server writes); `None` outside that range. History
    /// pages render one per message: the `time` crate's general formatter
    /// was 7% of a page (perf).
    fn write_rfc3339(self, buf: &mut [u8; 24]) -> Option<&str> {
        if !(0..=MAX_FAST_MS).contains(&self.0) {
            return None;
        }
        let ms = self.0 % 1000;
        let secs = self.0 / 1000;
        let (days, sod) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        let fields: [(usize, i64, usize); 7] = [
            (0, year, 4),
            (5, month, 2),
            (8, day, 2),
            (11, sod / 3600, 2),
            (14, sod / 60 % 60, 2),
            (17, sod % 60, 2),
            (20, ms, 3),
        ];
        *buf = *b"0000-00-00T00:00:00.000Z";
        for (at, mut value, width) in fields {
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        }
        std::str::from_utf8(buf).ok()
    }

    fn to_rfc3339_slow(self) -> String {
        let fmt = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&fmt).ok())
            .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
    }
}

/// (year, month, day) of a day count since 1970-01-01, for days >= 0
/// (Howard Hinnant's `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 24];
        match self.write_rfc3339(&mut buf) {
            Some(text) => s.serialize_str(text),
            None => s.serialize_str(&self.to_rfc3339_slow()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc3339_with_milliseconds_in_utc() {
        assert_eq!(
            Timestamp(1_795_485_166_123).to_rfc3339(),
            "2026-11-24T01:52:46.123Z"
        );
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn fast_path_matches_the_general_formatter() {
        let mut cases = vec![0, 1, 999, 1000, MAX_FAST_MS, MAX_FAST_MS - 1];
        // Leap days and century rules: 2000-02-29 (leap), 2100-02-28/03-01
        // (not leap), 2400-02-29 (leap), each at the day's first and last ms.
        for (y, m, d) in [
            (2000, 2, 29),
            (2100, 2, 28),
            (2100, 3, 1),
            (2400, 2, 29),
            (1972, 12, 31),
        ] {
            let date =
                time::Date::from_calendar_date(y, time::Month::try_from(m).unwrap(), d).unwrap();
            let ms = date.midnight().assume_utc().unix_timestamp() * 1000;
            cases.extend([ms, ms + 86_399_999]);
        }
        // A deterministic spread over the whole range (an LCG).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            cases.push((x >> 16) as i64 % (MAX_FAST_MS + 1));
        }
        for ms in cases {
            let t = Timestamp(ms);
            let mut buf = [0u8; 24];
            assert_eq!(
                t.write_rfc3339(&mut buf),
                Some(t.to_rfc3339_slow().as_str()),
                "{ms}"
            );
        }
    }

    #[test]
    fn out_of_range_falls_back() {
        assert_eq!(Timestamp(-1).to_rfc3339(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            Timestamp(MAX_FAST_MS + 1).to_rfc3339(),
            Timestamp(MAX_FAST_MS + 1).to_rfc3339_slow()
        );
        assert_eq!(
            serde_json::to_string(&Timestamp(-1)).unwrap(),
            "\"1969-12-31T23:59:59.999Z\""
        );
    }
}
