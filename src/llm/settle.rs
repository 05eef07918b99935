//! A model call in flight and its settlement: what it reserved, and how the reservation is
//! settled to what was used (both the plain answer in `call` and the stream in `relay` end here).

use super::{
    Gateway,
    metrics::{CostLabels, DurationLabels, ModelLabels, Outcome, ProviderLabel, TokenLabels},
    providers::Model,
};
use crate::{
    jobs::{JobRecord, NanoUsd, TokenCounts},
    store::CallTicket,
};
use bytes::Bytes;
use poem::{Body, Response, http::StatusCode};
use std::{sync::Arc, time::Instant};
use tokio::sync::OwnedSemaphorePermit;

/// A call in flight: what it reserved and what settling it must report.
pub(super) struct Call {
    pub(super) gateway: Arc<Gateway>,
    pub(super) job: Arc<JobRecord>,
    pub(super) model: Arc<Model>,
    pub(super) ticket: CallTicket,
    pub(super) input_bound: u64,
    pub(super) max_output_tokens: u64,
    pub(super) started: Instant,
    pub(super) span: tracing::Span,
    /// The tenant's policy lets prompts and completions be recorded in spans.
    pub(super) record_content: bool,
    pub(super) _slot: OwnedSemaphorePermit,
}

/// What a finished call used, as far as the gateway knows.
pub(super) enum Used {
    /// The provider reported its usage.
    Reported(TokenCounts),
    /// The provider answered but reported nothing (or the stream broke): the reservation is
    /// charged, the most the call could have cost.
    Unknown,
    /// No answer came: nothing is charged.
    Nothing,
}

impl Call {
    /// Settle the reservation to what was used, and report the call in metrics and its span.
    pub(super) async fn finish(self, used: Used, error_type: Option<&'static str>, finish_reasons: &[String]) {
        let prices = self.model.prices;
        let (tokens, cost) = match used {
            Used::Reported(tokens) => (tokens, prices.cost(&tokens)),
            Used::Unknown => (
                TokenCounts { input: self.input_bound, output: self.max_output_tokens, ..TokenCounts::default() },
                self.ticket.reserved_cost,
            ),
            Used::Nothing => (TokenCounts::default(), NanoUsd(0)),
        };
        let metrics = &self.gateway.metrics;
        let provider = self.model.provider.name.clone();
        metrics.in_flight.get_or_create(&ProviderLabel { provider: provider.clone() }).dec();
        match self.gateway.store.settle(&self.ticket, tokens, cost).await {
            // The tenant's spend of the day, as the settlement left it, for the near-the-limit alert.
            Ok(Some(spent)) if self.ticket.day == crate::store::today() => {
                let tenant = super::metrics::TenantLabel { tenant: self.job.tenant.clone() };
                self.gateway.metrics.tenant_spend_today.get_or_create(&tenant).set(spent.as_usd());
                if let Some(limit) = self.gateway.jobs.rules_for(&self.job.tenant).daily_spend_limit {
                    self.gateway.metrics.tenant_daily_limit.get_or_create(&tenant).set(limit.as_usd());
                }
            }
            Ok(_) => {}
            // The reservation stays charged (the most the call could cost) until the sweeper
            // settles it; never less than what was used.
            Err(error) => {
                tracing::error!(%error, job_id = %self.job.id, "cannot settle a model call; its reservation stays charged")
            }
        }
        self.gateway.jobs.usage_changed(&self.job.id);
        let model = self.model.name.clone();
        metrics
            .operation_duration
            .get_or_create(&DurationLabels {
                gen_ai_operation_name: "chat",
                gen_ai_provider_name: provider.clone(),
                gen_ai_request_model: model.clone(),
                error_type: error_type.unwrap_or(""),
            })
            .observe(self.started.elapsed().as_secs_f64());
        if tokens.total() > 0 {
            for (token_type, count) in [("input", tokens.input), ("output", tokens.output)] {
                metrics
                    .token_usage
                    .get_or_create(&TokenLabels {
                        gen_ai_operation_name: "chat",
                        gen_ai_provider_name: provider.clone(),
                        gen_ai_request_model: model.clone(),
                        gen_ai_token_type: token_type,
                    })
                    .observe(count as f64);
            }
        }
        metrics
            .cost
            .get_or_create(&CostLabels { provider: provider.clone(), model: model.clone() })
            .inc_by(cost.as_usd());
        let outcome = if error_type.is_some() { Outcome::UpstreamError } else { Outcome::Ok };
        metrics.request(&provider, &model, outcome);
        let span = &self.span;
        span.record("gen_ai.usage.input_tokens", tokens.input);
        span.record("gen_ai.usage.output_tokens", tokens.output);
        span.record("gen_ai.usage.cache_read.input_tokens", tokens.cached_input);
        span.record("gen_ai.usage.reasoning.output_tokens", tokens.reasoning);
        span.record("oats.llm.cost_usd", cost.as_usd());
        if !finish_reasons.is_empty() {
            span.record("gen_ai.response.finish_reasons", format!("{finish_reasons:?}"));
        }
        if let Some(error_type) = error_type {
            span.record("error.type", error_type);
            span.record("otel.status_code", "ERROR");
        }
        tracing::info!(
            parent: span,
            job_id = %self.job.id,
            model = %model,
            input_tokens = tokens.input,
            output_tokens = tokens.output,
            cost_usd = cost.as_usd(),
            error_type = error_type.unwrap_or(""),
            "model call"
        );
    }

    /// Time to the first chunk of a stream.
    pub(super) fn first_chunk(&self) {
        self.gateway
            .metrics
            .time_to_first_chunk
            .get_or_create(&ModelLabels {
                gen_ai_operation_name: "chat",
                gen_ai_provider_name: self.model.provider.name.clone(),
                gen_ai_request_model: self.model.name.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Build a streamed response from relayed bytes.
pub(super) fn stream_response(body: impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .content_type("text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_bytes_stream(body))
}
