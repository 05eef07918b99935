//! One chat completion through the gateway: check, size, reserve, forward, settle.

use super::{
    ApiError, Gateway,
    metrics::{LEDGER_UNAVAILABLE, MODEL_NOT_ALLOWED, Outcome, ProviderLabel},
    openai,
    providers::Model,
    relay,
    settle::{Call, Used},
    sizing,
};
use crate::{
    jobs::{JobRecord, NanoUsd, Refusal, TokenCounts, policy::TenantRules},
    store::{CallTicket, LedgerLimits},
};
use bytes::Bytes;
use futures::StreamExt;
use poem::{Body, Response, http::StatusCode};
use serde_json::{Map, Value};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// How often a refused reservation is re-sized against the budget that concurrent calls left.
const RESERVE_ATTEMPTS: usize = 3;
/// Longest wait for a provider's concurrency slot.
const SLOT_WAIT: Duration = Duration::from_secs(30);
/// Largest non-streamed answer read from a provider.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Most bytes of content recorded in one span attribute, when a tenant opts in.
const MAX_CONTENT_BYTES: usize = 16 * 1024;

/// `text` cut to [`MAX_CONTENT_BYTES`] on a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_CONTENT_BYTES {
        let mut end = MAX_CONTENT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

pub(super) async fn chat(
    gateway: Arc<Gateway>,
    job: Arc<JobRecord>,
    body: Body,
    traceparent: Option<String>,
) -> Result<Response, ApiError> {
    let (input_bound, mut request, model_name) = read_request(&gateway, body).await?;
    let (model, rules) = allowed_model(&gateway, &job, &model_name)?;
    let limits = LedgerLimits {
        budget: job.spec.budget,
        max_calls: job.spec.max_turns,
        max_in_flight: rules.max_in_flight_calls,
        daily_limit: rules.daily_spend_limit,
    };
    let requested_field = ["max_completion_tokens", "max_tokens"].into_iter().find(|f| request.contains_key(*f));
    let requested = requested_field.and_then(|f| request.get(f)).and_then(Value::as_u64);
    let (ticket, size) = reserve(&gateway, &job, &model, &limits, input_bound, requested).await?;

    request.insert("model".into(), Value::String(model.upstream.clone()));
    request.insert(requested_field.unwrap_or("max_tokens").into(), size.max_output_tokens.into());
    let (stream, client_wants_usage) = ask_for_usage(&mut request);
    let slot = match tokio::time::timeout(SLOT_WAIT, model.provider.slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        _ => {
            let error = ApiError::unavailable(
                format!("provider {} is at its concurrency cap", model.provider.name),
                Duration::from_secs(2),
            );
            gateway.store.settle(&ticket, TokenCounts::default(), NanoUsd(0)).await.ok();
            return Err(error);
        }
    };
    let span = call_span(&model, &job, stream, size.max_output_tokens, traceparent.as_deref());
    if rules.record_llm_content
        && let Some(messages) = request.get("messages")
    {
        span.record("gen_ai.input.messages", bounded(messages.to_string()));
    }
    let call = Call {
        gateway: gateway.clone(),
        job,
        model,
        ticket,
        input_bound,
        max_output_tokens: size.max_output_tokens,
        started: Instant::now(),
        span,
        record_content: rules.record_llm_content,
        _slot: slot,
    };
    let body = serde_json::to_vec(&request).expect("a JSON map serialises");
    call.gateway.metrics.in_flight.get_or_create(&ProviderLabel { provider: call.model.provider.name.clone() }).inc();
    let upstream = match forward(&call, body).await {
        Ok(upstream) => upstream,
        Err((error_type, error)) => {
            call.finish(Used::Nothing, Some(error_type), &[]).await;
            return Err(error);
        }
    };
    if stream && upstream.status().is_success() {
        return Ok(relay::stream(call, upstream, client_wants_usage));
    }
    answer(call, upstream).await
}

/// The request's body (at most the gateway's limit) as a JSON object, its size (the bound of its
/// input tokens) and the model it names.
async fn read_request(gateway: &Gateway, body: Body) -> Result<(u64, Map<String, Value>, String), ApiError> {
    let bytes = body.into_bytes_limit(gateway.max_body_bytes).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is over {} bytes", gateway.max_body_bytes),
        )
    })?;
    let request: Map<String, Value> = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => map,
        _ => return Err(ApiError::invalid("the body must be a JSON object (a chat completion request)")),
    };
    let model_name = match request.get("model") {
        Some(Value::String(name)) => name.clone(),
        _ => return Err(ApiError::invalid("`model` must be a string")),
    };
    if !request.get("messages").is_some_and(Value::is_array) {
        return Err(ApiError::invalid("`messages` must be an array"));
    }
    Ok((bytes.len() as u64, request, model_name))
}

/// The model `name` stands for, if the job's tenant may use it, and the tenant's rules.
fn allowed_model(gateway: &Gateway, job: &JobRecord, name: &str) -> Result<(Arc<Model>, TenantRules), ApiError> {
    let model = gateway.providers.catalog().model(name).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model `{name}` does not exist here; GET /v1/models lists this job's models"),
        )
    })?;
    let rules = gateway.jobs.rules_for(&job.tenant);
    if !rules.allows_model(std::iter::once(model.name.as_str()).chain(model.aliases.iter().map(String::as_str))) {
        gateway.metrics.refused(MODEL_NOT_ALLOWED);
        gateway.metrics.request(&model.provider.name, &model.name, Outcome::Refused);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "model_not_allowed",
            format!("tenant {} may not use the model `{}`", job.tenant, model.name),
        ));
    }
    Ok((model, rules))
}

/// Whether the call streams, and whether its client asked for the usage chunk; a stream always
/// asks the provider for it (the call is charged what it used).
fn ask_for_usage(request: &mut Map<String, Value>) -> (bool, bool) {
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_wants_usage = stream
        && request.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    if stream {
        let options = request.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(options) = options {
            options.insert("include_usage".into(), Value::Bool(true));
        }
    }
    (stream, client_wants_usage)
}

/// Size the call and reserve it, re-sizing when concurrent calls took what it was sized for.
async fn reserve(
    gateway: &Gateway,
    job: &JobRecord,
    model: &Model,
    limits: &LedgerLimits,
    input_bound: u64,
    requested: Option<u64>,
) -> Result<(CallTicket, sizing::CallSize), ApiError> {
    let unavailable = |error: crate::store::StoreError| {
        tracing::error!(%error, job_id = %job.id, "the ledger is unavailable; refusing the model call");
        gateway.metrics.refused(LEDGER_UNAVAILABLE);
        ApiError::unavailable(
            "the budget ledger is unavailable; no call is forwarded without it",
            Duration::from_secs(5),
        )
    };
    gateway.open_ledger(job, limits).await.map_err(unavailable)?;
    let mut refusal = Refusal::JobTokens;
    for _ in 0..RESERVE_ATTEMPTS {
        let usage = gateway.store.job_usage(&job.id).await.map_err(unavailable)?;
        let size = match sizing::size(
            input_bound,
            requested,
            model.max_output_tokens,
            &model.prices,
            usage.as_ref(),
            &limits.budget,
        ) {
            Ok(size) => size,
            Err(why) => {
                refusal = why;
                break;
            }
        };
        let route = (model.provider.name.as_str(), model.name.as_str());
        match gateway
            .store
            .reserve(&job.id, &job.tenant, limits, route, size.reserved_tokens, size.reserved_cost)
            .await
            .map_err(unavailable)?
        {
            Ok(ticket) => return Ok((ticket, size)),
            Err(why @ (Refusal::JobTokens | Refusal::JobCost)) => refusal = why,
            Err(why) => {
                refusal = why;
                break;
            }
        }
    }
    Err(refuse(gateway, job, model, refusal).await)
}

/// Count and remember a refusal, and say it in OpenAI's terms.
async fn refuse(gateway: &Gateway, job: &JobRecord, model: &Model, refusal: Refusal) -> ApiError {
    gateway.metrics.refused(refusal.as_str());
    gateway.metrics.request(&model.provider.name, &model.name, Outcome::Refused);
    if refusal != Refusal::InFlight
        && let Err(error) = gateway.store.record_refusal(&job.id, refusal).await
    {
        tracing::warn!(%error, "cannot record the refusal");
    }
    tracing::info!(job_id = %job.id, reason = refusal.as_str(), "model call refused");
    match refusal {
        Refusal::CallCap => ApiError::quota(
            "max_calls_reached",
            format!("job {} made its {} model calls (max_turns)", job.id, job.spec.max_turns),
        ),
        Refusal::InFlight => ApiError {
            retry_after: Some(Duration::from_secs(1)),
            retryable: true,
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "too_many_calls_in_flight",
                "too many of this job's model calls are in flight; retry when one finishes",
            )
        },
        Refusal::JobTokens => ApiError::quota("insufficient_quota", "the job's token budget cannot pay for this call"),
        Refusal::JobCost => ApiError::quota("insufficient_quota", "the job's cost budget cannot pay for this call"),
        Refusal::TenantDailySpend => {
            ApiError::quota("insufficient_quota", format!("tenant {} reached its daily spend limit", job.tenant))
        }
    }
}

/// The `chat {model}` CLIENT span, a child of the agent's `traceparent` if it sent one, else of
/// the trace that created the job.
fn call_span(
    model: &Model,
    job: &JobRecord,
    stream: bool,
    max_tokens: u64,
    traceparent: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "chat",
        otel.name = format!("chat {}", model.name),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = model.provider.name.as_str(),
        gen_ai.request.model = model.name.as_str(),
        gen_ai.request.max_tokens = max_tokens,
        gen_ai.request.stream = stream,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        gen_ai.input.messages = tracing::field::Empty,
        gen_ai.output.messages = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.usage.cache_read.input_tokens = tracing::field::Empty,
        gen_ai.usage.reasoning.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
        oats.job.id = job.id.as_str(),
        oats.llm.cost_usd = tracing::field::Empty,
    );
    let parent = traceparent
        .map(|tp| crate::jobs::TraceContext { traceparent: tp.to_owned(), tracestate: None })
        .or_else(|| job.trace.clone());
    if let Some(parent) = parent {
        let _ = span.set_parent(crate::telemetry::trace::context_of(&parent));
    }
    span
}

/// Send the call, retrying 429, 5xx and connection failures with backoff (honouring
/// `Retry-After`) within the provider's count and time bounds. Nothing is retried once a byte
/// of an answer was relayed: retries happen before the answer's status is passed on.
async fn forward(call: &Call, body: Vec<u8>) -> Result<reqwest::Response, (&'static str, ApiError)> {
    let provider = &call.model.provider;
    let url = format!("{}/chat/completions", provider.base_url);
    let body = Bytes::from(body);
    let deadline = Instant::now() + provider.retry_window;
    let mut attempt = 0;
    loop {
        let mut request = call
            .gateway
            .http
            .post(&url)
            .header("content-type", "application/json")
            .timeout(provider.timeout)
            .body(body.clone());
        if let Some(key) = &provider.api_key {
            request = request.bearer_auth(key.expose());
        }
        if let Some(traceparent) = crate::telemetry::trace::context_header(&call.span) {
            request = request.header("traceparent", traceparent);
        }
        let (error_type, retry_after) = match request.send().await {
            Ok(response) if response.status() == 429 || response.status().is_server_error() => {
                let retry_after = retry_after_of(&response);
                let error_type = if response.status() == 429 { "upstream_429" } else { "upstream_5xx" };
                if !retry(call, &mut attempt, deadline, retry_after).await {
                    return Err((error_type, upstream_error(call, response).await));
                }
                continue;
            }
            Ok(response) => return Ok(response),
            Err(error) if error.is_timeout() => ("timeout", None),
            Err(_) => ("connection", None),
        };
        if !retry(call, &mut attempt, deadline, retry_after).await {
            let message = match error_type {
                "timeout" => format!("provider {} did not answer within {:?}", provider.name, provider.timeout),
                _ => format!("provider {} cannot be reached", provider.name),
            };
            let status = if error_type == "timeout" { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::BAD_GATEWAY };
            return Err((
                error_type,
                ApiError { retryable: true, ..ApiError::new(status, "api_error", "upstream_unavailable", message) },
            ));
        }
    }
}

/// The upstream's `Retry-After`, in seconds (the HTTP-date form is not used by providers).
fn retry_after_of(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get("retry-after")?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Wait before the next attempt, if one is left; `false` when retries are spent.
async fn retry(call: &Call, attempt: &mut u32, deadline: Instant, retry_after: Option<Duration>) -> bool {
    let provider = &call.model.provider;
    if *attempt >= provider.max_retries {
        return false;
    }
    let backoff = Duration::from_millis(200 * 2u64.pow(*attempt)).min(Duration::from_secs(5));
    let wait = retry_after.unwrap_or(backoff);
    if Instant::now() + wait > deadline {
        return false;
    }
    *attempt += 1;
    call.gateway.metrics.retries.get_or_create(&ProviderLabel { provider: provider.name.clone() }).inc();
    tokio::time::sleep(wait).await;
    true
}

/// An upstream error, in OpenAI's format with the provider's message sanitised. Errors about
/// the gateway's own credentials are not the agent's to see.
async fn upstream_error(call: &Call, response: reqwest::Response) -> ApiError {
    let status = response.status();
    let retry_after = retry_after_of(&response);
    let text = response.text().await.unwrap_or_default();
    let upstream: Option<String> = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned));
    let provider = &call.model.provider;
    let key = provider.api_key.as_ref().map(|k| k.expose());
    let detail = upstream.map(|m| openai::sanitize(&m, key)).unwrap_or_default();
    let (status, kind, code, message) = match status.as_u16() {
        401 | 403 => (
            StatusCode::BAD_GATEWAY,
            "api_error",
            "upstream_auth",
            format!("provider {} refused the gateway's credentials; tell the operator", provider.name),
        ),
        429 => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "upstream_rate_limited",
            format!("provider {} is rate limiting: {detail}", provider.name),
        ),
        code if code >= 500 => (
            StatusCode::BAD_GATEWAY,
            "api_error",
            "upstream_error",
            format!("provider {} failed ({code}): {detail}", provider.name),
        ),
        code => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            "upstream_rejected",
            format!("provider {} refused the request ({code}): {detail}", provider.name),
        ),
    };
    ApiError {
        retry_after,
        retryable: status.as_u16() == 429 || status.is_server_error(),
        ..ApiError::new(status, kind, code, message)
    }
}

/// A non-streamed answer: read it whole, settle, pass it on.
async fn answer(call: Call, upstream: reqwest::Response) -> Result<Response, ApiError> {
    let status = upstream.status();
    if !status.is_success() {
        let error = upstream_error(&call, upstream).await;
        call.finish(Used::Nothing, Some("upstream_4xx"), &[]).await;
        return Err(error);
    }
    let mut bytes = Vec::new();
    let mut chunks = upstream.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) if bytes.len() + chunk.len() <= MAX_ANSWER_BYTES => bytes.extend_from_slice(&chunk),
            Ok(_) | Err(_) => {
                call.finish(Used::Unknown, Some("stream_interrupted"), &[]).await;
                return Err(ApiError {
                    retryable: true,
                    ..ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "api_error",
                        "upstream_interrupted",
                        "the provider's answer broke off",
                    )
                });
            }
        }
    }
    let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let used = answer.get("usage").and_then(openai::usage_of).map_or(Used::Unknown, Used::Reported);
    if let Some(model) = answer.get("model").and_then(Value::as_str) {
        call.span.record("gen_ai.response.model", model);
    }
    if call.record_content
        && let Some(choices) = answer.get("choices")
    {
        call.span.record("gen_ai.output.messages", bounded(choices.to_string()));
    }
    call.finish(used, None, &openai::finish_reasons(&answer)).await;
    Ok(Response::builder().status(StatusCode::OK).content_type("application/json").body(bytes))
}
