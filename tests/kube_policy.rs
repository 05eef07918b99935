//! The admission guardrails for agent Jobs (policies/vap, applied with infra/base) against the
//! real kube-apiserver of `testenv/`: the Job OATS renders is admitted, each single violation is
//! denied with its own message, OATS' cancel (an UPDATE) still passes, and every shipped
//! manifest (base, dev, prod) passes a server-side dry run.

mod common;
mod kube;

use chrono::Utc;
use oats::{
    backend::kubernetes::render::{AgentTemplate, render_job},
    config::Config,
    jobs::{JobId, JobLimits, JobRequest, NewJob},
    policy::ResourceProfile,
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

fn config() -> Config {
    let mut config = Config::default();
    config.llm_secret_name = Some("oats-llm-credentials".into());
    config.llm_secret_keys = vec!["api-key".into()];
    config
}

/// With the LLM gateway on (agents get its address and a projected token).
fn gateway_config() -> Config {
    let mut config = Config::default();
    config.llm_providers_file = Some("/etc/oats/llm/providers.yaml".into());
    config
}

/// The Job OATS renders for a plain request (as JSON), through the library.
fn rendered_with(
    config: &Config,
    labels: BTreeMap<String, String>,
    timeout: u32,
    profile: Option<ResourceProfile>,
) -> Value {
    let spec = JobRequest {
        goal: "Check the admission policy".into(),
        max_turns: 3,
        labels,
        timeout_seconds: Some(timeout),
        model: None,
        profile: None,
        budget: Default::default(),
    }
    .validate(&JobLimits::default())
    .unwrap();
    let job = NewJob {
        id: JobId::random(),
        tenant: "default".into(),
        request_hash: spec.fingerprint(),
        trace: None,
        resources: profile,
        spec,
        created_at: Utc::now(),
    };
    serde_json::to_value(render_job(&job, &AgentTemplate::from_config(config, kube::NAMESPACE))).unwrap()
}

fn rendered() -> Value {
    rendered_with(&config(), BTreeMap::new(), 600, None)
}

/// `kubectl <verb> --dry-run=server -f <job>` as the admin (no RBAC in the way).
fn dry_run(cluster: &kube::Cluster, job: &Value) -> Output {
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
fn max_deadline(cluster: &kube::Cluster) -> i64 {
    let params = cluster.kubectl_json(&["get", "configmap", PARAMS, "-n", kube::NAMESPACE]);
    params["data"]["maxActiveDeadlineSeconds"].as_str().unwrap().parse().unwrap()
}

/// The cluster, once the policy (applied by kube::cluster() with infra/base) is in force: the
/// API server compiles a new policy asynchronously, so wait until a known-bad Job is denied.
fn cluster_with_policy() -> Option<&'static kube::Cluster> {
    let cluster = kube::cluster()?;
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
    Some(cluster)
}

#[test]
fn the_policy_admits_every_job_oats_renders() {
    let Some(cluster) = cluster_with_policy() else { return };
    let max = max_deadline(cluster);
    let large = ResourceProfile {
        cpu_request: "2".into(),
        cpu_limit: "4".into(),
        memory_request: "4Gi".into(),
        memory_limit: "8Gi".into(),
        image: None,
        command: None,
    };
    // A team's own agent, named by a profile, behind the launcher.
    let own_agent = ResourceProfile {
        image: Some("registry.example.com/oats/team-agent:1.2".into()),
        command: Some(["/oats-launcher/oats", "launch", "--", "python", "/app/agent.py"].map(String::from).to_vec()),
        ..large.clone()
    };
    let cases = [
        ("defaults with the LLM secret volume", rendered()),
        ("without an LLM secret", rendered_with(&Config::default(), BTreeMap::new(), 600, None)),
        (
            "the longest timeout OATS allows",
            rendered_with(&config(), BTreeMap::new(), JobLimits::default().max_timeout_seconds, None),
        ),
        (
            "a resource profile and user labels",
            rendered_with(&config(), [("team".to_owned(), "ml".to_owned())].into(), 60, Some(large)),
        ),
        ("a profile's own agent image and command", rendered_with(&config(), BTreeMap::new(), 60, Some(own_agent.clone()))),
        (
            "a profile's own agent behind the launcher, with the gateway",
            rendered_with(&gateway_config(), BTreeMap::new(), 60, Some(own_agent)),
        ),
        ("the LLM gateway's token and address", rendered_with(&gateway_config(), BTreeMap::new(), 600, None)),
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

#[test]
fn the_policy_denies_each_violation_with_its_own_message() {
    let Some(cluster) = cluster_with_policy() else { return };
    let too_long = max_deadline(cluster) + 1;
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "another service account",
            Box::new(|j| pod_spec(j)["serviceAccountName"] = json!("oats-backend-api")),
            "serviceAccountName must be oats-agent (got oats-backend-api)",
        ),
        (
            "no service account (default)",
            Box::new(|j| remove(pod_spec(j), "serviceAccountName")),
            "serviceAccountName must be oats-agent",
        ),
        (
            "token automounted",
            Box::new(|j| pod_spec(j)["automountServiceAccountToken"] = json!(true)),
            "automountServiceAccountToken must be false",
        ),
        (
            "automount left unset",
            Box::new(|j| remove(pod_spec(j), "automountServiceAccountToken")),
            "automountServiceAccountToken must be false",
        ),
        ("hostPID", Box::new(|j| pod_spec(j)["hostPID"] = json!(true)), "found hostPID set to true"),
        ("hostNetwork", Box::new(|j| pod_spec(j)["hostNetwork"] = json!(true)), "found hostNetwork set to true"),
        ("hostIPC", Box::new(|j| pod_spec(j)["hostIPC"] = json!(true)), "found hostIPC set to true"),
        (
            "hostPort",
            Box::new(|j| agent(j)["ports"] = json!([{"containerPort": 8080, "hostPort": 8080}])),
            "must not use hostPort",
        ),
        (
            "no seccomp profile",
            Box::new(|j| remove(&mut pod_spec(j)["securityContext"], "seccompProfile")),
            "seccompProfile.type must be RuntimeDefault",
        ),
        (
            "a container overrides seccomp with Unconfined",
            Box::new(|j| agent(j)["securityContext"]["seccompProfile"] = json!({"type": "Unconfined"})),
            "seccompProfile.type must be RuntimeDefault (in the pod securityContext, or in every container); not in: agent",
        ),
        (
            "runAsNonRoot false in the container",
            Box::new(|j| agent(j)["securityContext"]["runAsNonRoot"] = json!(false)),
            "runAsNonRoot must be true",
        ),
        (
            "runAsUser 0",
            Box::new(|j| pod_spec(j)["securityContext"]["runAsUser"] = json!(0)),
            "runAsUser must be set to a non-zero (non-root) numeric uid",
        ),
        (
            "runAsUser unset",
            Box::new(|j| remove(&mut pod_spec(j)["securityContext"], "runAsUser")),
            "runAsUser must be set to a non-zero (non-root) numeric uid",
        ),
        (
            "allowPrivilegeEscalation true",
            Box::new(|j| agent(j)["securityContext"]["allowPrivilegeEscalation"] = json!(true)),
            "allowPrivilegeEscalation must be false in every container; not in: agent",
        ),
        (
            "an init container that may escalate",
            Box::new(|j| {
                let mut init = agent(j).clone();
                init["name"] = json!("setup");
                remove(&mut init["securityContext"], "allowPrivilegeEscalation");
                pod_spec(j)["initContainers"] = json!([init]);
            }),
            "allowPrivilegeEscalation must be false in every container; not in: setup",
        ),
        (
            "writable root filesystem",
            Box::new(|j| agent(j)["securityContext"]["readOnlyRootFilesystem"] = json!(false)),
            "readOnlyRootFilesystem must be true in every container; not in: agent",
        ),
        (
            "capabilities not dropped",
            Box::new(|j| agent(j)["securityContext"]["capabilities"]["drop"] = json!(["NET_RAW"])),
            "capabilities.drop must contain ALL in every container; not in: agent",
        ),
        (
            "a capability added",
            Box::new(|j| agent(j)["securityContext"]["capabilities"]["add"] = json!(["NET_BIND_SERVICE"])),
            "capabilities.add must be empty in every container; not in: agent (adds NET_BIND_SERVICE)",
        ),
        (
            "hostPath volume",
            Box::new(|j| {
                pod_spec(j)["volumes"].as_array_mut().unwrap().push(json!({"name": "host", "hostPath": {"path": "/"}}))
            }),
            "only emptyDir, secret, configMap, downwardAPI and projected volumes are allowed; not: host",
        ),
        (
            "persistentVolumeClaim volume",
            Box::new(|j| {
                pod_spec(j)["volumes"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "data", "persistentVolumeClaim": {"claimName": "x"}}))
            }),
            "only emptyDir, secret, configMap, downwardAPI and projected volumes are allowed; not: data",
        ),
        (
            "projected service account token",
            Box::new(|j| {
                pod_spec(j)["volumes"].as_array_mut().unwrap().push(json!({
                    "name": "kube-api-access",
                    "projected": {"sources": [
                        {"configMap": {"name": "kube-root-ca.crt"}},
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                    ]},
                }))
            }),
            "and the LLM gateway's token (volume llm-token, audience oats-llm); not: kube-api-access",
        ),
        (
            "the gateway's token volume with another audience",
            Box::new(|j| {
                pod_spec(j)["volumes"].as_array_mut().unwrap().push(json!({
                    "name": "llm-token",
                    "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "audience": "https://kubernetes.default.svc", "expirationSeconds": 3600}},
                    ]},
                }))
            }),
            "and the LLM gateway's token (volume llm-token, audience oats-llm); not: llm-token",
        ),
        (
            "disallowed image",
            Box::new(|j| agent(j)["image"] = json!("docker.io/attacker/agent:latest")),
            "container images must start with one of [oats-agent:, registry.example.com/oats/]; not allowed: agent=docker.io/attacker/agent:latest",
        ),
        (
            "a look-alike image name",
            Box::new(|j| agent(j)["image"] = json!("oats-agent-evil:1")),
            "not allowed: agent=oats-agent-evil:1",
        ),
        (
            "no activeDeadlineSeconds",
            Box::new(|j| remove(&mut j["spec"], "activeDeadlineSeconds")),
            "spec.activeDeadlineSeconds must be set",
        ),
        (
            "activeDeadlineSeconds above the maximum",
            Box::new(move |j| j["spec"]["activeDeadlineSeconds"] = json!(too_long)),
            "spec.activeDeadlineSeconds must be at most",
        ),
        (
            "no cpu limit",
            Box::new(|j| remove(&mut agent(j)["resources"]["limits"], "cpu")),
            "every container must set resources.limits.cpu and resources.limits.memory; not: agent",
        ),
        (
            "no memory limit",
            Box::new(|j| remove(&mut agent(j)["resources"]["limits"], "memory")),
            "every container must set resources.limits.cpu and resources.limits.memory; not: agent",
        ),
    ];
    let mut failures = Vec::new();
    for (what, mutate, message) in &cases {
        let mut job = rendered();
        mutate(&mut job);
        let out = dry_run(cluster, &job);
        let said = stderr(&out);
        if out.status.success() {
            failures.push(format!("{what}: admitted"));
        } else if !said.contains(DENIED) || !said.contains(message) {
            failures.push(format!("{what}: expected a denial saying {message:?}, got: {said}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} violations:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn the_policy_is_scoped_to_the_jobs_namespace_by_name() {
    let Some(cluster) = cluster_with_policy() else { return };
    // The same bad Job elsewhere is not this policy's business (PSA and RBAC are).
    let mut job = rendered();
    pod_spec(&mut job)["hostPID"] = json!(true);
    job["metadata"]["namespace"] = json!("default");
    let out = dry_run(cluster, &job);
    assert!(out.status.success(), "the policy reached namespace default: {}", stderr(&out));
    // And a namespace cannot pose as `oats`: the API server owns kubernetes.io/metadata.name.
    let dir = tempfile::tempdir().unwrap();
    let ns = dir.path().join("ns.json");
    let name = kube::unique("pose");
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": kube::NAMESPACE}},
    });
    std::fs::write(&ns, manifest.to_string()).unwrap();
    let created = cluster.kubectl_ok(&["create", "--dry-run=server", "-o", "json", "-f", ns.to_str().unwrap()]);
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["metadata"]["labels"]["kubernetes.io/metadata.name"], json!(name));
}

#[test]
fn cancelling_passes_the_policy_and_deadline_updates_are_checked() {
    let Some(cluster) = cluster_with_policy() else { return };
    let run = kube::unique("policy-cancel");
    let labels = [("e2e", run.as_str()), ("kwok.oats.dev/outcome", "run")].map(|(k, v)| (k.to_owned(), v.to_owned()));
    let job = rendered_with(&config(), labels.into(), 600, None);
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.json");
    std::fs::write(&path, job.to_string()).unwrap();
    cluster.kubectl_ok(&["create", "-f", path.to_str().unwrap()]);

    let patch = |kind: &str, body: Value| {
        cluster.kubectl(&["patch", "job", &name, "-n", kube::NAMESPACE, "--type", kind, "-p", &body.to_string()])
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
    // OATS' cancel, exactly as src/backend/kubernetes/mod.rs sends it.
    let cancel = json!({
        "metadata": {"annotations": {"oats.dev/cancelled-at": Utc::now().to_rfc3339()}},
        "spec": {"activeDeadlineSeconds": 1},
    });
    let out = patch("merge", cancel);
    assert!(out.status.success(), "the cancel patch was denied: {}", stderr(&out));
    let stored = cluster.kubectl_json(&["get", "job", &name, "-n", kube::NAMESPACE]);
    assert_eq!(stored["spec"]["activeDeadlineSeconds"], 1);
    cluster.delete_jobs(&format!("e2e={run}"));
}

/// The prometheus-operator CRDs that infra/monitoring (prod) needs, applied once and established.
fn apply_monitoring_crds(cluster: &kube::Cluster) {
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
    let Some(cluster) = cluster_with_policy() else { return };
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
