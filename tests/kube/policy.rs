//! The admission guardrails for agent Jobs (policies/vap, applied with infra/base) against the
//! real kube-apiserver of `testenv/`: the Job OATS renders is admitted, each single violation is
//! denied with its own message, OATS' cancel (an UPDATE) still passes, and every shipped
//! manifest (base, dev, prod) passes a server-side dry run.

use crate::{cluster, common};

use oats::{
    backend::kubernetes::render::{AgentTemplate, render_job},
    config::Config,
    jobs::{JobLimits, JobRequest, NewJob, policy::ResourceProfile},
};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    process::Output,
    sync::OnceLock,
    time::{Duration, Instant},
};

const POLICY: &str = "oats-agent-job-guardrails";
const PARAMS: &str = "oats-agent-job-guardrails-params";
/// How the API server words a denial by this policy.
const DENIED: &str = "ValidatingAdmissionPolicy 'oats-agent-job-guardrails' with binding";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// As shipped: the LLM gateway on (agents get its address and a projected token), no Secret.
fn config() -> Config {
    Config { llm_providers_file: Some("/etc/oats/llm/providers.yaml".into()), ..Config::default() }
}

/// The opt-in for agents that call a provider directly: a Secret mounted as llm-credentials.
fn secret_config() -> Config {
    Config {
        llm_secret_name: Some("oats-llm-credentials".into()),
        llm_secret_keys: vec!["api-key".into()],
        ..Config::default()
    }
}

/// The Job OATS renders for a plain request (as JSON), through the library.
fn rendered_with(
    config: &Config,
    labels: BTreeMap<String, String>,
    timeout: u32,
    profile: Option<ResourceProfile>,
) -> Value {
    let request = JobRequest {
        labels,
        timeout_seconds: Some(timeout),
        ..common::fixtures::request("Check the admission policy", 3)
    };
    let job = NewJob { resources: profile, ..common::fixtures::new_job(request) };
    serde_json::to_value(render_job(&job, &AgentTemplate::from_config(config, cluster::NAMESPACE))).unwrap()
}

fn rendered() -> Value {
    rendered_with(&config(), BTreeMap::new(), 600, None)
}

/// `kubectl <verb> --dry-run=server -f <job>` as the admin (no RBAC in the way).
fn dry_run(cluster: &cluster::Cluster, job: &Value) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.json");
    std::fs::write(&path, job.to_string()).unwrap();
    cluster.kubectl(&["create", "--dry-run=server", "-f", path.to_str().unwrap()])
}

fn pod_spec(job: &mut Value) -> &mut Value {
    &mut job["spec"]["template"]["spec"]
}

fn agent(job: &mut Value) -> &mut Value {
    &mut job["spec"]["template"]["spec"]["containers"][0]
}

fn remove(value: &mut Value, key: &str) {
    value.as_object_mut().expect("an object").remove(key);
}

/// The deadline limit from the parameters the cluster holds.
fn max_deadline(cluster: &cluster::Cluster) -> i64 {
    let params = cluster.kubectl_json(&["get", "configmap", PARAMS, "-n", cluster::NAMESPACE]);
    params["data"]["maxActiveDeadlineSeconds"].as_str().unwrap().parse().unwrap()
}

/// The cluster, once the policy (applied by cluster::cluster() with infra/base) is in force: the
/// API server compiles a new policy asynchronously, so wait until a known-bad Job is denied.
fn cluster_with_policy() -> &'static cluster::Cluster {
    let cluster = cluster::cluster();
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let mut bad = rendered();
        pod_spec(&mut bad)["hostPID"] = json!(true);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = dry_run(cluster, &bad);
            if !out.status.success() && stderr(&out).contains(DENIED) {
                break;
            }
            assert!(Instant::now() < deadline, "the admission policy never started denying: {}", stderr(&out));
            std::thread::sleep(Duration::from_millis(250));
        }
        // The API server type-checked every expression against the Job schema without warnings.
        let policy = cluster.kubectl_json(&["get", "validatingadmissionpolicy", POLICY]);
        let warnings = &policy["status"]["typeChecking"]["expressionWarnings"];
        assert!(warnings.as_array().is_none_or(|w| w.is_empty()), "type-checking warnings: {warnings:#}");
    });
    cluster
}

#[test]
fn the_policy_admits_every_job_oats_renders() {
    let cluster = cluster_with_policy();
    let max = max_deadline(cluster);
    let large = ResourceProfile {
        cpu_request: "2".into(),
        cpu_limit: "4".into(),
        memory_request: "4Gi".into(),
        memory_limit: "8Gi".into(),
        image: None,
        command: None,
        egress: None,
    };
    // A team's own agent, named by a profile, behind the launcher.
    let own_agent = ResourceProfile {
        image: Some("registry.example.com/oats/team-agent:1.2".into()),
        command: Some(["/oats-launcher/oats", "launch", "--", "python", "/app/agent.py"].map(String::from).to_vec()),
        ..large.clone()
    };
    let cases = [
        ("as shipped: the LLM gateway's token and address", rendered()),
        ("without the gateway", rendered_with(&Config::default(), BTreeMap::new(), 600, None)),
        (
            "the longest timeout OATS allows",
            rendered_with(&config(), BTreeMap::new(), JobLimits::default().max_timeout_seconds, None),
        ),
        (
            "a resource profile and user labels",
            rendered_with(
                &config(),
                [("team", "ml"), ("app.kubernetes.io/name", "summariser"), ("example.com/run", "7")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into(),
                60,
                Some(large),
            ),
        ),
        (
            "a profile's own agent image and command, without the gateway",
            rendered_with(&Config::default(), BTreeMap::new(), 60, Some(own_agent.clone())),
        ),
        (
            "a profile's own agent behind the launcher, with the gateway",
            rendered_with(&config(), BTreeMap::new(), 60, Some(own_agent)),
        ),
    ];
    assert!(
        i64::from(JobLimits::default().max_timeout_seconds) <= max,
        "OATS' default max timeout exceeds the policy's"
    );
    for (what, job) in cases {
        let out = dry_run(cluster, &job);
        assert!(out.status.success(), "{what}: denied: {}", stderr(&out));
        assert!(!stderr(&out).contains("Warning"), "{what}: the API server warned: {}", stderr(&out));
    }
}

fn volumes(job: &mut Value) -> &mut Vec<Value> {
    pod_spec(job)["volumes"].as_array_mut().expect("volumes")
}

fn pod_labels(job: &mut Value) -> &mut Value {
    &mut job["spec"]["template"]["metadata"]["labels"]
}

/// The env var `name` of the agent, replaced by one that reads `value_from`.
fn env_from_elsewhere(job: &mut Value, name: &str, value_from: Value) {
    let env = agent(job)["env"].as_array_mut().unwrap();
    env.retain(|e| e["name"] != name);
    env.push(json!({"name": name, "valueFrom": value_from}));
}

type Mutation = Box<dyn Fn(&mut Value)>;

/// Each mutation of `job` must be denied by the policy with its message.
fn assert_each_denied(cluster: &cluster::Cluster, job: &Value, cases: &[(String, Mutation, String)]) {
    let mut failures = Vec::new();
    for (what, mutate, message) in cases {
        let mut job = job.clone();
        mutate(&mut job);
        let out = dry_run(cluster, &job);
        let said = stderr(&out);
        if out.status.success() {
            failures.push(format!("{what}: admitted"));
        } else if !said.contains(DENIED) || !said.contains(message.as_str()) {
            failures.push(format!("{what}: expected a denial saying {message:?}, got: {said}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} violations:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn the_policy_denies_each_violation_with_its_own_message() {
    let cluster = cluster_with_policy();
    let too_long = max_deadline(cluster) + 1;
    let volume_kinds = "volumes may only be OATS' own: emptyDir (tmp, workspace, launcher), the gateway's projected \
                        token (llm-token) and the configured LLM secret (llm-credentials); not: ";
    let projected = "projected volumes may only be the LLM gateway's token (volume llm-token: one serviceAccountToken \
                     source, audience oats-llm); not: ";
    let no_secret = "secret volumes are forbidden: agents hold no secret (the parameters name no llmSecretName); not: ";
    let commands = "containers may only run the agent command (the image's entrypoint) or /oats-launcher/oats launch \
                    -- <command>; not: ";
    let stray_labels = "spec.template.metadata.labels: keys reserved for OATS or Kubernetes, or not allowed by \
                        allowedPodLabelKeys [*] (keys of service meshes and batch queues need an entry of their own): ";
    let install_launcher = json!(["/oats", "install-launcher", "/oats-launcher/oats"]);
    let mut cases: Vec<(&str, Mutation, String)> = vec![
        (
            "another service account",
            Box::new(|j| pod_spec(j)["serviceAccountName"] = json!("oats-backend-api")),
            "serviceAccountName must be oats-agent (got oats-backend-api)".into(),
        ),
        (
            "no service account (default)",
            Box::new(|j| remove(pod_spec(j), "serviceAccountName")),
            "serviceAccountName must be oats-agent".into(),
        ),
        (
            "token automounted",
            Box::new(|j| pod_spec(j)["automountServiceAccountToken"] = json!(true)),
            "automountServiceAccountToken must be false".into(),
        ),
        (
            "automount left unset",
            Box::new(|j| remove(pod_spec(j), "automountServiceAccountToken")),
            "automountServiceAccountToken must be false".into(),
        ),
        ("hostPID", Box::new(|j| pod_spec(j)["hostPID"] = json!(true)), "found hostPID set to true".into()),
        ("hostNetwork", Box::new(|j| pod_spec(j)["hostNetwork"] = json!(true)), "found hostNetwork set to true".into()),
        ("hostIPC", Box::new(|j| pod_spec(j)["hostIPC"] = json!(true)), "found hostIPC set to true".into()),
        (
            "hostPort",
            Box::new(|j| agent(j)["ports"] = json!([{"containerPort": 8080, "hostPort": 8080}])),
            "must not use hostPort".into(),
        ),
        (
            "no seccomp profile",
            Box::new(|j| remove(&mut pod_spec(j)["securityContext"], "seccompProfile")),
            "seccompProfile.type must be RuntimeDefault".into(),
        ),
        (
            "a container overrides seccomp with Unconfined",
            Box::new(|j| agent(j)["securityContext"]["seccompProfile"] = json!({"type": "Unconfined"})),
            "seccompProfile.type must be RuntimeDefault (in the pod securityContext, or in every container); not in: agent"
                .into(),
        ),
        (
            "runAsNonRoot false in the container",
            Box::new(|j| agent(j)["securityContext"]["runAsNonRoot"] = json!(false)),
            "runAsNonRoot must be true".into(),
        ),
        (
            "runAsUser 0",
            Box::new(|j| pod_spec(j)["securityContext"]["runAsUser"] = json!(0)),
            "runAsUser must be set to a non-zero (non-root) numeric uid".into(),
        ),
        (
            "runAsUser unset",
            Box::new(|j| remove(&mut pod_spec(j)["securityContext"], "runAsUser")),
            "runAsUser must be set to a non-zero (non-root) numeric uid".into(),
        ),
        (
            "runAsGroup 0",
            Box::new(|j| pod_spec(j)["securityContext"]["runAsGroup"] = json!(0)),
            "runAsGroup must be set to a non-zero (non-root) numeric gid; not in: agent".into(),
        ),
        (
            "runAsGroup 0 in the container",
            Box::new(|j| agent(j)["securityContext"]["runAsGroup"] = json!(0)),
            "runAsGroup must be set to a non-zero (non-root) numeric gid; not in: agent".into(),
        ),
        (
            "fsGroup 0",
            Box::new(|j| pod_spec(j)["securityContext"]["fsGroup"] = json!(0)),
            "fsGroup must be set to a non-zero gid, and supplementalGroups must not contain 0".into(),
        ),
        (
            "supplementalGroups with 0",
            Box::new(|j| pod_spec(j)["securityContext"]["supplementalGroups"] = json!([0])),
            "fsGroup must be set to a non-zero gid, and supplementalGroups must not contain 0".into(),
        ),
        (
            "allowPrivilegeEscalation true",
            Box::new(|j| agent(j)["securityContext"]["allowPrivilegeEscalation"] = json!(true)),
            "allowPrivilegeEscalation must be false in every container; not in: agent".into(),
        ),
        (
            "an init container that may escalate",
            Box::new({
                let install_launcher = install_launcher.clone();
                move |j| {
                    let mut init = agent(j).clone();
                    init["name"] = json!("setup");
                    init["command"] = install_launcher.clone();
                    remove(&mut init["securityContext"], "allowPrivilegeEscalation");
                    pod_spec(j)["initContainers"] = json!([init]);
                }
            }),
            "allowPrivilegeEscalation must be false in every container; not in: setup".into(),
        ),
        (
            "writable root filesystem",
            Box::new(|j| agent(j)["securityContext"]["readOnlyRootFilesystem"] = json!(false)),
            "readOnlyRootFilesystem must be true in every container; not in: agent".into(),
        ),
        (
            "capabilities not dropped",
            Box::new(|j| agent(j)["securityContext"]["capabilities"]["drop"] = json!(["NET_RAW"])),
            "capabilities.drop must contain ALL in every container; not in: agent".into(),
        ),
        (
            "a capability added",
            Box::new(|j| agent(j)["securityContext"]["capabilities"]["add"] = json!(["NET_BIND_SERVICE"])),
            "capabilities.add must be empty in every container; not in: agent (adds NET_BIND_SERVICE)".into(),
        ),
        // -- volumes ---------------------------------------------------------------------------
        (
            "hostPath volume",
            Box::new(|j| volumes(j).push(json!({"name": "host", "hostPath": {"path": "/"}}))),
            format!("{volume_kinds}host"),
        ),
        (
            "persistentVolumeClaim volume",
            Box::new(|j| volumes(j).push(json!({"name": "data", "persistentVolumeClaim": {"claimName": "x"}}))),
            format!("{volume_kinds}data"),
        ),
        (
            "configMap volume",
            Box::new(|j| volumes(j).push(json!({"name": "settings", "configMap": {"name": "oats-llm-providers"}}))),
            format!("{volume_kinds}settings"),
        ),
        (
            "downwardAPI volume",
            Box::new(|j| {
                volumes(j).push(json!({"name": "podinfo", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}))
            }),
            format!("{volume_kinds}podinfo"),
        ),
        (
            "an emptyDir of another name",
            Box::new(|j| volumes(j).push(json!({"name": "cache", "emptyDir": {"medium": "Memory"}}))),
            "emptyDir volumes may only be tmp, workspace and launcher; not: cache".into(),
        ),
        (
            "projected service account token",
            Box::new(|j| {
                volumes(j).push(json!({
                    "name": "kube-api-access",
                    "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                    ]},
                }))
            }),
            format!("{projected}kube-api-access"),
        ),
        (
            "a projected secret",
            Box::new(|j| {
                volumes(j).push(json!({
                    "name": "keys",
                    "projected": {"sources": [{"secret": {"name": "oats-llm-provider-keys"}}]},
                }))
            }),
            format!("{projected}keys"),
        ),
        (
            "the gateway's token volume with another audience",
            Box::new(|j| {
                let token = volumes(j).iter_mut().find(|v| v["name"] == "llm-token").expect("llm-token");
                token["projected"]["sources"][0]["serviceAccountToken"]["audience"] = json!("https://kubernetes.default.svc");
            }),
            format!("{projected}llm-token"),
        ),
        (
            "the gateway's token volume with the cluster's CA next to it",
            Box::new(|j| {
                let token = volumes(j).iter_mut().find(|v| v["name"] == "llm-token").expect("llm-token");
                token["projected"]["sources"].as_array_mut().unwrap().push(json!({"configMap": {"name": "kube-root-ca.crt"}}));
            }),
            format!("{projected}llm-token"),
        ),
        (
            "the LLM secret, which the shipped parameters do not name",
            Box::new(|j| {
                volumes(j).push(json!({"name": "llm-credentials", "secret": {"secretName": "oats-llm-credentials"}}))
            }),
            format!("{no_secret}llm-credentials (Secret oats-llm-credentials)"),
        ),
        (
            "the provider keys as a secret volume",
            Box::new(|j| volumes(j).push(json!({"name": "keys", "secret": {"secretName": "oats-llm-provider-keys"}}))),
            format!("{no_secret}keys (Secret oats-llm-provider-keys)"),
        ),
        // -- environment -----------------------------------------------------------------------
        (
            "an env value from a Secret",
            Box::new(|j| {
                env_from_elsewhere(
                    j,
                    "OPENAI_API_KEY",
                    json!({"secretKeyRef": {"name": "oats-llm-provider-keys", "key": "openai"}}),
                )
            }),
            "env[].valueFrom is forbidden: OATS sets literal values only (no Secret, ConfigMap or field references); \
             not in: agent (OPENAI_API_KEY)"
                .into(),
        ),
        (
            "an env value from a ConfigMap",
            Box::new(|j| {
                env_from_elsewhere(j, "OATS_GOAL", json!({"configMapKeyRef": {"name": "goals", "key": "goal"}}))
            }),
            "env[].valueFrom is forbidden: OATS sets literal values only (no Secret, ConfigMap or field references); \
             not in: agent (OATS_GOAL)"
                .into(),
        ),
        (
            "envFrom a Secret",
            Box::new(|j| agent(j)["envFrom"] = json!([{"secretRef": {"name": "oats-database"}}])),
            "envFrom is forbidden: OATS sets literal values only; not in: agent".into(),
        ),
        // -- commands --------------------------------------------------------------------------
        (
            "another command",
            Box::new(|j| agent(j)["command"] = json!(["sh", "-c", "curl evil.example"])),
            format!("{commands}agent (sh -c curl evil.example)"),
        ),
        (
            "the launcher without a command",
            Box::new(|j| agent(j)["command"] = json!(["/oats-launcher/oats", "launch", "--"])),
            format!("{commands}agent (/oats-launcher/oats launch --)"),
        ),
        (
            "args",
            Box::new(|j| agent(j)["args"] = json!(["--verbose"])),
            "args are forbidden: OATS renders the whole command in command; not in: agent".into(),
        ),
        (
            "an init container that runs something else",
            Box::new(|j| {
                let mut init = agent(j).clone();
                init["name"] = json!("setup");
                init["command"] = json!(["sh", "-c", "cp /bin/sh /oats-launcher/oats"]);
                pod_spec(j)["initContainers"] = json!([init]);
            }),
            "init containers may only install the launcher (/oats install-launcher /oats-launcher/oats); not: setup \
             (sh -c cp /bin/sh /oats-launcher/oats)"
                .into(),
        ),
        // -- pod labels ------------------------------------------------------------------------
        (
            "the API's app label, which would join its Services",
            Box::new(|j| pod_labels(j)["app"] = json!("oats-backend-api")),
            "must carry app: oats-agent and oats.dev/job-id: job-".into(),
        ),
        (
            "another job's id",
            Box::new(|j| pod_labels(j)["oats.dev/job-id"] = json!("job-aaaaaaaaaaaaaaaaaaaa")),
            "(got app: oats-agent, oats.dev/job-id: job-aaaaaaaaaaaaaaaaaaaa)".into(),
        ),
        (
            "an OATS label on the pod",
            Box::new(|j| pod_labels(j)["oats.dev/tenant"] = json!("someone-else")),
            format!("{stray_labels}oats.dev/tenant"),
        ),
        (
            "a Kubernetes label",
            Box::new(|j| pod_labels(j)["node-role.kubernetes.io/control-plane"] = json!("")),
            format!("{stray_labels}node-role.kubernetes.io/control-plane"),
        ),
        (
            "managed-by",
            Box::new(|j| pod_labels(j)["app.kubernetes.io/managed-by"] = json!("oats")),
            format!("{stray_labels}app.kubernetes.io/managed-by"),
        ),
        (
            "an egress label, which the shipped parameters do not allow",
            Box::new(|j| pod_labels(j)["oats.dev/egress"] = json!("public-https")),
            "spec.template.metadata.labels: oats.dev/egress must be one of allowedEgress []: got public-https".into(),
        ),
        (
            "a key under batch.kubernetes.io",
            Box::new(|j| pod_labels(j)["batch.kubernetes.io/controller"] = json!("x")),
            format!("{stray_labels}batch.kubernetes.io/controller"),
        ),
        // -- scheduling ------------------------------------------------------------------------
        (
            "nodeName",
            Box::new(|j| pod_spec(j)["nodeName"] = json!("node-1")),
            "spec.template.spec.nodeName is forbidden (it bypasses the scheduler; allowNodeName is not true): got node-1"
                .into(),
        ),
        (
            "a toleration",
            Box::new(|j| {
                pod_spec(j)["tolerations"] =
                    json!([{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}])
            }),
            "tolerations may only name the taint keys of allowedTolerationKeys []; not: node-role.kubernetes.io/control-plane"
                .into(),
        ),
        (
            "a toleration of every taint",
            Box::new(|j| pod_spec(j)["tolerations"] = json!([{"operator": "Exists"}])),
            "tolerations may only name the taint keys of allowedTolerationKeys []; not: (every taint)".into(),
        ),
        (
            "runtimeClassName",
            Box::new(|j| pod_spec(j)["runtimeClassName"] = json!("runc-unconfined")),
            "spec.template.spec.runtimeClassName must be one of allowedRuntimeClassNames []: got runc-unconfined".into(),
        ),
        (
            "priorityClassName",
            Box::new(|j| pod_spec(j)["priorityClassName"] = json!("system-cluster-critical")),
            "spec.template.spec.priorityClassName must be one of allowedPriorityClassNames []: got system-cluster-critical"
                .into(),
        ),
        (
            "hostUsers",
            Box::new(|j| pod_spec(j)["hostUsers"] = json!(true)),
            "spec.template.spec.hostUsers must be left unset (allowHostUsers is not true)".into(),
        ),
        // -- image, deadline, resources, pod count -----------------------------------------------
        (
            "disallowed image",
            Box::new(|j| agent(j)["image"] = json!("docker.io/attacker/agent:latest")),
            "container images must start with one of [oats-agent:, registry.example.com/oats/]; not allowed: agent=docker.io/attacker/agent:latest".into(),
        ),
        (
            "a look-alike image name",
            Box::new(|j| agent(j)["image"] = json!("oats-agent-evil:1")),
            "not allowed: agent=oats-agent-evil:1".into(),
        ),
        (
            "no activeDeadlineSeconds",
            Box::new(|j| remove(&mut j["spec"], "activeDeadlineSeconds")),
            "spec.activeDeadlineSeconds must be set".into(),
        ),
        (
            "activeDeadlineSeconds above the maximum",
            Box::new(move |j| j["spec"]["activeDeadlineSeconds"] = json!(too_long)),
            "spec.activeDeadlineSeconds must be at most".into(),
        ),
        (
            "no cpu limit",
            Box::new(|j| remove(&mut agent(j)["resources"]["limits"], "cpu")),
            "every container must set resources.limits.cpu and resources.limits.memory; not: agent".into(),
        ),
        (
            "no memory limit",
            Box::new(|j| remove(&mut agent(j)["resources"]["limits"], "memory")),
            "every container must set resources.limits.cpu and resources.limits.memory; not: agent".into(),
        ),
        (
            "parallelism 2",
            Box::new(|j| j["spec"]["parallelism"] = json!(2)),
            "spec.parallelism and spec.completions must be 1: one agent pod per Job (got parallelism 2".into(),
        ),
        (
            "completions 3",
            Box::new(|j| j["spec"]["completions"] = json!(3)),
            "spec.parallelism and spec.completions must be 1: one agent pod per Job (got parallelism 1, completions 3)"
                .into(),
        ),
    ];
    // Keys of service meshes and batch queues need an entry of their own: `*` is not enough.
    for domain in oats::jobs::policy::GUARDED_LABEL_DOMAINS {
        let key = format!("sidecar.{domain}/inject");
        let label = key.clone();
        cases.push((
            "a service mesh's or batch queue's label",
            Box::new(move |j| pod_labels(j)[&label] = json!("true")),
            format!("{stray_labels}{key}"),
        ));
    }
    let cases: Vec<(String, Mutation, String)> =
        cases.into_iter().map(|(what, mutate, message)| (what.to_owned(), mutate, message)).collect();
    assert_each_denied(cluster, &rendered(), &cases);
}

/// The opt-ins of the parameters: the Secret (OATS_LLM_SECRET_NAME) is admitted where they name
/// it, and only that Secret; a profile's egress label where they allow its value, and only that
/// value. A namespace of its own, bound to the same policy with such parameters (the shipped
/// `oats` parameters allow neither, and other tests run against them meanwhile).
#[test]
fn the_opt_ins_are_admitted_only_where_the_parameters_name_them() {
    let cluster = cluster_with_policy();
    const OPT_IN: &str = "oats-policy-opt-in";
    let mut params = cluster.kubectl_json(&["get", "configmap", PARAMS, "-n", cluster::NAMESPACE]);
    params["data"]["llmSecretName"] = json!("oats-llm-credentials");
    params["data"]["allowedEgress"] = json!("public-https");
    let manifests = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPT_IN}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": PARAMS, "namespace": OPT_IN}, "data": params["data"]},
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": OPT_IN},
            "spec": {
                "policyName": POLICY,
                "validationActions": ["Deny"],
                "paramRef": {"name": PARAMS, "namespace": OPT_IN, "parameterNotFoundAction": "Deny"},
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPT_IN}}},
            },
        },
    ]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt-in.json");
    std::fs::write(&path, manifests.to_string()).unwrap();
    cluster.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);

    let in_opt_in_with = |config: &Config, profile: Option<ResourceProfile>| {
        let mut job = rendered_with(config, BTreeMap::new(), 600, profile);
        job["metadata"]["namespace"] = json!(OPT_IN);
        job
    };
    let in_opt_in = |config: &Config| in_opt_in_with(config, None);
    let web_agent = ResourceProfile {
        cpu_request: "1".into(),
        cpu_limit: "1".into(),
        memory_request: "1Gi".into(),
        memory_limit: "1Gi".into(),
        image: Some("registry.example.com/oats/web-agent:1".into()),
        command: Some(["/oats-launcher/oats", "launch", "--", "web-agent"].map(String::from).to_vec()),
        egress: Some(oats::jobs::policy::Egress::PublicHttps),
    };
    // The new binding is in force once it denies a bad Job.
    let mut bad = in_opt_in(&config());
    pod_spec(&mut bad)["hostPID"] = json!(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = dry_run(cluster, &bad);
        if !out.status.success() && stderr(&out).contains(DENIED) {
            break;
        }
        assert!(Instant::now() < deadline, "the opt-in binding never started denying: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(250));
    }

    for (what, job) in [
        ("the LLM secret where the parameters name it", in_opt_in(&secret_config())),
        ("the gateway there too", in_opt_in(&config())),
        ("a profile's egress where the parameters allow it", in_opt_in_with(&config(), Some(web_agent.clone()))),
    ] {
        let out = dry_run(cluster, &job);
        assert!(out.status.success(), "{what}: denied: {}", stderr(&out));
    }
    let only = "the only secret volume allowed is llm-credentials of Secret oats-llm-credentials; not: ";
    let cases: Vec<(String, Mutation, String)> = vec![
        (
            "llm-credentials of another Secret".into(),
            Box::new(|j| {
                let v = volumes(j).iter_mut().find(|v| v["name"] == "llm-credentials").expect("llm-credentials");
                v["secret"]["secretName"] = json!("oats-llm-provider-keys");
            }),
            format!("{only}llm-credentials (Secret oats-llm-provider-keys)"),
        ),
        (
            "the named Secret under another volume name".into(),
            Box::new(|j| volumes(j).push(json!({"name": "more", "secret": {"secretName": "oats-llm-credentials"}}))),
            format!("{only}more (Secret oats-llm-credentials)"),
        ),
    ];
    assert_each_denied(cluster, &in_opt_in(&secret_config()), &cases);
    let cases: Vec<(String, Mutation, String)> = vec![(
        "an egress the parameters do not allow".into(),
        Box::new(|j| pod_labels(j)["oats.dev/egress"] = json!("everywhere")),
        "oats.dev/egress must be one of allowedEgress [public-https]: got everywhere".into(),
    )];
    assert_each_denied(cluster, &in_opt_in_with(&config(), Some(web_agent.clone())), &cases);
    // In the shipped namespace the same Jobs are denied (the_policy_denies_each_violation_...).
    let out = dry_run(cluster, &rendered_with(&secret_config(), BTreeMap::new(), 600, None));
    assert!(!out.status.success() && stderr(&out).contains("secret volumes are forbidden"), "{}", stderr(&out));
    let out = dry_run(cluster, &rendered_with(&config(), BTreeMap::new(), 600, Some(web_agent)));
    assert!(!out.status.success() && stderr(&out).contains("allowedEgress []"), "{}", stderr(&out));
}

#[test]
fn the_policy_is_scoped_to_the_jobs_namespace_by_name() {
    let cluster = cluster_with_policy();
    // The same bad Job elsewhere is not this policy's business (PSA and RBAC are).
    let mut job = rendered();
    pod_spec(&mut job)["hostPID"] = json!(true);
    job["metadata"]["namespace"] = json!("default");
    let out = dry_run(cluster, &job);
    assert!(out.status.success(), "the policy reached namespace default: {}", stderr(&out));
    // And a namespace cannot pose as `oats`: the API server owns kubernetes.io/metadata.name.
    let dir = tempfile::tempdir().unwrap();
    let ns = dir.path().join("ns.json");
    let name = cluster::unique("pose");
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": cluster::NAMESPACE}},
    });
    std::fs::write(&ns, manifest.to_string()).unwrap();
    let created = cluster.kubectl_ok(&["create", "--dry-run=server", "-o", "json", "-f", ns.to_str().unwrap()]);
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["metadata"]["labels"]["kubernetes.io/metadata.name"], json!(name));
}

#[tokio::test]
async fn cancelling_passes_the_policy_and_deadline_updates_are_checked() {
    let cluster = cluster_with_policy();
    let run = cluster::unique("policy-cancel");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let labels = [("e2e", run.as_str()), ("kwok.oats.dev/outcome", "run")].map(|(k, v)| (k.to_owned(), v.to_owned()));
    let job = rendered_with(&config(), labels.into(), 600, None);
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.json");
    std::fs::write(&path, job.to_string()).unwrap();
    cluster.kubectl_ok(&["create", "-f", path.to_str().unwrap()]);

    let patch = |kind: &str, body: Value| {
        cluster.kubectl(&["patch", "job", &name, "-n", cluster::NAMESPACE, "--type", kind, "-p", &body.to_string()])
    };
    // Metadata-only updates are not the policy's business.
    let out = patch("merge", json!({"metadata": {"annotations": {"oats.dev/note": "x"}}}));
    assert!(out.status.success(), "annotating: {}", stderr(&out));
    // Raising the deadline past the maximum, or removing it, is denied on UPDATE too.
    let too_long = max_deadline(cluster) + 1;
    let out = patch("merge", json!({"spec": {"activeDeadlineSeconds": too_long}}));
    assert!(!out.status.success() && stderr(&out).contains("must be at most"), "raising: {}", stderr(&out));
    let out = patch("json", json!([{"op": "remove", "path": "/spec/activeDeadlineSeconds"}]));
    assert!(!out.status.success() && stderr(&out).contains("must be set"), "removing: {}", stderr(&out));
    // More pods than one, on UPDATE too (parallelism is mutable; completions is not, the API
    // server refuses changing it before admission).
    let out = patch("merge", json!({"spec": {"parallelism": 2}}));
    let said = stderr(&out);
    assert!(!out.status.success() && said.contains("(got parallelism 2, completions 1)"), "parallelism: {said}");

    // OATS' own cancel, whatever patch it sends, through its API: the policy lets it pass.
    let server = cluster.start_oats(dir.path()).await;
    let response = server
        .submit(json!({"goal": "Cancel me", "max_turns": 1, "labels": {"e2e": run, "kwok.oats.dev/outcome": "run"}}))
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    server.wait_for(&id, "running", Duration::from_secs(60)).await;
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), reqwest::StatusCode::OK, "{}\n{}", cancel.text().await.unwrap(), server.log_text());
    let stored = cluster.kubectl_json(&["get", "job", &id, "-n", cluster::NAMESPACE]);
    assert_eq!(stored["spec"]["activeDeadlineSeconds"], 1);
    assert!(stored["metadata"]["annotations"]["oats.dev/cancelled-at"].is_string(), "{stored}");
}

/// The prometheus-operator CRDs that infra/monitoring (prod) needs, applied once and established.
fn apply_monitoring_crds(cluster: &cluster::Cluster) {
    let out = std::process::Command::new("testenv/crds.sh").output().expect("testenv/crds.sh runs");
    assert!(out.status.success(), "testenv/crds.sh: {}", stderr(&out));
    let paths: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), 2, "testenv/crds.sh printed {paths:?}");
    let mut args = vec!["apply", "--server-side", "--force-conflicts"];
    for p in &paths {
        args.extend(["-f", p.as_str()]);
    }
    cluster.kubectl_ok(&args);
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]);
}

#[test]
fn every_manifest_passes_a_server_side_dry_run() {
    let cluster = cluster_with_policy();
    apply_monitoring_crds(cluster);
    for dir in ["infra/base", "infra/overlays/dev", "infra/overlays/prod"] {
        // A freshly established CRD can take a moment to be served for dry runs: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            let out = cluster.kubectl(&["apply", "--dry-run=server", "--server-side", "--force-conflicts", "-k", dir]);
            if out.status.success() || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(out.status.success(), "{dir}: {said}");
        assert!(!said.contains("violate PodSecurity"), "{dir}: {said}");
        for object in [
            "validatingadmissionpolicy.admissionregistration.k8s.io/oats-agent-job-guardrails",
            "validatingadmissionpolicybinding.admissionregistration.k8s.io/oats-agent-job-guardrails",
            "networkpolicy.networking.k8s.io/default-deny-all",
            "resourcequota/oats-quota",
            "limitrange/oats-limits",
        ] {
            assert!(said.contains(object), "{dir}: {object} is not part of the dry run: {said}");
        }
        if dir.ends_with("prod") {
            assert!(said.contains("servicemonitor.monitoring.coreos.com/"), "{dir}: {said}");
            assert!(said.contains("prometheusrule.monitoring.coreos.com/"), "{dir}: {said}");
        }
    }
}

/// How Pod Security Admission names each control of the checker in its denials.
const PSA_REASONS: [(&str, &str); 15] = [
    ("hostNamespaces", "host namespaces"),
    ("privileged", "privileged"),
    ("capabilities_restricted", "unrestricted capabilities"),
    ("hostPorts", "hostPort"),
    ("appArmorProfile", "forbidden AppArmor profile"),
    ("seLinuxOptions", "seLinuxOptions"),
    ("procMount", "procMount"),
    ("seccompProfile_restricted", "seccompProfile"),
    ("sysctls", "forbidden sysctls"),
    ("restrictedVolumes", "restricted volume types"),
    ("allowPrivilegeEscalation", "allowPrivilegeEscalation != false"),
    ("runAsNonRoot", "runAsNonRoot != true"),
    ("runAsUser", "runAsUser=0"),
    ("windowsHostProcess", "hostProcess"),
    ("hostProbesAndHostLifecycle", "probe or lifecycle host"),
];

/// The reasons of a Pod Security denial (`violates PodSecurity "restricted:…": a (…), b (…)`).
fn psa_reasons(stderr: &str) -> std::collections::BTreeSet<String> {
    let Some(start) = stderr.find("violates PodSecurity") else { return Default::default() };
    let list = &stderr[start..];
    let list = &list[list.find("\": ").expect("a PodSecurity denial lists its reasons") + 3..];
    let (mut reasons, mut depth, mut item) = (std::collections::BTreeSet::new(), 0, String::new());
    for c in list.trim_end().chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                reasons.insert(item.trim().to_owned());
                item.clear();
                continue;
            }
            _ if depth > 0 => continue,
            _ => {}
        }
        if depth == 0 && c != ')' {
            item.push(c);
        }
    }
    reasons.insert(item.trim().to_owned());
    reasons
}

/// The checker OATS runs before creating a Job (backend::kubernetes::pss) gives, on each
/// violation, the verdict of the real Pod Security Admission: each pod template is sent as a Pod
/// (server-side dry run) to a namespace enforcing restricted, and the reasons are compared.
#[test]
fn the_pod_security_checker_agrees_with_the_api_server_on_each_violation() {
    let ns = cluster::TestNamespace::create(cluster::cluster(), "pss");
    ns.cluster.kubectl_ok(&["label", "namespace", &ns.name, "pod-security.kubernetes.io/enforce=restricted"]);
    let cases: Vec<(&str, Mutation)> = vec![
        ("as rendered", Box::new(|_| {})),
        ("hostNetwork", Box::new(|j| pod_spec(j)["hostNetwork"] = json!(true))),
        (
            "hostPID and hostIPC",
            Box::new(|j| {
                pod_spec(j)["hostPID"] = json!(true);
                pod_spec(j)["hostIPC"] = json!(true);
            }),
        ),
        // Each case a Pod the API server validates (privileged needs privilege escalation, an
        // unmasked /proc a user namespace, a Windows host process the host network).
        (
            "privileged",
            Box::new(|j| {
                agent(j)["securityContext"]["privileged"] = json!(true);
                agent(j)["securityContext"]["allowPrivilegeEscalation"] = json!(true);
            }),
        ),
        ("adds NET_ADMIN", Box::new(|j| agent(j)["securityContext"]["capabilities"]["add"] = json!(["NET_ADMIN"]))),
        (
            "adds NET_BIND_SERVICE",
            Box::new(|j| agent(j)["securityContext"]["capabilities"]["add"] = json!(["NET_BIND_SERVICE"])),
        ),
        ("adds CHOWN", Box::new(|j| agent(j)["securityContext"]["capabilities"]["add"] = json!(["CHOWN"]))),
        ("drops nothing", Box::new(|j| remove(&mut agent(j)["securityContext"], "capabilities"))),
        ("hostPath volume", Box::new(|j| volumes(j).push(json!({"name": "host", "hostPath": {"path": "/etc"}})))),
        (
            "nfs volume",
            Box::new(|j| volumes(j).push(json!({"name": "nfs", "nfs": {"server": "10.0.0.1", "path": "/"}}))),
        ),
        ("hostPort", Box::new(|j| agent(j)["ports"] = json!([{"containerPort": 8080, "hostPort": 8080}]))),
        (
            "seLinux type spc_t",
            Box::new(|j| pod_spec(j)["securityContext"]["seLinuxOptions"] = json!({"type": "spc_t"})),
        ),
        (
            "procMount Unmasked",
            Box::new(|j| {
                agent(j)["securityContext"]["procMount"] = json!("Unmasked");
                pod_spec(j)["hostUsers"] = json!(false);
            }),
        ),
        ("no seccomp profile", Box::new(|j| remove(&mut pod_spec(j)["securityContext"], "seccompProfile"))),
        (
            "seccomp Unconfined",
            Box::new(|j| agent(j)["securityContext"]["seccompProfile"] = json!({"type": "Unconfined"})),
        ),
        (
            "unsafe sysctl",
            Box::new(|j| pod_spec(j)["securityContext"]["sysctls"] = json!([{"name": "kernel.msgmax", "value": "1"}])),
        ),
        ("privilege escalation", Box::new(|j| agent(j)["securityContext"]["allowPrivilegeEscalation"] = json!(true))),
        ("runAsNonRoot false", Box::new(|j| agent(j)["securityContext"]["runAsNonRoot"] = json!(false))),
        ("runAsUser 0", Box::new(|j| pod_spec(j)["securityContext"]["runAsUser"] = json!(0))),
        (
            "AppArmor unconfined",
            Box::new(|j| agent(j)["securityContext"]["appArmorProfile"] = json!({"type": "Unconfined"})),
        ),
        (
            "Windows hostProcess",
            Box::new(|j| {
                agent(j)["securityContext"]["windowsOptions"] = json!({"hostProcess": true});
                pod_spec(j)["hostNetwork"] = json!(true);
            }),
        ),
        (
            "probe on another host",
            Box::new(|j| agent(j)["livenessProbe"] = json!({"httpGet": {"host": "10.0.0.1", "port": 80}})),
        ),
        (
            "all of privileged, root and hostNetwork",
            Box::new(|j| {
                agent(j)["securityContext"]["privileged"] = json!(true);
                agent(j)["securityContext"]["allowPrivilegeEscalation"] = json!(true);
                pod_spec(j)["securityContext"]["runAsUser"] = json!(0);
                pod_spec(j)["hostNetwork"] = json!(true);
            }),
        ),
    ];
    let reason_of: BTreeMap<&str, &str> = PSA_REASONS.into_iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let pod_of = |i: usize, template: &Value| {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": format!("pss-{i}"), "namespace": ns.name, "labels": template["metadata"]["labels"]},
                         "spec": template["spec"]});
        let file = dir.path().join(format!("pod-{i}.json"));
        std::fs::write(&file, pod.to_string()).unwrap();
        let out = ns.cluster.kubectl(&["create", "--dry-run=server", "-f", file.to_str().unwrap()]);
        (out.status.success(), stderr(&out))
    };
    // The namespace's label reaches the admission plugin's cache soon after it is set.
    let mut bad = rendered();
    pod_spec(&mut bad)["hostNetwork"] = json!(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while psa_reasons(&pod_of(cases.len(), &bad["spec"]["template"]).1).is_empty() {
        assert!(Instant::now() < deadline, "the namespace never enforced restricted");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut disagreements = Vec::new();
    for (i, (what, mutate)) in cases.iter().enumerate() {
        let mut job = rendered();
        mutate(&mut job);
        let template = &job["spec"]["template"];
        let checker: std::collections::BTreeSet<String> =
            oats::backend::kubernetes::pss::check_restricted(&serde_json::from_value(template.clone()).unwrap())
                .iter()
                .map(|v| {
                    reason_of.get(v.control).map_or_else(|| format!("unknown control {}", v.control), |r| r.to_string())
                })
                .collect();
        let (admitted, said) = pod_of(i, template);
        let server = psa_reasons(&said);
        if !admitted && server.is_empty() {
            disagreements.push(format!("{what}: refused for another reason: {said}"));
            continue;
        }
        if checker != server {
            disagreements.push(format!("{what}: the checker says {checker:?}, the API server {server:?}"));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} cases:\n{}",
        disagreements.len(),
        cases.len(),
        disagreements.join("\n")
    );
}
