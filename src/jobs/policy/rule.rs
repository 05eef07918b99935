//! The names of the policy's rules: what a denial (`JobError::PolicyDenied`) reports.

/// A rule of the policy; its name is the stable suffix of the problem `type` of a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    MaxGoalBytes,
    MaxTurns,
    MaxTimeout,
    AllowedModels,
    AllowedLabelKeys,
    ResourceProfile,
    AllowedImages,
    PodSecurity,
    MaxConcurrentJobs,
    /// The tenant's Jobs still held in the namespace: unfinished ones, and finished ones until
    /// their `ttl_seconds_after_finished` removes them (what counts against the namespace quota).
    MaxKeptJobs,
    SubmissionsPerMinute,
    MaxStreams,
    MaxBudget,
    /// The Kubernetes API server refuses the Job (validation or admission, a 422): found by the
    /// server-side dry run of `?dry_run=true`, or by the create itself.
    KubernetesAdmission,
    /// The namespace's ResourceQuota has no room (dry runs only: a real submission answers the
    /// problem `quota-exhausted`, not a policy denial).
    NamespaceQuota,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxGoalBytes => "max-goal-bytes",
            Self::MaxTurns => "max-turns",
            Self::MaxTimeout => "max-timeout",
            Self::AllowedModels => "allowed-models",
            Self::AllowedLabelKeys => "allowed-label-keys",
            Self::ResourceProfile => "resource-profile",
            Self::AllowedImages => "allowed-images",
            Self::PodSecurity => "pod-security",
            Self::MaxConcurrentJobs => "max-concurrent-jobs",
            Self::MaxKeptJobs => "max-kept-jobs",
            Self::SubmissionsPerMinute => "submissions-per-minute",
            Self::MaxStreams => "max-streams",
            Self::MaxBudget => "max-budget",
            Self::KubernetesAdmission => "kubernetes-admission",
            Self::NamespaceQuota => "quota-exhausted",
        }
    }

    /// The HTTP status of a denial: 422 for a request outside the limits, 403 for something the
    /// tenant may not use, 429 (with Retry-After) for rate and concurrency limits.
    pub fn status(self) -> u16 {
        match self {
            Self::MaxGoalBytes
            | Self::MaxTurns
            | Self::MaxTimeout
            | Self::AllowedLabelKeys
            | Self::MaxBudget
            | Self::KubernetesAdmission => 422,
            Self::AllowedModels | Self::ResourceProfile | Self::AllowedImages | Self::PodSecurity => 403,
            Self::MaxConcurrentJobs
            | Self::MaxKeptJobs
            | Self::SubmissionsPerMinute
            | Self::MaxStreams
            | Self::NamespaceQuota => 429,
        }
    }
}
