//! Timestamps in the API's JSON, written as poem-openapi writes them, so serde's bytes and the
//! OpenAPI document agree (`json` and `types` both use these).

/// Timestamps as poem-openapi writes them (chrono's `to_rfc3339`: `+00:00`, not `Z`, and 0, 3, 6
/// or 9 fraction digits), without chrono's formatting machinery, which cost more than the rest of
/// a job's JSON.
pub fn rfc3339<S: serde::Serializer>(time: &chrono::DateTime<chrono::Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    let nanos = time.nanosecond();
    if !(0..=9999).contains(&time.year()) || nanos >= 1_000_000_000 {
        return serializer.collect_str(&time.to_rfc3339());
    }
    let mut text = Text::default();
    text.digits(time.year() as u32, 4);
    for (separator, value) in [(b'-', time.month()), (b'-', time.day()), (b'T', time.hour())] {
        text.push(separator);
        text.digits(value, 2);
    }
    for value in [time.minute(), time.second()] {
        text.push(b':');
        text.digits(value, 2);
    }
    let fraction = match nanos {
        0 => None,
        n if n % 1_000_000 == 0 => Some((n / 1_000_000, 3)),
        n if n % 1_000 == 0 => Some((n / 1_000, 6)),
        n => Some((n, 9)),
    };
    if let Some((value, width)) = fraction {
        text.push(b'.');
        text.digits(value, width);
    }
    for byte in *b"+00:00" {
        text.push(byte);
    }
    serializer.serialize_str(std::str::from_utf8(&text.bytes[..text.len]).expect("ASCII digits"))
}

/// A timestamp's text, built on the stack.
struct Text {
    bytes: [u8; 35],
    len: usize,
}

impl Default for Text {
    fn default() -> Self {
        Self { bytes: [0; 35], len: 0 }
    }
}

impl Text {
    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    fn digits(&mut self, mut value: u32, width: usize) {
        for place in (0..width).rev() {
            self.bytes[self.len + place] = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width;
    }
}

/// [`rfc3339`] of an optional timestamp (absent ones are skipped by the caller).
pub fn rfc3339_opt<S: serde::Serializer>(
    time: &Option<chrono::DateTime<chrono::Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        #[derive(Serialize)]
        struct At(#[serde(serialize_with = "rfc3339")] chrono::DateTime<chrono::Utc>);
        let base = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let nanos = [0, 1, 7_000, 120_000_000, 123_456_000, 999_999_999, 5];
        let mut times: Vec<_> = nanos.iter().map(|n| base + chrono::Duration::nanoseconds(*n)).collect();
        times.push(chrono::DateTime::from_timestamp(0, 0).unwrap());
        times.push(chrono::DateTime::from_timestamp(253_402_300_799, 999_000_000).unwrap());
        times.push(chrono::DateTime::from_timestamp(-62_135_596_800, 0).unwrap());
        times.push(chrono::Utc::now());
        for time in times {
            assert_eq!(serde_json::to_value(At(time)).unwrap(), time.to_rfc3339(), "{time:?}");
        }
    }
}
