//! Pure mapping from a Job and its Pods to a job record. No I/O, so a table of cases pins it.

use super::render::{
    AGENT_CONTAINER, CANCELLED_AT_ANNOTATION, COUNTED_ANNOTATION, CREATED_AT_ANNOTATION, ENV_ESCAPED_ANNOTATION,
    FAIL_ON_PREEMPTION_ANNOTATION, JOB_ID_LABEL, KUEUE_QUEUE_LABEL, LABEL_KEYS_ANNOTATION, PREEMPTED_AT_ANNOTATION,
    PROFILE_ANNOTATION, REQUEST_HASH_ANNOTATION, TENANT_LABEL, TRACEPARENT_ANNOTATION, TRACESTATE_ANNOTATION,
    unescape_env_value,
};
use super::wire::{CachedJob, CachedPod};
use crate::jobs::{
    Budget, JobId, JobPhase, JobReason, JobRecord, JobSpec, JobState, Labels, NanoUsd, QueuePlace,
    RESERVED_LABEL_PREFIX, TraceContext, agent_env, agent_exit, truncate_result,
};
use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{batch::v1::JobCondition, core::v1::ContainerStatus},
    apimachinery::pkg::apis::meta::v1::Time,
};

/// Convert a Kubernetes timestamp.
pub fn to_chrono(time: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(time.0.as_second(), time.0.subsec_nanosecond().max(0) as u32).unwrap_or_default()
}

/// What the status mapping reads from a Job besides the job's spec: its status and OATS's
/// annotations. Kept beside a cached record so a pod's change can recompute it.
#[derive(Clone, Debug, Default)]
pub struct JobFacts {
    pub resource_version: Option<String>,
    /// Whether a replica already counted the job's finish ([`COUNTED_ANNOTATION`]).
    pub counted: bool,
    pub cancelled_at: Option<String>,
    /// OATS failed the job because Kueue preempted it (the tenant's `on_preemption: fail`).
    pub preempted_at: Option<String>,
    /// The tenant fails the job if Kueue preempts it.
    pub fails_on_preemption: bool,
    /// Only the conditions that hold (`status: "True"`).
    pub conditions: Vec<JobCondition>,
    /// Pods the Job controller counted as active, succeeded or failed, plus terminated ones not
    /// yet counted.
    pub pods_seen: usize,
    pub completion_time: Option<Time>,
    /// The LocalQueue of a Job held suspended by Kueue until it admits it; `None` once admitted
    /// (or without Kueue).
    pub queued_in: Option<String>,
}

impl JobFacts {
    pub fn of(job: &CachedJob) -> Self {
        let annotations = job.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
        let status = job.status.as_ref();
        // Pods that finished but are not yet folded into the counters sit in uncountedTerminatedPods.
        let uncounted = status
            .and_then(|s| s.uncounted_terminated_pods.as_ref())
            .map_or(0, |u| u.succeeded.as_ref().map_or(0, Vec::len) + u.failed.as_ref().map_or(0, Vec::len));
        let counted = status.map_or(0, |s| s.active.unwrap_or(0) + s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0));
        Self {
            resource_version: job.metadata.resource_version.clone(),
            counted: annotations.is_some_and(|a| a.contains_key(COUNTED_ANNOTATION)),
            cancelled_at: annotation(CANCELLED_AT_ANNOTATION),
            preempted_at: annotation(PREEMPTED_AT_ANNOTATION),
            fails_on_preemption: annotation(FAIL_ON_PREEMPTION_ANNOTATION).is_some(),
            conditions: status
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .filter(|c| c.status == "True")
                .cloned()
                .collect(),
            pods_seen: counted.max(0) as usize + uncounted,
            completion_time: status.and_then(|s| s.completion_time.clone()),
            queued_in: job
                .spec
                .as_ref()
                .filter(|spec| spec.suspend == Some(true))
                .and_then(|_| job.metadata.labels.as_ref()?.get(KUEUE_QUEUE_LABEL).cloned()),
        }
    }

    fn condition(&self, kind: &str) -> Option<&JobCondition> {
        self.conditions.iter().find(|c| c.type_ == kind)
    }

    /// Whether the Job has reached a final status: the same judgement as [`apply_pods`], from the
    /// Job alone (pods only add detail to a final status, never decide it).
    pub fn is_finished(&self) -> bool {
        self.cancelled_at.is_some()
            || self.preempted_at.is_some()
            || ["Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"].iter().any(|k| self.condition(k).is_some())
    }
}

/// The record of `job`, given its pods (any order). `None` for a Job OATS did not create.
pub fn job_record(job: &CachedJob, pods: &[&CachedPod]) -> Option<JobRecord> {
    job_record_with(job, &JobFacts::of(job), pods)
}

/// [`job_record`] with the Job's facts already taken.
pub fn job_record_with(job: &CachedJob, facts: &JobFacts, pods: &[&CachedPod]) -> Option<JobRecord> {
    let mut record = submitted(job)?;
    apply_pods(&mut record, facts, pods);
    Some(record)
}

/// The job as it was submitted (pending; nothing observed yet), read back from its Job.
fn submitted(job: &CachedJob) -> Option<JobRecord> {
    let meta = &job.metadata;
    let labels = meta.labels.as_ref()?;
    let id = JobId::parse(labels.get(JOB_ID_LABEL)?).ok()?;
    let tenant = labels.get(TENANT_LABEL)?.clone();
    let annotations = meta.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
    let spec = job.spec.as_ref()?;
    let container = spec.template.spec.as_ref()?.containers.iter().find(|c| c.name == AGENT_CONTAINER)?;
    let escaped = annotations.is_some_and(|a| a.contains_key(ENV_ESCAPED_ANNOTATION));
    let env = |name: &str| {
        let value = container.env.iter().find(|e| e.name == name).and_then(|e| e.value.as_deref())?;
        Some(if escaped { unescape_env_value(value) } else { value.to_owned() })
    };
    let user_labels: Labels = match annotation(LABEL_KEYS_ANNOTATION) {
        // The keys the job was created with: every user label, and only those, byte for byte.
        Some(keys) => keys
            .split(',')
            .filter(|k| !k.is_empty())
            .filter_map(|k| Some((k.to_owned(), labels.get(k)?.clone())))
            .collect(),
        // A Job from before the annotation: everything but what OATS sets.
        None => labels
            .iter()
            .filter(|(k, _)| {
                k.as_str() != "app" && !k.starts_with(RESERVED_LABEL_PREFIX) && !k.starts_with("app.kubernetes.io/")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let job_spec = JobSpec {
        goal: env(agent_env::GOAL).unwrap_or_default(),
        max_turns: env(agent_env::MAX_TURNS).and_then(|v| v.parse().ok()).unwrap_or(0),
        labels: user_labels,
        timeout_seconds: env(agent_env::TIMEOUT_SECONDS).and_then(|v| v.parse().ok()).unwrap_or(0),
        model: env(agent_env::MODEL),
        profile: annotation(PROFILE_ANNOTATION),
        budget: Budget {
            max_tokens: env(agent_env::BUDGET_MAX_TOKENS).and_then(|v| v.parse().ok()),
            max_cost: env(agent_env::BUDGET_MAX_COST_USD).and_then(|v| v.parse().ok()).and_then(NanoUsd::from_usd),
        },
    };
    let created_at = annotation(CREATED_AT_ANNOTATION)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| meta.creation_timestamp.as_ref().map(to_chrono))
        .unwrap_or_default();
    Some(JobRecord {
        id,
        tenant,
        spec: job_spec,
        status: JobState::new(JobPhase::Pending),
        created_at,
        started_at: None,
        finished_at: None,
        attempts: 0,
        result: None,
        request_hash: annotation(REQUEST_HASH_ANNOTATION).unwrap_or_default(),
        trace: annotation(TRACEPARENT_ANNOTATION)
            .map(|traceparent| TraceContext { traceparent, tracestate: annotation(TRACESTATE_ANNOTATION) }),
        queue: None,
        json: Default::default(),
    })
}

fn agent_status(pod: &CachedPod) -> Option<&ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|c| c.name == AGENT_CONTAINER)
}

/// When the agent container first started, across attempts.
fn agent_started_at(pods: &[&CachedPod]) -> Option<DateTime<Utc>> {
    pods.iter()
        .filter_map(|p| {
            let state = agent_status(p)?.state.as_ref()?;
            let started = state
                .running
                .as_ref()
                .and_then(|r| r.started_at.as_ref())
                .or_else(|| state.terminated.as_ref().and_then(|t| t.started_at.as_ref()))?;
            Some(to_chrono(started))
        })
        .min()
}

/// Set what Kubernetes says about the job (status, times, attempts, result) on its record.
pub fn apply_pods(record: &mut JobRecord, facts: &JobFacts, pods: &[&CachedPod]) {
    let mut pods: Vec<&CachedPod> = pods.to_vec();
    pods.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(to_chrono));
    let attempts = facts.pods_seen.max(pods.len()) as u32;
    let started_at = agent_started_at(&pods);
    let latest = pods.last().copied();
    let latest_terminated = latest.and_then(agent_status).and_then(|c| c.state.as_ref()?.terminated.as_ref());
    let message_of = |text: Option<&String>| text.map(|m| truncate_result(m.trim_end().to_owned()));
    record.attempts = attempts;
    record.started_at = started_at;
    record.finished_at = None;
    record.result = None;
    record.queue = None;

    if let Some(done) = facts.condition("Complete").or_else(|| facts.condition("SuccessCriteriaMet")) {
        record.status = JobState::new(JobPhase::Succeeded);
        record.finished_at = facts.completion_time.as_ref().or(done.last_transition_time.as_ref()).map(to_chrono);
        record.result = latest_terminated.and_then(|t| message_of(t.message.as_ref()));
        return;
    }
    if let Some(at) = &facts.preempted_at {
        record.status = JobState::with_reason(
            JobPhase::Failed,
            JobReason::Preempted,
            "Kueue preempted the job, and its tenant's policy fails preempted jobs",
        );
        record.finished_at = DateTime::parse_from_rfc3339(at).ok().map(|t| t.with_timezone(&Utc));
        return;
    }
    let failed = facts.condition("Failed").or_else(|| facts.condition("FailureTarget"));
    let failed_at = failed.and_then(|c| c.last_transition_time.as_ref()).map(to_chrono);
    if let Some(at) = &facts.cancelled_at {
        let cancelled = DateTime::parse_from_rfc3339(at).ok().map(|t| t.with_timezone(&Utc));
        // OATS cancels only a Job it saw unfinished, guarded by its resourceVersion, so a failure
        // beside the annotation came after it. A failure in an earlier second than the cancel
        // (a Job annotated some other way) happened first, and the outcome stands.
        let failed_first = matches!((failed_at, cancelled), (Some(f), Some(c)) if f.timestamp() < c.timestamp());
        if !failed_first {
            record.status = JobState::with_reason(JobPhase::Cancelled, JobReason::Cancelled, "cancelled by request");
            record.finished_at = cancelled.or(failed_at);
            return;
        }
    }
    let Some(failed) = failed else {
        record.status = match &facts.queued_in {
            Some(queue) => queued(record, queue),
            None => active_status(latest),
        };
        return;
    };
    record.finished_at = failed.last_transition_time.as_ref().map(to_chrono);
    let pod_reason = latest.and_then(|p| p.status.as_ref()?.reason.as_deref());
    record.status = match failed.reason.as_deref() {
        Some("DeadlineExceeded") => JobState::with_reason(
            JobPhase::Failed,
            JobReason::DeadlineExceeded,
            format!("the job ran longer than its timeout of {}s", record.spec.timeout_seconds),
        ),
        _ if pod_reason == Some("Evicted") => {
            JobState::with_reason(JobPhase::Failed, JobReason::Evicted, "the node evicted the agent pod")
        }
        _ => match latest_terminated {
            Some(t) if t.reason.as_deref() == Some("OOMKilled") => JobState::with_reason(
                JobPhase::Failed,
                JobReason::OOMKilled,
                "the agent was killed for exceeding its memory limit",
            ),
            Some(t) if let Some((reason, message)) = agent_exit::reason(t.exit_code) => {
                JobState::with_reason(JobPhase::Failed, reason, message)
            }
            Some(t) if attempts > 1 => JobState::with_reason(
                JobPhase::Failed,
                JobReason::BackoffLimitExceeded,
                format!("the agent failed {attempts} times; last exit code {}", t.exit_code),
            ),
            Some(t) => JobState::with_reason(
                JobPhase::Failed,
                JobReason::AgentError,
                format!("the agent exited with code {}", t.exit_code),
            ),
            None => JobState::with_reason(
                JobPhase::Failed,
                JobReason::BackoffLimitExceeded,
                failed.message.clone().unwrap_or_else(|| "the job failed".into()),
            ),
        },
    };
}

/// A job waiting for Kueue's admission. Its place is filled in from Kueue's visibility API (and
/// the reason turns `Preempted` for a job Kueue stopped), see `kueue.rs`.
fn queued(record: &mut JobRecord, queue: &str) -> JobState {
    record.queue = Some(QueuePlace { name: queue.to_owned(), position: None });
    JobState::with_reason(
        JobPhase::Pending,
        JobReason::Queued,
        format!("waiting in queue {queue} for Kueue to admit it"),
    )
}

/// A job that has not finished: pending (with why, when Kubernetes says) or running.
fn active_status(latest: Option<&CachedPod>) -> JobState {
    let Some(pod) = latest else { return JobState::new(JobPhase::Pending) };
    let pod_status = pod.status.clone().unwrap_or_default();
    if let Some(waiting) = agent_status(pod).and_then(|c| c.state.as_ref()?.waiting.clone()) {
        let message = waiting.message.clone().unwrap_or_default();
        let reason = match waiting.reason.as_deref() {
            Some("ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" | "ErrImageNeverPull") => {
                Some(JobReason::ImagePullFailed)
            }
            Some("CrashLoopBackOff") => Some(JobReason::CrashLoop),
            Some("CreateContainerConfigError" | "CreateContainerError" | "RunContainerError") => {
                Some(JobReason::StartFailed)
            }
            _ => None,
        };
        if let Some(reason) = reason {
            let detail = waiting.reason.unwrap_or_default();
            let message = if message.is_empty() { detail } else { format!("{detail}: {message}") };
            return JobState::with_reason(JobPhase::Pending, reason, message);
        }
        return JobState::new(JobPhase::Pending);
    }
    if let Some(unschedulable) = pod_status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
    {
        return JobState::with_reason(
            JobPhase::Pending,
            JobReason::Unschedulable,
            unschedulable.message.clone().unwrap_or_else(|| "no node can run the agent yet".into()),
        );
    }
    match pod_status.phase.as_deref() {
        Some("Running" | "Succeeded" | "Failed") => JobState::new(JobPhase::Running),
        _ => JobState::new(JobPhase::Pending),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::kubernetes::render::{AgentTemplate, render_job},
        config::Config,
        jobs::{JobLimits, JobRequest, NewJob},
    };
    use k8s_openapi::api::{
        batch::v1::{Job, JobStatus as K8sJobStatus},
        core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, Pod, PodCondition,
            PodStatus,
        },
    };

    /// The record of a Job and its Pods as the watches would cache them.
    fn record_of(job: &Job, pods: &[Pod]) -> Option<JobRecord> {
        let pods: Vec<CachedPod> = pods.iter().map(|p| CachedPod::from_pod(p).unwrap()).collect();
        let pods: Vec<&CachedPod> = pods.iter().collect();
        job_record(&CachedJob::from_job(job).unwrap(), &pods)
    }

    fn time(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + second).unwrap())
    }

    fn job(conditions: &[(&str, &str)], counts: (i32, i32, i32)) -> Job {
        let spec = JobRequest { goal: "do it".into(), max_turns: 3, timeout_seconds: Some(60), ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        let new = NewJob {
            id: JobId::parse("job-aaaaaaaaaaaaaaaaaaaa").unwrap(),
            tenant: "default".into(),
            spec,
            created_at: Utc::now(),
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        };
        let mut job = render_job(&new, &AgentTemplate::from_config(&Config::default(), "ns"));
        job.status = Some(K8sJobStatus {
            active: Some(counts.0),
            succeeded: Some(counts.1),
            failed: Some(counts.2),
            conditions: Some(
                conditions
                    .iter()
                    .map(|(kind, reason)| JobCondition {
                        type_: kind.to_string(),
                        status: "True".into(),
                        reason: Some(reason.to_string()),
                        last_transition_time: Some(time(100)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        job
    }

    #[test]
    fn a_job_kueue_holds_suspended_is_queued_and_running_once_admitted() {
        let mut queued = job(&[("Suspended", "JobSuspended")], (0, 0, 0));
        queued.spec.as_mut().unwrap().suspend = Some(true);
        queued.metadata.labels.as_mut().unwrap().insert(KUEUE_QUEUE_LABEL.into(), "team-a".into());
        let record = record_of(&queued, &[]).unwrap();
        assert_eq!((record.status.phase, record.status.reason), (JobPhase::Pending, Some(JobReason::Queued)));
        assert_eq!(record.queue, Some(QueuePlace { name: "team-a".into(), position: None }));

        queued.spec.as_mut().unwrap().suspend = Some(false);
        let admitted = record_of(&queued, &[]).unwrap();
        assert_eq!((admitted.status.phase, admitted.queue), (JobPhase::Pending, None));
        assert_eq!(admitted.status.reason, None);

        let mut cancelled = job(&[], (0, 0, 0));
        cancelled.spec.as_mut().unwrap().suspend = Some(true);
        cancelled.metadata.labels.as_mut().unwrap().insert(KUEUE_QUEUE_LABEL.into(), "team-a".into());
        cancelled
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(CANCELLED_AT_ANNOTATION.into(), "2027-01-15T08:00:00Z".into());
        let record = record_of(&cancelled, &[]).unwrap();
        assert_eq!((record.status.phase, record.queue), (JobPhase::Cancelled, None), "cancelled while queued");

        let mut preempted = queued.clone();
        preempted.spec.as_mut().unwrap().suspend = Some(true);
        preempted
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(PREEMPTED_AT_ANNOTATION.into(), "2027-01-15T08:00:00Z".into());
        let record = record_of(&preempted, &[]).unwrap();
        assert_eq!((record.status.phase, record.status.reason), (JobPhase::Failed, Some(JobReason::Preempted)));
        assert!(JobFacts::of(&CachedJob::from_job(&preempted).unwrap()).is_finished());
    }

    fn pod(phase: &str, state: ContainerState) -> Pod {
        Pod {
            metadata: Default::default(),
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "agent".into(),
                    state: Some(state),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn waiting(reason: &str) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message: Some("detail".into()) }),
            ..Default::default()
        }
    }

    fn running() -> ContainerState {
        ContainerState { running: Some(ContainerStateRunning { started_at: Some(time(5)) }), ..Default::default() }
    }

    fn terminated(code: i32, reason: &str, message: Option<&str>) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.into()),
                message: message.map(String::from),
                started_at: Some(time(5)),
                finished_at: Some(time(50)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn unschedulable() -> Pod {
        let mut p = pod("Pending", ContainerState::default());
        p.status.as_mut().unwrap().container_statuses = None;
        p.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/1 nodes are available".into()),
            ..Default::default()
        }]);
        p
    }

    fn evicted() -> Pod {
        let mut p = pod("Failed", terminated(137, "Error", None));
        p.status.as_mut().unwrap().reason = Some("Evicted".into());
        p
    }

    #[test]
    fn status_and_reason_table() {
        use JobPhase::*;
        use JobReason::*;
        type Case = (&'static str, Job, Vec<Pod>, JobPhase, Option<JobReason>);
        let cases: Vec<Case> = vec![
            ("no pod yet", job(&[], (0, 0, 0)), vec![], Pending, None),
            ("pod scheduling", job(&[], (1, 0, 0)), vec![pod("Pending", waiting("ContainerCreating"))], Pending, None),
            ("unschedulable", job(&[], (1, 0, 0)), vec![unschedulable()], Pending, Some(Unschedulable)),
            (
                "image pull back-off",
                job(&[], (1, 0, 0)),
                vec![pod("Pending", waiting("ImagePullBackOff"))],
                Pending,
                Some(ImagePullFailed),
            ),
            (
                "err image pull",
                job(&[], (1, 0, 0)),
                vec![pod("Pending", waiting("ErrImagePull"))],
                Pending,
                Some(ImagePullFailed),
            ),
            (
                "crash loop",
                job(&[], (1, 0, 0)),
                vec![pod("Running", waiting("CrashLoopBackOff"))],
                Pending,
                Some(CrashLoop),
            ),
            (
                "bad config",
                job(&[], (1, 0, 0)),
                vec![pod("Pending", waiting("CreateContainerConfigError"))],
                Pending,
                Some(StartFailed),
            ),
            ("running", job(&[], (1, 0, 0)), vec![pod("Running", running())], Running, None),
            (
                "complete",
                job(&[("Complete", "")], (0, 1, 0)),
                vec![pod("Succeeded", terminated(0, "Completed", Some("42")))],
                Succeeded,
                None,
            ),
            (
                "success criteria met",
                job(&[("SuccessCriteriaMet", "CompletionsReached")], (0, 1, 0)),
                vec![pod("Succeeded", terminated(0, "Completed", None))],
                Succeeded,
                None,
            ),
            ("deadline", job(&[("Failed", "DeadlineExceeded")], (0, 0, 1)), vec![], Failed, Some(DeadlineExceeded)),
            (
                "failure target deadline",
                job(&[("FailureTarget", "DeadlineExceeded")], (1, 0, 0)),
                vec![pod("Running", running())],
                Failed,
                Some(DeadlineExceeded),
            ),
            (
                "agent error",
                job(&[("Failed", "BackoffLimitExceeded")], (0, 0, 1)),
                vec![pod("Failed", terminated(3, "Error", None))],
                Failed,
                Some(AgentError),
            ),
            (
                "retries exhausted",
                job(&[("Failed", "BackoffLimitExceeded")], (0, 0, 3)),
                vec![pod("Failed", terminated(3, "Error", None))],
                Failed,
                Some(BackoffLimitExceeded),
            ),
            (
                "oom",
                job(&[("Failed", "BackoffLimitExceeded")], (0, 0, 1)),
                vec![pod("Failed", terminated(137, "OOMKilled", None))],
                Failed,
                Some(OOMKilled),
            ),
            ("evicted", job(&[("Failed", "BackoffLimitExceeded")], (0, 0, 1)), vec![evicted()], Failed, Some(Evicted)),
        ];
        for (name, job, pods, phase, reason) in cases {
            let record = record_of(&job, &pods).unwrap();
            assert_eq!((record.status.phase, record.status.reason), (phase, reason), "{name}");
            if reason.is_some() {
                assert!(record.status.message.is_some(), "{name} has no message");
            }
        }
    }

    #[test]
    fn cancelled_jobs_report_cancelled_until_their_ttl() {
        let mut j = job(&[("Failed", "DeadlineExceeded")], (0, 0, 1));
        j.metadata.annotations.as_mut().unwrap().insert(CANCELLED_AT_ANNOTATION.into(), "2027-01-15T08:00:00Z".into());
        let record = record_of(&j, &[]).unwrap();
        assert_eq!(record.status.phase, JobPhase::Cancelled);
        assert_eq!(record.status.reason, Some(JobReason::Cancelled));
        assert!(record.finished_at.is_some());
        // Cancelled while still running: already reported cancelled.
        let mut running_job = job(&[], (1, 0, 0));
        running_job.metadata.annotations.as_mut().unwrap().insert(CANCELLED_AT_ANNOTATION.into(), "x".into());
        assert_eq!(record_of(&running_job, &[]).unwrap().status.phase, JobPhase::Cancelled);
    }

    #[test]
    fn a_job_that_failed_before_the_cancel_stays_failed() {
        // time(100) is 2027-01-15T08:01:40Z.
        let annotate = |j: &mut Job, at: &str| {
            j.metadata.annotations.as_mut().unwrap().insert(CANCELLED_AT_ANNOTATION.into(), at.into());
        };
        let mut failed = job(&[("Failed", "BackoffLimitExceeded")], (0, 0, 1));
        annotate(&mut failed, "2027-01-15T08:01:45.5Z");
        let record = record_of(&failed, &[pod("Failed", terminated(3, "Error", None))]).unwrap();
        assert_eq!((record.status.phase, record.status.reason), (JobPhase::Failed, Some(JobReason::AgentError)));
        assert_eq!(record.finished_at, Some(to_chrono(&time(100))));
        // The failure the cancel caused (same second or later) is the cancel.
        let mut caused = job(&[("Failed", "DeadlineExceeded")], (0, 0, 1));
        annotate(&mut caused, "2027-01-15T08:01:40.2Z");
        assert_eq!(record_of(&caused, &[]).unwrap().status.phase, JobPhase::Cancelled);
    }

    #[test]
    fn labels_and_env_round_trip_byte_for_byte() {
        let spec = JobRequest {
            goal: "run $(OATS_JOB_ID) for $$5".into(),
            max_turns: 3,
            labels: [("app.kubernetes.io/name", "x"), ("app.kubernetes.io/part-of", ""), ("team", "ml")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            ..Default::default()
        }
        .validate(&JobLimits::default())
        .unwrap();
        let new = NewJob {
            id: JobId::parse("job-aaaaaaaaaaaaaaaaaaaa").unwrap(),
            tenant: "default".into(),
            spec: spec.clone(),
            created_at: Utc::now(),
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        };
        let rendered = render_job(&new, &AgentTemplate::from_config(&Config::default(), "ns"));
        assert_eq!(rendered.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"], "oats");
        let record = record_of(&rendered, &[]).unwrap();
        assert_eq!(record.spec, spec);
    }

    #[test]
    fn record_carries_spec_result_times_and_attempts() {
        let j = job(&[("Complete", "")], (0, 1, 0));
        let p = pod("Succeeded", terminated(0, "Completed", Some("the answer\n")));
        let record = record_of(&j, &[p]).unwrap();
        assert_eq!(record.spec.goal, "do it");
        assert_eq!(record.spec.max_turns, 3);
        assert_eq!(record.spec.timeout_seconds, 60);
        assert_eq!(record.result.as_deref(), Some("the answer"));
        assert_eq!(record.started_at, Some(to_chrono(&time(5))));
        assert_eq!(record.finished_at, Some(to_chrono(&time(100))));
        assert_eq!(record.attempts, 1);
        assert_eq!(record.request_hash, "h");
        assert!(record.spec.labels.is_empty());
    }

    #[test]
    fn is_finished_agrees_with_the_record() {
        let cases = [
            job(&[], (1, 0, 0)),
            job(&[("Complete", "")], (0, 1, 0)),
            job(&[("SuccessCriteriaMet", "CompletionsReached")], (0, 1, 0)),
            job(&[("Failed", "DeadlineExceeded")], (0, 0, 1)),
            job(&[("FailureTarget", "BackoffLimitExceeded")], (1, 0, 0)),
        ];
        for j in cases {
            assert_eq!(
                JobFacts::of(&CachedJob::from_job(&j).unwrap()).is_finished(),
                record_of(&j, &[]).unwrap().status.phase.is_terminal(),
                "{:?}",
                j.status
            );
        }
    }

    #[test]
    fn foreign_jobs_are_ignored() {
        let mut j = job(&[], (0, 0, 0));
        j.metadata.labels = None;
        assert!(record_of(&j, &[]).is_none());
    }
}
