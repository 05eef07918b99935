//! The service's policy: per-tenant limits read from a YAML file (see `policies/oats-policy.yaml`),
//! reloaded when the file changes. A file that fails to load is logged and the last good policy
//! stays in force.
//!
//! Every submission is judged by every rule before anything is created; each rule gives a
//! verdict, and the first denial decides the answer (`dry_run` shows them all).

mod rule;
mod rules;

pub use rule::Rule;
pub use rules::{
    Egress, GUARDED_LABEL_DOMAINS, OnPreemption, PolicyDocument, PolicyError, ResourceProfile, TenantRules,
};

use crate::jobs::JobSpec;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

/// One rule's judgement of a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub rule: Rule,
    pub allowed: bool,
    pub detail: String,
    /// For 429 denials: when a retry may succeed.
    pub retry_after: Option<Duration>,
}

impl Verdict {
    pub fn allow(rule: Rule, detail: impl Into<String>) -> Self {
        Self { rule, allowed: true, detail: detail.into(), retry_after: None }
    }

    pub fn deny(rule: Rule, detail: impl Into<String>) -> Self {
        Self { rule, allowed: false, detail: detail.into(), retry_after: None }
    }
}

/// The verdicts on a submission, and the resources it would get.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub verdicts: Vec<Verdict>,
    pub resources: Option<ResourceProfile>,
}

impl Evaluation {
    pub fn denial(&self) -> Option<&Verdict> {
        self.verdicts.iter().find(|v| !v.allowed)
    }
}

/// What the policy needs to know about a submission besides its spec.
pub struct Submission<'a> {
    pub tenant: &'a str,
    pub spec: &'a JobSpec,
    /// The tenant's unfinished jobs right now.
    pub active_jobs: usize,
    /// The tenant's jobs the backend still holds: unfinished ones and finished ones not yet
    /// removed by `ttl_seconds_after_finished` (on Kubernetes, its Jobs in the namespace).
    pub kept_jobs: usize,
    /// The agent image the job would run, where there is one (Kubernetes).
    pub image: Option<&'a str>,
}

/// A token bucket per tenant for `submissions_per_minute` (per replica).
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The policy in force.
pub struct Policy {
    path: Option<PathBuf>,
    document: RwLock<Arc<PolicyDocument>>,
    loaded: Mutex<Option<SystemTime>>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Policy {
    /// The built-in policy (no file): the defaults of [`TenantRules`].
    pub fn builtin() -> Arc<Self> {
        Arc::new(Self::with_document(None, PolicyDocument::default()))
    }

    fn with_document(path: Option<PathBuf>, document: PolicyDocument) -> Self {
        let loaded = path.as_deref().and_then(crate::reload::stamp);
        Self { path, document: RwLock::new(Arc::new(document)), loaded: Mutex::new(loaded), buckets: Mutex::default() }
    }

    /// Load the file; it must be valid at start.
    pub fn load(path: &Path) -> Result<Arc<Self>, PolicyError> {
        let document = PolicyDocument::read(path)?;
        tracing::info!(path = %path.display(), tenants = document.tenant_count(), "policy loaded");
        Ok(Arc::new(Self::with_document(Some(path.to_owned()), document)))
    }

    /// Check the file every `every` and reload it when it changed.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        crate::reload::poll(self, every, Self::reload_if_changed);
    }

    pub fn reload_if_changed(&self) {
        let Some(path) = &self.path else { return };
        let current = crate::reload::stamp(path);
        {
            let mut loaded = self.loaded.lock().unwrap();
            if *loaded == current {
                return;
            }
            *loaded = current;
        }
        match PolicyDocument::read(path) {
            Ok(document) => {
                tracing::info!(path = %path.display(), tenants = document.tenant_count(), "policy reloaded");
                *self.document.write().unwrap() = Arc::new(document);
            }
            Err(error) => tracing::error!(%error, "policy file rejected; the previous policy stays in force"),
        }
    }

    pub fn rules_for(&self, tenant: &str) -> TenantRules {
        self.document.read().unwrap().rules_for(tenant)
    }

    /// The tenants the policy in force names (that have rules of their own).
    pub fn tenants(&self) -> Vec<String> {
        self.document.read().unwrap().tenant_names().map(str::to_owned).collect()
    }

    /// Judge a submission by every rule. With `consume`, an allowed submission takes a token from
    /// the tenant's rate bucket (dry runs do not).
    pub fn evaluate(&self, submission: &Submission<'_>, consume: bool) -> Evaluation {
        let rules = self.rules_for(submission.tenant);
        let (mut verdicts, resources) = rules.judge(submission);
        let allowed_so_far = verdicts.iter().all(|v| v.allowed);
        verdicts.push(self.rate(submission.tenant, &rules, consume && allowed_so_far));
        Evaluation { verdicts, resources }
    }

    fn rate(&self, tenant: &str, rules: &TenantRules, consume: bool) -> Verdict {
        let per_minute = f64::from(rules.submissions_per_minute);
        let mut buckets = self.buckets.lock().unwrap();
        let now = Instant::now();
        let bucket = buckets.entry(tenant.to_owned()).or_insert(Bucket { tokens: per_minute, updated: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.updated).as_secs_f64() * per_minute / 60.0).min(per_minute);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            if consume {
                bucket.tokens -= 1.0;
            }
            return Verdict::allow(
                Rule::SubmissionsPerMinute,
                format!("at most {} submissions per minute", rules.submissions_per_minute),
            );
        }
        let wait = if per_minute > 0.0 { (1.0 - bucket.tokens) * 60.0 / per_minute } else { 60.0 };
        Verdict {
            retry_after: Some(Duration::from_secs_f64(wait.ceil().max(1.0))),
            ..Verdict::deny(
                Rule::SubmissionsPerMinute,
                format!("tenant {tenant} may submit at most {} jobs per minute", rules.submissions_per_minute),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobLimits, JobRequest};

    fn spec() -> JobSpec {
        JobRequest { goal: "g".into(), max_turns: 5, ..Default::default() }.validate(&JobLimits::default()).unwrap()
    }

    fn policy(yaml: &str) -> (tempfile::TempDir, Arc<Policy>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, yaml).unwrap();
        let policy = Policy::load(&path).unwrap();
        (dir, policy)
    }

    #[test]
    fn the_rate_limit_denies_with_retry_after_and_refills() {
        let (_dir, policy) = policy("defaults:\n  submissions_per_minute: 2\n");
        let spec = spec();
        let submission = Submission { tenant: "t", spec: &spec, active_jobs: 0, kept_jobs: 0, image: None };
        assert!(policy.evaluate(&submission, true).denial().is_none());
        assert!(policy.evaluate(&submission, false).denial().is_none(), "a dry run consumes nothing");
        assert!(policy.evaluate(&submission, true).denial().is_none());
        let third = policy.evaluate(&submission, true);
        let denial = third.denial().unwrap();
        assert_eq!((denial.rule, denial.rule.status()), (Rule::SubmissionsPerMinute, 429));
        assert!(denial.retry_after.unwrap() >= Duration::from_secs(1));
        // Other tenants have their own bucket.
        let other = Submission { tenant: "u", ..submission };
        assert!(policy.evaluate(&other, true).denial().is_none());
    }

    #[test]
    fn a_bad_reload_keeps_the_last_good_policy() {
        let (dir, policy) = policy("defaults:\n  max_turns: 3\n");
        assert_eq!(policy.rules_for("t").max_turns, 3);
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, "defaults:\n  max_turns: many\n").unwrap();
        policy.reload_if_changed();
        assert_eq!(policy.rules_for("t").max_turns, 3);
        std::fs::write(&path, "defaults:\n  max_turns: 7\ntenants:\n  vip:\n    max_turns: 9\n").unwrap();
        policy.reload_if_changed();
        assert_eq!((policy.rules_for("t").max_turns, policy.rules_for("vip").max_turns), (7, 9));
    }

    #[test]
    fn the_shipped_policy_file_loads() {
        let policy = Policy::load(Path::new("policies/oats-policy.yaml")).unwrap();
        assert!(policy.rules_for("anyone").resource_profiles.contains_key("small"));
    }
}
