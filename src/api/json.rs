//! JSON responses written straight with serde.
//!
//! poem-openapi's `Json<T>` converts the value into a `serde_json::Value` tree first (an
//! allocation per field), which was the largest single cost of `GET /api/v1/jobs/{id}`. Here the
//! response types derive `serde::Serialize` with the same names and formats as their OpenAPI
//! schema, and jobs are written from their shared records ([`JobJson`], [`JobListJson`]) without
//! copying them into the API types first. `tests` below checks that every path gives the bytes
//! poem-openapi would, so the document stays the truth.

use super::{
    timestamp::rfc3339,
    types::{JobBudget, JobQueue, JobStatus, JobStatusReason, Usage},
};
use crate::jobs::{JobId, JobRecord, JobUsage};
use poem::{IntoResponse, Request, RequestBody, Response, http::header};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions,
    error::ContentTypeError,
    payload::{Json, ParsePayload, Payload},
    registry::{MetaMediaType, MetaRequest, MetaResponse, MetaResponses, MetaSchemaRef, Registry},
    types::{ParseFromJSON, ToJSON, Type},
};
use serde::Serialize;
use std::{collections::HashMap, marker::PhantomData, sync::Arc};

/// The media type of JSON bodies, in the document and on the wire: plain `application/json`.
/// (poem-openapi's `Json` declares `application/json; charset=utf-8`, and some client generators
/// turn that parameter into method and type names such as `CreateJobWithApplicationJSONCharsetUTF8Body`.)
pub const JSON: &str = "application/json";

/// A JSON request or response body: poem-openapi's [`Json`], declared as plain [`JSON`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainJson<T>(pub T);

impl<T: Type> Payload for PlainJson<T> {
    const CONTENT_TYPE: &'static str = JSON;

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

impl<T: ParseFromJSON> ParsePayload for PlainJson<T> {
    const IS_REQUIRED: bool = T::IS_REQUIRED;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        <Json<T> as ParsePayload>::from_request(request, body).await.map(|json| Self(json.0))
    }
}

impl<'a, T: ParseFromJSON> ApiExtractor<'a> for PlainJson<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType { content_type: JSON, schema: T::schema_ref() }],
            required: T::IS_REQUIRED,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _options: ExtractParamOptions<()>,
    ) -> poem::Result<Self> {
        match request.content_type() {
            Some(content_type) if Self::check_content_type(content_type) => {
                <Self as ParsePayload>::from_request(request, body).await
            }
            Some(content_type) => Err(ContentTypeError::NotSupported { content_type: content_type.to_owned() }.into()),
            None => Err(ContentTypeError::ExpectContentType.into()),
        }
    }
}

impl<T: ToJSON> IntoResponse for PlainJson<T> {
    fn into_response(self) -> Response {
        let body = self.0.to_json().map(|value| value.to_string()).unwrap_or_else(|| "null".into());
        Response::builder().header(header::CONTENT_TYPE, JSON).body(body)
    }
}

impl<T: ToJSON> ApiResponse for PlainJson<T> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType { content_type: JSON, schema: T::schema_ref() }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

/// A JSON response body documented as the schema `S` (like `Json<S>`) and written with serde from
/// `T`: `S` itself, or a view that writes the same JSON without building an `S` first.
pub struct JsonBody<S, T = S>(T, PhantomData<fn() -> S>);

impl<S, T> JsonBody<S, T> {
    pub fn new(value: T) -> Self {
        Self(value, PhantomData)
    }
}

impl<S: Type, T: Send> Payload for JsonBody<S, T> {
    const CONTENT_TYPE: &'static str = JSON;

    fn check_content_type(content_type: &str) -> bool {
        Json::<S>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        S::schema_ref()
    }

    fn register(registry: &mut Registry) {
        S::register(registry);
    }
}

/// A response body's bytes.
pub trait EncodeJson {
    fn encode_json(&self) -> serde_json::Result<bytes::Bytes>;
}

/// Types written as they are.
macro_rules! encode_with_serde {
    ($($type:ty),*) => {$(
        impl EncodeJson for $type {
            fn encode_json(&self) -> serde_json::Result<bytes::Bytes> {
                serde_json::to_vec(self).map(bytes::Bytes::from)
            }
        }
    )*};
}
encode_with_serde!(super::types::Job, super::types::JobList, super::types::Health);

/// A page is the jobs' own (mostly memoized) bytes joined: writing it copies, it does not
/// serialise each job again.
impl EncodeJson for JobListJson {
    fn encode_json(&self) -> serde_json::Result<bytes::Bytes> {
        let mut body = Vec::with_capacity(1024 * (self.items.len() + 1));
        body.extend_from_slice(b"{\"items\":[");
        for (i, record) in self.items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            let usage = self.usage.get(&record.id).copied();
            body.extend_from_slice(&JobJson(record.clone(), usage).encode_json()?);
        }
        body.push(b']');
        if let Some(token) = &self.next_page_token {
            body.extend_from_slice(b",\"next_page_token\":");
            serde_json::to_writer(&mut body, token)?;
        }
        body.push(b'}');
        Ok(body.into())
    }
}

/// A job is written once per version of its record: polls of an unchanged job reuse the bytes.
/// Usage changes without the record, so a job with usage is written afresh.
impl EncodeJson for JobJson {
    fn encode_json(&self) -> serde_json::Result<bytes::Bytes> {
        match self.1 {
            Some(_) => serde_json::to_vec(self).map(bytes::Bytes::from),
            None => self.0.json.get_or_try_init(|| serde_json::to_vec(self).map(bytes::Bytes::from)),
        }
    }
}

impl<S: Type, T: EncodeJson + Send> IntoResponse for JsonBody<S, T> {
    fn into_response(self) -> Response {
        match self.0.encode_json() {
            Ok(body) => {
                let content_type = header::HeaderValue::from_static(Self::CONTENT_TYPE);
                Response::builder().header(header::CONTENT_TYPE, content_type).body(body)
            }
            Err(error) => poem::Error::from_string(
                format!("cannot serialise the response: {error}"),
                poem::http::StatusCode::INTERNAL_SERVER_ERROR,
            )
            .into_response(),
        }
    }
}

impl<S: Type + ToJSON, T: EncodeJson + Send> ApiResponse for JsonBody<S, T> {
    fn meta() -> MetaResponses {
        PlainJson::<S>::meta()
    }

    fn register(registry: &mut Registry) {
        S::register(registry);
    }
}

/// A job's JSON (schema [`Job`](super::types::Job)) written straight from its shared record, with
/// what it spent on model calls.
pub struct JobJson(pub Arc<JobRecord>, pub Option<JobUsage>);

impl Serialize for JobJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = &*self.0;
        let status: JobStatus = r.status.phase.into();
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", r.id.as_str())?;
        map.serialize_entry("status", &status)?;
        if let Some(reason) = r.status.reason {
            map.serialize_entry("reason", &JobStatusReason::from(reason))?;
        }
        if let Some(message) = &r.status.message {
            map.serialize_entry("message", message)?;
        }
        if let Some(queue) = &r.queue {
            map.serialize_entry("queue", &JobQueue::from(queue))?;
        }
        map.serialize_entry("created_at", &Timestamp(r.created_at))?;
        if let Some(started_at) = r.started_at {
            map.serialize_entry("started_at", &Timestamp(started_at))?;
        }
        if let Some(finished_at) = r.finished_at {
            map.serialize_entry("finished_at", &Timestamp(finished_at))?;
        }
        map.serialize_entry("attempts", &r.attempts)?;
        map.serialize_entry("goal", &r.spec.goal)?;
        map.serialize_entry("max_turns", &r.spec.max_turns)?;
        map.serialize_entry("timeout_seconds", &r.spec.timeout_seconds)?;
        if let Some(model) = &r.spec.model {
            map.serialize_entry("model", model)?;
        }
        if let Some(profile) = &r.spec.profile {
            map.serialize_entry("profile", profile)?;
        }
        map.serialize_entry("labels", &r.spec.labels)?;
        if !r.spec.budget.is_unlimited() {
            map.serialize_entry("budget", &JobBudget::from(r.spec.budget))?;
        }
        if let Some(usage) = &self.1 {
            map.serialize_entry("usage", &Usage::from(usage))?;
        }
        if let Some(result) = &r.result {
            map.serialize_entry("result", result)?;
        }
        if let Some(trace_id) = r.trace.as_ref().and_then(|t| t.trace_id()) {
            map.serialize_entry("trace_id", trace_id)?;
        }
        map.serialize_entry("links", &Links(r.id.as_str()))?;
        map.end()
    }
}

/// A page of jobs (schema [`JobList`](super::types::JobList)) written from shared records.
pub struct JobListJson {
    pub items: Vec<Arc<JobRecord>>,
    pub next_page_token: Option<String>,
    /// What the listed jobs spent on model calls (jobs that made none are absent).
    pub usage: HashMap<JobId, JobUsage>,
}

impl Serialize for JobListJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Items<'a>(&'a [Arc<JobRecord>], &'a HashMap<JobId, JobUsage>);
        impl Serialize for Items<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
                for record in self.0 {
                    seq.serialize_element(&JobJson(record.clone(), self.1.get(&record.id).copied()))?;
                }
                seq.end()
            }
        }
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("items", &Items(&self.items, &self.usage))?;
        if let Some(token) = &self.next_page_token {
            map.serialize_entry("next_page_token", token)?;
        }
        map.end()
    }
}

/// `links` of a job, written without building the strings first.
struct Links<'a>(&'a str);

impl Serialize for Links<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let id = self.0;
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("self", &format_args!("/api/v1/jobs/{id}"))?;
        map.serialize_entry("logs", &format_args!("/api/v1/jobs/{id}/logs"))?;
        map.serialize_entry("events", &format_args!("/api/v1/jobs/{id}/events"))?;
        map.serialize_entry("cancel", &format_args!("/api/v1/jobs/{id}/cancel"))?;
        map.end()
    }
}

struct Timestamp(chrono::DateTime<chrono::Utc>);

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        rfc3339(&self.0, serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{Health, Job, JobList};
    use poem_openapi::types::Example;

    /// serde and poem-openapi write the same bytes, so the OpenAPI document describes what is sent.
    fn same_json<T: ToJSON + Serialize>(value: &T) {
        let documented = value.to_json().expect("a value").to_string();
        assert_eq!(serde_json::to_string(value).unwrap(), documented);
    }

    fn usage(every_field: bool) -> JobUsage {
        use crate::jobs::{NanoUsd, Refusal, TokenCounts};
        JobUsage {
            model_calls: 3,
            tokens: TokenCounts { input: 120, output: 45, cached_input: 20, reasoning: 5 },
            cost: NanoUsd(1_234_567),
            tokens_left: every_field.then_some(835),
            cost_left: every_field.then_some(NanoUsd(98_765_433)),
            refused: every_field.then_some(Refusal::JobTokens),
        }
    }

    fn record(every_field: bool) -> Arc<JobRecord> {
        use crate::jobs::{JobId, JobLimits, JobPhase, JobReason, JobRequest, TraceContext};
        let spec = JobRequest {
            goal: "say \"hi\" ü\n".into(),
            max_turns: 3,
            labels: if every_field { [("team".to_string(), "a".to_string())].into() } else { Default::default() },
            model: every_field.then(|| "m".into()),
            budget: crate::jobs::Budget {
                max_tokens: every_field.then_some(1000),
                max_cost: every_field.then_some(crate::jobs::NanoUsd(100_000_000)),
            },
            ..Default::default()
        }
        .validate(&JobLimits::default())
        .unwrap();
        let now = chrono::Utc::now();
        Arc::new(JobRecord {
            id: JobId::random(),
            tenant: "t".into(),
            spec: crate::jobs::JobSpec { profile: every_field.then(|| "small".into()), ..spec },
            status: if every_field {
                crate::jobs::JobState::with_reason(JobPhase::Failed, JobReason::OOMKilled, "killed")
            } else {
                crate::jobs::JobState::new(JobPhase::Pending)
            },
            created_at: now,
            started_at: every_field.then_some(now),
            finished_at: every_field.then(|| chrono::DateTime::from_timestamp(1_800_000_000, 5_000).unwrap()),
            attempts: 2,
            result: every_field.then(|| "the answer".into()),
            request_hash: "h".into(),
            trace: every_field.then(|| TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: None,
            }),
            queue: None,
            json: Default::default(),
        })
    }

    #[test]
    fn views_of_records_write_what_the_schema_documents() {
        for every_field in [false, true] {
            let record = record(every_field);
            let documented = Job::from(&*record).to_json().unwrap().to_string();
            assert_eq!(serde_json::to_string(&JobJson(record.clone(), None)).unwrap(), documented);
            // Encoded once, then reused; a changed copy is encoded afresh.
            assert_eq!(JobJson(record.clone(), None).encode_json().unwrap(), documented.as_bytes());
            assert_eq!(JobJson(record.clone(), None).encode_json().unwrap(), documented.as_bytes());
            // Usage is written afresh each time, beside the memoized record.
            let usage = usage(every_field);
            let with_usage = Job::with_usage(&record, Some(&usage)).to_json().unwrap().to_string();
            assert_eq!(JobJson(record.clone(), Some(usage)).encode_json().unwrap(), with_usage.as_bytes());
            let mut changed = JobRecord::clone(&record);
            changed.attempts += 1;
            let changed = Arc::new(changed);
            let expected = Job::from(&*changed).to_json().unwrap().to_string();
            assert_eq!(JobJson(changed, None).encode_json().unwrap(), expected.as_bytes());
        }
        let items = vec![record(true), record(false)];
        let documented = JobList { items: items.iter().map(|r| Job::from(&**r)).collect(), next_page_token: None };
        let view = JobListJson { items: items.clone(), next_page_token: None, usage: HashMap::new() };
        assert_eq!(serde_json::to_string(&view).unwrap(), documented.to_json().unwrap().to_string());
        assert_eq!(view.encode_json().unwrap(), documented.to_json().unwrap().to_string().as_bytes());
        let view = JobListJson { items, next_page_token: Some("t\"".into()), usage: HashMap::new() };
        let documented = JobList { next_page_token: Some("t\"".into()), ..documented };
        assert_eq!(serde_json::to_string(&view).unwrap(), documented.to_json().unwrap().to_string());
        assert_eq!(view.encode_json().unwrap(), documented.to_json().unwrap().to_string().as_bytes());
        let usage = usage(true);
        let view = JobListJson { items: vec![record(false)], next_page_token: None, usage: HashMap::new() };
        let view = JobListJson { usage: [(view.items[0].id.clone(), usage)].into(), ..view };
        let documented = JobList { items: vec![Job::with_usage(&view.items[0], Some(&usage))], next_page_token: None };
        assert_eq!(view.encode_json().unwrap(), documented.to_json().unwrap().to_string().as_bytes());
        let empty = JobListJson { items: vec![], next_page_token: None, usage: HashMap::new() };
        assert_eq!(&empty.encode_json().unwrap()[..], br#"{"items":[]}"#);
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
