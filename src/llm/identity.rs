//! Who is calling the gateway.
//!
//! Local agents present a per-job credential this server minted ([`AgentCredentials`]). Agents on
//! Kubernetes present a projected service-account token: a JWT the API server signed for the
//! agent's service account, bound to its pod, with the gateway's audience. It is checked against
//! the API server's own key set (`/openid/v1/jwks`, readable by every service account through the
//! default `system:service-account-issuer-discovery` binding) and its claims must name this
//! OATS's agents namespace and service account and a pod of one of its jobs. Tokens cannot be
//! revoked, so the job's state does that: the gateway answers only while the job runs.

use crate::jobs::{AgentCredentials, JobId};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::{Map, Value};
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long the API server's key set is trusted before it is fetched again.
const KEYS_TTL: Duration = Duration::from_secs(300);
/// At most one fetch forced by an unknown key id in this period.
const FORCED_REFRESH_GAP: Duration = Duration::from_secs(10);
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;

/// Why a credential was refused; the gateway answers 401 with it (never with the token).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the credential is not one of a job of this OATS")]
    Unknown,
    #[error("the service-account token is not valid: {0}")]
    InvalidToken(String),
    #[error("the key set of the Kubernetes API server cannot be fetched")]
    KeysUnavailable,
}

/// What a projected token must say.
#[derive(Debug, Clone)]
pub struct ServiceAccountRules {
    pub audience: String,
    pub namespace: String,
    pub service_account: String,
}

/// Verifies projected service-account tokens against the API server's keys.
pub struct ServiceAccountVerifier {
    client: kube::Client,
    rules: ServiceAccountRules,
    keys: tokio::sync::Mutex<Option<(JwkSet, String, Instant)>>,
    last_forced: Mutex<Option<Instant>>,
}

impl ServiceAccountVerifier {
    pub fn new(client: kube::Client, rules: ServiceAccountRules) -> Self {
        Self { client, rules, keys: tokio::sync::Mutex::new(None), last_forced: Mutex::new(None) }
    }

    /// The key set and the issuer, cached; `force` fetches anew.
    async fn keys(&self, force: bool) -> Result<(JwkSet, String), IdentityError> {
        let mut cached = self.keys.lock().await;
        if let Some((keys, issuer, at)) = cached.as_ref()
            && !force
            && at.elapsed() < KEYS_TTL
        {
            return Ok((keys.clone(), issuer.clone()));
        }
        match self.fetch().await {
            Ok((keys, issuer)) => {
                *cached = Some((keys.clone(), issuer.clone(), Instant::now()));
                Ok((keys, issuer))
            }
            Err(error) => {
                tracing::warn!(%error, "cannot fetch the API server's service-account keys");
                cached.as_ref().map(|(k, i, _)| (k.clone(), i.clone())).ok_or(IdentityError::KeysUnavailable)
            }
        }
    }

    async fn fetch(&self) -> Result<(JwkSet, String), kube::Error> {
        let get = |path: &str| http::Request::get(path).body(Vec::new()).expect("a valid request");
        let discovery: Value = self.client.request(get("/.well-known/openid-configuration")).await?;
        let issuer = discovery.get("issuer").and_then(Value::as_str).unwrap_or_default().to_owned();
        let keys: JwkSet = self.client.request(get("/openid/v1/jwks")).await?;
        Ok((keys, issuer))
    }

    fn may_force_refresh(&self) -> bool {
        let mut last = self.last_forced.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < FORCED_REFRESH_GAP) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// The job whose pod the token was issued to.
    pub async fn verify(&self, token: &str) -> Result<JobId, IdentityError> {
        let invalid = |why: &str| IdentityError::InvalidToken(why.to_owned());
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(invalid("algorithm not allowed"));
        }
        let kid = header.kid.ok_or_else(|| invalid("no key id"))?;
        let (mut keys, mut issuer) = self.keys(false).await?;
        if keys.find(&kid).is_none() && self.may_force_refresh() {
            (keys, issuer) = self.keys(true).await?;
        }
        let jwk = keys.find(&kid).ok_or_else(|| invalid("unknown key id"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| invalid("unusable key"))?;
        check(token, &key, header.alg, &issuer, &self.rules)
    }
}

/// Verify the token's signature and times (`exp`, `nbf`, with [`LEEWAY_SECONDS`]), audience and
/// issuer, then read which job's pod it was issued to.
fn check(
    token: &str,
    key: &DecodingKey,
    algorithm: Algorithm,
    issuer: &str,
    rules: &ServiceAccountRules,
) -> Result<JobId, IdentityError> {
    let invalid = |why: &str| IdentityError::InvalidToken(why.to_owned());
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    validation.set_audience(&[&rules.audience]);
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
        .map_err(|e| invalid(&format!("{:?}", e.kind())))?
        .claims;
    job_of_claims(&claims, rules).map_err(|why| invalid(&why))
}

/// The job named by a verified token's `kubernetes.io` claim: this OATS's namespace and agent
/// service account, and a pod of one of its Jobs (pods of a Job are named `<job name>-<suffix>`,
/// and OATS names Jobs by their job id).
fn job_of_claims(claims: &Map<String, Value>, rules: &ServiceAccountRules) -> Result<JobId, String> {
    let kube = claims.get("kubernetes.io").ok_or("no kubernetes.io claim")?;
    let text = |pointer: &str| kube.pointer(pointer).and_then(Value::as_str);
    if text("/namespace") != Some(rules.namespace.as_str()) {
        return Err("another namespace".into());
    }
    if text("/serviceaccount/name") != Some(rules.service_account.as_str()) {
        return Err("another service account".into());
    }
    let pod = text("/pod/name").ok_or("not bound to a pod")?;
    let (job, _suffix) = pod.rsplit_once('-').ok_or("the pod is not a job's")?;
    JobId::parse(job).map_err(|_| "the pod is not one of an OATS job".to_owned())
}

/// Every way an agent may prove which job it runs for.
pub struct Identities {
    pub local: std::sync::Arc<AgentCredentials>,
    pub kubernetes: Option<ServiceAccountVerifier>,
}

impl Identities {
    /// The job a credential stands for.
    pub async fn job_of(&self, credential: &str) -> Result<JobId, IdentityError> {
        if let Some(id) = self.local.verify(credential) {
            return Ok(id);
        }
        match &self.kubernetes {
            Some(verifier) if credential.split('.').count() == 3 => verifier.verify(credential).await,
            _ => Err(IdentityError::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> ServiceAccountRules {
        ServiceAccountRules {
            audience: "oats-llm".into(),
            namespace: "oats".into(),
            service_account: "oats-agent".into(),
        }
    }

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    /// A token like the API server's, signed with a test key (HS256: the checks under test are
    /// the times, audience, issuer and claims, not the signature scheme).
    fn token(exp_from_now: i64, nbf_from_now: i64, audience: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({"iss": "https://kubernetes.default.svc", "aud": [audience], "exp": now + exp_from_now,
            "nbf": now + nbf_from_now, "iat": now,
            "kubernetes.io": {"namespace": "oats", "serviceaccount": {"name": "oats-agent"},
                "pod": {"name": "job-abcdefghijklmnopqrst-x7k2p"}}});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"k"),
        )
        .unwrap()
    }

    #[test]
    fn expired_early_and_foreign_tokens_are_refused() {
        let key = DecodingKey::from_secret(b"k");
        let check = |token: &str| check(token, &key, Algorithm::HS256, "https://kubernetes.default.svc", &rules());
        assert_eq!(check(&token(600, 0, "oats-llm")).unwrap().as_str(), "job-abcdefghijklmnopqrst");
        for (token, why) in [
            (token(-120, -700, "oats-llm"), "ExpiredSignature"),
            (token(600, 300, "oats-llm"), "ImmatureSignature"),
            (token(600, 0, "another-audience"), "InvalidAudience"),
        ] {
            assert_eq!(check(&token), Err(IdentityError::InvalidToken(why.into())));
        }
        let wrong_key = DecodingKey::from_secret(b"other");
        let forged = super::check(
            &token(600, 0, "oats-llm"),
            &wrong_key,
            Algorithm::HS256,
            "https://kubernetes.default.svc",
            &rules(),
        );
        assert_eq!(forged, Err(IdentityError::InvalidToken("InvalidSignature".into())));
    }

    #[test]
    fn the_pod_claim_names_the_job_in_this_namespace_and_account_only() {
        let good = json!({"kubernetes.io": {"namespace": "oats", "serviceaccount": {"name": "oats-agent"},
            "pod": {"name": "job-abcdefghijklmnopqrst-x7k2p", "uid": "u"}}});
        assert_eq!(job_of_claims(&claims(good.clone()), &rules()).unwrap().as_str(), "job-abcdefghijklmnopqrst");
        for (pointer, value) in [
            ("/kubernetes.io/namespace", json!("default")),
            ("/kubernetes.io/serviceaccount/name", json!("oats-backend-api")),
            ("/kubernetes.io/pod/name", json!("some-other-pod")),
            ("/kubernetes.io/pod", json!(null)),
        ] {
            let mut bad = good.clone();
            *bad.pointer_mut(pointer).unwrap() = value;
            assert!(job_of_claims(&claims(bad), &rules()).is_err(), "{pointer}");
        }
    }
}
