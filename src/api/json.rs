//! A JSON payload written straight from the value with serde.
//!
//! poem-openapi's `Json<T>` converts the value into a `serde_json::Value` tree first (an
//! allocation per field), which was the largest single cost of `GET /api/v1/jobs/{id}`. The hot
//! response types derive `serde::Serialize` with the same names and formats as their OpenAPI
//! schema; `tests` below checks that both give the same JSON, so the document stays the truth.

use poem::{IntoResponse, Response, http::header};
use poem_openapi::{
    ApiResponse,
    payload::{Json, Payload},
    registry::{MetaResponses, MetaSchemaRef, Registry},
    types::{ToJSON, Type},
};
use serde::Serialize;

/// A JSON response body, documented like `Json<T>`, serialised with serde.
pub struct JsonBody<T>(pub T);

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = Json::<T>::CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        Json::<T>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Type + Serialize + Send> IntoResponse for JsonBody<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => Response::builder().header(header::CONTENT_TYPE, Self::CONTENT_TYPE).body(body),
            Err(error) => poem::Error::from_string(
                format!("cannot serialise the response: {error}"),
                poem::http::StatusCode::INTERNAL_SERVER_ERROR,
            )
            .into_response(),
        }
    }
}

impl<T: Type + ToJSON + Serialize + Send> ApiResponse for JsonBody<T> {
    fn meta() -> MetaResponses {
        Json::<T>::meta()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

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
    use crate::api::types::{Health, Job, JobList, JobStatus, JobStatusReason};
    use poem_openapi::types::Example;

    /// serde and poem-openapi write the same bytes, so the OpenAPI document describes what is sent.
    fn same_json<T: ToJSON + Serialize>(value: &T) {
        let documented = value.to_json().expect("a value").to_string();
        assert_eq!(serde_json::to_string(value).unwrap(), documented);
    }

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

    #[test]
    fn serde_writes_what_the_schema_documents() {
        let full = Job::example();
        same_json(&full);
        let mut sparse = full.clone();
        (sparse.reason, sparse.message, sparse.started_at, sparse.finished_at) = (None, None, None, None);
        (sparse.model, sparse.profile, sparse.result, sparse.trace_id) = (None, None, None, None);
        sparse.labels.clear();
        same_json(&sparse);
        let mut every = full.clone();
        every.status = JobStatus::Failed;
        every.reason = Some(JobStatusReason::OomKilled);
        every.message = Some("quotes \" and \n newlines and ünïcode".into());
        every.started_at = Some(chrono::Utc::now());
        every.finished_at = Some(chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap());
        (every.model, every.profile, every.result) = (Some("m".into()), Some("small".into()), Some("r".into()));
        same_json(&every);
        same_json(&JobList { items: vec![full, sparse, every], next_page_token: Some("t".into()) });
        same_json(&JobList { items: vec![], next_page_token: None });
        same_json(&Health { status: "ok".into(), backend: "local".into() });
    }
}
