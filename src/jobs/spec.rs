//! What a client asks for, the limits it must meet, and the normalised spec both backends run.

use super::{Budget, FieldError, Labels};
use sha2::{Digest, Sha256};

/// Label keys under this prefix (and `app`) belong to OATS itself; users cannot set them.
pub const RESERVED_LABEL_PREFIX: &str = "oats.dev/";

/// Why a label key is not the user's to set, if it is not: OATS's own keys, and every key that
/// Kubernetes or its controllers own or act on (the Job controller's `job-name` and
/// `controller-uid`, `batch.kubernetes.io/*`, `kubernetes.io/*`, `*.kubernetes.io/*`, `k8s.io/*`,
/// `*.k8s.io/*`). The recommended `app.kubernetes.io/*` labels stay the user's, except
/// `app.kubernetes.io/managed-by`, which OATS sets.
pub fn reserved_label_key(key: &str) -> Option<&'static str> {
    if key == "app" || key.starts_with(RESERVED_LABEL_PREFIX) {
        return Some("this key is reserved for OATS");
    }
    if key == "app.kubernetes.io/managed-by" {
        return Some("this key is reserved: OATS sets it on every Job");
    }
    if ["job-name", "controller-uid", "pod-template-hash"].contains(&key) {
        return Some("this key is reserved: the Kubernetes Job controller sets it");
    }
    let (prefix, _) = key.rsplit_once('/')?;
    let under = |domain: &str| prefix == domain || prefix.ends_with(&format!(".{domain}"));
    if prefix != "app.kubernetes.io" && (under("kubernetes.io") || under("k8s.io")) {
        return Some("this key is reserved: keys under kubernetes.io and k8s.io belong to Kubernetes");
    }
    None
}

/// A submission as the client sent it, before defaults and limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRequest {
    pub goal: String,
    pub max_turns: u32,
    pub labels: Labels,
    pub timeout_seconds: Option<u32>,
    pub model: Option<String>,
    pub profile: Option<String>,
    /// Limits on the job's model calls; the tenant's default budget fills what is unset.
    pub budget: Budget,
}

/// A validated job: every field within limits and every default applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobSpec {
    pub goal: String,
    pub max_turns: u32,
    pub labels: Labels,
    pub timeout_seconds: u32,
    pub model: Option<String>,
    /// Named resource profile from the policy (`small`, `medium`, …); `None` for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// What the job may spend on model calls (the tenant's default fills unset limits at submit).
    #[serde(default, skip_serializing_if = "Budget::is_unlimited")]
    pub budget: Budget,
}

/// Names of the environment variables of the agent contract (docs/agent-contract.md).
pub mod agent_env {
    /// The job's id (`job-…`).
    pub const JOB_ID: &str = "OATS_JOB_ID";
    /// What the agent is asked to do.
    pub const GOAL: &str = "OATS_GOAL";
    /// The most model calls the agent may make.
    pub const MAX_TURNS: &str = "OATS_MAX_TURNS";
    pub const TIMEOUT_SECONDS: &str = "OATS_TIMEOUT_SECONDS";
    /// Where the agent writes its answer (on Kubernetes, the termination message).
    pub const RESULT_FILE: &str = "OATS_RESULT_FILE";
    /// The only directory the agent works in.
    pub const WORKSPACE: &str = "OATS_WORKSPACE";
    /// The model the job asked for, when it named one.
    pub const MODEL: &str = "OATS_MODEL";
    /// On Kubernetes, where a provider Secret is mounted (the opt-in for agents that call a
    /// provider directly).
    pub const LLM_CREDENTIALS_DIR: &str = "OATS_LLM_CREDENTIALS_DIR";
    /// The job's budget, for agents that plan their spending (the gateway enforces it anyway).
    pub const BUDGET_MAX_TOKENS: &str = "OATS_BUDGET_MAX_TOKENS";
    pub const BUDGET_MAX_COST_USD: &str = "OATS_BUDGET_MAX_COST_USD";
    /// The LLM gateway's OpenAI-compatible base URL, as the OpenAI SDKs read it.
    pub const OPENAI_BASE_URL: &str = "OPENAI_BASE_URL";
    /// The job's credential for the gateway, as the OpenAI SDKs read it.
    pub const OPENAI_API_KEY: &str = "OPENAI_API_KEY";
    /// On Kubernetes: the file holding the job's credential (a projected service-account token,
    /// rotated in place), for agents that read it per call or through `oats launch`.
    pub const LLM_TOKEN_FILE: &str = "OATS_LLM_TOKEN_FILE";
}

/// Exit codes of the agent contract beyond 0 (answered) and other failures.
pub mod agent_exit {
    /// The agent stopped because its budget could not pay for another model call.
    pub const BUDGET_EXHAUSTED: i32 = 10;
    /// The agent stopped at its call cap (`max_turns`).
    pub const MAX_TURNS_REACHED: i32 = 11;
    /// The agent stopped because its deadline was near, before being killed at it.
    pub const DEADLINE_NEAR: i32 = 12;

    /// The stable reason a failed agent's exit code stands for, if it is one of the contract's.
    pub fn reason(code: i32) -> Option<(crate::jobs::JobReason, &'static str)> {
        match code {
            BUDGET_EXHAUSTED => {
                Some((crate::jobs::JobReason::BudgetExhausted, "the job's budget could not pay for another model call"))
            }
            MAX_TURNS_REACHED => {
                Some((crate::jobs::JobReason::MaxTurnsReached, "the job made its max_turns model calls"))
            }
            DEADLINE_NEAR => Some((
                crate::jobs::JobReason::DeadlineExceeded,
                "the agent stopped as its deadline neared, with a partial result",
            )),
            _ => None,
        }
    }
}

impl JobSpec {
    /// The environment contract every agent gets, on Kubernetes and locally alike.
    pub fn agent_env(&self, id: &super::JobId, result_file: &str, workspace: &str) -> Vec<(String, String)> {
        let mut env = vec![
            (agent_env::JOB_ID.to_owned(), id.to_string()),
            (agent_env::GOAL.to_owned(), self.goal.clone()),
            (agent_env::MAX_TURNS.to_owned(), self.max_turns.to_string()),
            (agent_env::TIMEOUT_SECONDS.to_owned(), self.timeout_seconds.to_string()),
            (agent_env::RESULT_FILE.to_owned(), result_file.to_owned()),
            (agent_env::WORKSPACE.to_owned(), workspace.to_owned()),
        ];
        if let Some(model) = &self.model {
            env.push((agent_env::MODEL.to_owned(), model.clone()));
        }
        if let Some(tokens) = self.budget.max_tokens {
            env.push((agent_env::BUDGET_MAX_TOKENS.to_owned(), tokens.to_string()));
        }
        if let Some(cost) = self.budget.max_cost {
            env.push((agent_env::BUDGET_MAX_COST_USD.to_owned(), cost.as_usd().to_string()));
        }
        env
    }

    /// A fingerprint of the normalised spec; equal specs give equal hashes on every replica.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a JobSpec always serialises");
        let digest = Sha256::digest(canonical);
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The numbers every submission is held to. Each has a default, a config key and a test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    pub max_goal_bytes: usize,
    pub max_turns: u32,
    pub max_labels: usize,
    pub default_timeout_seconds: u32,
    pub max_timeout_seconds: u32,
    pub max_model_len: usize,
}

impl JobLimits {
    /// Hard ceilings: configuration may lower these, never raise them.
    pub const GOAL_BYTES_CEILING: usize = 16384;
    pub const MAX_TURNS_CEILING: u32 = 100;
    pub const LABELS_CEILING: usize = 16;
    pub const MIN_TIMEOUT_SECONDS: u32 = 10;
    pub const TIMEOUT_CEILING_SECONDS: u32 = 86_400;
    pub const MODEL_LEN_CEILING: usize = 128;
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_goal_bytes: Self::GOAL_BYTES_CEILING,
            max_turns: Self::MAX_TURNS_CEILING,
            max_labels: Self::LABELS_CEILING,
            default_timeout_seconds: 600,
            max_timeout_seconds: 3600,
            max_model_len: Self::MODEL_LEN_CEILING,
        }
    }
}

impl JobRequest {
    /// Check every rule at once, so a client sees all its mistakes in one answer.
    pub fn validate(self, limits: &JobLimits) -> Result<JobSpec, Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.goal.trim().is_empty() {
            errors.push(FieldError::new("goal", "must not be empty"));
        }
        if self.goal.len() > limits.max_goal_bytes {
            errors.push(FieldError::new(
                "goal",
                format!("is {} bytes; at most {} bytes of UTF-8 are allowed", self.goal.len(), limits.max_goal_bytes),
            ));
        }
        if self.goal.contains('\0') {
            errors.push(FieldError::new("goal", "must not contain NUL characters"));
        }
        if self.max_turns < 1 || self.max_turns > limits.max_turns {
            errors.push(FieldError::new("max_turns", format!("must be between 1 and {}", limits.max_turns)));
        }
        if self.labels.len() > limits.max_labels {
            errors.push(FieldError::new("labels", format!("at most {} labels are allowed", limits.max_labels)));
        }
        for (key, value) in &self.labels {
            if let Err(message) = check_label_key(key) {
                errors.push(FieldError::new(format!("labels.{key}"), message));
            } else if let Some(message) = reserved_label_key(key) {
                errors.push(FieldError::new(format!("labels.{key}"), format!("`{key}`: {message}")));
            }
            if let Err(message) = check_label_value(value) {
                errors.push(FieldError::new(format!("labels.{key}"), message));
            }
        }
        let timeout_seconds = self.timeout_seconds.unwrap_or(limits.default_timeout_seconds);
        if timeout_seconds < JobLimits::MIN_TIMEOUT_SECONDS || timeout_seconds > limits.max_timeout_seconds {
            errors.push(FieldError::new(
                "timeout_seconds",
                format!("must be between {} and {}", JobLimits::MIN_TIMEOUT_SECONDS, limits.max_timeout_seconds),
            ));
        }
        if let Some(model) = &self.model {
            let ok = !model.is_empty()
                && model.len() <= limits.max_model_len
                && model.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:@".contains(&b));
            if !ok {
                errors.push(FieldError::new(
                    "model",
                    format!("must be 1 to {} characters of A-Z, a-z, 0-9 and -_./:@", limits.max_model_len),
                ));
            }
        }
        if let Some(profile) = &self.profile {
            let ok = !profile.is_empty()
                && profile.len() <= 32
                && profile.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                errors.push(FieldError::new("profile", "must be 1 to 32 characters of a-z, 0-9 and -"));
            }
        }
        if self.budget.max_tokens == Some(0) {
            errors.push(FieldError::new("budget.max_tokens", "must be at least 1"));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(JobSpec {
            goal: self.goal,
            max_turns: self.max_turns,
            labels: self.labels,
            timeout_seconds,
            model: self.model,
            profile: self.profile,
            budget: self.budget,
        })
    }
}

/// Kubernetes label key syntax: optional DNS-subdomain prefix (≤253) and `/`, then a name (≤63).
pub(crate) fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err("key prefix must be a lowercase DNS subdomain of at most 253 characters".into());
        }
    }
    if name.is_empty() || name.len() > 63 || !is_label_name(name) {
        return Err("key name must be 1-63 characters of alphanumerics, '-', '_' or '.', \
                    starting and ending with an alphanumeric"
            .into());
    }
    Ok(())
}

/// Kubernetes label value syntax: empty, or ≤63 characters shaped like a key name.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || (value.len() <= 63 && is_label_name(value)) {
        Ok(())
    } else {
        Err("value must be at most 63 characters of alphanumerics, '-', '_' or '.', \
             starting and ending with an alphanumeric"
            .into())
    }
}

fn is_label_name(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> JobRequest {
        JobRequest { goal: "Summarise the news".into(), max_turns: 5, ..Default::default() }
    }

    fn fields(result: Result<JobSpec, Vec<FieldError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn defaults_are_applied() {
        let spec = request().validate(&JobLimits::default()).unwrap();
        assert_eq!(spec.timeout_seconds, 600);
        assert_eq!(spec.max_turns, 5);
    }

    #[test]
    fn goal_is_limited_in_bytes_not_characters() {
        let limits = JobLimits::default();
        let exact = JobRequest { goal: "a".repeat(16384), ..request() };
        assert!(exact.validate(&limits).is_ok());
        let over = JobRequest { goal: "a".repeat(16385), ..request() };
        assert_eq!(fields(over.validate(&limits)), ["goal"]);
        // 4097 four-byte characters: 16388 bytes, over the limit though only 4097 characters.
        let wide = JobRequest { goal: "🦀".repeat(4097), ..request() };
        assert_eq!(fields(wide.validate(&limits)), ["goal"]);
        for empty in ["", "   \n"] {
            let r = JobRequest { goal: empty.into(), ..request() };
            assert_eq!(fields(r.validate(&limits)), ["goal"]);
        }
        let nul = JobRequest { goal: "a\0b".into(), ..request() };
        assert_eq!(fields(nul.validate(&limits)), ["goal"]);
    }

    #[test]
    fn max_turns_bounds_follow_the_configured_ceiling() {
        let limits = JobLimits::default();
        for ok in [1, 100] {
            assert!(JobRequest { max_turns: ok, ..request() }.validate(&limits).is_ok());
        }
        for bad in [0, 101] {
            assert_eq!(fields(JobRequest { max_turns: bad, ..request() }.validate(&limits)), ["max_turns"]);
        }
        let lowered = JobLimits { max_turns: 10, ..JobLimits::default() };
        assert_eq!(fields(JobRequest { max_turns: 11, ..request() }.validate(&lowered)), ["max_turns"]);
    }

    #[test]
    fn labels_are_limited_and_checked() {
        let limits = JobLimits::default();
        let many: Labels = (0..17).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert_eq!(fields(JobRequest { labels: many, ..request() }.validate(&limits)), ["labels"]);
        let sixteen: Labels = (0..16).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(JobRequest { labels: sixteen, ..request() }.validate(&limits).is_ok());
        let good: Labels = [("team", "ml"), ("example.com/run", "a.b_c-1"), ("empty", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(JobRequest { labels: good, ..request() }.validate(&limits).is_ok());
        for (key, value) in [
            ("bad key", "v"),
            ("-lead", "v"),
            ("Upper.Case/x", "v"),
            ("ok", "has space"),
            ("ok", &"v".repeat(64)),
            (&"k".repeat(64), "v"),
            ("app", "mine"),
            ("oats.dev/job-id", "x"),
            ("/name", "v"),
        ] {
            let labels: Labels = [(key.to_string(), value.to_string())].into();
            let result = JobRequest { labels, ..request() }.validate(&limits);
            assert!(result.is_err(), "{key}={value} accepted");
        }
    }

    #[test]
    fn keys_kubernetes_owns_are_reserved_and_named() {
        let limits = JobLimits::default();
        for key in [
            "job-name",
            "controller-uid",
            "batch.kubernetes.io/job-name",
            "batch.kubernetes.io/controller-uid",
            "kubernetes.io/metadata.name",
            "topology.kubernetes.io/zone",
            "pod-security.kubernetes.io/enforce",
            "k8s.io/anything",
            "jobset.sigs.k8s.io/jobset-name",
            "app.kubernetes.io/managed-by",
        ] {
            let labels: Labels = [(key.to_string(), "v".to_string())].into();
            let errors = JobRequest { labels, ..request() }.validate(&limits).unwrap_err();
            assert_eq!(errors.len(), 1, "{key}: {errors:?}");
            assert_eq!(errors[0].field, format!("labels.{key}"));
            assert!(errors[0].message.contains(key) && errors[0].message.contains("reserved"), "{errors:?}");
        }
        // The recommended labels stay the user's, and look-alike domains are not Kubernetes'.
        for key in
            ["app.kubernetes.io/name", "app.kubernetes.io/part-of", "notkubernetes.io/x", "x-k8s.io.example.com/y"]
        {
            let labels: Labels = [(key.to_string(), "v".to_string())].into();
            assert!(JobRequest { labels, ..request() }.validate(&limits).is_ok(), "{key} refused");
        }
    }

    #[test]
    fn timeout_bounds() {
        let limits = JobLimits::default();
        for ok in [10, 3600] {
            assert!(JobRequest { timeout_seconds: Some(ok), ..request() }.validate(&limits).is_ok());
        }
        for bad in [0, 9, 3601] {
            let r = JobRequest { timeout_seconds: Some(bad), ..request() };
            assert_eq!(fields(r.validate(&limits)), ["timeout_seconds"]);
        }
    }

    #[test]
    fn model_names_are_restricted() {
        let limits = JobLimits::default();
        assert!(JobRequest { model: Some("gpt-4o-mini".into()), ..request() }.validate(&limits).is_ok());
        for bad in ["", "has space", "a;rm -rf", &"m".repeat(129)] {
            let r = JobRequest { model: Some(bad.to_string()), ..request() };
            assert_eq!(fields(r.validate(&limits)), ["model"]);
        }
    }

    #[test]
    fn all_errors_are_reported_together() {
        let r = JobRequest { goal: String::new(), max_turns: 0, timeout_seconds: Some(1), ..request() };
        assert_eq!(fields(r.validate(&JobLimits::default())), ["goal", "max_turns", "timeout_seconds"]);
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let limits = JobLimits::default();
        let a = request().validate(&limits).unwrap();
        let b = request().validate(&limits).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = JobRequest { max_turns: 6, ..request() }.validate(&limits).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
        // An explicit default is the same job as an omitted one.
        let d = JobRequest { timeout_seconds: Some(600), ..request() }.validate(&limits).unwrap();
        assert_eq!(a.fingerprint(), d.fingerprint());
    }
}
