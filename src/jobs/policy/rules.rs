//! The policy document and the rules of one tenant.

use super::{Rule, Submission, Verdict};
use crate::jobs::{Budget, JobSpec, NanoUsd};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

/// Why a policy file cannot be used. At start this stops the server; on a reload the file is
/// rejected and the policy in force stays.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A tenant's rules (or the defaults', tenant `(defaults)`) contradict themselves.
    #[error("{}: tenant {tenant}: {message}", path.display())]
    Tenant { path: PathBuf, tenant: String, message: String },
}

/// When a submission refused by `max_kept_jobs` may be retried.
const KEPT_JOBS_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Requests and limits of the agent container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceProfile {
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// The agent image of jobs with this profile (a team's own agent), instead of `agent_image`.
    /// It must still pass `allowed_images` and the admission policy's image prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The agent command of jobs with this profile, instead of `agent_command`; e.g.
    /// `[/oats/oats, launch, --, python, agent.py]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Extra network access of jobs with this profile: `public-https` lets agents that need web
    /// tools reach public HTTPS (the NetworkPolicy `oats-agents-public-https` selects the pod
    /// label OATS sets for it); none by default, when agents reach only the LLM gateway and DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
}

/// Network access beyond the LLM gateway that a profile may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Egress {
    PublicHttps,
}

impl Egress {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PublicHttps => "public-https",
        }
    }
}

/// The rules a tenant's submissions are held to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRules {
    pub max_concurrent_jobs: u32,
    /// The tenant's jobs held at once, finished ones included until their TTL removes them: what
    /// a tenant may hold of the namespace's `count/jobs.batch` quota.
    pub max_kept_jobs: u32,
    pub submissions_per_minute: u32,
    /// Open watch and log-follow streams per tenant (per replica).
    pub max_streams: u32,
    pub max_turns: u32,
    pub max_timeout_seconds: u32,
    pub max_goal_bytes: usize,
    /// Model names, or `*` for any.
    pub allowed_models: Vec<String>,
    /// Image prefixes (`registry.example.com/oats/`) or exact digests (`…@sha256:…`); `*` for any.
    pub allowed_images: Vec<String>,
    /// Label keys, `prefix/*` for a whole prefix, or `*` for any.
    pub allowed_label_keys: Vec<String>,
    pub resource_profiles: BTreeMap<String, ResourceProfile>,
    /// The profile of jobs that name none; without one, the server's configured resources apply.
    pub default_profile: Option<String>,
    /// The budget of jobs that set none (each limit on its own).
    pub default_budget: Budget,
    /// The most budget a job may ask for.
    pub max_budget: Budget,
    /// The tenant's spend on model calls per UTC day, across replicas.
    pub daily_spend_limit: Option<NanoUsd>,
    /// Model calls of one job in flight at once.
    pub max_in_flight_calls: u32,
    /// Whether prompts and completions may be recorded in spans (off: only counts and names).
    pub record_llm_content: bool,
    /// The Kueue LocalQueue of the tenant's jobs when queueing is on (`None`: the server's
    /// `kueue_default_queue`).
    pub local_queue: Option<String>,
    /// The Kueue WorkloadPriorityClass of the tenant's jobs (`None`: Kueue's default priority).
    pub priority_class: Option<String>,
    /// What becomes of a job Kueue preempts: queued again (Kueue's way) or failed.
    pub on_preemption: OnPreemption,
}

/// What becomes of a job Kueue preempts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPreemption {
    /// Kueue queues it again and it starts over when admitted (reason `Preempted` meanwhile).
    #[default]
    Requeue,
    /// It fails with reason `Preempted` (for work that must not run twice).
    Fail,
}

impl TenantRules {
    /// Where the tenant's jobs queue when queueing is on.
    pub fn queue_choice(&self) -> crate::jobs::QueueChoice {
        crate::jobs::QueueChoice {
            local_queue: self.local_queue.clone(),
            priority_class: self.priority_class.clone(),
            fail_on_preemption: self.on_preemption == OnPreemption::Fail,
        }
    }
}

impl Default for TenantRules {
    fn default() -> Self {
        Self {
            max_concurrent_jobs: 1000,
            max_kept_jobs: 5000,
            submissions_per_minute: 1200,
            max_streams: 100,
            max_turns: 100,
            max_timeout_seconds: 86_400,
            max_goal_bytes: 16_384,
            allowed_models: vec!["*".into()],
            allowed_images: vec!["*".into()],
            allowed_label_keys: vec!["*".into()],
            resource_profiles: BTreeMap::new(),
            default_profile: None,
            default_budget: Budget::default(),
            max_budget: Budget::default(),
            daily_spend_limit: None,
            max_in_flight_calls: 4,
            record_llm_content: false,
            local_queue: None,
            priority_class: None,
            on_preemption: OnPreemption::Requeue,
        }
    }
}

/// A budget as written in the file: dollars, not nano-dollars.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetPatch {
    max_tokens: Option<u64>,
    max_cost_usd: Option<f64>,
}

impl BudgetPatch {
    fn budget(self) -> Result<Budget, String> {
        let max_cost = match self.max_cost_usd {
            Some(usd) => Some(NanoUsd::from_usd(usd).ok_or_else(|| format!("max_cost_usd {usd} is not an amount"))?),
            None => None,
        };
        Ok(Budget { max_tokens: self.max_tokens, max_cost })
    }
}

/// Overrides of some rules, as written in the file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesPatch {
    max_concurrent_jobs: Option<u32>,
    max_kept_jobs: Option<u32>,
    submissions_per_minute: Option<u32>,
    max_streams: Option<u32>,
    max_turns: Option<u32>,
    max_timeout_seconds: Option<u32>,
    max_goal_bytes: Option<usize>,
    allowed_models: Option<Vec<String>>,
    allowed_images: Option<Vec<String>>,
    allowed_label_keys: Option<Vec<String>>,
    resource_profiles: Option<BTreeMap<String, ResourceProfile>>,
    default_profile: Option<String>,
    default_budget: Option<BudgetPatch>,
    max_budget: Option<BudgetPatch>,
    daily_spend_limit_usd: Option<f64>,
    max_in_flight_calls: Option<u32>,
    record_llm_content: Option<bool>,
    local_queue: Option<String>,
    priority_class: Option<String>,
    on_preemption: Option<OnPreemption>,
}

impl RulesPatch {
    fn apply(&self, rules: &mut TenantRules) {
        macro_rules! take {
            ($($field:ident),*) => {$(
                if let Some(value) = &self.$field {
                    rules.$field = value.clone();
                }
            )*};
        }
        take!(
            max_concurrent_jobs,
            max_kept_jobs,
            submissions_per_minute,
            max_streams,
            max_turns,
            max_timeout_seconds,
            max_goal_bytes,
            allowed_models,
            allowed_images,
            allowed_label_keys,
            resource_profiles
        );
        for (patch, rule) in [
            (&self.default_profile, &mut rules.default_profile),
            (&self.local_queue, &mut rules.local_queue),
            (&self.priority_class, &mut rules.priority_class),
        ] {
            if patch.is_some() {
                rule.clone_from(patch);
            }
        }
        take!(max_in_flight_calls, record_llm_content, on_preemption);
        // Amounts were checked when the file was read.
        if let Some(budget) = self.default_budget.and_then(|b| b.budget().ok()) {
            rules.default_budget = budget;
        }
        if let Some(budget) = self.max_budget.and_then(|b| b.budget().ok()) {
            rules.max_budget = budget;
        }
        if let Some(limit) = self.daily_spend_limit_usd.and_then(NanoUsd::from_usd) {
            rules.daily_spend_limit = Some(limit);
        }
    }

    /// Amounts that are not amounts, named.
    fn check_amounts(&self) -> Result<(), String> {
        for budget in [self.default_budget, self.max_budget].into_iter().flatten() {
            budget.budget()?;
        }
        if let Some(usd) = self.daily_spend_limit_usd
            && NanoUsd::from_usd(usd).is_none()
        {
            return Err(format!("daily_spend_limit_usd {usd} is not an amount"));
        }
        if self.max_in_flight_calls == Some(0) {
            return Err("max_in_flight_calls must be at least 1".into());
        }
        Ok(())
    }
}

/// The whole file: `defaults`, then per-tenant overrides.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    #[serde(default)]
    defaults: RulesPatch,
    #[serde(default)]
    tenants: BTreeMap<String, RulesPatch>,
}

impl PolicyDocument {
    /// How many tenants have rules of their own.
    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// The tenants that have rules of their own.
    pub fn tenant_names(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }

    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.into(), source })?;
        let document: Self = serde_saphyr::from_str(&text)
            .map_err(|e| PolicyError::Parse { path: path.into(), message: e.to_string() })?;
        let invalid =
            |tenant: &str, message: String| PolicyError::Tenant { path: path.into(), tenant: tenant.into(), message };
        for (tenant, patch) in std::iter::once(("(defaults)", &document.defaults))
            .chain(document.tenants.iter().map(|(name, patch)| (name.as_str(), patch)))
        {
            patch.check_amounts().map_err(|message| invalid(tenant, message))?;
        }
        for tenant in std::iter::once("(defaults)").chain(document.tenants.keys().map(String::as_str)) {
            let rules = document.rules_for(tenant);
            if let Some(why) = rules.default_budget.exceeds(&rules.max_budget) {
                return Err(invalid(tenant, format!("default_budget is above max_budget: {why}")));
            }
            if let Some(profile) = &rules.default_profile
                && !rules.resource_profiles.contains_key(profile)
            {
                return Err(invalid(tenant, format!("default_profile {profile} is not defined")));
            }
        }
        Ok(document)
    }

    pub fn rules_for(&self, tenant: &str) -> TenantRules {
        let mut rules = TenantRules::default();
        self.defaults.apply(&mut rules);
        if let Some(patch) = self.tenants.get(tenant) {
            patch.apply(&mut rules);
        }
        rules
    }
}

fn listed(allowed: &[String], value: &str) -> bool {
    allowed.iter().any(|a| a == "*" || a == value)
}

/// Domains of label keys that service meshes and batch queues act on (sidecar injection, queue
/// admission: `sidecar.istio.io/inject`, `kueue.x-k8s.io/queue-name`, …), with their subdomains.
/// A tenant may set them only when its `allowed_label_keys` names them: a bare `*` is not enough.
pub const GUARDED_LABEL_DOMAINS: [&str; 7] =
    ["istio.io", "linkerd.io", "x-k8s.io", "kuma.io", "volcano.sh", "yunikorn.apache.org", "consul.hashicorp.com"];

fn guarded_label_key(key: &str) -> bool {
    key.rsplit_once('/').is_some_and(|(prefix, _)| {
        GUARDED_LABEL_DOMAINS.iter().any(|d| prefix == *d || prefix.ends_with(&format!(".{d}")))
    })
}

fn label_key_allowed(allowed: &[String], key: &str) -> bool {
    let named =
        |a: &String| a == key || (a != "*" && a.strip_suffix('*').is_some_and(|prefix| key.starts_with(prefix)));
    if guarded_label_key(key) {
        return allowed.iter().any(named);
    }
    allowed.iter().any(|a| a == "*" || named(a))
}

/// An image is allowed by an exact match (digests), or a prefix ending in `/` or `:`.
fn image_allowed(allowed: &[String], image: &str) -> bool {
    allowed
        .iter()
        .any(|a| a == "*" || a == image || ((a.ends_with('/') || a.ends_with(':')) && image.starts_with(a.as_str())))
}

impl TenantRules {
    /// Whether the tenant may use the model called any of `names` (its name and aliases).
    pub fn allows_model<'a>(&self, mut names: impl Iterator<Item = &'a str>) -> bool {
        names.any(|name| listed(&self.allowed_models, name))
    }

    /// Every rule but the rate limit (which needs the shared buckets).
    /// The profile a job gets (its own, else the tenant's default) and that profile's resources;
    /// `None` resources for a name the tenant does not define (the resource-profile rule denies).
    pub fn profile_for(&self, spec: &JobSpec) -> (Option<String>, Option<ResourceProfile>) {
        let name = spec.profile.clone().or_else(|| self.default_profile.clone());
        let resources = name.as_ref().and_then(|p| self.resource_profiles.get(p)).cloned();
        (name, resources)
    }

    /// Every rule's verdict on a submission, in a fixed order (the first denial decides), and the
    /// resources its profile gives.
    pub(super) fn judge(&self, s: &Submission<'_>) -> (Vec<Verdict>, Option<ResourceProfile>) {
        let spec = s.spec;
        let (profile, resources) = self.profile_for(spec);
        let verdicts = vec![
            self.goal_size(spec),
            self.turns(spec),
            self.timeout(spec),
            self.model(spec),
            self.budget_ceiling(spec),
            self.label_keys(spec),
            self.profile(profile.as_deref(), resources.is_some()),
            self.image(s.image, resources.as_ref()),
            self.concurrency(s),
            self.kept(s),
        ];
        (verdicts, resources)
    }

    fn goal_size(&self, spec: &JobSpec) -> Verdict {
        verdict(
            Rule::MaxGoalBytes,
            spec.goal.len() <= self.max_goal_bytes,
            format!("goal is {} bytes; the limit is {}", spec.goal.len(), self.max_goal_bytes),
        )
    }

    fn turns(&self, spec: &JobSpec) -> Verdict {
        verdict(
            Rule::MaxTurns,
            spec.max_turns <= self.max_turns,
            format!("max_turns is {}; the limit is {}", spec.max_turns, self.max_turns),
        )
    }

    fn timeout(&self, spec: &JobSpec) -> Verdict {
        verdict(
            Rule::MaxTimeout,
            spec.timeout_seconds <= self.max_timeout_seconds,
            format!("timeout is {}s; the limit is {}s", spec.timeout_seconds, self.max_timeout_seconds),
        )
    }

    fn model(&self, spec: &JobSpec) -> Verdict {
        match &spec.model {
            Some(model) => verdict(
                Rule::AllowedModels,
                listed(&self.allowed_models, model),
                format!("model {model}; allowed: {}", self.allowed_models.join(", ")),
            ),
            None => verdict(Rule::AllowedModels, true, "no model requested".into()),
        }
    }

    fn budget_ceiling(&self, spec: &JobSpec) -> Verdict {
        verdict(
            Rule::MaxBudget,
            spec.budget.exceeds(&self.max_budget).is_none(),
            spec.budget.exceeds(&self.max_budget).unwrap_or_else(|| "the budget is within the tenant's ceiling".into()),
        )
    }

    fn label_keys(&self, spec: &JobSpec) -> Verdict {
        let refused: Vec<&str> = spec
            .labels
            .keys()
            .filter(|k| !label_key_allowed(&self.allowed_label_keys, k))
            .map(String::as_str)
            .collect();
        verdict(
            Rule::AllowedLabelKeys,
            refused.is_empty(),
            if refused.is_empty() {
                "all label keys allowed".into()
            } else if refused.iter().any(|k| guarded_label_key(k)) {
                format!(
                    "label keys not allowed: {} (keys of service meshes and batch queues must be named in \
                     allowed_label_keys)",
                    refused.join(", ")
                )
            } else {
                format!("label keys not allowed: {}", refused.join(", "))
            },
        )
    }

    fn profile(&self, name: Option<&str>, defined: bool) -> Verdict {
        match name {
            Some(name) => verdict(
                Rule::ResourceProfile,
                defined,
                format!(
                    "profile {name}; defined: {}",
                    self.resource_profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ),
            None => verdict(Rule::ResourceProfile, true, "the server's default resources".into()),
        }
    }

    /// The agent image: a profile's own image replaces the server's.
    fn image(&self, server_image: Option<&str>, resources: Option<&ResourceProfile>) -> Verdict {
        let image = match (server_image, resources.and_then(|r| r.image.as_deref())) {
            (Some(_), Some(own)) => Some(own),
            (image, _) => image,
        };
        match image {
            Some(image) => verdict(
                Rule::AllowedImages,
                image_allowed(&self.allowed_images, image),
                format!("agent image {image}; allowed: {}", self.allowed_images.join(", ")),
            ),
            None => verdict(Rule::AllowedImages, true, "no container image (local backend)".into()),
        }
    }

    fn concurrency(&self, s: &Submission<'_>) -> Verdict {
        Verdict {
            retry_after: (s.active_jobs >= self.max_concurrent_jobs as usize).then_some(Duration::from_secs(10)),
            ..if s.active_jobs < self.max_concurrent_jobs as usize {
                Verdict::allow(
                    Rule::MaxConcurrentJobs,
                    format!("{} of {} jobs active", s.active_jobs, self.max_concurrent_jobs),
                )
            } else {
                Verdict::deny(
                    Rule::MaxConcurrentJobs,
                    format!(
                        "tenant {} already has {} unfinished jobs; the limit is {}",
                        s.tenant, s.active_jobs, self.max_concurrent_jobs
                    ),
                )
            }
        }
    }

    fn kept(&self, s: &Submission<'_>) -> Verdict {
        // Room appears when one of the tenant's finished jobs is removed (its TTL) or deleted;
        // nothing tells when, so clients come back in a minute.
        if s.kept_jobs < self.max_kept_jobs as usize {
            Verdict::allow(Rule::MaxKeptJobs, format!("{} of {} jobs kept", s.kept_jobs, self.max_kept_jobs))
        } else {
            Verdict {
                retry_after: Some(KEPT_JOBS_RETRY_AFTER),
                ..Verdict::deny(
                    Rule::MaxKeptJobs,
                    format!(
                        "tenant {} already holds {} jobs (unfinished, or finished and kept until \
                         ttl_seconds_after_finished removes them); the limit is {}",
                        s.tenant, s.kept_jobs, self.max_kept_jobs
                    ),
                )
            }
        }
    }
}

/// An allowing or denying verdict of `rule`.
fn verdict(rule: Rule, ok: bool, detail: String) -> Verdict {
    if ok { Verdict::allow(rule, detail) } else { Verdict::deny(rule, detail) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobLimits, JobRequest, JobSpec};

    fn spec(change: impl FnOnce(&mut JobRequest)) -> JobSpec {
        let mut request = JobRequest { goal: "goal".into(), max_turns: 5, ..Default::default() };
        change(&mut request);
        request.validate(&JobLimits::default()).unwrap()
    }

    fn rules() -> TenantRules {
        let document: PolicyDocument = serde_saphyr::from_str(
            r#"
defaults:
  max_concurrent_jobs: 2
  max_turns: 10
  max_timeout_seconds: 600
  max_goal_bytes: 100
  allowed_models: [small-model]
  allowed_images: ["registry.example.com/oats/", "oats-agent:"]
  allowed_label_keys: [team, "example.com/*"]
  resource_profiles:
    small: {cpu_request: 100m, cpu_limit: 500m, memory_request: 128Mi, memory_limit: 256Mi}
    team: {cpu_request: 100m, cpu_limit: 500m, memory_request: 128Mi, memory_limit: 256Mi, image: "registry.example.com/oats/team:1", command: [/oats/oats, launch, --, agent]}
    rogue: {cpu_request: 100m, cpu_limit: 500m, memory_request: 128Mi, memory_limit: 256Mi, image: "docker.io/someone/agent:1"}
  default_profile: small
"#,
        )
        .unwrap();
        document.rules_for("t")
    }

    fn denied(spec: &JobSpec, active: usize, image: Option<&str>) -> Vec<Rule> {
        let submission = Submission { tenant: "t", spec, active_jobs: active, kept_jobs: active, image };
        rules().judge(&submission).0.into_iter().filter(|v| !v.allowed).map(|v| v.rule).collect()
    }

    #[test]
    fn each_rule_denies_what_it_should() {
        let image = Some("oats-agent:0.1.0");
        assert_eq!(denied(&spec(|_| {}), 0, image), vec![]);
        assert_eq!(denied(&spec(|r| r.goal = "g".repeat(101)), 0, image), vec![Rule::MaxGoalBytes]);
        assert_eq!(denied(&spec(|r| r.max_turns = 11), 0, image), vec![Rule::MaxTurns]);
        assert_eq!(denied(&spec(|r| r.timeout_seconds = Some(601)), 0, image), vec![Rule::MaxTimeout]);
        assert_eq!(denied(&spec(|r| r.model = Some("big-model".into())), 0, image), vec![Rule::AllowedModels]);
        assert_eq!(denied(&spec(|r| r.model = Some("small-model".into())), 0, image), vec![]);
        let labels = |k: &str| [(k.to_string(), "v".to_string())].into();
        assert_eq!(denied(&spec(|r| r.labels = labels("other")), 0, image), vec![Rule::AllowedLabelKeys]);
        assert_eq!(denied(&spec(|r| r.labels = labels("example.com/run")), 0, image), vec![]);
        assert_eq!(denied(&spec(|r| r.profile = Some("huge".into())), 0, image), vec![Rule::ResourceProfile]);
        assert_eq!(denied(&spec(|_| {}), 0, Some("evil.example/agent:1")), vec![Rule::AllowedImages]);
        assert_eq!(denied(&spec(|_| {}), 0, Some("registry.example.com/oats/agent@sha256:ab")), vec![]);
        assert_eq!(denied(&spec(|_| {}), 2, image), vec![Rule::MaxConcurrentJobs]);
    }

    #[test]
    fn max_kept_jobs_counts_finished_jobs_still_kept_and_denies_with_retry_after() {
        let document: PolicyDocument = serde_saphyr::from_str(
            "defaults:\n  max_concurrent_jobs: 5\n  max_kept_jobs: 3\ntenants:\n  big:\n    max_kept_jobs: 10\n",
        )
        .unwrap();
        let spec = spec(|_| {});
        let judge = |tenant: &str, active_jobs: usize, kept_jobs: usize| {
            let submission = Submission { tenant, spec: &spec, active_jobs, kept_jobs, image: None };
            let verdicts = document.rules_for(tenant).judge(&submission).0;
            verdicts.into_iter().find(|v| v.rule == Rule::MaxKeptJobs).unwrap()
        };
        assert!(judge("t", 0, 2).allowed);
        // No job running, three finished ones not yet removed by their TTL: full.
        let denied = judge("t", 0, 3);
        assert!(!denied.allowed && denied.detail.contains("the limit is 3"), "{denied:?}");
        assert_eq!((denied.rule.name(), denied.rule.status()), ("max-kept-jobs", 429));
        assert!(denied.retry_after.is_some_and(|r| r >= Duration::from_secs(1)));
        // Per tenant.
        assert!(judge("big", 0, 9).allowed && !judge("big", 0, 10).allowed);
        // Built in: a bound too, above max_concurrent_jobs.
        let builtin = TenantRules::default();
        assert!(builtin.max_kept_jobs >= builtin.max_concurrent_jobs);
    }

    #[test]
    fn mesh_and_queue_label_keys_need_an_explicit_entry() {
        let labels = |k: &str| [(k.to_string(), "v".to_string())].into();
        let judge = |allowed: &[&str], key: &str| {
            let rules = TenantRules {
                allowed_label_keys: allowed.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            };
            let spec = spec(|r| r.labels = labels(key));
            let submission = Submission { tenant: "t", spec: &spec, active_jobs: 0, kept_jobs: 0, image: None };
            rules.judge(&submission).0.into_iter().find(|v| v.rule == Rule::AllowedLabelKeys).unwrap()
        };
        for key in ["sidecar.istio.io/inject", "istio.io/rev", "kueue.x-k8s.io/queue-name", "linkerd.io/inject"] {
            let verdict = judge(&["*"], key);
            assert!(!verdict.allowed && verdict.detail.contains(key), "{key}: {verdict:?}");
        }
        assert!(judge(&["*", "sidecar.istio.io/*"], "sidecar.istio.io/inject").allowed);
        assert!(judge(&["kueue.x-k8s.io/queue-name"], "kueue.x-k8s.io/queue-name").allowed);
        assert!(!judge(&["kueue.x-k8s.io/queue-name"], "kueue.x-k8s.io/priority-class").allowed);
        assert!(judge(&["*"], "example.com/istio.io").allowed, "only the key's prefix counts");
    }

    #[test]
    fn a_profile_names_its_own_agent_image_which_must_be_allowed() {
        let image = Some("oats-agent:0.1.0");
        assert_eq!(denied(&spec(|r| r.profile = Some("team".into())), 0, image), vec![]);
        assert_eq!(denied(&spec(|r| r.profile = Some("rogue".into())), 0, image), vec![Rule::AllowedImages]);
        let submission = Submission {
            tenant: "t",
            spec: &spec(|r| r.profile = Some("team".into())),
            active_jobs: 0,
            kept_jobs: 0,
            image,
        };
        let (_, resources) = rules().judge(&submission);
        assert_eq!(resources.unwrap().command.unwrap()[..3], ["/oats/oats", "launch", "--"]);
    }

    #[test]
    fn the_default_profile_gives_resources() {
        let submission = Submission { tenant: "t", spec: &spec(|_| {}), active_jobs: 0, kept_jobs: 0, image: None };
        let (_, resources) = rules().judge(&submission);
        assert_eq!(resources.unwrap().memory_limit, "256Mi");
    }

    #[test]
    fn tenants_override_defaults_key_by_key() {
        let document: PolicyDocument = serde_saphyr::from_str(
            "defaults:\n  max_turns: 10\n  max_concurrent_jobs: 3\ntenants:\n  vip:\n    max_turns: 50\n",
        )
        .unwrap();
        let vip = document.rules_for("vip");
        assert_eq!((vip.max_turns, vip.max_concurrent_jobs), (50, 3));
        assert_eq!(document.rules_for("other").max_turns, 10);
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(serde_saphyr::from_str::<PolicyDocument>("defaults:\n  max_turn: 10\n").is_err());
    }

    #[test]
    fn budgets_are_read_in_dollars_and_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(
            &path,
            "defaults:\n  default_budget: {max_tokens: 1000, max_cost_usd: 0.5}\n  daily_spend_limit_usd: 20\n  max_in_flight_calls: 2\n",
        )
        .unwrap();
        let rules = PolicyDocument::read(&path).unwrap().rules_for("any");
        assert_eq!(rules.default_budget, Budget { max_tokens: Some(1000), max_cost: Some(NanoUsd(500_000_000)) });
        assert_eq!((rules.daily_spend_limit, rules.max_in_flight_calls), (Some(NanoUsd(20_000_000_000)), 2));
        for (yaml, expected) in [
            ("defaults:\n  default_budget: {max_tokens: 10}\n  max_budget: {max_tokens: 5}\n", "above max_budget"),
            ("defaults:\n  daily_spend_limit_usd: -1\n", "not an amount"),
            ("defaults:\n  max_in_flight_calls: 0\n", "at least 1"),
        ] {
            std::fs::write(&path, yaml).unwrap();
            let error = PolicyDocument::read(&path).unwrap_err().to_string();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
    }
}
