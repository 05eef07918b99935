//! Who is calling: bearer API tokens (stored as SHA-256 hashes, compared in constant time) and
//! optional OIDC JWTs, each mapped to a tenant and a role.
//!
//! With neither configured, authentication is off and every caller is the configured default
//! tenant's admin: convenient on a laptop, and logged loudly at start.

mod oidc;
mod tokens;

pub use oidc::{OidcError, OidcSettings, OidcVerifier};
pub use tokens::{TokenFile, TokenFileError, TokenStore, TokensError, hash_token};

use crate::jobs::{Caller, Role};
use std::sync::Arc;

/// Whether `tenant` can name a tenant: it becomes the value of a Kubernetes label
/// (`oats.dev/tenant`), so it must be one, and not empty.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    if tenant.is_empty() {
        return Err("a tenant must not be empty".into());
    }
    crate::jobs::check_label_value(tenant).map_err(|why| format!("a tenant becomes a Kubernetes label, so its {why}"))
}

/// Why a caller could not be authenticated. Details go to logs, never to the response.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("credentials are required")]
    Missing,
    #[error("the credentials are not valid")]
    Invalid,
    #[error("the identity provider's keys cannot be fetched; retry later")]
    Unavailable,
    /// The credentials are genuine but name no usable tenant (the detail says why; it holds
    /// nothing secret).
    #[error("{0}")]
    UnusableTenant(String),
}

/// Checks credentials against every configured source.
pub struct Authenticator {
    tokens: Option<Arc<TokenStore>>,
    oidc: Option<Arc<OidcVerifier>>,
    anonymous: Option<Caller>,
}

impl Authenticator {
    /// Authentication is off when neither tokens nor OIDC are configured.
    pub fn new(tokens: Option<Arc<TokenStore>>, oidc: Option<Arc<OidcVerifier>>, default_tenant: &str) -> Self {
        let anonymous = (tokens.is_none() && oidc.is_none()).then(|| Caller {
            tenant: default_tenant.into(),
            role: Role::Admin,
            name: "anonymous".into(),
        });
        Self { tokens, oidc, anonymous }
    }

    pub fn is_enabled(&self) -> bool {
        self.anonymous.is_none()
    }

    /// The caller a bearer token (or its absence) stands for.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, AuthError> {
        let Some(token) = bearer.map(str::trim).filter(|t| !t.is_empty()) else {
            return self.anonymous.clone().ok_or(AuthError::Missing);
        };
        if let Some(anonymous) = &self.anonymous {
            return Ok(anonymous.clone());
        }
        if token.matches('.').count() == 2
            && let Some(oidc) = &self.oidc
        {
            // Boxed: verifying may fetch keys over HTTP, a large future that would otherwise sit
            // inline in every request's future (and be copied with it) even when no JWT is used.
            return Box::pin(oidc.verify(token)).await;
        }
        self.tokens.as_ref().and_then(|store| store.lookup(token)).ok_or(AuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_configuration_everyone_is_the_default_admin() {
        let auth = Authenticator::new(None, None, "default");
        assert!(!auth.is_enabled());
        let caller = auth.authenticate(None).await.unwrap();
        assert_eq!((&*caller.tenant, caller.role), ("default", Role::Admin));
    }

    #[test]
    fn visibility_and_write_rights_follow_the_role() {
        let caller = |role| Caller { tenant: "a".into(), role, name: "n".into() };
        assert!(caller(Role::Viewer).sees("a") && !caller(Role::Viewer).sees("b"));
        assert!(caller(Role::Admin).sees("b"));
        assert!(!caller(Role::Viewer).may_write());
        assert!(caller(Role::Submitter).may_write() && caller(Role::Admin).may_write());
    }
}
