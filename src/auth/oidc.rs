//! OIDC: JWTs verified against the issuer's JWKS (signature, issuer, audience, expiry with clock
//! skew), with tenant and role read from configurable claims. The key set is cached, refreshed
//! periodically, and refetched (at most every 30 s) when a token names a key it lacks, so key
//! rotation needs no restart.

use super::{AuthError, Caller, Role};
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
/// Asymmetric algorithms only: never `none`, never a shared secret.
const ALGORITHMS: [Algorithm; 6] =
    [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::ES256, Algorithm::ES384];

struct CachedKeys {
    keys: JwkSet,
    fetched: Instant,
}

pub struct OidcVerifier {
    settings: OidcSettings,
    http: reqwest::Client,
    keys: RwLock<Option<Arc<CachedKeys>>>,
    last_forced: Mutex<Option<Instant>>,
}

impl OidcVerifier {
    pub fn new(settings: OidcSettings) -> Result<Arc<Self>, String> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the HTTP client for OIDC: {e}"))?;
        Ok(Arc::new(Self { settings, http, keys: RwLock::new(None), last_forced: Mutex::new(None) }))
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let response = self.http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: {}", response.status()));
        }
        response.json().await.map_err(|e| format!("GET {url}: {e}"))
    }

    async fn fetch(&self) -> Result<Arc<CachedKeys>, String> {
        let url = match &self.settings.jwks_url {
            Some(url) => url.clone(),
            None => {
                let discovery =
                    format!("{}/.well-known/openid-configuration", self.settings.issuer.trim_end_matches('/'));
                let document = self.get_json(&discovery).await?;
                document["jwks_uri"].as_str().ok_or("the discovery document has no jwks_uri")?.to_owned()
            }
        };
        let keys: JwkSet = serde_json::from_value(self.get_json(&url).await?).map_err(|e| format!("{url}: {e}"))?;
        tracing::info!(keys = keys.keys.len(), "OIDC key set fetched");
        let cached = Arc::new(CachedKeys { keys, fetched: Instant::now() });
        *self.keys.write().unwrap() = Some(cached.clone());
        Ok(cached)
    }

    /// The key set: cached while fresh; on a failed refresh, the stale set if there is one.
    async fn keys(&self, force: bool) -> Result<Arc<CachedKeys>, AuthError> {
        let cached = self.keys.read().unwrap().clone();
        if let Some(keys) = &cached
            && !force
            && keys.fetched.elapsed() < self.settings.refresh_every
        {
            return Ok(keys.clone());
        }
        match self.fetch().await {
            Ok(keys) => Ok(keys),
            Err(error) => {
                tracing::warn!(%error, "cannot fetch the OIDC key set");
                cached.ok_or(AuthError::Unavailable)
            }
        }
    }

    fn may_force_refresh(&self) -> bool {
        let mut last = self.last_forced.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < FORCED_REFRESH_GAP) {
            return false;
        }
        *last = Some(Instant::now());
        true
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
        let mut keys = self.keys(false).await?;
        if keys.keys.find(&kid).is_none() && self.may_force_refresh() {
            keys = self.keys(true).await?;
        }
        let jwk = keys.keys.find(&kid).ok_or_else(|| invalid("unknown key id"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| invalid("unusable key"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.clock_skew.as_secs();
        validation.set_audience(&[&self.settings.audience]);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| invalid(&format!("{:?}", e.kind())))?
            .claims;
        let tenant = claims
            .get(&self.settings.tenant_claim)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && t.len() <= 63)
            .ok_or_else(|| invalid("no tenant claim"))?;
        let role = claims
            .get(&self.settings.role_claim)
            .and_then(Value::as_str)
            .and_then(Role::parse)
            .ok_or_else(|| invalid("no valid role claim"))?;
        let name = claims.get("sub").and_then(Value::as_str).unwrap_or("oidc").chars().take(128).collect();
        Ok(Caller { tenant: tenant.to_owned(), role, name })
    }
}
