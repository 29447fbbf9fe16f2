//! Cron expressions of recurring schedules (`schedule.cron`), in a time zone.

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::spec::Schedule;
use crate::error::{Error, Result};

/// A parsed recurring schedule.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    tz: Tz,
    source: String,
}

impl CronSchedule {
    /// Parses `expr`: 5 fields (minute granularity), or 6 with a leading
    /// seconds field; `@hourly`-style aliases too. `timezone` is an IANA
    /// name (default UTC).
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<Self> {
        let tz: Tz = match timezone {
            None => Tz::UTC,
            Some(name) => name.parse().map_err(|_| {
                Error::invalid(
                    "timezone",
                    format!(
                        "unknown time zone {name:?}; use an IANA name such as Europe/Berlin or UTC"
                    ),
                )
            })?,
        };
        if expr.trim().is_empty() || expr.len() > 256 {
            return Err(Error::invalid(
                "cron",
                "must be a cron expression of 5 or 6 fields, e.g. \"0 */5 * * * *\"",
            ));
        }
        let fields = expr.split_whitespace().count();
        if !expr.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(Error::invalid(
                "cron",
                format!(
                    "{expr:?} has {fields} fields; give 5 (minute hour day month weekday) or 6 (with seconds first)"
                ),
            ));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let cron = parser.parse(expr).map_err(|e| {
            Error::invalid(
                "cron",
                format!("{expr:?} is not a valid cron expression: {e}"),
            )
        })?;
        Ok(CronSchedule {
            cron,
            tz,
            source: expr.to_string(),
        })
    }

    /// The expression as given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The first firing strictly after `after_ms` (Unix ms), in Unix ms.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let start = Utc.timestamp_millis_opt(after_ms).single()?;
        let local = start.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.timestamp_millis())
            .filter(|t| *t > after_ms)
    }

    /// The next `n` firings after `after_ms` (for previews).
    pub fn upcoming(&self, after_ms: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        let mut t = after_ms;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

impl Schedule {
    /// Exactly one of `at` or `cron`; `timezone` only with `cron`; the
    /// expression and zone must parse. Fields are relative to the schedule.
    pub fn validate(&self) -> Result<()> {
        match (&self.at, &self.cron) {
            (Some(_), Some(_)) => Err(Error::invalid(
                "cron",
                "give either at (a one-off time) or cron (recurring), not both",
            )),
            (None, None) => Err(Error::invalid(
                "at",
                "give at (an RFC 3339 time) or cron (a cron expression)",
            )),
            (Some(_), None) if self.timezone.is_some() => Err(Error::invalid(
                "timezone",
                "only applies to cron; `at` carries its own offset",
            )),
            (Some(_), None) => Ok(()),
            (None, Some(expr)) => CronSchedule::parse(expr, self.timezone.as_deref()).map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn five_and_six_fields() {
        let c = CronSchedule::parse("*/5 * * * *", None).unwrap();
        assert_eq!(
            c.next_after(ms("2027-01-01T10:02:30Z")),
            Some(ms("2027-01-01T10:05:00Z"))
        );
        let c = CronSchedule::parse("0 */5 * * * *", None).unwrap();
        assert_eq!(
            c.next_after(ms("2027-01-01T10:02:30Z")),
            Some(ms("2027-01-01T10:05:00Z"))
        );
        let every = CronSchedule::parse("* * * * * *", None).unwrap();
        assert_eq!(
            every.upcoming(ms("2027-01-01T10:00:00.500Z"), 3),
            vec![
                ms("2027-01-01T10:00:01Z"),
                ms("2027-01-01T10:00:02Z"),
                ms("2027-01-01T10:00:03Z")
            ]
        );
    }

    #[test]
    fn strictly_after_a_slot() {
        let c = CronSchedule::parse("0 * * * * *", None).unwrap();
        assert_eq!(
            c.next_after(ms("2027-01-01T10:00:00Z")),
            Some(ms("2027-01-01T10:01:00Z"))
        );
    }

    #[test]
    fn time_zones_and_daylight_saving() {
        let c = CronSchedule::parse("0 0 9 * * *", Some("America/New_York")).unwrap();
        // Winter: UTC-5; summer: UTC-4.
        assert_eq!(
            c.next_after(ms("2027-01-10T00:00:00Z")),
            Some(ms("2027-01-10T14:00:00Z"))
        );
        assert_eq!(
            c.next_after(ms("2027-07-10T00:00:00Z")),
            Some(ms("2027-07-10T13:00:00Z"))
        );
        // 02:30 does not exist in Berlin on 2027-03-28: that day is skipped.
        let c = CronSchedule::parse("0 30 2 * * *", Some("Europe/Berlin")).unwrap();
        let next = c.next_after(ms("2027-03-27T12:00:00Z")).unwrap();
        assert_ne!(next, ms("2027-03-28T00:30:00Z"));
        assert!(next > ms("2027-03-28T00:00:00Z"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = CronSchedule::parse("61 * * * *", None).unwrap_err();
        assert!(e.to_string().contains("invalid cron"), "{e}");
        let e = CronSchedule::parse("* * *", None).unwrap_err();
        assert!(e.to_string().contains("3 fields"), "{e}");
        let e = CronSchedule::parse("* * * * *", Some("Mars/Base")).unwrap_err();
        assert!(e.to_string().contains("invalid timezone"), "{e}");
        let s = Schedule {
            at: None,
            cron: None,
            timezone: None,
        };
        assert!(s.validate().unwrap_err().to_string().contains("invalid at"));
    }
}
