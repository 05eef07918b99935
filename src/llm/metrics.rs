//! The gateway's metrics: OpenTelemetry GenAI semantic conventions (v1.41.1, the last core text
//! before they moved to their own repository) in Prometheus form, plus OATS's own cost and
//! budget counters. Labels are bounded: providers and models come from the providers file,
//! tenants from the policy, the rest from fixed sets; never a job id.

use super::providers::Catalog;
use crate::jobs::Refusal;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: String,
    pub gen_ai_request_model: String,
    pub gen_ai_token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: String,
    pub gen_ai_request_model: String,
    /// Empty on success.
    pub error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: String,
    pub gen_ai_request_model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub provider: String,
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// How a call ended, for `oats_llm_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    UpstreamError,
    Refused,
    Invalid,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Self::Ok, Self::UpstreamError, Self::Refused, Self::Invalid];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::UpstreamError => "upstream_error",
            Self::Refused => "refused",
            Self::Invalid => "invalid",
        }
    }
}

/// Refusal reasons as counted: the ledger's, and the gateway's own.
pub const MODEL_NOT_ALLOWED: &str = "model_not_allowed";
pub const LEDGER_UNAVAILABLE: &str = "ledger_unavailable";

/// Every metric of the gateway.
#[derive(Clone)]
pub struct LlmMetrics {
    pub token_usage: HistogramFamily<TokenLabels>,
    pub operation_duration: HistogramFamily<DurationLabels>,
    pub time_to_first_chunk: HistogramFamily<ModelLabels>,
    pub requests: Family<RequestLabels, Counter>,
    pub cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    pub refusals: Family<ReasonLabel, Counter>,
    pub retries: Family<ProviderLabel, Counter>,
    pub in_flight: Family<ProviderLabel, Gauge>,
    pub tenant_spend_today: Family<TenantLabel, Gauge<f64, AtomicU64>>,
    pub tenant_daily_limit: Family<TenantLabel, Gauge<f64, AtomicU64>>,
}

/// The convention's buckets for `gen_ai.client.token.usage`: 1, 4, 16, ... 67108864.
fn token_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 14))
}

/// The convention's buckets for `gen_ai.client.operation.duration`: 0.01 s to 81.92 s.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

impl Default for LlmMetrics {
    fn default() -> Self {
        Self {
            token_usage: Family::new_with_constructor(token_buckets),
            operation_duration: Family::new_with_constructor(duration_buckets),
            time_to_first_chunk: Family::new_with_constructor(duration_buckets),
            requests: Family::default(),
            cost: Family::default(),
            refusals: Family::default(),
            retries: Family::default(),
            in_flight: Family::default(),
            tenant_spend_today: Family::default(),
            tenant_daily_limit: Family::default(),
        }
    }
}

impl LlmMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("gen_ai_client_token_usage", "Tokens used per model call", self.token_usage.clone());
        registry.register_with_unit(
            "gen_ai_client_operation_duration",
            "Duration of model calls, to the last byte",
            Unit::Seconds,
            self.operation_duration.clone(),
        );
        registry.register_with_unit(
            "gen_ai_client_operation_time_to_first_chunk",
            "Time to the first chunk of streamed model calls",
            Unit::Seconds,
            self.time_to_first_chunk.clone(),
        );
        let oats = registry.sub_registry_with_prefix("oats_llm");
        oats.register("requests", "Model calls through the gateway by outcome", self.requests.clone());
        oats.register("cost_usd", "Cost of model calls at the configured prices, in US dollars", self.cost.clone());
        oats.register("budget_refusals", "Model calls refused before forwarding, by reason", self.refusals.clone());
        oats.register("upstream_retries", "Retries of model calls by provider", self.retries.clone());
        oats.register("in_flight", "Model calls in flight by provider", self.in_flight.clone());
        oats.register(
            "tenant_spend_today_usd",
            "A tenant's settled spend on the current UTC day (as seen by this replica's last call)",
            self.tenant_spend_today.clone(),
        );
        oats.register(
            "tenant_daily_limit_usd",
            "A tenant's daily spend limit, for tenants that have one",
            self.tenant_daily_limit.clone(),
        );
    }

    /// Create every series of the configured models and the fixed reasons, so dashboards show 0
    /// rather than nothing before the first call.
    pub fn prime(&self, catalog: &Catalog) {
        for model in catalog.models() {
            let provider = model.provider.name.clone();
            for token_type in ["input", "output"] {
                let _ = self.token_usage.get_or_create(&TokenLabels {
                    gen_ai_operation_name: "chat",
                    gen_ai_provider_name: provider.clone(),
                    gen_ai_request_model: model.name.clone(),
                    gen_ai_token_type: token_type,
                });
            }
            let _ = self.operation_duration.get_or_create(&DurationLabels {
                gen_ai_operation_name: "chat",
                gen_ai_provider_name: provider.clone(),
                gen_ai_request_model: model.name.clone(),
                error_type: "",
            });
            let _ = self.time_to_first_chunk.get_or_create(&ModelLabels {
                gen_ai_operation_name: "chat",
                gen_ai_provider_name: provider.clone(),
                gen_ai_request_model: model.name.clone(),
            });
            for outcome in Outcome::ALL {
                let _ = self.requests.get_or_create(&RequestLabels {
                    provider: provider.clone(),
                    model: model.name.clone(),
                    outcome: outcome.as_str(),
                });
            }
            let _ = self.cost.get_or_create(&CostLabels { provider: provider.clone(), model: model.name.clone() });
            let _ = self.retries.get_or_create(&ProviderLabel { provider: provider.clone() });
            let _ = self.in_flight.get_or_create(&ProviderLabel { provider });
        }
        for reason in Refusal::ALL.iter().map(|r| r.as_str()).chain([MODEL_NOT_ALLOWED, LEDGER_UNAVAILABLE]) {
            let _ = self.refusals.get_or_create(&ReasonLabel { reason });
        }
    }

    pub fn request(&self, provider: &str, model: &str, outcome: Outcome) {
        self.requests
            .get_or_create(&RequestLabels { provider: provider.into(), model: model.into(), outcome: outcome.as_str() })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }
}
