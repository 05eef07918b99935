//! OIDC: JWTs verified against the issuer's JWKS (signature, issuer, audience, expiry and
//! not-before with clock skew), with tenant and role read from configurable claims.
//!
//! The key set is cached. Once it is older than `refresh_every`, one background fetch refreshes
//! it while requests go on with the cached keys. A token naming a key the set lacks waits for a
//! refetch (at most one forced refetch every 30 s), so key rotation needs no restart. There is
//! never more than one fetch at a time, and every request that needs it shares it. A failed fetch
//! backs off (1 s, doubling to 60 s): until then no request starts a fetch or waits for one, so an
//! outage of the identity provider costs a request nothing beyond the cached keys (a token the
//! cached keys cannot verify is refused at once).

use super::AuthError;
use crate::jobs::{Caller, Role};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::{Map, Value};
use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

/// Where and how to verify tokens.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    pub issuer: String,
    /// The JWKS address; discovered from the issuer's `.well-known/openid-configuration` if unset.
    pub jwks_url: Option<String>,
    pub audience: String,
    pub tenant_claim: String,
    pub role_claim: String,
    pub clock_skew: Duration,
    pub refresh_every: Duration,
}

/// Longest wait for the identity provider.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two refetches forced by unknown key ids.
const FORCED_REFRESH_GAP: Duration = Duration::from_secs(30);
/// The wait after a first failed fetch; it doubles with each further failure, up to the most.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MOST: Duration = Duration::from_secs(60);
/// Asymmetric algorithms only: never `none`, never a shared secret.
const ALGORITHMS: [Algorithm; 6] =
    [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::ES256, Algorithm::ES384];

struct CachedKeys {
    keys: JwkSet,
    fetched: Instant,
}

/// The one fetch in flight: its result is the new key set, or `None` if it failed.
type Fetch = Shared<BoxFuture<'static, Option<Arc<CachedKeys>>>>;

/// The state of fetching the key set.
#[derive(Default)]
struct Refresh {
    in_flight: Option<Fetch>,
    /// Failed fetches in a row, and when the next may start.
    failures: u32,
    retry_at: Option<Instant>,
    last_forced: Option<Instant>,
}

/// The wait after `failures` failed fetches in a row.
fn backoff(failures: u32) -> Duration {
    BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(BACKOFF_MOST)
}

pub struct OidcVerifier {
    settings: OidcSettings,
    http: reqwest::Client,
    keys: Arc<RwLock<Option<Arc<CachedKeys>>>>,
    refresh: Arc<Mutex<Refresh>>,
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: {}", response.status()));
    }
    response.json().await.map_err(|e| format!("GET {url}: {e}"))
}

/// Fetch the issuer's key set (through its discovery document unless the address is given).
async fn fetch(http: reqwest::Client, issuer: String, jwks_url: Option<String>) -> Result<JwkSet, String> {
    let url = match jwks_url {
        Some(url) => url,
        None => {
            let discovery = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
            let document = get_json(&http, &discovery).await?;
            document["jwks_uri"].as_str().ok_or("the discovery document has no jwks_uri")?.to_owned()
        }
    };
    serde_json::from_value(get_json(&http, &url).await?).map_err(|e| format!("{url}: {e}"))
}

/// Why the OIDC verifier cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot build the HTTP client for OIDC: {0}")]
    Client(#[source] reqwest::Error),
}

impl OidcVerifier {
    pub fn new(settings: OidcSettings) -> Result<Arc<Self>, OidcError> {
        let http = reqwest::Client::builder().timeout(FETCH_TIMEOUT).build().map_err(OidcError::Client)?;
        Ok(Arc::new(Self { settings, http, keys: Arc::default(), refresh: Arc::default() }))
    }

    /// The fetch in flight, or a new one; `None` while fetches back off after a failure (or, for
    /// a `forced` refetch, within [`FORCED_REFRESH_GAP`] of the last). The fetch runs on its own
    /// task: it completes (and updates the cache) whether or not anyone waits for it.
    fn start_fetch(&self, forced: bool) -> Option<Fetch> {
        let mut refresh = self.refresh.lock().unwrap();
        if let Some(in_flight) = &refresh.in_flight {
            return Some(in_flight.clone());
        }
        let now = Instant::now();
        if refresh.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        if forced {
            if refresh.last_forced.is_some_and(|at| now.duration_since(at) < FORCED_REFRESH_GAP) {
                return None;
            }
            refresh.last_forced = Some(now);
        }
        let (http, issuer, url) = (self.http.clone(), self.settings.issuer.clone(), self.settings.jwks_url.clone());
        let (slot, state) = (self.keys.clone(), self.refresh.clone());
        let task = tokio::spawn(async move {
            let result = fetch(http, issuer, url).await;
            let mut refresh = state.lock().unwrap();
            refresh.in_flight = None;
            match result {
                Ok(keys) => {
                    tracing::info!(keys = keys.keys.len(), "OIDC key set fetched");
                    refresh.failures = 0;
                    refresh.retry_at = None;
                    let cached = Arc::new(CachedKeys { keys, fetched: Instant::now() });
                    *slot.write().unwrap() = Some(cached.clone());
                    Some(cached)
                }
                Err(error) => {
                    refresh.failures += 1;
                    let wait = backoff(refresh.failures);
                    refresh.retry_at = Some(Instant::now() + wait);
                    tracing::warn!(%error, failures = refresh.failures, retry_in_seconds = wait.as_secs_f64(),
                        "cannot fetch the OIDC key set; the cached keys stay in use");
                    None
                }
            }
        });
        let fetch: Fetch = async move { task.await.ok().flatten() }.boxed().shared();
        refresh.in_flight = Some(fetch.clone());
        Some(fetch)
    }

    /// The key set to verify with: the cached one (refreshed in the background once it is
    /// old), or, when there is none yet, the result of a fetch.
    async fn keys(&self) -> Result<Arc<CachedKeys>, AuthError> {
        let cached = self.keys.read().unwrap().clone();
        match cached {
            Some(keys) => {
                if keys.fetched.elapsed() >= self.settings.refresh_every {
                    drop(self.start_fetch(false));
                }
                Ok(keys)
            }
            None => match self.start_fetch(false) {
                Some(fetch) => fetch.await.ok_or(AuthError::Unavailable),
                None => Err(AuthError::Unavailable),
            },
        }
    }

    /// The caller a JWT stands for, if it is valid.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let invalid = |why: &str| {
            tracing::info!(reason = why, "JWT refused");
            AuthError::Invalid
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed header"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid("algorithm not allowed"));
        }
        let kid = header.kid.ok_or_else(|| invalid("no key id"))?;
        let mut keys = self.keys().await?;
        if keys.keys.find(&kid).is_none()
            && let Some(fetch) = self.start_fetch(true)
            && let Some(fresh) = fetch.await
        {
            keys = fresh;
        }
        let jwk = keys.keys.find(&kid).ok_or_else(|| invalid("unknown key id"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| invalid("unusable key"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&[&self.settings.audience]);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| invalid(&format!("{:?}", e.kind())))?
            .claims;
        // The token is genuine from here on: what is wrong with it may be said.
        let claim = &self.settings.tenant_claim;
        let unusable = |detail: String| {
            tracing::info!(reason = %detail, "JWT refused: no usable tenant");
            AuthError::UnusableTenant(detail)
        };
        let tenant = match claims.get(claim) {
            Some(Value::String(tenant)) => tenant,
            None | Some(Value::Null) => return Err(unusable(format!("the token has no tenant claim `{claim}`"))),
            Some(_) => return Err(unusable(format!("the token's tenant claim `{claim}` is not a string"))),
        };
        if let Err(why) = super::check_tenant(tenant) {
            let shown: String = tenant.chars().take(80).collect();
            return Err(unusable(format!(
                "the token's tenant claim `{claim}` is {shown:?}, not a usable tenant: {why}"
            )));
        }
        let role = claims
            .get(&self.settings.role_claim)
            .and_then(Value::as_str)
            .and_then(Role::parse)
            .ok_or_else(|| invalid("no valid role claim"))?;
        let name: String = claims.get("sub").and_then(Value::as_str).unwrap_or("oidc").chars().take(128).collect();
        Ok(Caller { tenant: tenant.as_str().into(), role, name: name.into() })
    }
}
