//! Durations, byte sizes and timestamps as they appear in specs and records.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as `"30s"`, `"5m"`, `"1h 30m"`, `"250ms"`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn from_secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub fn from_millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    pub fn as_millis(&self) -> u64 {
        self.0.as_millis().min(u64::MAX as u128) as u64
    }
}

impl From<Duration> for Dur {
    fn from(d: Duration) -> Self {
        Dur(d)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(secs) = t.parse::<u64>() {
            return Ok(Dur::from_secs(secs));
        }
        humantime::parse_duration(t).map(Dur).map_err(|e| {
            format!("expected a duration such as \"30s\", \"5m\" or \"1h\", got {s:?} ({e})")
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"5m\", \"1h\" or a number of seconds")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur::from_secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(Dur::from_secs)
                    .map_err(|_| E::custom(format!("a duration cannot be negative, got {v}")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dur, E> {
                if (0.0..1e12).contains(&v) {
                    Ok(Dur(Duration::from_secs_f64(v)))
                } else {
                    Err(E::custom(format!(
                        "expected a non-negative number of seconds, got {v}"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration: \"500ms\", \"30s\", \"5m\", \"1h 30m\", or a number of seconds.",
            "type": ["string", "number"],
            "examples": ["30s", "5m"]
        })
    }
}

/// A byte count written as a number or with a unit: `"512MiB"`, `"10MB"`, `"1GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| {
            format!("expected a size such as 1048576, \"512MiB\" or \"1GB\", got {s:?}")
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?}; use B, KB, KiB, MB, MiB, GB, GiB, TB or TiB"
                ));
            }
        };
        let v = n * mult as f64;
        if !(0.0..1.8e19).contains(&v) {
            return Err(format!("size {s:?} is out of range"));
        }
        Ok(ByteSize(v as u64))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte count such as 1048576 or \"512MiB\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative, got {v}")))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A byte count: a number, or a string with a unit (\"512MiB\", \"10MB\", \"1GiB\").",
            "type": ["integer", "string"],
            "minimum": 0
        })
    }
}

/// Milliseconds since the Unix epoch; serialized as RFC 3339 (UTC, milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }
    pub fn to_rfc3339(self) -> String {
        let t = UNIX_EPOCH + Duration::from_millis(self.0.max(0) as u64);
        humantime::format_rfc3339_millis(t).to_string()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Timestamp {
    /// An RFC 3339 time with any offset (`2026-05-01T09:30:00+02:00`,
    /// `...Z`, `...z`); a time without an offset is taken as UTC.
    pub fn parse(s: &str) -> Result<Timestamp, String> {
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            return Ok(Timestamp(t.timestamp_millis()));
        }
        let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
            format!("expected an RFC 3339 time such as 2026-05-01T09:30:00Z or 2026-05-01T11:30:00+02:00, got {s:?} ({e})")
        })?;
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| format!("expected an RFC 3339 time, got {s:?} (before 1970)"))?
            .as_millis() as i64;
        Ok(Timestamp(ms))
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "date-time" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_times_with_any_offset() {
        let utc = Timestamp::parse("2026-05-01T09:30:00Z").unwrap();
        assert_eq!(utc.0, 1_777_627_800_000);
        for same in [
            "2026-05-01T11:30:00+02:00",
            "2026-05-01T04:30:00-05:00",
            "2026-05-01t09:30:00z",
            "2026-05-01T09:30:00",
        ] {
            assert_eq!(Timestamp::parse(same), Ok(utc), "{same}");
        }
        assert_eq!(Timestamp::parse("1969-12-31T23:59:59Z").unwrap().0, -1000);
        let e = Timestamp::parse("tomorrow").unwrap_err();
        assert!(e.contains("RFC 3339") && e.contains("\"tomorrow\""), "{e}");
    }

    #[test]
    fn parses_durations() {
        assert_eq!("30s".parse::<Dur>().unwrap(), Dur::from_secs(30));
        assert_eq!("5m".parse::<Dur>().unwrap(), Dur::from_secs(300));
        assert_eq!("250ms".parse::<Dur>().unwrap(), Dur::from_millis(250));
        assert_eq!("12".parse::<Dur>().unwrap(), Dur::from_secs(12));
        assert!("soon".parse::<Dur>().is_err());
        assert_eq!(Dur::from_secs(90).to_string(), "1m 30s");
    }

    #[test]
    fn parses_sizes() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("10MB".parse::<ByteSize>().unwrap(), ByteSize(10_000_000));
        assert_eq!("100".parse::<ByteSize>().unwrap(), ByteSize(100));
        assert!("3 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn timestamps_round_trip() {
        let t = Timestamp(1_700_000_000_123);
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(s, "\"2023-11-14T22:13:20.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&s).unwrap(), t);
    }
}
