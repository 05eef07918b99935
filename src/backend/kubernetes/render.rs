//! The one function that turns a job into a Kubernetes Job manifest.
//!
//! The template meets the Pod Security Standards *restricted* profile and more: read-only root,
//! no service-account token, no service links, size-limited scratch space, and LLM credentials
//! only as read-only files of the keys configured.

use crate::{
    config::{Config, Queueing},
    jobs::{NewJob, agent_env},
};
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec as K8sJobSpec},
        core::v1::{
            Capabilities, Container, EmptyDirVolumeSource, EnvVar, KeyToPath, PodSecurityContext, PodSpec,
            PodTemplateSpec, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretVolumeSource,
            SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
        },
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use std::collections::BTreeMap;

/// Label every OATS Job and agent pod carries; the watch caches select on it.
pub const APP_LABEL: (&str, &str) = ("app", "oats-agent");
/// Label holding the job id, on the Job and its pods.
pub const JOB_ID_LABEL: &str = "oats.dev/job-id";
/// Pod label of agents whose profile grants extra egress (`public-https`); NetworkPolicies
/// select on it.
pub const EGRESS_LABEL: &str = "oats.dev/egress";
/// Label holding the owning tenant.
pub const TENANT_LABEL: &str = "oats.dev/tenant";
/// Kueue's label naming the LocalQueue a Job waits in.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Kueue's label naming a Job's WorkloadPriorityClass.
pub const KUEUE_PRIORITY_LABEL: &str = "kueue.x-k8s.io/priority-class";
/// Precise creation time (RFC 3339, nanoseconds): orders listings where metadata has only seconds.
pub const CREATED_AT_ANNOTATION: &str = "oats.dev/created-at";
/// Fingerprint of the normalised request, compared on idempotent retries.
pub const REQUEST_HASH_ANNOTATION: &str = "oats.dev/request-hash";
/// W3C `traceparent` of the request that created the job.
pub const TRACEPARENT_ANNOTATION: &str = "oats.dev/traceparent";
/// W3C `tracestate` of the request that created the job, when it had one.
pub const TRACESTATE_ANNOTATION: &str = "oats.dev/tracestate";
/// The job's resource profile, when it named one.
pub const PROFILE_ANNOTATION: &str = "oats.dev/profile";
/// Set by the replica that counted the job's finish, so it is counted once.
pub const COUNTED_ANNOTATION: &str = "oats.dev/finish-counted";
/// Set when a user cancels the job.
pub const CANCELLED_AT_ANNOTATION: &str = "oats.dev/cancelled-at";
/// On a queued Job whose tenant fails preempted jobs (`on_preemption: fail`).
pub const FAIL_ON_PREEMPTION_ANNOTATION: &str = "oats.dev/fail-on-preemption";
/// When OATS failed the job because Kueue preempted it.
pub const PREEMPTED_AT_ANNOTATION: &str = "oats.dev/preempted-at";
/// The keys of the user's labels, comma-separated (label keys hold no commas): what GET shows,
/// told apart from the labels OATS sets (`app`, `oats.dev/*`, `app.kubernetes.io/managed-by`).
pub const LABEL_KEYS_ANNOTATION: &str = "oats.dev/label-keys";
/// Present when every `$` of the agent's env values is written as `$$` ([`escape_env_value`]).
pub const ENV_ESCAPED_ANNOTATION: &str = "oats.dev/env-escaped";
/// The agent container's name.
pub const AGENT_CONTAINER: &str = "agent";
/// Where the configured LLM credential keys appear as files.
pub const LLM_CREDENTIALS_DIR: &str = "/var/run/secrets/oats/llm";
/// Where the agent's projected service-account token for the LLM gateway appears.
pub const LLM_TOKEN_DIR: &str = "/var/run/secrets/oats/llm-token";
/// The token file in [`LLM_TOKEN_DIR`], named to agents by `OATS_LLM_TOKEN_FILE`.
pub const LLM_TOKEN_FILE: &str = "/var/run/secrets/oats/llm-token/token";

/// Where a profile's own agent finds `oats launch` (copied in by an init container).
pub const LAUNCHER_DIR: &str = "/oats-launcher";

/// How agents reach the LLM gateway on Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAccess {
    /// `OPENAI_BASE_URL` of agents.
    pub url: String,
    /// Audience of the projected service-account token the gateway accepts.
    pub audience: String,
    /// The OATS image, whose binary an init container copies into agents of other images so
    /// they can run under `/oats-launcher/oats launch -- ...`.
    pub launcher_image: String,
}

/// Everything about the agent pod that comes from configuration rather than the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTemplate {
    pub namespace: String,
    pub image: String,
    pub image_pull_policy: String,
    pub command: Vec<String>,
    pub service_account: String,
    pub uid: u32,
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
    pub ephemeral_storage_request: String,
    pub ephemeral_storage_limit: String,
    pub tmp_size: String,
    pub workspace_size: String,
    pub ttl_seconds_after_finished: u32,
    pub backoff_limit: u32,
    pub llm_secret_name: Option<String>,
    pub llm_secret_keys: Vec<String>,
    /// The LLM gateway, when it is on.
    pub llm_gateway: Option<GatewayAccess>,
    /// With Kueue: the LocalQueue of jobs whose tenant names none. `None`: Jobs start at once.
    pub kueue_default_queue: Option<String>,
}

impl AgentTemplate {
    pub fn from_config(config: &Config, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            image: config.agent_image.clone(),
            image_pull_policy: config.agent_image_pull_policy.clone(),
            command: config.agent_command.clone(),
            service_account: config.agent_service_account.clone(),
            uid: config.agent_uid,
            cpu_request: config.agent_cpu_request.clone(),
            cpu_limit: config.agent_cpu_limit.clone(),
            memory_request: config.agent_memory_request.clone(),
            memory_limit: config.agent_memory_limit.clone(),
            ephemeral_storage_request: config.agent_ephemeral_storage_request.clone(),
            ephemeral_storage_limit: config.agent_ephemeral_storage_limit.clone(),
            tmp_size: config.agent_tmp_size.clone(),
            workspace_size: config.agent_workspace_size.clone(),
            ttl_seconds_after_finished: config.ttl_seconds_after_finished,
            backoff_limit: config.backoff_limit,
            llm_secret_name: config.llm_secret_name.clone(),
            llm_secret_keys: config.llm_secret_keys.clone(),
            llm_gateway: config.llm_providers_file.as_ref().map(|_| GatewayAccess {
                url: config
                    .llm_gateway_url
                    .clone()
                    .unwrap_or_else(|| format!("http://oats-llm-gateway.{namespace}.svc:8001/v1")),
                audience: config.llm_token_audience.clone(),
                launcher_image: config.agent_launcher_image.clone(),
            }),
            kueue_default_queue: (config.queueing == Queueing::Kueue).then(|| config.kueue_default_queue.clone()),
        }
    }
}

/// An env value as Kubernetes must be given it to hand the agent `value` byte for byte: the
/// kubelet expands `$(VAR)` in env values and turns `$$` into `$`, so every `$` is doubled.
pub fn escape_env_value(value: &str) -> String {
    value.replace('$', "$$")
}

/// The value the agent saw, from an env value written by [`escape_env_value`].
pub fn unescape_env_value(value: &str) -> String {
    value.replace("$$", "$")
}

/// `TRACEPARENT` and `TRACESTATE` for the agent (the environment-variable carriers of W3C trace
/// context), never baggage.
pub fn trace_env(job: &NewJob) -> Vec<(String, String)> {
    let Some(trace) = &job.trace else { return Vec::new() };
    let mut env = vec![("TRACEPARENT".to_owned(), trace.traceparent.clone())];
    if let Some(state) = &trace.tracestate {
        env.push(("TRACESTATE".to_owned(), state.clone()));
    }
    env
}

/// The agent's way to the gateway: a projected service-account token (audience of the gateway,
/// valid past the job's deadline, rotated by the kubelet, read-only), its path, and the URL.
/// No long-lived secret is in the pod; the token is refused once the job has finished.
fn gateway_token(gateway: &GatewayAccess, timeout_seconds: u32) -> (Volume, VolumeMount, Vec<EnvVar>) {
    let volume = Volume {
        name: "llm-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(gateway.audience.clone()),
                    // At least the API server's minimum of 10 minutes, and past the deadline.
                    expiration_seconds: Some(i64::from(timeout_seconds) + 600),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            default_mode: Some(0o440),
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: "llm-token".into(),
        mount_path: LLM_TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let env = [(agent_env::OPENAI_BASE_URL, gateway.url.as_str()), (agent_env::LLM_TOKEN_FILE, LLM_TOKEN_FILE)]
        .map(|(name, value)| EnvVar { name: name.into(), value: Some(value.into()), value_from: None })
        .to_vec();
    (volume, mount, env)
}

/// What every container of an agent pod runs with: no privileges, read-only root.
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { add: None, drop: Some(vec!["ALL".into()]) }),
        ..Default::default()
    }
}

/// The launcher for agents of other images (Argo's emissary pattern): an init container of the
/// OATS image copies its static binary into a shared emptyDir, mounted read-only in the agent.
fn launcher(gateway: &GatewayAccess, security: &SecurityContext) -> (Volume, VolumeMount, Container) {
    let quantity = |q: &str| Quantity(q.to_owned());
    let volume = Volume {
        name: "launcher".into(),
        empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(quantity("64Mi")), medium: None }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: "launcher".into(),
        mount_path: LAUNCHER_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let small = BTreeMap::from([("cpu".into(), quantity("50m")), ("memory".into(), quantity("32Mi"))]);
    let installer = Container {
        name: "install-launcher".into(),
        image: Some(gateway.launcher_image.clone()),
        command: Some(vec!["/oats".into(), "install-launcher".into(), format!("{LAUNCHER_DIR}/oats")]),
        resources: Some(ResourceRequirements {
            requests: Some(small.clone()),
            limits: Some(small),
            ..Default::default()
        }),
        security_context: Some(security.clone()),
        volume_mounts: Some(vec![VolumeMount { read_only: None, ..mount.clone() }]),
        ..Default::default()
    };
    (volume, mount, installer)
}

/// Build the Job that runs `job`. Pure: the same input always gives the same manifest.
pub fn render_job(job: &NewJob, template: &AgentTemplate) -> Job {
    let id = job.id.to_string();
    let (pod_labels, mut job_labels) = labels(job);
    if let Some(default) = &template.kueue_default_queue {
        let local_queue = job.queue.local_queue.as_ref().unwrap_or(default);
        job_labels.insert(KUEUE_QUEUE_LABEL.into(), local_queue.clone());
        if let Some(priority) = &job.queue.priority_class {
            job_labels.insert(KUEUE_PRIORITY_LABEL.into(), priority.clone());
        }
    }
    let parts = PodParts::of(job, template);
    Job {
        metadata: ObjectMeta {
            name: Some(id),
            namespace: Some(template.namespace.clone()),
            labels: Some(job_labels),
            annotations: Some(annotations(job)),
            ..Default::default()
        },
        spec: Some(K8sJobSpec {
            backoff_limit: Some(template.backoff_limit as i32),
            active_deadline_seconds: Some(i64::from(job.spec.timeout_seconds)),
            ttl_seconds_after_finished: Some(template.ttl_seconds_after_finished as i32),
            // Queued: Kueue unsuspends the Job when it admits it.
            suspend: template.kueue_default_queue.as_ref().map(|_| true),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(pod_labels), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: Some(template.service_account.clone()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security_context(template.uid)),
                    containers: vec![agent_container(job, template, parts.env, parts.mounts)],
                    init_containers: (!parts.init_containers.is_empty()).then_some(parts.init_containers),
                    volumes: Some(parts.volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The pod's labels (the job's own, OATS's, the egress profile's) and the Job's (those and the
/// tenant's).
fn labels(job: &NewJob) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut pod_labels: BTreeMap<String, String> = job.spec.labels.clone();
    pod_labels.insert(APP_LABEL.0.into(), APP_LABEL.1.into());
    pod_labels.insert(JOB_ID_LABEL.into(), job.id.to_string());
    if let Some(egress) = job.resources.as_ref().and_then(|p| p.egress) {
        pod_labels.insert(EGRESS_LABEL.into(), egress.as_str().into());
    }
    let mut job_labels = pod_labels.clone();
    job_labels.insert(TENANT_LABEL.into(), job.tenant.clone());
    job_labels.insert("app.kubernetes.io/managed-by".into(), "oats".into());
    (pod_labels, job_labels)
}

/// The Job's annotations: what the status mapping reads back besides the environment.
fn annotations(job: &NewJob) -> BTreeMap<String, String> {
    let label_keys: Vec<&str> = job.spec.labels.keys().map(String::as_str).collect();
    let mut annotations = BTreeMap::from([
        (CREATED_AT_ANNOTATION.to_owned(), job.created_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
        (REQUEST_HASH_ANNOTATION.to_owned(), job.request_hash.clone()),
        (LABEL_KEYS_ANNOTATION.to_owned(), label_keys.join(",")),
        (ENV_ESCAPED_ANNOTATION.to_owned(), "true".to_owned()),
    ]);
    if let Some(profile) = &job.spec.profile {
        annotations.insert(PROFILE_ANNOTATION.to_owned(), profile.clone());
    }
    if job.queue.fail_on_preemption {
        annotations.insert(FAIL_ON_PREEMPTION_ANNOTATION.to_owned(), "true".to_owned());
    }
    if let Some(trace) = &job.trace {
        annotations.insert(TRACEPARENT_ANNOTATION.to_owned(), trace.traceparent.clone());
        if let Some(state) = &trace.tracestate {
            annotations.insert(TRACESTATE_ANNOTATION.to_owned(), state.clone());
        }
    }
    annotations
}

/// The agent's environment and storage: the contract's variables, scratch and workspace volumes,
/// and what the LLM credentials (a Secret, or the gateway's token and launcher) add.
struct PodParts {
    env: Vec<EnvVar>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    init_containers: Vec<Container>,
}

impl PodParts {
    fn of(job: &NewJob, template: &AgentTemplate) -> Self {
        let quantity = |q: &str| Quantity(q.to_owned());
        let mut env: Vec<EnvVar> = job
            .spec
            .agent_env(&job.id, "/dev/termination-log", "/workspace")
            .into_iter()
            .chain(trace_env(job))
            .map(|(name, value)| EnvVar { name, value: Some(escape_env_value(&value)), value_from: None })
            .collect();
        env.extend([("HOME", "/workspace"), ("TMPDIR", "/tmp")].map(|(name, value)| EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }));

        let mut volumes = vec![
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(quantity(&template.tmp_size)), medium: None }),
                ..Default::default()
            },
            Volume {
                name: "workspace".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(quantity(&template.workspace_size)),
                    medium: None,
                }),
                ..Default::default()
            },
        ];
        let mut mounts = vec![
            VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
            VolumeMount { name: "workspace".into(), mount_path: "/workspace".into(), ..Default::default() },
        ];
        if let Some(secret) = &template.llm_secret_name {
            volumes.push(Volume {
                name: "llm-credentials".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    items: Some(
                        template
                            .llm_secret_keys
                            .iter()
                            .map(|key| KeyToPath { key: key.clone(), path: key.clone(), mode: None })
                            .collect(),
                    ),
                    default_mode: Some(0o440),
                    optional: Some(false),
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "llm-credentials".into(),
                mount_path: LLM_CREDENTIALS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
            env.push(EnvVar {
                name: agent_env::LLM_CREDENTIALS_DIR.into(),
                value: Some(LLM_CREDENTIALS_DIR.into()),
                value_from: None,
            });
        }

        let mut init_containers = Vec::new();
        if let Some(gateway) = &template.llm_gateway {
            let (volume, mount, gateway_env) = gateway_token(gateway, job.spec.timeout_seconds);
            volumes.push(volume);
            mounts.push(mount);
            env.extend(gateway_env);
            // A profile's own image gets the launcher, for agents that read OPENAI_API_KEY at start.
            if job.resources.as_ref().is_some_and(|p| p.image.is_some()) {
                let (volume, mount, installer) = launcher(gateway, &restricted_security_context());
                volumes.push(volume);
                mounts.push(mount);
                init_containers.push(installer);
            }
        }
        Self { env, volumes, mounts, init_containers }
    }
}

/// The agent container: image and command (the profile's, else the server's), resources,
/// restricted security context.
fn agent_container(job: &NewJob, template: &AgentTemplate, env: Vec<EnvVar>, mounts: Vec<VolumeMount>) -> Container {
    let quantity = |q: &str| Quantity(q.to_owned());
    let (cpu_request, cpu_limit, memory_request, memory_limit) = match &job.resources {
        Some(p) => (&p.cpu_request, &p.cpu_limit, &p.memory_request, &p.memory_limit),
        None => (&template.cpu_request, &template.cpu_limit, &template.memory_request, &template.memory_limit),
    };
    Container {
        name: AGENT_CONTAINER.into(),
        image: Some(job.resources.as_ref().and_then(|p| p.image.clone()).unwrap_or_else(|| template.image.clone())),
        image_pull_policy: Some(template.image_pull_policy.clone()),
        command: job
            .resources
            .as_ref()
            .and_then(|p| p.command.clone())
            .or_else(|| (!template.command.is_empty()).then(|| template.command.clone())),
        env: Some(env),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), quantity(cpu_request)),
                ("memory".into(), quantity(memory_request)),
                ("ephemeral-storage".into(), quantity(&template.ephemeral_storage_request)),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".into(), quantity(cpu_limit)),
                ("memory".into(), quantity(memory_limit)),
                ("ephemeral-storage".into(), quantity(&template.ephemeral_storage_limit)),
            ])),
            ..Default::default()
        }),
        security_context: Some(restricted_security_context()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// The pod runs as the agent's non-root uid, under the runtime's default seccomp profile.
fn pod_security_context(uid: u32) -> PodSecurityContext {
    let uid = i64::from(uid);
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::kubernetes::pss,
        jobs::{JobId, JobLimits, JobRequest},
    };
    use chrono::{TimeZone, Utc};

    fn job() -> NewJob {
        let spec = JobRequest {
            goal: "Find the bug".into(),
            max_turns: 7,
            labels: [("team".to_string(), "ml".to_string())].into(),
            timeout_seconds: Some(120),
            model: Some("small-model".into()),
            profile: None,
            budget: Default::default(),
        }
        .validate(&JobLimits::default())
        .unwrap();
        NewJob {
            id: JobId::parse("job-abcdefghijklmnopqrst").unwrap(),
            tenant: "default".into(),
            spec,
            created_at: Utc.with_ymd_and_hms(2026, 11, 26, 10, 0, 0).unwrap(),
            request_hash: "feedface".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        }
    }

    fn template() -> AgentTemplate {
        let config = Config {
            llm_secret_name: Some("llm-credentials".into()),
            llm_secret_keys: vec!["api-key".into()],
            ..Config::default()
        };
        AgentTemplate::from_config(&config, "oats")
    }

    fn env_of(job: &Job) -> BTreeMap<String, String> {
        let container = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        container.env.as_ref().unwrap().iter().map(|e| (e.name.clone(), e.value.clone().unwrap())).collect()
    }

    #[test]
    fn job_metadata_names_and_labels() {
        let rendered = render_job(&job(), &template());
        let meta = &rendered.metadata;
        assert_eq!(meta.name.as_deref(), Some("job-abcdefghijklmnopqrst"));
        assert_eq!(meta.namespace.as_deref(), Some("oats"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["app"], "oats-agent");
        assert_eq!(labels[JOB_ID_LABEL], "job-abcdefghijklmnopqrst");
        assert_eq!(labels[TENANT_LABEL], "default");
        assert_eq!(labels["team"], "ml");
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations[LABEL_KEYS_ANNOTATION], "team");
        assert_eq!(annotations[CREATED_AT_ANNOTATION], "2026-11-26T10:00:00.000000000Z");
        assert_eq!(annotations[REQUEST_HASH_ANNOTATION], "feedface");
        let pod_labels = rendered.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(pod_labels["app"], "oats-agent");
        assert_eq!(pod_labels[JOB_ID_LABEL], "job-abcdefghijklmnopqrst");
        assert_eq!(pod_labels["team"], "ml");
    }

    #[test]
    fn with_kueue_a_job_is_created_suspended_in_its_tenants_queue() {
        let kueue = Config { queueing: crate::config::Queueing::Kueue, ..Config::default() };
        let template = AgentTemplate::from_config(&kueue, "oats");
        let rendered = render_job(&job(), &template);
        let labels = rendered.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[KUEUE_QUEUE_LABEL], "oats", "the default queue");
        assert!(!labels.contains_key(KUEUE_PRIORITY_LABEL));
        assert_eq!(rendered.spec.as_ref().unwrap().suspend, Some(true));
        let pod_labels = rendered.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(!pod_labels.contains_key(KUEUE_QUEUE_LABEL), "Kueue reads the Job's labels, not the pod's");

        let mut chosen = job();
        chosen.queue = crate::jobs::QueueChoice {
            local_queue: Some("team-a".into()),
            priority_class: Some("oats-high".into()),
            fail_on_preemption: true,
        };
        let rendered = render_job(&chosen, &template);
        let labels = rendered.metadata.labels.as_ref().unwrap();
        assert_eq!(
            (labels[KUEUE_QUEUE_LABEL].as_str(), labels[KUEUE_PRIORITY_LABEL].as_str()),
            ("team-a", "oats-high")
        );

        let plain = render_job(&chosen, &template_without_kueue());
        assert!(!plain.metadata.labels.as_ref().unwrap().contains_key(KUEUE_QUEUE_LABEL));
        assert_eq!(plain.spec.as_ref().unwrap().suspend, None, "without Kueue a Job starts at once");
    }

    fn template_without_kueue() -> AgentTemplate {
        AgentTemplate::from_config(&Config::default(), "oats")
    }

    #[test]
    fn job_spec_limits_runtime() {
        let rendered = render_job(&job(), &template());
        let spec = rendered.spec.as_ref().unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(120));
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.ttl_seconds_after_finished, Some(600));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.service_account_name.as_deref(), Some("oats-agent"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.enable_service_links, Some(false));
        assert_eq!(pod.containers.len(), 1);
        let c = &pod.containers[0];
        assert_eq!(c.name, "agent");
        assert_eq!(c.image.as_deref(), Some("oats-agent:0.1.0"));
        assert_eq!(c.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
        let resources = c.resources.as_ref().unwrap();
        let requests = resources.requests.as_ref().unwrap();
        let limits = resources.limits.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "250m");
        assert_eq!(requests["memory"].0, "256Mi");
        assert_eq!(limits["memory"].0, "512Mi");
        assert_eq!(limits["ephemeral-storage"].0, "1Gi");
    }

    #[test]
    fn pod_and_container_security_context() {
        let rendered = render_job(&job(), &template());
        let pod = rendered.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(psc.run_as_group, Some(65532));
        assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.privileged, Some(false));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert!(caps.add.is_none());
        assert!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none());
    }

    #[test]
    fn environment_contract() {
        let env = env_of(&render_job(&job(), &template()));
        assert_eq!(env["OATS_JOB_ID"], "job-abcdefghijklmnopqrst");
        assert_eq!(env["OATS_GOAL"], "Find the bug");
        assert_eq!(env["OATS_MAX_TURNS"], "7");
        assert_eq!(env["OATS_TIMEOUT_SECONDS"], "120");
        assert_eq!(env["OATS_MODEL"], "small-model");
        assert_eq!(env["OATS_RESULT_FILE"], "/dev/termination-log");
        assert_eq!(env["OATS_LLM_CREDENTIALS_DIR"], LLM_CREDENTIALS_DIR);
    }

    #[test]
    fn env_values_survive_kubernetes_variable_expansion() {
        let mut job = job();
        job.spec.goal = "echo $(OATS_JOB_ID) costs $$5 and $HOME$".into();
        job.trace = Some(crate::jobs::TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: Some("vendor=a$b".into()),
        });
        let rendered = render_job(&job, &template());
        let env = env_of(&rendered);
        assert_eq!(env["OATS_GOAL"], "echo $$(OATS_JOB_ID) costs $$$$5 and $$HOME$$");
        assert_eq!(unescape_env_value(&env["OATS_GOAL"]), job.spec.goal);
        assert_eq!(env["TRACEPARENT"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(env["TRACESTATE"], "vendor=a$$b");
        assert_eq!(rendered.metadata.annotations.as_ref().unwrap()[ENV_ESCAPED_ANNOTATION], "true");
    }

    #[test]
    fn scratch_space_is_size_limited_and_credentials_are_read_only_files() {
        let rendered = render_job(&job(), &template());
        let pod = rendered.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let volumes = pod.volumes.as_ref().unwrap();
        for name in ["tmp", "workspace"] {
            let v = volumes.iter().find(|v| v.name == name).unwrap();
            assert!(v.empty_dir.as_ref().unwrap().size_limit.is_some(), "{name} has no size limit");
        }
        let secret = volumes.iter().find(|v| v.name == "llm-credentials").unwrap().secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("llm-credentials"));
        let items = secret.items.as_ref().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].key, "api-key");
        let c = &pod.containers[0];
        let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "llm-credentials").unwrap();
        assert_eq!(mount.read_only, Some(true));
        assert!(mount.sub_path.is_none());
        assert!(c.env_from.is_none());
        assert!(c.env.as_ref().unwrap().iter().all(|e| e.value_from.is_none()));
    }

    #[test]
    fn a_profile_sets_the_resources() {
        let mut job = job();
        job.spec.profile = Some("large".into());
        job.resources = Some(crate::jobs::policy::ResourceProfile {
            image: None,
            command: None,
            egress: None,
            cpu_request: "2".into(),
            cpu_limit: "4".into(),
            memory_request: "4Gi".into(),
            memory_limit: "8Gi".into(),
        });
        let rendered = render_job(&job, &template());
        let c = &rendered.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        let resources = c.resources.as_ref().unwrap();
        assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "8Gi");
        assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "2");
        assert_eq!(rendered.metadata.annotations.as_ref().unwrap()[PROFILE_ANNOTATION], "large");
        assert_eq!(
            c.image.as_deref(),
            Some(template().image.as_str()),
            "the server's image without one of the profile's"
        );
    }

    #[test]
    fn agents_of_other_images_get_the_launcher_when_the_gateway_is_on() {
        let mut job = job();
        job.resources = Some(crate::jobs::policy::ResourceProfile {
            image: Some("registry.example.com/oats/team:1".into()),
            command: Some(vec!["/oats-launcher/oats".into(), "launch".into(), "--".into(), "agent".into()]),
            egress: None,
            cpu_request: "1".into(),
            cpu_limit: "1".into(),
            memory_request: "1Gi".into(),
            memory_limit: "1Gi".into(),
        });
        let mut template = template();
        template.llm_gateway = Some(GatewayAccess {
            url: "http://oats-llm-gateway.oats.svc:8001/v1".into(),
            audience: "oats-llm".into(),
            launcher_image: "oats-agent:0.1.0".into(),
        });
        let rendered = render_job(&job, &template);
        let pod = rendered.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let init = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.image.as_deref(), Some("oats-agent:0.1.0"));
        assert_eq!(
            init.command.as_ref().unwrap()[1..],
            ["install-launcher".to_owned(), "/oats-launcher/oats".to_owned()]
        );
        let agent_mount =
            pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "launcher").unwrap();
        assert_eq!((agent_mount.mount_path.as_str(), agent_mount.read_only), (LAUNCHER_DIR, Some(true)));
        // The server's own agent image needs no launcher.
        job.resources.as_mut().unwrap().image = None;
        assert!(render_job(&job, &template).spec.unwrap().template.spec.unwrap().init_containers.is_none());
    }

    #[test]
    fn a_profile_names_the_agent_image_and_command() {
        let mut job = job();
        job.resources = Some(crate::jobs::policy::ResourceProfile {
            image: Some("registry.example.com/oats/team:1".into()),
            command: Some(vec!["/oats/oats".into(), "launch".into(), "--".into(), "agent".into()]),
            egress: Some(crate::jobs::policy::Egress::PublicHttps),
            cpu_request: "1".into(),
            cpu_limit: "1".into(),
            memory_request: "1Gi".into(),
            memory_limit: "1Gi".into(),
        });
        let rendered = render_job(&job, &template());
        let c = &rendered.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example.com/oats/team:1"));
        assert_eq!(c.command.as_ref().unwrap()[..2], ["/oats/oats".to_owned(), "launch".to_owned()]);
        let pod_labels = rendered.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(
            pod_labels[EGRESS_LABEL], "public-https",
            "the profile's egress is a pod label NetworkPolicies select"
        );
    }

    #[test]
    fn no_credentials_without_a_secret() {
        let rendered = render_job(&job(), &AgentTemplate::from_config(&Config::default(), "oats"));
        let pod = rendered.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert!(pod.volumes.as_ref().unwrap().iter().all(|v| v.secret.is_none()));
        assert!(!env_of(&rendered).contains_key("OATS_LLM_CREDENTIALS_DIR"));
    }

    #[test]
    fn rendered_template_meets_the_restricted_profile() {
        let rendered = render_job(&job(), &template());
        let pod = &rendered.spec.as_ref().unwrap().template;
        assert_eq!(pss::check_restricted(pod), Vec::<pss::Violation>::new());
    }
}
