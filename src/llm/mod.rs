//! The LLM gateway: the only way an agent reaches a model.
//!
//! An OpenAI-compatible endpoint on its own listener (`llm_listen`). A call is identified by the
//! job's credential, checked against the tenant's policy, sized and reserved against the job's
//! budget in the store's ledger ([`crate::store`]), forwarded to the provider with the provider's
//! key (the agent's credential never leaves), and settled to the usage the provider reported.
//! Every call is a `chat {model}` span in the job's trace and a set of GenAI metrics.

mod call;
pub mod identity;
pub mod metrics;
mod openai;
pub mod providers;
mod relay;
mod settle;
mod sizing;

pub use metrics::LlmMetrics;
pub use openai::ApiError;
pub use providers::{Catalog, Providers, ProvidersError};

use crate::{
    jobs::{JobRecord, JobService, policy::Policy},
    store::Store,
};
use identity::{Identities, IdentityError};
use poem::{Endpoint, EndpointExt, Request, Response, Route, get, handler, http::StatusCode, post, web::Data};
use std::{sync::Arc, time::Duration};

/// Everything a call needs, shared by all calls.
pub struct Gateway {
    pub jobs: Arc<JobService>,
    pub identities: Identities,
    pub providers: Arc<Providers>,
    pub store: Store,
    pub metrics: LlmMetrics,
    pub max_body_bytes: usize,
    http: reqwest::Client,
    /// Jobs whose ledger row this replica has created or seen, so that a call costs no insert.
    opened: std::sync::Mutex<std::collections::HashSet<crate::jobs::JobId>>,
}

/// Jobs remembered as opened before the set is cleared (their rows stay; only an insert that
/// changes nothing is saved).
const MAX_REMEMBERED_LEDGERS: usize = 100_000;

impl Gateway {
    pub fn new(
        jobs: Arc<JobService>,
        identities: Identities,
        providers: Arc<Providers>,
        store: Store,
        metrics: LlmMetrics,
        max_body_bytes: usize,
    ) -> Arc<Self> {
        metrics.prime(&providers.catalog());
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("a TLS-capable HTTP client builds");
        Arc::new(Self { jobs, identities, providers, store, metrics, max_body_bytes, http, opened: Default::default() })
    }

    /// Settle calls that a dead replica left reserved, every minute, for as long as `self` lives.
    pub fn sweep_abandoned_calls(self: &Arc<Self>) {
        let gateway = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(gateway) = gateway.upgrade() else { return };
                // A call cannot outlive its provider's timeout plus its retries; an hour is far past both.
                match gateway.store.settle_abandoned(3_600_000).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(calls = n, "settled abandoned model calls at their reservation"),
                    Err(error) => tracing::warn!(%error, "cannot settle abandoned model calls"),
                }
            }
        });
    }

    /// Publish the spend today (and the daily limit, where there is one) of every tenant the
    /// policy names, now and every minute for as long as `self` lives: the gauges exist from the
    /// start, not only after a tenant's first call, and follow policy reloads and the UTC day.
    pub fn publish_tenant_gauges(self: &Arc<Self>, policy: Arc<Policy>) {
        let gateway = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(gateway) = gateway.upgrade() else { return };
                for tenant in policy.tenants() {
                    gateway.update_tenant_gauges(&tenant).await;
                }
                drop(gateway);
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });
    }

    /// The tenant's spend today (from the ledger all replicas share) and its daily limit (the
    /// series goes when the policy no longer sets one), for dashboards and the near-the-limit alert.
    async fn update_tenant_gauges(&self, tenant: &str) {
        let label = metrics::TenantLabel { tenant: tenant.to_owned() };
        if let Ok(spent) = self.store.tenant_spend_today(tenant).await {
            self.metrics.tenant_spend_today.get_or_create(&label).set(spent.as_usd());
        }
        match self.jobs.rules_for(tenant).daily_spend_limit {
            Some(limit) => {
                self.metrics.tenant_daily_limit.get_or_create(&label).set(limit.as_usd());
            }
            None => {
                self.metrics.tenant_daily_limit.remove(&label);
            }
        }
    }

    /// Create the job's ledger row on its first call through this replica.
    async fn open_ledger(
        &self,
        job: &JobRecord,
        limits: &crate::store::LedgerLimits,
    ) -> Result<(), crate::store::StoreError> {
        if self.opened.lock().unwrap().contains(&job.id) {
            return Ok(());
        }
        self.store.open_ledger(&job.id, &job.tenant, limits).await?;
        let mut opened = self.opened.lock().unwrap();
        if opened.len() >= MAX_REMEMBERED_LEDGERS {
            opened.clear();
        }
        opened.insert(job.id.clone());
        Ok(())
    }

    /// The job whose credential authorises `request`, while it has not finished.
    async fn caller(&self, request: &Request) -> Result<Arc<JobRecord>, ApiError> {
        let credential = request.header("authorization").and_then(|h| h.strip_prefix("Bearer ")).ok_or_else(|| {
            ApiError::unauthenticated("send the job's credential as `Authorization: Bearer <OPENAI_API_KEY>`")
        })?;
        let id = self.identities.job_of(credential.trim()).await.map_err(|error| match error {
            IdentityError::KeysUnavailable => ApiError::unavailable(error.to_string(), Duration::from_secs(2)),
            other => {
                tracing::info!(reason = %other, "gateway credential refused");
                ApiError::unauthenticated(other.to_string())
            }
        })?;
        let job = self
            .jobs
            .job(&id)
            .await
            .map_err(|_| ApiError::unavailable("the job cannot be looked up right now", Duration::from_secs(1)))?
            .ok_or_else(|| ApiError::unauthenticated("the credential's job does not exist"))?;
        if job.status.phase.is_terminal() {
            return Err(ApiError::unauthenticated(format!(
                "job {} has finished ({}); its credential is no longer valid",
                job.id,
                job.status.phase.as_str()
            )));
        }
        Ok(job)
    }
}

/// The gateway's HTTP app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /healthz`.
pub fn app(gateway: Arc<Gateway>) -> impl Endpoint<Output = Response> {
    Route::new()
        .at("/v1/chat/completions", post(chat_completions))
        .at("/v1/models", get(list_models))
        .at("/healthz", get(healthz))
        .data(gateway)
        .map_to_response()
}

#[handler]
async fn chat_completions(request: &Request, body: poem::Body, gateway: Data<&Arc<Gateway>>) -> Response {
    let job = match gateway.caller(request).await {
        Ok(job) => job,
        Err(error) => return error.into_response(),
    };
    let traceparent = request.header("traceparent").map(str::to_owned);
    match call::chat(gateway.0.clone(), job, body, traceparent).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// The models this job may use: the configured ones its tenant's policy allows.
#[handler]
async fn list_models(request: &Request, gateway: Data<&Arc<Gateway>>) -> Response {
    let job = match gateway.caller(request).await {
        Ok(job) => job,
        Err(error) => return error.into_response(),
    };
    let rules = gateway.jobs.rules_for(&job.tenant);
    let catalog = gateway.providers.catalog();
    let data: Vec<_> = catalog
        .models()
        .iter()
        .filter(|m| rules.allows_model(std::iter::once(m.name.as_str()).chain(m.aliases.iter().map(String::as_str))))
        .map(|m| serde_json::json!({"id": m.name, "object": "model", "created": 0, "owned_by": m.provider.name}))
        .collect();
    Response::builder()
        .content_type("application/json")
        .body(serde_json::json!({"object": "list", "data": data}).to_string())
}

#[handler]
async fn healthz() -> Response {
    Response::builder().status(StatusCode::OK).content_type("application/json").body(r#"{"status":"ok"}"#)
}
