//! Cron schedules: parsing an expression in an IANA time zone and finding
//! its next firings.
//!
//! Expressions have 5 fields (`minute hour day-of-month month day-of-week`)
//! or 6 with a leading seconds field; `@yearly`, `@monthly`, `@weekly`,
//! `@daily` and `@hourly` are accepted too. Firings fall on whole seconds.
//!
//! Daylight saving time follows croner (which follows Vixie cron):
//! - a local time that does not exist (clocks go forward) is skipped by
//!   interval/wildcard expressions (`*/5 * * * *`), while a fixed time of
//!   day (`30 2 * * *`) runs once at the first instant after the gap
//!   (03:00 on the day Europe/Berlin jumps from 02:00 to 03:00);
//! - a local time that happens twice (clocks go back) fires once, at its
//!   first occurrence, for a fixed time of day; interval/wildcard
//!   expressions fire in both passes of the repeated hour.

use std::fmt;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::{Schedule, Timestamp};
use crate::error::{Error, Result};

/// A parsed recurring schedule.
#[derive(Clone)]
pub struct CronSchedule {
    cron: Cron,
    tz: Tz,
    source: String,
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CronSchedule")
            .field("cron", &self.source)
            .field("timezone", &self.tz.name())
            .finish()
    }
}

impl CronSchedule {
    /// Parses `expr` (5 fields, or 6 with a leading seconds field; also
    /// `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`) in `timezone`
    /// (an IANA name, default UTC).
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<Self> {
        let tz = match timezone {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| {
                Error::invalid(
                    "timezone",
                    format!("unknown time zone {name:?}; use an IANA name such as Europe/Berlin"),
                )
            })?,
        };
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let cron = parser.parse(expr).map_err(|e| {
            Error::invalid(
                "cron",
                format!(
                    "{expr:?} is not a valid cron expression ({e}); use 5 fields \
                     (minute hour day-of-month month day-of-week) or 6 with a leading seconds field"
                ),
            )
        })?;
        Ok(CronSchedule {
            cron,
            tz,
            source: expr.to_string(),
        })
    }

    /// The expression as given.
    pub fn expression(&self) -> &str {
        &self.source
    }

    /// The time zone the expression is read in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first firing strictly after `after_ms` (Unix ms), in Unix ms;
    /// None if there is none.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        // Firings are whole seconds, so the first one after `after_ms` is
        // the first one after the whole second it falls in.
        let secs = after_ms.div_euclid(1000);
        let start: DateTime<Tz> = Utc.timestamp_opt(secs, 0).single()?.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&start, false)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// The next `n` firings after `after_ms` (for previews).
    pub fn upcoming(&self, after_ms: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n.min(1024));
        let mut from = after_ms;
        while out.len() < n {
            match self.next_after(from) {
                Some(t) => {
                    out.push(t);
                    from = t;
                }
                None => break,
            }
        }
        out
    }
}

impl Schedule {
    /// Checks that exactly one of `at` or `cron` is set, that `timezone`
    /// comes only with `cron`, and that the expression and zone parse and
    /// the expression fires at least once more.
    /// Errors name the field relative to the schedule (`at`, `cron`, `timezone`).
    pub fn validate(&self) -> Result<()> {
        match (&self.at, &self.cron) {
            (Some(_), Some(_)) => Err(Error::invalid(
                "cron",
                "give either at (one run) or cron (recurring), not both",
            )),
            (None, None) => Err(Error::invalid(
                "at",
                "a schedule needs at (an RFC 3339 time for one run) or cron (a recurring expression)",
            )),
            (Some(_), None) => {
                if self.timezone.is_some() {
                    return Err(Error::invalid(
                        "timezone",
                        "only applies to cron; at is an absolute RFC 3339 time (give its offset there)",
                    ));
                }
                Ok(())
            }
            (None, Some(expr)) => {
                let schedule = CronSchedule::parse(expr, self.timezone.as_deref())?;
                if schedule.next_after(Timestamp::now().0).is_none() {
                    return Err(Error::invalid(
                        "cron",
                        format!("{expr:?} never fires (check the day and month fields)"),
                    ));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a UTC wall-clock time.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp_millis()
    }

    fn field_of(e: Error) -> (String, String) {
        match e {
            Error::InvalidInput { field, message } => (field, message),
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn five_fields_fire_on_the_minute() {
        let c = CronSchedule::parse("30 9 * * *", None).unwrap();
        assert_eq!(
            c.next_after(utc(2025, 1, 10, 8, 0, 0)),
            Some(utc(2025, 1, 10, 9, 30, 0))
        );
        assert_eq!(
            c.next_after(utc(2025, 1, 10, 9, 30, 1)),
            Some(utc(2025, 1, 11, 9, 30, 0))
        );
        let weekdays = CronSchedule::parse("0 12 * * MON-FRI", None).unwrap();
        // 2025-01-10 is a Friday; the next weekday is Monday the 13th.
        assert_eq!(
            weekdays.next_after(utc(2025, 1, 10, 13, 0, 0)),
            Some(utc(2025, 1, 13, 12, 0, 0))
        );
    }

    #[test]
    fn six_fields_have_seconds() {
        let c = CronSchedule::parse("15 30 9 * * *", None).unwrap();
        assert_eq!(
            c.next_after(utc(2025, 1, 10, 8, 0, 0)),
            Some(utc(2025, 1, 10, 9, 30, 15))
        );
        let every_five = CronSchedule::parse("0 */5 * * * *", None).unwrap();
        assert_eq!(
            every_five.upcoming(utc(2025, 1, 10, 8, 1, 0), 3),
            vec![
                utc(2025, 1, 10, 8, 5, 0),
                utc(2025, 1, 10, 8, 10, 0),
                utc(2025, 1, 10, 8, 15, 0)
            ]
        );
    }

    #[test]
    fn every_second() {
        let c = CronSchedule::parse("* * * * * *", None).unwrap();
        let t = utc(2025, 6, 1, 0, 0, 0);
        assert_eq!(c.next_after(t), Some(t + 1000));
        assert_eq!(c.next_after(t + 1), Some(t + 1000));
        assert_eq!(c.next_after(t + 999), Some(t + 1000));
        assert_eq!(c.next_after(t - 1), Some(t));
        assert_eq!(c.upcoming(t, 3), vec![t + 1000, t + 2000, t + 3000]);
    }

    #[test]
    fn strictly_after_a_slot() {
        let c = CronSchedule::parse("0 */5 * * * *", None).unwrap();
        let slot = utc(2025, 1, 10, 8, 5, 0);
        assert_eq!(c.next_after(slot), Some(utc(2025, 1, 10, 8, 10, 0)));
        assert_eq!(c.next_after(slot - 1), Some(slot));
        assert_eq!(c.next_after(slot + 1), Some(utc(2025, 1, 10, 8, 10, 0)));
    }

    #[test]
    fn nicknames() {
        let c = CronSchedule::parse("@hourly", None).unwrap();
        assert_eq!(
            c.next_after(utc(2025, 1, 10, 8, 0, 0)),
            Some(utc(2025, 1, 10, 9, 0, 0))
        );
        let d = CronSchedule::parse("@daily", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            d.next_after(utc(2025, 1, 10, 8, 0, 0)),
            Some(utc(2025, 1, 10, 23, 0, 0))
        );
    }

    #[test]
    fn time_zone_offsets_follow_dst() {
        let c = CronSchedule::parse("0 0 9 * * *", Some("America/New_York")).unwrap();
        assert_eq!(c.timezone(), chrono_tz::America::New_York);
        // Winter, EST (UTC-5).
        assert_eq!(
            c.next_after(utc(2025, 1, 15, 0, 0, 0)),
            Some(utc(2025, 1, 15, 14, 0, 0))
        );
        // Summer, EDT (UTC-4).
        assert_eq!(
            c.next_after(utc(2025, 7, 15, 0, 0, 0)),
            Some(utc(2025, 7, 15, 13, 0, 0))
        );
    }

    #[test]
    fn berlin_dst_gap_and_overlap() {
        // 2025-03-30: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist.
        // A fixed time of day runs once at the first instant after the gap.
        let fixed = CronSchedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            fixed.upcoming(utc(2025, 3, 29, 12, 0, 0), 2),
            vec![
                utc(2025, 3, 30, 1, 0, 0),  // 03:00 CEST
                utc(2025, 3, 31, 0, 30, 0), // 02:30 CEST
            ]
        );
        // An interval expression skips the times inside the gap.
        let every_half_hour = CronSchedule::parse("*/30 * * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            every_half_hour.upcoming(utc(2025, 3, 30, 0, 15, 0), 3),
            vec![
                utc(2025, 3, 30, 0, 30, 0), // 01:30 CET
                utc(2025, 3, 30, 1, 0, 0),  // 03:00 CEST
                utc(2025, 3, 30, 1, 30, 0), // 03:30 CEST
            ]
        );
        // 2025-10-26: 03:00 CEST goes back to 02:00 CET, so 02:30 happens
        // twice; a fixed time fires only at the first.
        assert_eq!(
            fixed.upcoming(utc(2025, 10, 25, 12, 0, 0), 2),
            vec![
                utc(2025, 10, 26, 0, 30, 0), // 02:30 CEST
                utc(2025, 10, 27, 1, 30, 0), // 02:30 CET, next day
            ]
        );
    }

    #[test]
    fn impossible_dates_never_fire() {
        let c = CronSchedule::parse("0 0 30 2 *", None).unwrap();
        assert_eq!(c.next_after(utc(2025, 1, 1, 0, 0, 0)), None);
        assert!(c.upcoming(utc(2025, 1, 1, 0, 0, 0), 3).is_empty());
    }

    #[test]
    fn parse_errors_name_the_field() {
        for bad in [
            "",
            "* * *",
            "61 * * * *",
            "* * * * * * *",
            "every day",
            "*/0 * * * *",
        ] {
            let (field, msg) = field_of(CronSchedule::parse(bad, None).unwrap_err());
            assert_eq!(field, "cron", "{bad:?}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        }
        let (field, msg) =
            field_of(CronSchedule::parse("* * * * *", Some("Mars/Base")).unwrap_err());
        assert_eq!(field, "timezone");
        assert_eq!(
            msg,
            "unknown time zone \"Mars/Base\"; use an IANA name such as Europe/Berlin"
        );
    }

    #[test]
    fn schedule_validation() {
        let cron = |c: &str, tz: Option<&str>| Schedule {
            at: None,
            cron: Some(c.into()),
            timezone: tz.map(Into::into),
        };
        cron("0 */5 * * * *", None).validate().unwrap();
        cron("0 9 * * *", Some("Europe/Berlin")).validate().unwrap();
        Schedule {
            at: Some(Timestamp(1_700_000_000_000)),
            cron: None,
            timezone: None,
        }
        .validate()
        .unwrap();

        let cases = [
            (cron("nope", None), "cron"),
            (cron("0 0 30 2 *", None), "cron"),
            (cron("* * * * *", Some("Mars/Base")), "timezone"),
            (
                Schedule {
                    at: Some(Timestamp(1)),
                    cron: Some("* * * * *".into()),
                    timezone: None,
                },
                "cron",
            ),
            (
                Schedule {
                    at: None,
                    cron: None,
                    timezone: None,
                },
                "at",
            ),
            (
                Schedule {
                    at: Some(Timestamp(1)),
                    cron: None,
                    timezone: Some("UTC".into()),
                },
                "timezone",
            ),
        ];
        for (s, want) in cases {
            let (field, _) = field_of(s.validate().unwrap_err());
            assert_eq!(field, want, "{s:?}");
        }
    }
}
