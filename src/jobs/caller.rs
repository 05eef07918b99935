//! Who asks: the tenant and role the domain checks every operation against (`crate::auth`
//! finds them from credentials).

use std::{fmt, sync::Arc};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the tenant's jobs.
    Viewer,
    /// Create, read and cancel the tenant's jobs.
    Submitter,
    /// Everything, in every tenant.
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Self::Viewer),
            "submitter" => Some(Self::Submitter),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// An authenticated caller. Its texts are shared: a caller is cloned per request from the token
/// that names it (or from the anonymous caller), and a clone costs no allocation.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: Arc<str>,
    pub role: Role,
    /// A name for logs (the token's name or the JWT subject), never the credential.
    pub name: Arc<str>,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{} ({:?})", self.name, self.tenant, self.role)
    }
}

impl Caller {
    /// Whether this caller may see jobs of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.role == Role::Admin || *self.tenant == *tenant
    }

    /// The one tenant whose jobs this caller may list, or `None` for every tenant (an admin).
    pub fn listed_tenant(&self) -> Option<&str> {
        (self.role != Role::Admin).then_some(&self.tenant)
    }

    /// Whether this caller may create and cancel jobs.
    pub fn may_write(&self) -> bool {
        matches!(self.role, Role::Submitter | Role::Admin)
    }
}
