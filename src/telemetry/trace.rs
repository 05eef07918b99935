//! Trace context for jobs: captured when a job is created, handed to the agent, and used to emit
//! the job's lifecycle as spans of the trace that created it.

use crate::jobs::{JobPhase, JobRecord, TraceContext};
use opentelemetry::{
    Context, KeyValue, global,
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _},
};
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The OpenTelemetry context a W3C trace context names (to parent spans on it).
pub fn context_of(trace: &TraceContext) -> Context {
    extract(trace)
}

/// The `traceparent` header that continues `span`'s trace, when it is traced.
pub fn context_header(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

fn extract(trace: &TraceContext) -> Context {
    let mut carrier = HashMap::from([("traceparent".to_owned(), trace.traceparent.clone())]);
    if let Some(state) = &trace.tracestate {
        carrier.insert("tracestate".to_owned(), state.clone());
    }
    global::get_text_map_propagator(|propagator| propagator.extract(&carrier))
}

/// Emit a finished job's life (waiting, then running) as spans under the trace that created it,
/// with the times the service observed. Called once per job, by whoever counts its finish.
pub fn emit_lifecycle(job: &JobRecord) {
    let Some(trace) = &job.trace else { return };
    let parent = extract(trace);
    if !parent.span().span_context().is_valid() {
        return;
    }
    let tracer = global::tracer("oats");
    let attributes = vec![
        KeyValue::new("oats.job.id", job.id.to_string()),
        KeyValue::new("oats.job.status", job.status.phase.as_str()),
        KeyValue::new("oats.job.reason", job.status.reason.map_or("none", |r| r.as_str())),
        KeyValue::new("oats.job.attempts", i64::from(job.attempts)),
    ];
    let finished = job.finished_at.unwrap_or_else(chrono::Utc::now);
    let waited_until = job.started_at.unwrap_or(finished);
    let mut pending = tracer
        .span_builder("job pending")
        .with_kind(SpanKind::Internal)
        .with_start_time(job.created_at)
        .with_attributes(attributes.clone())
        .start_with_context(&tracer, &parent);
    pending.end_with_timestamp(waited_until.into());
    if let Some(started) = job.started_at {
        let mut running = tracer
            .span_builder("job running")
            .with_kind(SpanKind::Internal)
            .with_start_time(started)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        if job.status.phase == JobPhase::Failed {
            running.set_status(Status::error(job.status.message.clone().unwrap_or_default()));
        }
        running.end_with_timestamp(finished.into());
    }
}
