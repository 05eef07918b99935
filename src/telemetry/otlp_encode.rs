//! The OTLP protobuf wire format of a batch of spans, written straight from the SDK's `SpanData`.
//!
//! Upstream builds prost structs first (an owned `String` for every key and value, a `HashMap` of
//! scopes), then measures and encodes them; that was most of an exported span's cost. Here each
//! field goes into the body as it is read. The content is upstream's
//! (`opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope`) field for
//! field, which the golden test checks by decoding with upstream's types. Field numbers are those
//! of `opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto`.

use opentelemetry::{
    Array, InstrumentationScope, KeyValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status},
};
use opentelemetry_sdk::{Resource, trace::SpanData};
use std::time::{SystemTime, UNIX_EPOCH};

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `SpanFlags`: the span's parent-is-remote bit is meaningful / set (trace.proto).
const CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const CONTEXT_IS_REMOTE: u32 = 0x200;

/// The resource part of every request, encoded once when the SDK hands the resource over.
#[derive(Debug)]
pub struct EncodedResource {
    /// `ResourceSpans.resource` (field 1), tag and length included.
    resource_field: Vec<u8>,
    schema_url: String,
}

impl EncodedResource {
    pub fn new(resource: &Resource) -> Self {
        let mut buf = Vec::new();
        let start = open(&mut buf, 1);
        for (key, value) in resource.iter() {
            key_value(&mut buf, 1, key.as_str(), value);
        }
        close(&mut buf, start);
        Self { resource_field: buf, schema_url: resource.schema_url().unwrap_or_default().to_owned() }
    }
}

/// An empty resource, until the SDK hands the real one over (upstream sends an empty one too).
impl Default for EncodedResource {
    fn default() -> Self {
        Self::new(&Resource::builder_empty().build())
    }
}

/// An `ExportTraceServiceRequest` of one `ResourceSpans` with one `ScopeSpans` per distinct scope
/// (in order of first appearance, spans in batch order), as upstream groups them.
pub fn export_request(resource: &EncodedResource, spans: &[SpanData]) -> Vec<u8> {
    // A batch holds one or two scopes: comparing against the few seen is cheaper than hashing.
    let mut scopes: Vec<&InstrumentationScope> = Vec::new();
    let mut scope_of = Vec::with_capacity(spans.len());
    for span in spans {
        let index = match scopes.iter().position(|scope| **scope == span.instrumentation_scope) {
            Some(index) => index,
            None => {
                scopes.push(&span.instrumentation_scope);
                scopes.len() - 1
            }
        };
        scope_of.push(index);
    }
    let mut buf = Vec::with_capacity(256 + 512 * spans.len());
    let resource_spans = open(&mut buf, 1);
    buf.extend_from_slice(&resource.resource_field);
    for (index, scope) in scopes.iter().enumerate() {
        let scope_spans = open(&mut buf, 2);
        instrumentation_scope(&mut buf, scope);
        for (span, _) in spans.iter().zip(&scope_of).filter(|(_, of)| **of == index) {
            self::span(&mut buf, span);
        }
        string(&mut buf, 3, scope.schema_url().unwrap_or_default());
        close(&mut buf, scope_spans);
    }
    string(&mut buf, 3, &resource.schema_url);
    close(&mut buf, resource_spans);
    buf
}

/// `ScopeSpans.scope` (field 1): name, version, attributes.
fn instrumentation_scope(buf: &mut Vec<u8>, scope: &InstrumentationScope) {
    let start = open(buf, 1);
    string(buf, 1, scope.name());
    string(buf, 2, scope.version().unwrap_or_default());
    for attribute in scope.attributes() {
        key_value(buf, 3, attribute.key.as_str(), &attribute.value);
    }
    close(buf, start);
}

/// `ScopeSpans.spans` (field 2): one `Span`.
fn span(buf: &mut Vec<u8>, span: &SpanData) {
    let start = open(buf, 2);
    context_ids(buf, &span.span_context);
    if span.parent_span_id != SpanId::INVALID {
        bytes(buf, 4, &span.parent_span_id.to_bytes());
    }
    string(buf, 5, &span.name);
    uint(
        buf,
        6,
        match span.span_kind {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
            SpanKind::Producer => 4,
            SpanKind::Consumer => 5,
        },
    );
    fixed64(buf, 7, unix_nanos(span.start_time));
    fixed64(buf, 8, unix_nanos(span.end_time));
    attributes(buf, 9, &span.attributes);
    uint(buf, 10, span.dropped_attributes_count.into());
    for event in span.events.iter() {
        let start = open(buf, 11);
        fixed64(buf, 1, unix_nanos(event.timestamp));
        string(buf, 2, &event.name);
        attributes(buf, 3, &event.attributes);
        uint(buf, 4, event.dropped_attributes_count.into());
        close(buf, start);
    }
    uint(buf, 12, span.events.dropped_count.into());
    for link in span.links.iter() {
        let start = open(buf, 13);
        context_ids(buf, &link.span_context);
        attributes(buf, 4, &link.attributes);
        uint(buf, 5, link.dropped_attributes_count.into());
        fixed32(buf, 6, flags(&link.span_context, link.span_context.is_remote()));
        close(buf, start);
    }
    uint(buf, 14, span.links.dropped_count.into());
    let status = open(buf, 15);
    let code = match &span.status {
        Status::Unset => 0,
        Status::Ok => 1,
        Status::Error { description } => {
            string(buf, 2, description);
            2
        }
    };
    uint(buf, 3, code);
    close(buf, status);
    fixed32(buf, 16, flags(&span.span_context, span.parent_span_is_remote));
    close(buf, start);
}

/// trace_id (1), span_id (2) and trace_state (3): the same fields in `Span` and `Span.Link`.
fn context_ids(buf: &mut Vec<u8>, context: &SpanContext) {
    bytes(buf, 1, &context.trace_id().to_bytes());
    bytes(buf, 2, &context.span_id().to_bytes());
    string(buf, 3, &context.trace_state().header());
}

/// The W3C trace flags plus the parent-is-remote bits, as upstream's `build_span_flags` sets them.
fn flags(context: &SpanContext, remote: bool) -> u32 {
    let flags = u32::from(context.trace_flags().to_u8()) | CONTEXT_HAS_IS_REMOTE;
    if remote { flags | CONTEXT_IS_REMOTE } else { flags }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos() as u64)
}

fn attributes(buf: &mut Vec<u8>, field: u32, attributes: &[KeyValue]) {
    for attribute in attributes {
        key_value(buf, field, attribute.key.as_str(), &attribute.value);
    }
}

/// A `KeyValue` message as field `field`.
fn key_value(buf: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    // Most attributes are a short key with a short string: every length fits in one byte and is
    // known up front, so the message is written in two copies instead of field by field (this
    // was half of a span's encoding).
    if let Value::String(text) = value
        && !key.is_empty()
        && field < 16
    {
        let text = text.as_str().as_bytes();
        let any_value = 2 + text.len();
        let message = 2 + key.len() + 2 + any_value;
        if message < 0x80 {
            buf.reserve(2 + message);
            buf.extend_from_slice(&[len_tag(field), message as u8, len_tag(1), key.len() as u8]);
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(&[len_tag(2), any_value as u8, len_tag(1), text.len() as u8]);
            buf.extend_from_slice(text);
            return;
        }
    }
    let start = open(buf, field);
    string(buf, 1, key);
    any_value(buf, 2, value);
    close(buf, start);
}

/// An `AnyValue` message as field `field`: the oneof is always present, even when zero.
fn any_value(buf: &mut Vec<u8>, field: u32, value: &Value) {
    let start = open(buf, field);
    match value {
        Value::String(value) => string_always(buf, 1, value.as_str()),
        Value::Bool(value) => {
            tag(buf, 2, VARINT);
            varint(buf, u64::from(*value));
        }
        Value::I64(value) => {
            tag(buf, 3, VARINT);
            varint(buf, *value as u64);
        }
        Value::F64(value) => {
            tag(buf, 4, FIXED64);
            buf.extend_from_slice(&value.to_bits().to_le_bytes());
        }
        Value::Array(array) => {
            let values = open(buf, 5);
            match array {
                Array::Bool(items) => items.iter().for_each(|item| any_value(buf, 1, &Value::Bool(*item))),
                Array::I64(items) => items.iter().for_each(|item| any_value(buf, 1, &Value::I64(*item))),
                Array::F64(items) => items.iter().for_each(|item| any_value(buf, 1, &Value::F64(*item))),
                Array::String(items) => items.iter().for_each(|item| {
                    let start = open(buf, 1);
                    string_always(buf, 1, item.as_str());
                    close(buf, start);
                }),
                // Kinds added after 0.33 have no OTLP mapping here (upstream panics on them).
                _ => {}
            }
            close(buf, values);
        }
        // As for arrays: an `AnyValue` without a value.
        _ => {}
    }
    close(buf, start);
}

/// The one-byte tag of a length-delimited field numbered below 16.
fn len_tag(field: u32) -> u8 {
    ((field << 3) | LEN) as u8
}

fn tag(buf: &mut Vec<u8>, field: u32, wire_type: u32) {
    varint(buf, u64::from((field << 3) | wire_type));
}

fn varint(buf: &mut Vec<u8>, value: u64) {
    // Tags and most lengths fit in one byte.
    if value < 0x80 {
        buf.push(value as u8);
        return;
    }
    let (bytes, len) = varint_bytes(value);
    buf.extend_from_slice(&bytes[..len]);
}

fn varint_bytes(mut value: u64) -> ([u8; 10], usize) {
    let mut bytes = [0; 10];
    let mut len = 0;
    while value >= 0x80 {
        bytes[len] = value as u8 | 0x80;
        value >>= 7;
        len += 1;
    }
    bytes[len] = value as u8;
    (bytes, len + 1)
}

/// Starts a length-delimited field; returns where its content begins, for [`close`]. One byte is
/// set aside for the length: short messages (most attributes) need no move.
fn open(buf: &mut Vec<u8>, field: u32) -> usize {
    tag(buf, field, LEN);
    buf.push(0);
    buf.len()
}

/// Writes the length of the field [`open`] began, moving its content when the length needs more
/// than the byte set aside.
fn close(buf: &mut Vec<u8>, start: usize) {
    let len = buf.len() - start;
    if len < 0x80 {
        buf[start - 1] = len as u8;
        return;
    }
    let (prefix, prefix_len) = varint_bytes(len as u64);
    let end = buf.len();
    buf.resize(end + prefix_len - 1, 0);
    buf.copy_within(start..end, start + prefix_len - 1);
    buf[start - 1..start - 1 + prefix_len].copy_from_slice(&prefix[..prefix_len]);
}

/// A proto3 string field, left out when empty (as prost does).
fn string(buf: &mut Vec<u8>, field: u32, value: &str) {
    if !value.is_empty() {
        string_always(buf, field, value);
    }
}

/// A string inside a oneof: present even when empty.
fn string_always(buf: &mut Vec<u8>, field: u32, value: &str) {
    bytes(buf, field, value.as_bytes());
}

fn bytes(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
    tag(buf, field, LEN);
    varint(buf, value.len() as u64);
    buf.extend_from_slice(value);
}

/// A proto3 varint field (uint32, enum), left out when zero.
fn uint(buf: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        tag(buf, field, VARINT);
        varint(buf, value);
    }
}

fn fixed64(buf: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        tag(buf, field, FIXED64);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

fn fixed32(buf: &mut Vec<u8>, field: u32, value: u32) {
    if value != 0 {
        tag(buf, field, FIXED32);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::{
        StringValue,
        trace::{Event, Link, TraceFlags, TraceId, TraceState},
    };
    use opentelemetry_proto::{
        tonic::collector::trace::v1::ExportTraceServiceRequest,
        transform::{common::tonic::ResourceAttributesWithSchema, trace::tonic::group_spans_by_resource_and_scope},
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;
    use std::{borrow::Cow, time::Duration};

    fn every_value(prefix: &str) -> Vec<KeyValue> {
        let long = "x".repeat(300);
        // Strings around the length where a `KeyValue` stops fitting a one-byte length.
        let edges = (100..=115).map(|len| KeyValue::new(format!("{prefix}.edge{len}"), "e".repeat(len)));
        let mut values = vec![
            KeyValue::new(format!("{prefix}.string"), "value"),
            KeyValue::new("", "keyless"),
            KeyValue::new(format!("{prefix}.empty"), ""),
            KeyValue::new(format!("{prefix}.long"), long.clone()),
            KeyValue::new(format!("{prefix}.true"), true),
            KeyValue::new(format!("{prefix}.false"), false),
            KeyValue::new(format!("{prefix}.int"), 42_i64),
            KeyValue::new(format!("{prefix}.zero"), 0_i64),
            KeyValue::new(format!("{prefix}.negative"), -7_i64),
            KeyValue::new(format!("{prefix}.float"), 3.5_f64),
            KeyValue::new(format!("{prefix}.float_zero"), 0.0_f64),
            KeyValue::new(format!("{prefix}.bools"), Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new(format!("{prefix}.ints"), Value::Array(Array::I64(vec![1, 0, -1, i64::MAX]))),
            KeyValue::new(format!("{prefix}.floats"), Value::Array(Array::F64(vec![0.5, -0.0]))),
            KeyValue::new(
                format!("{prefix}.strings"),
                Value::Array(Array::String(vec![StringValue::from("a"), StringValue::from(""), long.into()])),
            ),
            KeyValue::new(format!("{prefix}.no_items"), Value::Array(Array::I64(vec![]))),
        ];
        values.extend(edges);
        values
    }

    fn context(trace: u128, span: u64, flags: TraceFlags, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(TraceId::from(trace), SpanId::from(span), flags, remote, state.parse::<TraceState>().unwrap())
    }

    fn span(n: u64, scope: &InstrumentationScope, kind: SpanKind, status: Status) -> SpanData {
        let at = |nanos: u64| UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + nanos);
        let mut events = SpanEvents::default();
        let mut links = SpanLinks::default();
        if n.is_multiple_of(2) {
            events.events = vec![
                Event::new("exception", at(n * 10 + 5), every_value("event"), 3),
                Event::new("empty", at(n * 10 + 6), vec![], 0),
            ];
            events.dropped_count = 4;
            links.links = vec![
                Link::new(context(0xabc, 0xdef, TraceFlags::SAMPLED, true, "vendor=link"), every_value("link"), 5),
                Link::new(context(0x123, 0x456, TraceFlags::default(), false, ""), vec![], 0),
            ];
            links.dropped_count = 6;
        }
        SpanData {
            span_context: context(
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                0x1000 + n,
                if n.is_multiple_of(3) { TraceFlags::default() } else { TraceFlags::SAMPLED },
                false,
                if n == 1 { "a=1,b=2" } else { "" },
            ),
            parent_span_id: if n == 0 { SpanId::INVALID } else { SpanId::from(0x00f0_67aa_0ba9_02b7) },
            parent_span_is_remote: n == 1,
            span_kind: kind,
            name: Cow::Owned(format!("span {n}")),
            start_time: at(n * 10),
            end_time: if n == 4 { UNIX_EPOCH } else { at(n * 10 + 9) },
            attributes: if n == 3 { vec![] } else { every_value("span") },
            dropped_attributes_count: n as u32,
            events,
            links,
            status,
            instrumentation_scope: scope.clone(),
        }
    }

    /// A batch with every field, value kind, span kind and status, spans of two scopes interleaved.
    fn batch() -> Vec<SpanData> {
        let oats = InstrumentationScope::builder("oats")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.26.0")
            .with_attributes(every_value("scope"))
            .build();
        let bare = InstrumentationScope::builder("kube_client").build();
        let error = |description: &'static str| Status::Error { description: description.into() };
        vec![
            span(0, &oats, SpanKind::Server, Status::Unset),
            span(1, &bare, SpanKind::Client, Status::Ok),
            span(2, &oats, SpanKind::Internal, error("it broke")),
            span(3, &oats, SpanKind::Producer, error("")),
            span(4, &bare, SpanKind::Consumer, Status::Unset),
            span(5, &oats, SpanKind::Server, Status::Ok),
        ]
    }

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_schema_url(
                [KeyValue::new("service.name", "oats-under-test"), KeyValue::new("service.instance.id", 7_i64)],
                "https://opentelemetry.io/schemas/1.26.0",
            )
            .with_attributes(every_value("resource"))
            .build()
    }

    fn decode(body: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(body).expect("a valid ExportTraceServiceRequest")
    }

    fn upstream(resource: &Resource, batch: Vec<SpanData>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &ResourceAttributesWithSchema::from(resource)),
        }
    }

    #[test]
    fn the_request_is_the_one_upstream_builds() {
        let resource = resource();
        let ours = decode(&export_request(&EncodedResource::new(&resource), &batch()));
        let theirs = upstream(&resource, batch());
        assert_eq!(ours, theirs);
        // The batch does exercise what it is meant to.
        let scopes = &theirs.resource_spans[0].scope_spans;
        assert_eq!(scopes.len(), 2);
        assert_eq!(scopes[0].spans.len(), 4);
        assert!(scopes[0].spans.iter().any(|s| !s.links.is_empty() && !s.events.is_empty()));
        assert!(scopes[1].spans.iter().any(|s| s.flags & CONTEXT_IS_REMOTE != 0));
    }

    #[test]
    fn an_empty_resource_and_an_empty_batch_match_upstream_too() {
        let resource = Resource::builder_empty().build();
        assert_eq!(decode(&export_request(&EncodedResource::new(&resource), &[])), upstream(&resource, vec![]));
        assert_eq!(
            decode(&export_request(&EncodedResource::default(), &batch())),
            upstream(&resource, batch()),
            "before the SDK hands the resource over"
        );
    }

    #[test]
    fn lengths_past_one_byte_are_written_in_full() {
        for len in [0_usize, 127, 128, 16_383, 16_384, 2_100_000] {
            let mut buf = Vec::new();
            let start = open(&mut buf, 1);
            buf.resize(start + len, b'x');
            close(&mut buf, start);
            let decoded = opentelemetry_proto::tonic::common::v1::AnyValue::decode(buf.as_slice()).unwrap();
            let Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(value)) = decoded.value
            else {
                panic!("a string value")
            };
            assert_eq!(value.len(), len);
        }
    }
}
