//! JSON log lines that carry the trace and span ids of the request they belong to.
//!
//! The request span records `trace_id` and `span_id` fields; [`TraceIdLayer`] keeps them with the
//! span, and [`JsonWithTrace`] writes them at the top level of every event inside it.

use serde_json::{Map, Value};
use std::fmt;
use tracing::{Event, Subscriber, field::Field, span};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::{Context, Layer},
    registry::LookupSpan,
};

/// The ids recorded on a span.
#[derive(Clone, Default)]
struct TraceIds {
    trace_id: Option<String>,
    span_id: Option<String>,
}

/// Remembers `trace_id`/`span_id` fields of spans.
pub struct TraceIdLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TraceIdLayer {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut ids = TraceIds::default();
        attrs.record(&mut IdVisitor(&mut ids));
        if ids.trace_id.is_some()
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let mut ids = extensions.get_mut::<TraceIds>().cloned().unwrap_or_default();
        values.record(&mut IdVisitor(&mut ids));
        if ids.trace_id.is_some() {
            extensions.replace(ids);
        }
    }
}

struct IdVisitor<'a>(&'a mut TraceIds);

impl tracing::field::Visit for IdVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.0.trace_id = Some(value.to_owned()),
            "span_id" => self.0.span_id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// Span fields are not written to JSON lines (only the span's name and its ids are), so the fmt
/// layer need not format them: this formatter skips the work it would otherwise do for every
/// span of every request.
pub struct NoSpanFields;

impl<'writer> FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(&self, _: Writer<'writer>, _: R) -> fmt::Result {
        Ok(())
    }
}

/// One JSON object per line: time, level, target, message, the event's fields, the innermost
/// span's name, and `trace_id`/`span_id` when inside a traced request.
pub struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = Map::new();
        line.insert("timestamp".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        event.record(&mut FieldVisitor(&mut line));
        if let Some(scope) = ctx.event_scope() {
            let mut spans = scope.peekable();
            if let Some(leaf) = spans.peek() {
                line.insert("span".into(), leaf.name().into());
            }
            if let Some(ids) = spans.find_map(|s| s.extensions().get::<TraceIds>().cloned()) {
                line.insert("trace_id".into(), ids.trace_id.into());
                line.insert("span_id".into(), ids.span_id.into());
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct FieldVisitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}
