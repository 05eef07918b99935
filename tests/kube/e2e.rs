//! End-to-end tests of the Kubernetes backend against the real control plane of `testenv/`.
//! Agent pods are played by kwok, steered by `kwok.oats.dev/*` labels on the job (see
//! testenv/kwok/oats-stages.yaml).

use crate::{cluster, common};

use chrono::{DateTime, Utc};
use common::{Server, assert_problem};
use oats::{backend::kubernetes::render, jobs::JobId};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{collections::HashSet, time::Duration};

const SOON: Duration = Duration::from_secs(60);

async fn submit(server: &Server, goal: &str, labels: Value, timeout: Option<u32>) -> Value {
    let mut body = json!({"goal": goal, "max_turns": 3, "labels": labels});
    if let Some(t) = timeout {
        body["timeout_seconds"] = json!(t);
    }
    let response = server.submit(body).await;
    let status = response.status();
    let job: Value = response.json().await.unwrap();
    if status != StatusCode::CREATED {
        let errors: Vec<_> = server.log_text().lines().filter(|l| l.contains("ERROR")).map(str::to_owned).collect();
        panic!("submission answered {status}: {job}\nserver errors: {errors:#?}");
    }
    job
}

fn id_of(job: &Value) -> String {
    job["id"].as_str().unwrap().to_owned()
}

/// `expected` is contained in `actual`: every field OATS set is there with the same value
/// (the API server adds defaults of its own).
fn assert_subset(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, value) in e {
                let child = a.get(key).unwrap_or_else(|| panic!("{path}.{key} is missing in the stored Job"));
                assert_subset(value, child, &format!("{path}.{key}"));
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            assert_eq!(e.len(), a.len(), "{path} has a different length");
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                assert_subset(ev, av, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(expected, actual, "{path} differs"),
    }
}

#[tokio::test]
async fn submitted_job_is_the_rendered_template_and_pod_security_admits_it() {
    let cluster = cluster::cluster();
    let run = cluster::unique("render");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let job = submit(&server, "Render me", json!({"e2e": run, "kwok.oats.dev/outcome": "run"}), Some(120)).await;
    let id = id_of(&job);

    let stored = cluster.kubectl_json(&["get", "job", &id, "-n", cluster::NAMESPACE]);
    let annotations = &stored["metadata"]["annotations"];
    let created_at: DateTime<Utc> = annotations[render::CREATED_AT_ANNOTATION].as_str().unwrap().parse().unwrap();
    assert!((Utc::now() - created_at).num_seconds().abs() < 60, "created-at is the submission's time: {created_at}");
    let hash = annotations[render::REQUEST_HASH_ANNOTATION].as_str().unwrap();
    assert!(hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()), "{hash}");
    // What the Job must be, written out by hand (as shipped, cluster::Cluster::start_oats: the LLM
    // gateway on, no Secret); the API server's defaults come on top.
    let labels = json!({"e2e": run, "kwok.oats.dev/outcome": "run"});
    let mut job_labels = json!({"app": "oats-agent", "app.kubernetes.io/managed-by": "oats", "oats.dev/job-id": id, "oats.dev/tenant": "default"});
    let mut pod_labels = json!({"app": "oats-agent", "oats.dev/job-id": id});
    for (key, value) in labels.as_object().unwrap() {
        job_labels[key] = value.clone();
        pod_labels[key] = value.clone();
    }
    let env = |pairs: &[(&str, &str)]| -> Value { pairs.iter().map(|(k, v)| json!({"name": k, "value": v})).collect() };
    let expected = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": id,
            "namespace": cluster::NAMESPACE,
            "labels": job_labels,
            "annotations": {
                "oats.dev/env-escaped": "true",
                "oats.dev/label-keys": "e2e,kwok.oats.dev/outcome",
            },
        },
        "spec": {
            "activeDeadlineSeconds": 120,
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "restartPolicy": "Never",
                    "serviceAccountName": "oats-agent",
                    "securityContext": {
                        "fsGroup": 65532, "runAsGroup": 65532, "runAsNonRoot": true, "runAsUser": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "agent",
                        "image": "oats-agent:0.1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "env": env(&[
                            ("OATS_JOB_ID", &id),
                            ("OATS_GOAL", "Render me"),
                            ("OATS_MAX_TURNS", "3"),
                            ("OATS_TIMEOUT_SECONDS", "120"),
                            ("OATS_RESULT_FILE", "/dev/termination-log"),
                            ("OATS_WORKSPACE", "/workspace"),
                            ("HOME", "/workspace"),
                            ("TMPDIR", "/tmp"),
                            ("OPENAI_BASE_URL", "http://oats-llm-gateway.oats.svc:8001/v1"),
                            ("OATS_LLM_TOKEN_FILE", "/var/run/secrets/oats/llm-token/token"),
                        ]),
                        "resources": {
                            "limits": {"cpu": "1", "ephemeral-storage": "1Gi", "memory": "512Mi"},
                            "requests": {"cpu": "250m", "ephemeral-storage": "64Mi", "memory": "256Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]},
                            "privileged": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                        },
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "volumeMounts": [
                            {"mountPath": "/tmp", "name": "tmp"},
                            {"mountPath": "/workspace", "name": "workspace"},
                            {"mountPath": "/var/run/secrets/oats/llm-token", "name": "llm-token", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        {"name": "workspace", "emptyDir": {"sizeLimit": "512Mi"}},
                        {"name": "llm-token", "projected": {"defaultMode": 0o440, "sources": [{"serviceAccountToken": {
                            "audience": "oats-llm", "expirationSeconds": 720, "path": "token",
                        }}]}},
                    ],
                },
            },
        },
    });
    assert_subset(&expected, &stored, "job");
    // The gateway's projected token is the pod's only credential: no Secret, no env reference.
    let pod_spec = &stored["spec"]["template"]["spec"];
    let volumes: Vec<&str> =
        pod_spec["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(volumes, ["tmp", "workspace", "llm-token"]);
    assert!(pod_spec["volumes"].as_array().unwrap().iter().all(|v| v["secret"].is_null()), "{pod_spec}");
    let agent = &pod_spec["containers"][0];
    assert!(agent["envFrom"].is_null() && agent["env"].as_array().unwrap().iter().all(|e| e["valueFrom"].is_null()));

    // The same manifest, dry-run created under another name (and job id: the admission policy
    // wants the pods' oats.dev/job-id to be the Job's name): no Pod Security warnings.
    let mut probe = expected.clone();
    let probe_id = JobId::random().to_string();
    probe["metadata"]["name"] = json!(probe_id);
    probe["spec"]["template"]["metadata"]["labels"]["oats.dev/job-id"] = json!(probe_id);
    let manifest = dir.path().join("dry.json");
    std::fs::write(&manifest, probe.to_string()).unwrap();
    let dry = cluster.kubectl(&["create", "--dry-run=server", "-f", manifest.to_str().unwrap()]);
    let warnings = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "{warnings}");
    assert!(!warnings.contains("Warning"), "the API server warned: {warnings}");

    // The Job controller's pod was admitted under enforce=restricted.
    let running = server.wait_for(&id, "running", SOON).await;
    assert!(running["started_at"].is_string(), "{running}");
    let pods = cluster.kubectl_json(&["get", "pods", "-n", cluster::NAMESPACE, "-l", &format!("oats.dev/job-id={id}")]);
    assert_eq!(pods["items"].as_array().unwrap().len(), 1);
    let events = cluster.kubectl_json(&[
        "get",
        "events",
        "-n",
        cluster::NAMESPACE,
        "--field-selector",
        &format!("involvedObject.name={id}"),
    ]);
    assert!(
        events["items"].as_array().unwrap().iter().all(|e| e["reason"] != "FailedCreate"),
        "the Job controller could not create the pod: {events}"
    );
}

#[tokio::test]
async fn every_status_path_is_reported() {
    let cluster = cluster::cluster();
    let run = cluster::unique("paths");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let label = |outcome: &str, extra: &[(&str, &str)]| {
        let mut labels = json!({"e2e": run, "kwok.oats.dev/outcome": outcome, "kwok.oats.dev/run-ms": "3000"});
        for (k, v) in extra {
            labels[*k] = json!(v);
        }
        labels
    };
    let ok = id_of(&submit(&server, "Answer me", label("succeed", &[]), None).await);
    let fail = id_of(&submit(&server, "Fail me", label("fail", &[("kwok.oats.dev/exit-code", "3")]), None).await);
    let oom = id_of(&submit(&server, "Eat memory", label("oom", &[]), None).await);
    let slow = id_of(&submit(&server, "Never finish", label("run", &[]), Some(10)).await);
    let stuck = id_of(&submit(&server, "Wrong image", label("pending", &[]), None).await);

    server.wait_for(&ok, "running", SOON).await;
    let done = server.wait_for(&ok, "succeeded", SOON).await;
    assert_eq!(done["result"], "done: Answer me", "result comes from the termination message");
    assert!(done["finished_at"].is_string() && done["attempts"] == 1, "{done}");

    let failed = server.wait_for(&fail, "failed", SOON).await;
    assert_eq!(failed["reason"], "AgentError");
    assert!(failed["message"].as_str().unwrap().contains("code 3"), "{failed}");

    let oomed = server.wait_for(&oom, "failed", SOON).await;
    assert_eq!(oomed["reason"], "OOMKilled");

    let timed_out = server.wait_for(&slow, "failed", SOON).await;
    assert_eq!(timed_out["reason"], "DeadlineExceeded");

    let pending = server.job(&stuck).await;
    assert_eq!(pending["status"], "pending");
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let job = server.job(&stuck).await;
        if job["reason"] == "ImagePullFailed" {
            assert_eq!(job["status"], "pending", "an image pull failure is pending, not running");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no ImagePullFailed: {job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, events) = server.get_json(&format!("/api/v1/jobs/{stuck}/events")).await;
    assert_eq!(status, StatusCode::OK, "{events}");
    let items = events["items"].as_array().unwrap();
    assert!(items.iter().any(|e| e["object"].as_str().unwrap().starts_with("Pod/")), "{events}");
    assert!(items.iter().any(|e| e["object"] == format!("Job/{stuck}")), "{events}");
    let times: Vec<&str> = items.iter().map(|e| e["time"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "events are newest first");
}

#[tokio::test]
async fn cancel_removes_the_pods_and_keeps_the_record() {
    let cluster = cluster::cluster();
    let run = cluster::unique("cancel");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let id = id_of(&submit(&server, "Cancel me", json!({"e2e": run, "kwok.oats.dev/outcome": "run"}), None).await);
    server.wait_for(&id, "running", SOON).await;
    let response = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "cancelled");
    let selector = format!("oats.dev/job-id={id}");
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let pods = cluster.kubectl_json(&["get", "pods", "-n", cluster::NAMESPACE, "-l", &selector]);
        if pods["items"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent pod was never removed: {pods}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let kept = server.job(&id).await;
    assert_eq!(kept["status"], "cancelled");
    assert_eq!(kept["reason"], "Cancelled");
    let again = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK, "cancelling twice is harmless");
}

#[tokio::test]
async fn list_filter_and_page_through_300_jobs() {
    let cluster = cluster::cluster();
    let run = cluster::unique("page");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let mut created = Vec::new();
    for i in 0..300 {
        let shard = if i % 3 == 0 { "a" } else { "b" };
        let labels = json!({"e2e": run, "shard": shard, "kwok.oats.dev/outcome": "run"});
        created.push(id_of(&submit(&server, &format!("job {i}"), labels, None).await));
    }
    created.reverse();
    // The cache catches up with the writes.
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let (_, all) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}&limit=500")).await;
        if all["items"].as_array().unwrap().len() == 300 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cache never showed all 300 jobs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("/api/v1/jobs?label=e2e%3D{run}&limit=70");
        if let Some(t) = &token {
            url.push_str(&format!("&page_token={t}"));
        }
        let (status, page) = server.get_json(&url).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(id_of));
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created, "every job once, newest first");
    let (_, shard_a) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run},shard%3Da&limit=500")).await;
    assert_eq!(shard_a["items"].as_array().unwrap().len(), 100);
}

#[tokio::test]
async fn concurrent_idempotent_submissions_on_two_replicas_create_one_job() {
    let cluster = cluster::cluster();
    let run = cluster::unique("idem");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let first = cluster.start_oats(dir.path()).await;
    let second = cluster.start_oats(dir.path()).await;
    let body = json!({"goal": "Exactly once", "max_turns": 2, "labels": {"e2e": run, "kwok.oats.dev/outcome": "run"}});
    let requests = (0..20).map(|i| {
        let server = if i % 2 == 0 { &first } else { &second };
        server.http.post(server.url("/api/v1/jobs")).header("Idempotency-Key", format!("once-{run}")).json(&body).send()
    });
    let mut ids = HashSet::new();
    let mut created = 0;
    for response in futures::future::join_all(requests).await {
        let response = response.unwrap();
        let status = response.status();
        let job: Value = response.json().await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}: {job}"),
        }
        ids.insert(id_of(&job));
    }
    assert_eq!((created, ids.len()), (1, 1));
    assert_eq!(cluster.jobs_labelled(&format!("e2e={run}")).len(), 1, "exactly one Job in the cluster");
    let id = ids.into_iter().next().unwrap();

    // Both replicas give the same answers.
    let a = first.wait_for(&id, "running", SOON).await;
    let b = second.wait_for(&id, "running", SOON).await;
    assert_eq!(a, b);
    let (_, list_a) = first.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}")).await;
    let (_, list_b) = second.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}")).await;
    assert_eq!(list_a, list_b);
    let reuse = second
        .http
        .post(second.url("/api/v1/jobs"))
        .header("Idempotency-Key", format!("once-{run}"))
        .json(&json!({"goal": "Another", "max_turns": 2}))
        .send()
        .await
        .unwrap();
    assert_problem(reuse, 409, "idempotency-key-reused").await;
}

#[tokio::test]
async fn restarted_oats_finds_every_job_with_its_status() {
    let cluster = cluster::cluster();
    let run = cluster::unique("restart");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let running =
        id_of(&submit(&server, "Keep running", json!({"e2e": run, "kwok.oats.dev/outcome": "run"}), None).await);
    let done = id_of(&submit(&server, "Finish", json!({"e2e": run, "kwok.oats.dev/run-ms": "200"}), None).await);
    server.wait_for(&running, "running", SOON).await;
    server.crash();
    // While OATS is down, the done job finishes.
    let complete = format!("job/{done}");
    cluster.kubectl_ok(&["wait", "--for=condition=Complete", "--timeout=60s", "-n", cluster::NAMESPACE, &complete]);
    let server = cluster.start_oats(dir.path()).await;
    assert_eq!(server.job(&running).await["status"], "running");
    server.wait_for(&done, "succeeded", SOON).await;
    let (_, all) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}")).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
}

/// `kubectl auth can-i` arguments for `[verb, resource]`: a `pods/log` resource is the
/// subresource `log` of pods (as `pods/log` kubectl would ask about the pod named "log").
fn with_subresource<'a>([verb, resource]: [&'a str; 2], namespace: &'a str) -> Vec<String> {
    let mut args: Vec<String> = vec![verb.into()];
    match resource.split_once('/') {
        Some((resource, sub)) => args.extend([resource.to_owned(), format!("--subresource={sub}")]),
        None => args.push(resource.into()),
    }
    args.extend(["-n".to_owned(), namespace.to_owned()]);
    args
}

#[test]
fn the_shipped_rbac_is_enough_and_no_more() {
    let cluster = cluster::cluster();
    let can = |kubeconfig: &std::path::Path, args: &[String]| {
        let mut full = vec!["auth", "can-i"];
        full.extend(args.iter().map(String::as_str));
        let out = cluster.kubectl_as(kubeconfig, &full);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let oats = cluster.oats_kubeconfig.as_path();
    for allowed in [
        ["create", "jobs.batch"],
        ["get", "jobs.batch"],
        ["list", "jobs.batch"],
        ["watch", "jobs.batch"],
        ["patch", "jobs.batch"],
        ["list", "pods"],
        ["watch", "pods"],
        ["get", "pods/log"],
        ["list", "events"],
    ] {
        assert!(can(oats, &with_subresource(allowed, cluster::NAMESPACE)), "OATS may not {allowed:?}");
    }
    for denied in [
        ["get", "secrets"],
        ["list", "secrets"],
        ["create", "pods"],
        ["delete", "pods"],
        ["delete", "jobs.batch"],
        ["create", "pods/exec"],
        ["patch", "namespaces"],
        ["create", "rolebindings"],
    ] {
        assert!(!can(oats, &with_subresource(denied, cluster::NAMESPACE)), "OATS may {denied:?}");
    }
    assert!(!can(oats, &with_subresource(["list", "jobs.batch"], "default")), "OATS reaches another namespace");
    // Real calls, not only the authorizer's opinion: 403s.
    let forbidden = cluster.kubectl_as(oats, &["get", "secrets", "-n", cluster::NAMESPACE]);
    assert!(String::from_utf8_lossy(&forbidden.stderr).contains("Forbidden"));
    let elsewhere = cluster.kubectl_as(oats, &["get", "jobs", "-n", "default"]);
    assert!(String::from_utf8_lossy(&elsewhere.stderr).contains("Forbidden"));

    let agent = "system:serviceaccount:oats:oats-agent";
    for verb_resource in
        [["get", "pods"], ["list", "jobs.batch"], ["get", "secrets"], ["create", "pods"], ["get", "configmaps"]]
    {
        let out = cluster.kubectl(&[
            "auth",
            "can-i",
            verb_resource[0],
            verb_resource[1],
            "-n",
            cluster::NAMESPACE,
            "--as",
            agent,
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no", "the agent may {verb_resource:?}");
    }
    let sa = cluster.kubectl_json(&["get", "serviceaccount", "oats-agent", "-n", cluster::NAMESPACE]);
    assert_eq!(sa["automountServiceAccountToken"], false);
}

/// (API group, resource, verb) of every rule of the shipped Role `oats-backend-api-job-manager`.
fn shipped_role_grants() -> std::collections::BTreeSet<(String, String, String)> {
    let text = std::fs::read_to_string("infra/base/rbac.yaml").unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "oats-backend-api-job-manager")
        .expect("infra/base/rbac.yaml has the Role oats-backend-api-job-manager");
    let strings =
        |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect() };
    let mut grants = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    grants.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    grants
}

/// (verb, resource, code) -> count of `oats_kube_requests_total` in a /metrics page.
fn kube_calls_by_code(metrics: &str) -> std::collections::BTreeMap<(String, String, String), f64> {
    let mut calls = std::collections::BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("oats_kube_requests_total{")) {
        let (labels, value) = line["oats_kube_requests_total{".len()..].rsplit_once("} ").unwrap();
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or_else(|| panic!("no {name} in {line}"))
                .to_owned()
        };
        let value: f64 = value.trim().parse().unwrap();
        if value > 0.0 {
            calls.insert((label("verb"), label("resource"), label("code")), value);
        }
    }
    calls
}

/// RBAC grants only the verbs the backend calls: a scenario that takes every path of the
/// Kubernetes backend (submit, dry run, the watch caches, a job that succeeds and is counted, a
/// pending job's events, its logs, a cancel) on one server running as the shipped service
/// account, then the Kubernetes client metrics of that server (`oats_kube_requests_total`, every
/// call the backend made, by verb and resource) against the shipped Role: every grant was used,
/// every call is granted, none was refused.
#[tokio::test]
async fn the_shipped_role_grants_exactly_the_calls_the_backend_makes() {
    let cluster = cluster::cluster();
    let run = cluster::unique("rbac");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let labels = |outcome: &str| json!({"e2e": run, "kwok.oats.dev/outcome": outcome, "kwok.oats.dev/run-ms": "500"});

    // Dry run (a server-side dry-run create), then the real creates.
    let (status, dry) = dry_run(&server, &json!({"goal": "dry", "max_turns": 1, "labels": labels("succeed")})).await;
    assert_eq!((status, dry["allowed"].as_bool()), (StatusCode::ACCEPTED, Some(true)), "{dry}");
    let done = id_of(&submit(&server, "Succeed", labels("succeed"), None).await);
    let running = id_of(&submit(&server, "Run until cancelled", labels("run"), None).await);
    let stuck = id_of(&submit(&server, "Wrong image", labels("pending"), None).await);

    // Watches (list + watch of jobs and pods) bring the outcome; the finish is counted (patch).
    server.wait_for(&done, "succeeded", SOON).await;
    // Logs of a started pod (pods/log get); the answer does not matter here, the call does.
    let _ = server.http.get(server.url(&format!("/api/v1/jobs/{done}/logs"))).send().await.unwrap().text().await;
    // Events of a job and its pod (events list).
    let deadline = std::time::Instant::now() + SOON;
    while server.job(&stuck).await["reason"] != "ImagePullFailed" {
        assert!(std::time::Instant::now() < deadline, "the stuck job never reported ImagePullFailed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, events) = server.get_json(&format!("/api/v1/jobs/{stuck}/events")).await;
    assert_eq!(status, StatusCode::OK, "{events}");
    // Cancel reads the Job from the API server (get) and patches it; its finish is counted too.
    server.wait_for(&running, "running", SOON).await;
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{running}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);

    // The backend's calls, as its metrics recorded them (the finish counters' patches included).
    let deadline = std::time::Instant::now() + SOON;
    let calls = loop {
        let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let calls = kube_calls_by_code(&metrics);
        let patches: f64 = calls.iter().filter(|((v, r, _), _)| v == "patch" && r == "jobs").map(|(_, n)| n).sum();
        // The cancel, and the claims of the two finishes (done, cancelled) by the finish counter.
        if patches >= 3.0 {
            break calls;
        }
        assert!(std::time::Instant::now() < deadline, "the finishes were never counted: {calls:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let refused: Vec<_> = calls.keys().filter(|(_, _, code)| code == "403").collect();
    assert!(refused.is_empty(), "the API server refused calls of the shipped service account: {refused:?}");
    // The metric names the resource, not its API group: OATS reads Jobs of batch/v1 and Pods,
    // their logs and Events of the core group (/api/v1/...).
    let group_of = |resource: &str| match resource {
        "jobs" => Some("batch"),
        "pods" | "pods/log" | "events" => Some(""),
        _ => None,
    };
    let mut used = std::collections::BTreeSet::new();
    for (verb, resource, _) in calls.keys() {
        // GET /version (the client's first call): a non-resource URL that Kubernetes' default
        // ClusterRole system:public-info-viewer grants everyone; no Role can grant it.
        if resource == "version" {
            continue;
        }
        let group = group_of(resource).unwrap_or_else(|| {
            panic!("OATS called {verb} {resource}, a resource the test does not know: map it to its API group")
        });
        used.insert((group.to_owned(), resource.clone(), verb.clone()));
    }
    let granted = shipped_role_grants();
    let unused: Vec<_> = granted.difference(&used).collect();
    let ungranted: Vec<_> = used.difference(&granted).collect();
    assert!(
        unused.is_empty() && ungranted.is_empty(),
        "the shipped Role (infra/base/rbac.yaml) and the backend's calls differ\n\
         granted but never called (remove from the Role and the Helm chart): {unused:?}\n\
         called but not granted: {ungranted:?}\nall calls: {calls:#?}"
    );
}

#[tokio::test]
async fn kubernetes_calls_are_child_spans_of_the_job_creation() {
    let cluster = cluster::cluster();
    let run = cluster::unique("spans");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let (receiver, port) = common::otlp::start_receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let server = cluster
        .start_oats_with(
            dir.path(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
        .await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let response = server
        .http
        .post(server.url("/api/v1/jobs"))
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .json(&json!({"goal": "traced", "max_turns": 1, "labels": {"e2e": run, "kwok.oats.dev/outcome": "run"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let in_trace: Vec<_> = spans.iter().map(|(_, s)| s).filter(|s| hex(&s.trace_id) == trace).collect();
        let create = in_trace.iter().find(|s| s.name == "create job");
        let client = create.and_then(|create| {
            in_trace.iter().find(|s| {
                s.parent_span_id == create.span_id
                    && s.kind == opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32
            })
        });
        if let Some(client) = client {
            assert_eq!(client.name, "create", "the kube client names its span by verb");
            break;
        }
        let names: Vec<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
        assert!(std::time::Instant::now() < deadline, "no client span under `create job`: {names:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A providers file for the fake upstream, in `dir`.
fn providers_file(dir: &std::path::Path, fake: &common::fake_llm::FakeLlm) -> std::path::PathBuf {
    let path = dir.join("providers.yaml");
    let yaml = format!(
        "providers:\n  - name: fake\n    base_url: {}\n    models:\n      - name: test-model\n        input_per_million_usd: 1\n        output_per_million_usd: 2\n",
        fake.base_url
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test]
async fn agents_reach_the_gateway_with_a_pod_bound_token_only_while_their_job_runs() {
    let cluster = cluster::cluster();
    let run = cluster::unique("llm");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let fake = common::fake_llm::FakeLlm::start().await;
    let providers = providers_file(dir.path(), &fake);
    let extra =
        [("OATS_LLM_PROVIDERS_FILE", providers.to_str().unwrap()), ("OATS_STATE_DIR", dir.path().to_str().unwrap())];
    let server = cluster.start_oats_with(dir.path(), &extra).await;
    let gateway = server.gateway_url();
    let id =
        id_of(&submit(&server, "Use the model", json!({"e2e": run, "kwok.oats.dev/outcome": "run"}), Some(600)).await);
    server.wait_for(&id, "running", SOON).await;

    // The Job carries the gateway's address and a projected token for it, and no secret of a provider.
    let stored = cluster.kubectl_json(&["get", "job", &id, "-n", cluster::NAMESPACE]);
    let pod_spec = &stored["spec"]["template"]["spec"];
    let env = pod_spec["containers"][0]["env"].as_array().unwrap();
    let value = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
    assert_eq!(value("OPENAI_BASE_URL"), Some(json!("http://oats-llm-gateway.oats.svc:8001/v1")));
    assert_eq!(value("OATS_LLM_TOKEN_FILE"), Some(json!("/var/run/secrets/oats/llm-token/token")));
    assert_eq!(value("OPENAI_API_KEY"), None, "no credential in the pod spec");
    let token_volume =
        pod_spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "llm-token").unwrap().clone();
    let projection = &token_volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(
        (projection["audience"].as_str(), projection["expirationSeconds"].as_i64()),
        (Some("oats-llm"), Some(1200))
    );
    assert_eq!(pod_spec["automountServiceAccountToken"], false);

    let selector = format!("oats.dev/job-id={id}");
    let pod = cluster.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        cluster::NAMESPACE,
        "-l",
        &selector,
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let token = |extra: &[&str]| {
        let mut args = vec!["create", "token", "oats-agent", "-n", cluster::NAMESPACE, "--duration=10m"];
        args.extend_from_slice(extra);
        cluster.kubectl_ok(&args).trim().to_owned()
    };
    let bound = token(&["--audience", "oats-llm", "--bound-object-kind", "Pod", "--bound-object-name", &pod]);
    let http = reqwest::Client::new();
    let ask = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});
    let call = |credential: String| {
        let (http, url, ask) = (http.clone(), format!("{gateway}/chat/completions"), ask.clone());
        async move { http.post(url).bearer_auth(credential).json(&ask).send().await.unwrap().status() }
    };
    assert_eq!(call(bound.clone()).await, StatusCode::OK, "a token bound to the job's pod is accepted while it runs");
    assert_eq!(fake.requests().len(), 1);
    let other_audience =
        token(&["--audience", "somebody-else", "--bound-object-kind", "Pod", "--bound-object-name", &pod]);
    assert_eq!(call(other_audience).await, StatusCode::UNAUTHORIZED, "another audience");
    assert_eq!(call(token(&["--audience", "oats-llm"])).await, StatusCode::UNAUTHORIZED, "not bound to a pod");
    let stray = "job-aaaaaaaaaaaaaaaaaaaa-stray";
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {stray}, namespace: {ns}, labels: {{e2e: {run}}}}}\nspec:\n  serviceAccountName: oats-agent\n  automountServiceAccountToken: false\n  securityContext: {{runAsNonRoot: true, runAsUser: 65532, seccompProfile: {{type: RuntimeDefault}}}}\n  containers:\n  - name: c\n    image: busybox\n    securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}\n",
        ns = cluster::NAMESPACE
    );
    let manifest_path = dir.path().join("stray.yaml");
    std::fs::write(&manifest_path, manifest).unwrap();
    cluster.kubectl_ok(&["apply", "-f", manifest_path.to_str().unwrap()]);
    let stray_token = token(&["--audience", "oats-llm", "--bound-object-kind", "Pod", "--bound-object-name", stray]);
    assert_eq!(call(stray_token).await, StatusCode::UNAUTHORIZED, "a pod of no job");

    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    assert_eq!(call(bound).await, StatusCode::UNAUTHORIZED, "the token dies with the job");
    assert_eq!(fake.requests().len(), 1, "no refused call reached the upstream");
    cluster.kubectl_ok(&["delete", "pod", stray, "-n", cluster::NAMESPACE, "--wait=false"]);
}

/// Apply `yaml` as the cluster admin.
fn apply_yaml(cluster: &cluster::Cluster, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.yaml");
    std::fs::write(&path, yaml).unwrap();
    cluster.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
}

/// `POST /api/v1/jobs?dry_run=true`: the status and the answer.
async fn dry_run(server: &Server, body: &Value) -> (StatusCode, Value) {
    let response = server.http.post(server.url("/api/v1/jobs?dry_run=true")).json(body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// The verdict of `rule` in a dry run's answer.
fn verdict<'a>(dry: &'a Value, rule: &str) -> &'a Value {
    dry["verdicts"].as_array().unwrap().iter().find(|v| v["rule"] == rule).unwrap_or_else(|| panic!("no {rule}: {dry}"))
}

/// The env of the agent container of a stored Job, by name.
fn stored_env(cluster: &cluster::Cluster, id: &str) -> std::collections::BTreeMap<String, String> {
    let stored = cluster.kubectl_json(&["get", "job", id, "-n", cluster::NAMESPACE]);
    let env = stored["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    env.iter().map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].as_str().unwrap_or("").to_owned())).collect()
}

#[tokio::test]
async fn the_goal_and_the_trace_context_reach_the_agent_byte_for_byte() {
    let cluster = cluster::cluster();
    let run = cluster::unique("bytes");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let (_receiver, port) = common::otlp::start_receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let extra = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
    let server = cluster.start_oats_with(dir.path(), &extra).await;
    let goal = "Print $(OATS_JOB_ID), $(HOME), $$(OATS_GOAL), $$ and $5 as they are $";
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = server
        .http
        .post(server.url("/api/v1/jobs"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("tracestate", "oats=e2e")
        .json(&json!({"goal": goal, "max_turns": 1, "labels": {"e2e": run, "kwok.oats.dev/outcome": "run"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["goal"], goal);
    let id = id_of(&created);

    // The kubelet expands $(VAR) and turns $$ into $ in env values: every $ is stored doubled,
    // so what the agent's process gets is the goal itself.
    let env = stored_env(cluster, &id);
    assert_eq!(env["OATS_GOAL"], goal.replace('$', "$$"));
    // The agent continues the caller's trace, through the `create job` span.
    let traceparent = &env["TRACEPARENT"];
    assert!(traceparent.starts_with(&format!("00-{trace}-")) && traceparent.ends_with("-01"), "{traceparent}");
    assert_eq!(env["TRACESTATE"], "oats=e2e");

    // Read back from the Job (the API server's copy, then the watch cache): the same goal.
    server.wait_for(&id, "running", SOON).await;
    assert_eq!(server.job(&id).await["goal"], goal);
    let (_, listed) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}")).await;
    assert_eq!(listed["items"][0]["goal"], goal);
}

#[tokio::test]
async fn labels_round_trip_byte_for_byte_and_keys_kubernetes_owns_are_refused() {
    let cluster = cluster::cluster();
    let run = cluster::unique("labels");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let labels = json!({
        "e2e": run,
        "kwok.oats.dev/outcome": "run",
        "app.kubernetes.io/name": "summariser",
        "app.kubernetes.io/part-of": "",
        "example.com/Mixed_Case.value": "A-b_c.9",
    });
    let created = submit(&server, "Keep my labels", labels.clone(), None).await;
    assert_eq!(created["labels"], labels);
    let id = id_of(&created);
    server.wait_for(&id, "running", SOON).await;
    assert_eq!(server.job(&id).await["labels"], labels, "GET from the watch cache");
    for selector in
        ["app.kubernetes.io%2Fname%3Dsummariser", "app.kubernetes.io%2Fpart-of", "!app.kubernetes.io%2Fmanaged-by"]
    {
        let (status, page) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run},{selector}")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["items"].as_array().unwrap().len(), 1, "{selector}: {page}");
        assert_eq!(page["items"][0]["labels"], labels);
    }
    // OATS's own labels are on the Job, and not the user's.
    let stored = cluster.kubectl_json(&["get", "job", &id, "-n", cluster::NAMESPACE]);
    assert_eq!(stored["metadata"]["labels"]["app.kubernetes.io/managed-by"], "oats");

    // Keys Kubernetes owns: a 422 naming the key, for the dry run as for the submission (the
    // API server refused `controller-uid` with a 500 before), and no Job.
    for key in [
        "controller-uid",
        "job-name",
        "batch.kubernetes.io/job-name",
        "kubernetes.io/hostname",
        "node.k8s.io/x",
        "app.kubernetes.io/managed-by",
    ] {
        let body = json!({"goal": "g", "max_turns": 1, "labels": {"e2e": run, key: "x"}});
        for path in ["/api/v1/jobs?dry_run=true", "/api/v1/jobs"] {
            let response = server.http.post(server.url(path)).json(&body).send().await.unwrap();
            let problem = assert_problem(response, 422, "validation-failed").await;
            assert_eq!(problem["errors"][0]["field"], format!("labels.{key}"), "{problem}");
            assert!(problem["detail"].as_str().unwrap().contains(key), "{problem}");
        }
    }
    // Keys a service mesh or a batch queue acts on: refused by the policy unless it names them.
    for key in ["sidecar.istio.io/inject", "kueue.x-k8s.io/queue-name"] {
        let response = server.submit(json!({"goal": "g", "max_turns": 1, "labels": {"e2e": run, key: "true"}})).await;
        let problem = assert_problem(response, 422, "policy/allowed-label-keys").await;
        assert!(problem["detail"].as_str().unwrap().contains(key), "{problem}");
    }
    assert_eq!(cluster.jobs_labelled(&format!("e2e={run}")).len(), 1, "no refused submission made a Job");
}

#[tokio::test]
async fn an_api_server_refusal_is_a_422_with_its_message_and_the_dry_run_predicts_it() {
    let cluster = cluster::cluster();
    let run = cluster::unique("refuse");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    // An admission policy of the cluster (as a platform team would add) refuses Jobs labelled
    // `e2e-refuse=<run>`; OATS itself has nothing against them.
    let message = format!("jobs labelled e2e-refuse={run} are refused by the e2e admission policy");
    let name = format!("oats-e2e-refuse-{}", std::process::id());
    apply_yaml(
        cluster,
        &format!(
            r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {{apiGroups: [batch], apiVersions: [v1], operations: [CREATE], resources: [jobs]}}
  validations:
    - {{expression: "false", message: "{message}"}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
    objectSelector: {{matchLabels: {{e2e-refuse: {run}}}}}
"#,
            ns = cluster::NAMESPACE
        ),
    );
    let refused = json!({"goal": "Refuse me", "max_turns": 1, "labels": {"e2e": run, "e2e-refuse": run}});
    let fine = json!({"goal": "Admit me", "max_turns": 1, "labels": {"e2e": run}});

    // The API server compiles a new policy in the background: the dry run turns "not allowed"
    // once it is in force, with the API server's message.
    let deadline = std::time::Instant::now() + SOON;
    let dry = loop {
        let (status, dry) = dry_run(&server, &refused).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{dry}");
        if dry["allowed"] == false {
            break dry;
        }
        assert_eq!(verdict(&dry, "kubernetes-admission")["allowed"], true, "{dry}");
        assert!(std::time::Instant::now() < deadline, "the dry run never saw the policy: {dry}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let admission = verdict(&dry, "kubernetes-admission");
    assert_eq!(admission["allowed"], false, "{dry}");
    assert!(admission["detail"].as_str().unwrap().contains(&message), "{dry}");
    assert!(dry["verdicts"].as_array().unwrap().iter().filter(|v| v["allowed"] == false).count() == 1, "{dry}");
    let (_, admitted) = dry_run(&server, &fine).await;
    assert_eq!(
        (admitted["allowed"].clone(), verdict(&admitted, "kubernetes-admission")["allowed"].clone()),
        (json!(true), json!(true))
    );

    // The submission itself: 422 with the API server's message, never a 500, and no Job.
    let problem = assert_problem(server.submit(refused).await, 422, "policy/kubernetes-admission").await;
    assert!(problem["detail"].as_str().unwrap().contains(&message), "{problem}");
    assert!(cluster.jobs_labelled(&format!("e2e-refuse={run}")).is_empty());
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"oats_policy_denials_total{rule="kubernetes-admission"} 1"#), "{metrics}");
    assert!(!server.log_text().contains("internal error"), "{}", server.log_text());

    cluster.kubectl_ok(&["delete", "validatingadmissionpolicybinding", &name]);
    cluster.kubectl_ok(&["delete", "validatingadmissionpolicy", &name]);
}

#[tokio::test]
async fn an_exhausted_namespace_quota_is_a_429_quota_exhausted_counted_and_predicted() {
    let cluster = cluster::cluster();
    // A namespace of its own, so that its quota of two Jobs stops no other test: OATS runs there
    // with the shipped Role, bound to its service account.
    let namespace = format!("oats-quota-{}", std::process::id());
    let _ = cluster.kubectl(&["delete", "namespace", &namespace, "--wait=true", "--timeout=60s"]);
    cluster.kubectl_ok(&["create", "namespace", &namespace]);
    let mut role = cluster.kubectl_json(&["get", "role", "oats-backend-api-job-manager", "-n", cluster::NAMESPACE]);
    role["metadata"] = json!({"name": "oats-backend-api-job-manager", "namespace": namespace});
    apply_yaml(cluster, &role.to_string());
    cluster.kubectl_ok(&[
        "create",
        "rolebinding",
        "oats-backend-api-job-manager",
        "-n",
        &namespace,
        "--role=oats-backend-api-job-manager",
        &format!("--serviceaccount={}:oats-backend-api", cluster::NAMESPACE),
    ]);
    apply_yaml(
        cluster,
        &format!(
            "apiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: two-jobs, namespace: {namespace}}}\n\
             spec: {{hard: {{count/jobs.batch: \"2\"}}}}\n"
        ),
    );
    // The quota controller fills in the usage before the quota admits anything.
    let deadline = std::time::Instant::now() + SOON;
    while cluster
        .kubectl_ok(&["get", "resourcequota", "two-jobs", "-n", &namespace, "-o", "jsonpath={.status.used}"])
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "the quota's usage was never computed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats_with(dir.path(), &[("OATS_NAMESPACE", namespace.as_str())]).await;
    let body = |i: u32| json!({"goal": format!("job {i}"), "max_turns": 1, "labels": {"kwok.oats.dev/outcome": "run"}});
    let (_, dry) = dry_run(&server, &body(0)).await;
    assert_eq!(dry["allowed"], true, "{dry}");
    for i in 0..2 {
        assert_eq!(server.submit(body(i)).await.status(), StatusCode::CREATED);
    }

    // The dry run predicts the refusal; the submission is a 429 with Retry-After, not a 500.
    let (status, dry) = dry_run(&server, &body(2)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(dry["allowed"], false, "{dry}");
    let quota = verdict(&dry, "quota-exhausted");
    assert!(quota["allowed"] == false && quota["detail"].as_str().unwrap().contains("exceeded quota"), "{dry}");
    let response = server.submit(body(2)).await;
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let problem = assert_problem(response, 429, "quota-exhausted").await;
    assert!(problem["detail"].as_str().unwrap().contains("two-jobs"), "the quota is named: {problem}");
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("oats_kube_quota_refusals_total 1"), "{metrics}");
    assert!(metrics.contains(r#"oats_job_submissions_total{outcome="rejected"} 1"#), "{metrics}");
    let jobs = cluster.kubectl_json(&["get", "jobs", "-n", &namespace]);
    assert_eq!(jobs["items"].as_array().unwrap().len(), 2);
    drop(server);
    cluster.kubectl_ok(&["delete", "namespace", &namespace, "--wait=false"]);
}

#[tokio::test]
async fn a_finished_job_keeps_its_outcome_and_cancelling_it_is_409() {
    let cluster = cluster::cluster();
    let run = cluster::unique("finished");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let labels = |outcome: &str| json!({"e2e": run, "kwok.oats.dev/outcome": outcome, "kwok.oats.dev/run-ms": "200", "kwok.oats.dev/exit-code": "3"});
    let failing = id_of(&submit(&server, "Fail fast", labels("fail"), None).await);
    let succeeding = id_of(&submit(&server, "Succeed fast", labels("succeed"), None).await);
    let failed = server.wait_for(&failing, "failed", SOON).await;
    server.wait_for(&succeeding, "succeeded", SOON).await;

    for (id, phase) in [(&failing, "failed"), (&succeeding, "succeeded")] {
        let response = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
        let problem = assert_problem(response, 409, "job-finished").await;
        assert!(problem["detail"].as_str().unwrap().contains(phase), "{problem}");
        let stored = cluster.kubectl_json(&["get", "job", id, "-n", cluster::NAMESPACE]);
        assert!(stored["metadata"]["annotations"].get(render::CANCELLED_AT_ANNOTATION).is_none(), "{stored}");
        assert_eq!(server.job(id).await["status"], phase);
    }

    // A cancellation written after the failure (by a replica that cancelled without a
    // precondition, or by hand) does not rewrite the outcome. "After": once the Job controller
    // has recorded the failure on the Job (OATS may report it earlier, from the pod), and in a
    // later second.
    let deadline = std::time::Instant::now() + SOON;
    let failed_at: DateTime<Utc> = loop {
        let stored = cluster.kubectl_json(&["get", "job", &failing, "-n", cluster::NAMESPACE]);
        let conditions = stored["status"]["conditions"].as_array().cloned().unwrap_or_default();
        if let Some(failure) = conditions.iter().find(|c| c["type"] == "Failed" && c["status"] == "True") {
            break failure["lastTransitionTime"].as_str().unwrap().parse().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "the Job controller never recorded the failure: {stored}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    while Utc::now() < failed_at + chrono::Duration::seconds(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = format!(
        "{}={}",
        render::CANCELLED_AT_ANNOTATION,
        Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    );
    cluster.kubectl_ok(&["annotate", "job", &failing, "-n", cluster::NAMESPACE, &late]);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let job = server.job(&failing).await;
        assert_eq!(
            (job["status"].clone(), job["reason"].clone()),
            (failed["status"].clone(), failed["reason"].clone()),
            "{job}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn two_replicas_sharing_postgresql_never_spend_past_a_jobs_budget() {
    let cluster = cluster::cluster();
    let run = cluster::unique("budget");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let fake = common::fake_llm::FakeLlm::start().await;
    for _ in 0..50 {
        fake.push(common::fake_llm::Reply::text("x", 60, 90));
    }
    let providers = providers_file(dir.path(), &fake);
    let database = common::stores::postgres_url();
    let mut replicas = Vec::new();
    let mut gateways = Vec::new();
    for name in ["a", "b"] {
        let state = dir.path().join(name);
        let extra = [
            ("OATS_LLM_PROVIDERS_FILE", providers.to_str().unwrap()),
            ("OATS_STATE_DIR", state.to_str().unwrap()),
            ("OATS_DATABASE_URL", database.as_str()),
        ];
        let replica = cluster.start_oats_with(&dir.path().join(name), &extra).await;
        gateways.push(format!("{}/chat/completions", replica.gateway_url()));
        replicas.push(replica);
    }
    // About 200 tokens are reserved per call (its body bounds the input, max_tokens the output):
    // a budget of 2,000 fits about 10 of the 50.
    let body = json!({"goal": "Spend", "max_turns": 100, "budget": {"max_tokens": 2000},
        "labels": {"e2e": run, "kwok.oats.dev/outcome": "run"}, "timeout_seconds": 600});
    let response = replicas[0].submit(body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = id_of(&response.json().await.unwrap());
    for replica in &replicas {
        replica.wait_for(&id, "running", SOON).await;
    }
    let selector = format!("oats.dev/job-id={id}");
    let pod = cluster.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        cluster::NAMESPACE,
        "-l",
        &selector,
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let token = cluster
        .kubectl_ok(&[
            "create",
            "token",
            "oats-agent",
            "-n",
            cluster::NAMESPACE,
            "--duration=10m",
            "--audience",
            "oats-llm",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod,
        ])
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let calls = (0..50).map(|i| {
        let (http, url, token) = (http.clone(), gateways[i % 2].clone(), token.clone());
        let ask = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100});
        tokio::spawn(async move {
            let response = http.post(url).bearer_auth(token).json(&ask).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap_or(Value::Null))
        })
    });
    let mut answered = 0;
    for call in futures::future::join_all(calls).await {
        let (status, body) = call.unwrap();
        match status {
            StatusCode::OK => answered += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                let code = body["error"]["code"].as_str().unwrap_or_default().to_owned();
                assert!(["insufficient_quota", "too_many_calls_in_flight"].contains(&code.as_str()), "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    for replica in &replicas {
        let usage = replica.job(&id).await["usage"].clone();
        let charged = usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap();
        assert!(charged <= 2000, "charged {charged} against a budget of 2000 ({usage})");
        assert_eq!(usage["model_calls"], answered, "both replicas read one ledger");
        let reported = fake.reported_usage();
        assert_eq!(charged, reported.prompt_tokens + reported.completion_tokens, "usage is what the upstream reported");
    }
    // At most 4 calls of a job are in flight at once (the default max_in_flight_calls), so how
    // many of the 50 get through depends on timing; the budget must hold whatever it is.
    assert!(answered >= 1, "no call was answered");
}

#[tokio::test]
async fn a_burst_of_50_parallel_submissions_gets_exactly_max_concurrent_jobs() {
    let cluster = cluster::cluster();
    let run = cluster::unique("burst");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  max_concurrent_jobs: 2\n").unwrap();
    // A tenant of its own (it becomes a label), so no other test's jobs count against it.
    let env = [("OATS_POLICY_FILE", policy.to_str().unwrap()), ("OATS_TENANT", run.as_str())];
    let server = cluster.start_oats_with(dir.path(), &env).await;
    let body = |i: u32| json!({"goal": format!("burst {i}"), "max_turns": 1, "labels": {"e2e": run, "kwok.oats.dev/outcome": "run"}});
    // 50 submissions at once, each on its own connection: the watch delivers none of the
    // created Jobs before the others are judged.
    let submissions = (0..50).map(|i| reqwest::Client::new().post(server.url("/api/v1/jobs")).json(&body(i)).send());
    let mut created = Vec::new();
    for response in futures::future::join_all(submissions).await {
        let response = response.unwrap();
        if response.status() == StatusCode::CREATED {
            created.push(id_of(&response.json().await.unwrap()));
            continue;
        }
        let problem = assert_problem(response, 429, "policy/max-concurrent-jobs").await;
        assert!(problem["detail"].as_str().unwrap().contains("the limit is 2"), "{problem}");
    }
    assert_eq!(created.len(), 2, "exactly the limit is accepted");
    assert_eq!(cluster.jobs_labelled(&format!("e2e={run}")).len(), 2);
    // Once the watch has delivered them (running: their pods came through the watch too), they
    // are counted once, not twice.
    for id in &created {
        server.wait_for(id, "running", SOON).await;
    }
    let (_, page) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    let response = server.submit(body(50)).await;
    assert_problem(response, 429, "policy/max-concurrent-jobs").await;
}

#[tokio::test]
async fn finished_jobs_count_against_max_kept_jobs_until_their_ttl_removes_them() {
    let cluster = cluster::cluster();
    let run = cluster::unique("kept");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  max_concurrent_jobs: 10\n  max_kept_jobs: 2\n").unwrap();
    // A tenant of its own (it becomes a label), whose finished Jobs the TTL controller removes
    // 20 s after they finish.
    let env = [
        ("OATS_POLICY_FILE", policy.to_str().unwrap()),
        ("OATS_TENANT", run.as_str()),
        ("OATS_TTL_SECONDS_AFTER_FINISHED", "20"),
    ];
    let server = cluster.start_oats_with(dir.path(), &env).await;
    let labels = |outcome: &str| json!({"e2e": run, "kwok.oats.dev/outcome": outcome, "kwok.oats.dev/run-ms": "200"});
    let finished = id_of(&submit(&server, "Finish fast", labels("succeed"), None).await);
    server.wait_for(&finished, "succeeded", SOON).await;
    let running = id_of(&submit(&server, "Keep running", labels("run"), None).await);

    // One Job running, one finished and kept until its TTL: the tenant holds two Jobs of the
    // namespace, its limit, though only one of its jobs is unfinished.
    let body = json!({"goal": "One too many", "max_turns": 1, "labels": labels("run")});
    let (status, dry) = dry_run(&server, &body).await;
    assert_eq!((status, dry["allowed"].clone()), (StatusCode::ACCEPTED, json!(false)), "{dry}");
    assert_eq!(verdict(&dry, "max-concurrent-jobs")["allowed"], true, "{dry}");
    let kept = verdict(&dry, "max-kept-jobs");
    assert!(kept["allowed"] == false && kept["detail"].as_str().unwrap().contains("the limit is 2"), "{dry}");
    let response = server.submit(body.clone()).await;
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let problem = assert_problem(response, 429, "policy/max-kept-jobs").await;
    assert!(problem["detail"].as_str().unwrap().contains("holds 2 jobs"), "{problem}");
    assert_eq!(cluster.jobs_labelled(&format!("e2e={run}")).len(), 2);
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"oats_policy_denials_total{rule="max-kept-jobs"} 1"#), "{metrics}");

    // The TTL controller removes the finished Job, the watch delivers the delete: room again.
    let deadline = std::time::Instant::now() + SOON;
    let accepted = loop {
        let response = server.submit(body.clone()).await;
        if response.status() == StatusCode::CREATED {
            break response.json::<Value>().await.unwrap();
        }
        assert_problem(response, 429, "policy/max-kept-jobs").await;
        assert!(std::time::Instant::now() < deadline, "the finished Job was never removed by its TTL");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let left: HashSet<String> = cluster
        .jobs_labelled(&format!("e2e={run}"))
        .iter()
        .map(|j| j["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, HashSet::from([running, id_of(&accepted)]), "the TTL removed {finished} only");
}

/// `oats_kube_requests_total` by (verb, resource), summed over status codes.
async fn kube_call_counts(server: &Server) -> std::collections::HashMap<(String, String), f64> {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\"")).map(|i| i + name.len() + 2)?;
        Some(line[start..].split('"').next()?.to_owned())
    };
    let mut counts = std::collections::HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("oats_kube_requests_total{")) {
        let (Some(verb), Some(resource)) = (label(line, "verb"), label(line, "resource")) else { continue };
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *counts.entry((verb, resource)).or_default() += value;
    }
    counts
}

fn count(counts: &std::collections::HashMap<(String, String), f64>, verb: &str, resource: &str) -> f64 {
    counts.get(&(verb.to_owned(), resource.to_owned())).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn unknown_job_ids_never_reach_the_api_server_and_events_are_listed_at_most_every_few_seconds() {
    let cluster = cluster::cluster();
    let run = cluster::unique("reads");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await; // ready: the caches have synced
    let before = kube_call_counts(&server).await;
    for i in 0..20 {
        // Well-formed ids (20 of a-z, 2-7) that name no job.
        let id = format!("job-zz{}", ((b'a' + i as u8) as char).to_string().repeat(18));
        for path in
            [format!("/api/v1/jobs/{id}"), format!("/api/v1/jobs/{id}/events"), format!("/api/v1/jobs/{id}/logs")]
        {
            let response = server.http.get(server.url(&path)).send().await.unwrap();
            assert_problem(response, 404, "not-found").await;
        }
        let response = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
        assert_problem(response, 404, "not-found").await;
    }
    let after = kube_call_counts(&server).await;
    for (verb, resource) in [("get", "jobs"), ("list", "events"), ("get", "pods/log")] {
        assert_eq!(
            count(&before, verb, resource),
            count(&after, verb, resource),
            "{verb} {resource}: 80 requests for unknown jobs reached the API server"
        );
    }

    // A job's events: one listing (the Job's and its pod's) answers every request for a while.
    let id = id_of(&submit(&server, "Eventful", json!({"e2e": run, "kwok.oats.dev/outcome": "run"}), None).await);
    server.wait_for(&id, "running", SOON).await;
    let events = format!("/api/v1/jobs/{id}/events");
    let before = count(&kube_call_counts(&server).await, "list", "events");
    let started = std::time::Instant::now();
    let parallel = (0..20).map(|_| server.http.get(server.url(&events)).send());
    for response in futures::future::join_all(parallel).await {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }
    for _ in 0..30 {
        let (status, _) = server.get_json(&events).await;
        assert_eq!(status, StatusCode::OK);
    }
    let listed = count(&kube_call_counts(&server).await, "list", "events") - before;
    assert!(started.elapsed() < Duration::from_secs(5), "the 50 requests took {:?}", started.elapsed());
    assert!((1.0..=2.0).contains(&listed), "50 events requests made {listed} LIST calls");
    // Once the cached listing expires (5 s), a request lists them again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = server.get_json(&events).await;
        assert_eq!(status, StatusCode::OK);
        if count(&kube_call_counts(&server).await, "list", "events") - before > listed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the events were never listed again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn finished_jobs_outlive_their_kubernetes_job_in_a_history_two_replicas_share() {
    let namespace = cluster::TestNamespace::create(cluster::cluster(), "history");
    let run = cluster::unique("history");
    let dir = tempfile::tempdir().unwrap();
    let database = common::stores::postgres_url();
    // Two replicas of one tenant sharing PostgreSQL; the TTL controller removes finished Jobs
    // 3 s after they finish.
    let env = [
        ("OATS_TENANT", run.as_str()),
        ("OATS_TTL_SECONDS_AFTER_FINISHED", "3"),
        ("OATS_RETENTION_DAYS", "30"),
        ("OATS_DATABASE_URL", database.as_str()),
    ];
    let a = namespace.start_oats(&dir.path().join("a"), &env).await;
    let b = namespace.start_oats(&dir.path().join("b"), &env).await;
    let finished = id_of(
        &submit(
            &a,
            "Archive me",
            json!({"e2e": run, "kwok.oats.dev/outcome": "succeed", "kwok.oats.dev/run-ms": "200"}),
            None,
        )
        .await,
    );
    let deleted =
        id_of(&submit(&a, "Deleted by hand", json!({"e2e": run, "kwok.oats.dev/outcome": "run"}), None).await);
    let live = a.wait_for(&finished, "succeeded", SOON).await;
    b.wait_for(&deleted, "running", SOON).await;
    namespace.cluster.kubectl_ok(&["delete", "job", &deleted, "-n", &namespace.name, "--wait=false"]);

    let deadline = std::time::Instant::now() + SOON;
    while !namespace.jobs().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the TTL controller never removed the finished Job");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Each job was archived by one replica: the claims let exactly one of the two collect it.
    let archived = async |server: &Server| -> f64 {
        let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("oats_archive_archived_total ")).unwrap().parse().unwrap()
    };
    let total = eventually(SOON, async || {
        let total = archived(&a).await + archived(&b).await;
        (total >= 2.0, total)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a second archive would happen within a tick
    assert_eq!(archived(&a).await + archived(&b).await, total);
    assert_eq!(total, 2.0, "two jobs, each archived once across both replicas");
    for server in [&a, &b] {
        let kept = server.job(&finished).await;
        for field in ["id", "status", "reason", "goal", "labels", "created_at", "started_at", "result", "max_turns"] {
            assert_eq!(kept[field], live[field], "{field}: the finished job reads as it did while its Job existed");
        }
        assert!(kept["finished_at"].is_string(), "{kept}");
        let (status, events) = server.get_json(&format!("/api/v1/jobs/{finished}/events")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!events["items"].as_array().unwrap().is_empty(), "its events were kept: {events}");
        let logs = server.http.get(server.url(&format!("/api/v1/jobs/{finished}/logs"))).send().await.unwrap();
        assert_eq!(logs.status(), StatusCode::OK);

        let gone = server.job(&deleted).await;
        assert_eq!((gone["status"].as_str(), gone["reason"].as_str()), (Some("failed"), Some("Deleted")), "{gone}");
        let (status, page) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}")).await;
        assert_eq!(status, StatusCode::OK);
        let listed: Vec<&str> = page["items"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
        assert_eq!(listed, [deleted.as_str(), finished.as_str()], "newest first, both from the history");
    }
}

/// One line of a container log file in the CRI format kwok reads (as a kubelet does):
/// `<RFC 3339 time> <stream> F <text>`.
fn cri_line(at: DateTime<Utc>, stream: &str, text: &str) -> String {
    format!("{} {stream} F {text}\n", stamp(at))
}

/// A time as the kubelet (and kwok) print it with `timestamps`: nanoseconds, always 9 digits.
fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// The name of the pod of a job.
fn agent_pod(namespace: &cluster::TestNamespace, id: &str) -> String {
    let pods = namespace.cluster.kubectl_json(&["get", "pods", "-n", &namespace.name, "-l", &format!("job-name={id}")]);
    let pods = pods["items"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "one pod for job {id}");
    pods[0]["metadata"]["name"].as_str().unwrap().to_owned()
}

/// A kwok `Logs` object: kwok's server answers the pod's agent logs from `file`.
fn serve_logs(namespace: &cluster::TestNamespace, pod: &str, file: &std::path::Path) {
    let node = namespace.cluster.kubectl_json(&["get", "node", "kwok-node-0"]);
    assert!(
        node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64().unwrap_or(0) > 0,
        "kwok serves no logs on this control plane (started by an older testenv.sh): \
         run testenv/testenv.sh down && testenv/testenv.sh up"
    );
    let manifest = file.with_extension("logs.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Logs\nmetadata:\n  name: {pod}\n  namespace: {}\n\
             spec:\n  logs:\n  - containers: [agent]\n    logsFile: {}\n",
            namespace.name,
            file.display()
        ),
    )
    .unwrap();
    namespace.cluster.kubectl_ok(&["apply", "-f", &manifest.display().to_string()]);
}

/// GET the job's logs with a query; the status and the body.
async fn logs_of(server: &Server, id: &str, query: &str) -> (StatusCode, String) {
    let response = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs{query}"))).send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// The job's logs once they are `expected` (kwok sees a new Logs object through a watch).
async fn logs_become(server: &Server, id: &str, expected: &str) {
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let (status, body) = logs_of(server, id, "").await;
        if status == StatusCode::OK && body == expected {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the logs never became {expected:?}: {status} {body:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn logs_of_a_running_job_come_from_its_pod_with_tail_since_and_timestamps() {
    let namespace = cluster::TestNamespace::create(cluster::cluster(), "logs");
    let dir = tempfile::tempdir().unwrap();
    let server = namespace.start_oats(&dir.path().join("oats"), &[]).await;
    let id = id_of(&submit(&server, "Talk", json!({"kwok.oats.dev/outcome": "run"}), None).await);
    server.wait_for(&id, "running", SOON).await;

    // Two lines from an hour ago, then three from the last seconds, one of them on stderr.
    let now = Utc::now();
    let lines = [
        (now - chrono::Duration::hours(1), "stdout", "an hour ago"),
        (now - chrono::Duration::minutes(59), "stdout", "still long ago"),
        (now - chrono::Duration::seconds(5), "stdout", "recent"),
        (now - chrono::Duration::seconds(4), "stderr", "a warning"),
        (now - chrono::Duration::seconds(3), "stdout", "the last line"),
    ];
    let file = dir.path().join("agent.log");
    std::fs::write(&file, lines.iter().map(|(at, stream, text)| cri_line(*at, stream, text)).collect::<String>())
        .unwrap();
    serve_logs(&namespace, &agent_pod(&namespace, &id), &file);

    let all: String = lines.iter().map(|(_, _, text)| format!("{text}\n")).collect();
    logs_become(&server, &id, &all).await;
    let stamped = |from: usize| -> String {
        lines[from..].iter().map(|(at, _, text)| format!("{} {text}\n", stamp(*at))).collect()
    };
    for (query, expected) in [
        ("?tail_lines=2", "a warning\nthe last line\n".to_owned()),
        ("?since_seconds=600", "recent\na warning\nthe last line\n".to_owned()),
        ("?timestamps=true", stamped(0)),
        ("?tail_lines=1&timestamps=true", stamped(4)),
        ("?since_seconds=600&tail_lines=1", "the last line\n".to_owned()),
    ] {
        assert_eq!(logs_of(&server, &id, query).await, (StatusCode::OK, expected), "{query}");
    }
}

#[tokio::test]
async fn logs_followed_stream_a_growing_file_and_end_when_the_pod_ends() {
    let namespace = cluster::TestNamespace::create(cluster::cluster(), "logs-follow");
    let dir = tempfile::tempdir().unwrap();
    let server = namespace.start_oats(&dir.path().join("oats"), &[]).await;
    // The pod succeeds 20 s after it started: time to follow two lines first.
    let labels = json!({"kwok.oats.dev/outcome": "succeed", "kwok.oats.dev/run-ms": "20000"});
    let id = id_of(&submit(&server, "Talk slowly", labels, None).await);
    server.wait_for(&id, "running", SOON).await;
    let pod = agent_pod(&namespace, &id);
    let file = dir.path().join("agent.log");
    std::fs::write(&file, cri_line(Utc::now(), "stdout", "first")).unwrap();
    serve_logs(&namespace, &pod, &file);
    logs_become(&server, &id, "first\n").await;

    // A client of its own: the shared one gives up on any request after 30 s.
    let follower = reqwest::Client::new();
    let mut response = follower.get(server.url(&format!("/api/v1/jobs/{id}/logs?follow=true"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = String::new();
    let mut read_until = async |expected: &str| {
        while received != expected {
            let chunk = tokio::time::timeout(SOON, response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no more output within {SOON:?}; got {received:?}, want {expected:?}"))
                .unwrap();
            let Some(chunk) = chunk else { return false };
            received.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        true
    };
    assert!(read_until("first\n").await, "the stream ended before the first line");
    let mut log = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    std::io::Write::write_all(&mut log, cri_line(Utc::now(), "stdout", "second").as_bytes()).unwrap();
    assert!(read_until("first\nsecond\n").await, "the stream ended before the appended line");
    let phase =
        namespace.cluster.kubectl_ok(&["get", "pod", &pod, "-n", &namespace.name, "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Running", "both lines were followed while the pod ran");

    // The stream ends once the pod has ended, with nothing more.
    assert!(!read_until("first\nsecond\nnever sent").await, "the stream ends");
    assert_eq!(received, "first\nsecond\n");
    let phase =
        namespace.cluster.kubectl_ok(&["get", "pod", &pod, "-n", &namespace.name, "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Succeeded", "the stream ended when the pod did");
    // Following a job whose pod has ended gives its output and ends.
    let again = tokio::time::timeout(SOON, async {
        follower.get(server.url(&format!("/api/v1/jobs/{id}/logs?follow=true"))).send().await.unwrap().text().await
    })
    .await
    .expect("following an ended pod ends");
    assert_eq!(again.unwrap(), "first\nsecond\n");
}

#[tokio::test]
async fn logs_of_a_finished_job_read_the_same_from_the_history_after_its_kubernetes_job_is_gone() {
    let namespace = cluster::TestNamespace::create(cluster::cluster(), "logs-history");
    let run = cluster::unique("logs-history");
    let dir = tempfile::tempdir().unwrap();
    let database = common::stores::postgres_url();
    let env = [
        ("OATS_TENANT", run.as_str()),
        ("OATS_TTL_SECONDS_AFTER_FINISHED", "20"),
        ("OATS_RETENTION_DAYS", "30"),
        ("OATS_DATABASE_URL", database.as_str()),
    ];
    let server = namespace.start_oats(&dir.path().join("oats"), &env).await;
    // The pod succeeds 10 s after it started: time to give it its logs first.
    let labels = json!({"kwok.oats.dev/outcome": "succeed", "kwok.oats.dev/run-ms": "10000"});
    let id = id_of(&submit(&server, "Leave a trace", labels, None).await);
    server.wait_for(&id, "running", SOON).await;
    let now = Utc::now();
    let lines = [
        (now - chrono::Duration::hours(2), "stdout", "long ago"),
        (now - chrono::Duration::seconds(2), "stderr", "a warning"),
        (now - chrono::Duration::seconds(1), "stdout", "the result"),
    ];
    let file = dir.path().join("agent.log");
    std::fs::write(&file, lines.iter().map(|(at, stream, text)| cri_line(*at, stream, text)).collect::<String>())
        .unwrap();
    serve_logs(&namespace, &agent_pod(&namespace, &id), &file);
    logs_become(&server, &id, "long ago\na warning\nthe result\n").await;
    server.wait_for(&id, "succeeded", SOON).await;

    let queries = ["", "?timestamps=true", "?tail_lines=1", "?since_seconds=3600&timestamps=true"];
    let mut before = Vec::new();
    for query in queries {
        before.push(logs_of(&server, &id, query).await);
    }
    assert!(
        namespace.cluster.kubectl(&["get", "job", &id, "-n", &namespace.name]).status.success(),
        "the first reads were of the live job (the Job still existed after them)"
    );
    assert_eq!(before[0], (StatusCode::OK, "long ago\na warning\nthe result\n".to_owned()));
    assert_eq!(before[2], (StatusCode::OK, "the result\n".to_owned()));

    let deadline = std::time::Instant::now() + SOON;
    while !namespace.jobs().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the TTL controller never removed the finished Job");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (query, before) in queries.into_iter().zip(before) {
        assert_eq!(logs_of(&server, &id, query).await, before, "{query}: the archived logs read as the live ones did");
    }
}

/// Kueue objects of one test (cluster-scoped ones named after it), deleted on drop.
struct KueueQueues {
    namespace: cluster::TestNamespace,
    local_queue: String,
    cluster_scoped: Vec<(&'static str, String)>,
}

impl KueueQueues {
    /// A ResourceFlavor, a ClusterQueue admitting `cpus` agents (1 CPU each) from the test's
    /// namespace, preempting lower priorities within it, a LocalQueue, and the priority classes
    /// `<name>-low` (100) and `<name>-high` (1000).
    fn create(prefix: &str, cpus: u32) -> Self {
        let namespace = cluster::TestNamespace::create(cluster::cluster(), prefix);
        let name = namespace.name.clone();
        let manifests = format!(
            r#"
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: {name}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {{name: {name}}}
spec:
  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {name}}}}}
  preemption: {{withinClusterQueue: LowerPriority}}
  resourceGroups:
    - coveredResources: [cpu, memory, ephemeral-storage]
      flavors:
        - name: {name}
          resources:
            - {{name: cpu, nominalQuota: "{cpus}"}}
            - {{name: memory, nominalQuota: 100Gi}}
            - {{name: ephemeral-storage, nominalQuota: 100Gi}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {{name: {name}, namespace: {name}}}
spec: {{clusterQueue: {name}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata: {{name: {name}-low}}
value: 100
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata: {{name: {name}-high}}
value: 1000
"#
        );
        let file = std::env::temp_dir().join(format!("{name}-kueue.yaml"));
        std::fs::write(&file, manifests).unwrap();
        namespace.cluster.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
        let cluster_scoped = vec![
            ("clusterqueue", name.clone()),
            ("resourceflavor", name.clone()),
            ("workloadpriorityclass", format!("{name}-low")),
            ("workloadpriorityclass", format!("{name}-high")),
        ];
        Self { local_queue: name, namespace, cluster_scoped }
    }

    /// OATS with queueing on, its agents requesting 1 CPU, jobs in this queue; history on (a
    /// cancelled queued Job is deleted and answered from it).
    async fn start_oats(&self, dir: &std::path::Path, policy: &str, tenant: &str) -> Server {
        let database = common::stores::postgres_url();
        let policy_file = dir.join("policy.yaml");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(&policy_file, policy).unwrap();
        let env = [
            ("OATS_QUEUEING", "kueue"),
            ("OATS_KUEUE_DEFAULT_QUEUE", self.local_queue.as_str()),
            ("OATS_AGENT_CPU_REQUEST", "1"),
            ("OATS_AGENT_CPU_LIMIT", "1"),
            ("OATS_POLICY_FILE", policy_file.to_str().unwrap()),
            ("OATS_TENANT", tenant),
            ("OATS_RETENTION_DAYS", "30"),
            ("OATS_DATABASE_URL", database.as_str()),
        ];
        self.namespace.start_oats(dir, &env).await
    }

    /// The unfinished Jobs of the namespace that Kueue let start (not suspended).
    fn admitted(&self) -> usize {
        let finished = |j: &Value| {
            j["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
        };
        self.namespace.jobs().iter().filter(|j| j["spec"]["suspend"] != json!(true) && !finished(j)).count()
    }
}

impl Drop for KueueQueues {
    fn drop(&mut self) {
        let _ =
            self.namespace.cluster.kubectl(&["delete", "jobs", "--all", "-n", &self.namespace.name, "--wait=false"]);
        let _ = self.namespace.cluster.kubectl(&[
            "delete",
            "localqueue",
            &self.local_queue,
            "-n",
            &self.namespace.name,
            "--wait=false",
        ]);
        for (kind, name) in &self.cluster_scoped {
            let _ = self.namespace.cluster.kubectl(&["delete", kind, name, "--wait=false"]);
        }
    }
}

/// Poll `check` until it holds (or fail with what it last saw).
async fn eventually<T: std::fmt::Debug>(within: Duration, mut check: impl AsyncFnMut() -> (bool, T)) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (done, seen) = check().await;
        if done {
            return seen;
        }
        assert!(std::time::Instant::now() < deadline, "not reached within {within:?}; last seen: {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Each job's (status, reason, queue position), by id.
async fn queue_states(server: &Server, ids: &[String]) -> Vec<(String, String, Option<u64>)> {
    let mut states = Vec::new();
    for id in ids {
        let job = server.job(id).await;
        states.push((
            job["status"].as_str().unwrap().to_owned(),
            job["reason"].as_str().unwrap_or_default().to_owned(),
            job["queue"]["position"].as_u64(),
        ));
    }
    states
}

#[tokio::test]
async fn with_kueue_a_tenant_with_quota_for_two_runs_two_and_the_rest_wait_with_their_place() {
    let queues = KueueQueues::create("kueue-fifo", 2);
    let dir = tempfile::tempdir().unwrap();
    let server = queues.start_oats(dir.path(), "defaults: {}\n", "fifo").await;
    let labels =
        |outcome: &str, run_ms: &str| json!({"kwok.oats.dev/outcome": outcome, "kwok.oats.dev/run-ms": run_ms});
    let mut ids = vec![id_of(&submit(&server, "Finishes first", labels("succeed", "6000"), None).await)];
    for goal in ["second", "third", "fourth", "fifth"] {
        ids.push(id_of(&submit(&server, goal, labels("run", "1000"), None).await));
    }
    // Two run; three are queued with places 1, 2 and 3 (Kueue orders jobs created in the same
    // second by its own tie-break, so the places are compared as a set).
    let states = eventually(SOON, async || {
        let states = queue_states(&server, &ids).await;
        let running = states.iter().filter(|s| s.0 == "running").count();
        let mut places: Vec<u64> = states.iter().filter_map(|s| s.2).collect();
        places.sort_unstable();
        (running == 2 && places == [1, 2, 3], states)
    })
    .await;
    assert_eq!(states[0].0, "running", "the first job was admitted first: {states:?}");
    assert!(states.iter().filter(|s| s.0 == "pending").all(|s| s.1 == "Queued"), "{states:?}");
    assert_eq!(queues.admitted(), 2, "Kueue admitted two Jobs");
    let job = server.job(&ids[4]).await;
    assert_eq!(job["queue"]["name"], queues.local_queue.as_str(), "{job}");
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let waiting = format!("oats_queue_jobs{{queue=\"{}\"}} 3", queues.local_queue);
    assert!(metrics.contains(&waiting), "{waiting} in\n{metrics}");

    // The first finishes: the next is admitted and the places move up.
    server.wait_for(&ids[0], "succeeded", SOON).await;
    let states = eventually(SOON, async || {
        let states = queue_states(&server, &ids[1..]).await;
        let running = states.iter().filter(|s| s.0 == "running").count();
        let mut places: Vec<u64> = states.iter().filter_map(|s| s.2).collect();
        places.sort_unstable();
        (running == 2 && places == [1, 2], states)
    })
    .await;

    // A queued job is cancelled: it leaves the queue (its Job is deleted) and stays readable.
    let queued = ids[1..].iter().zip(&states).find(|(_, s)| s.2 == Some(2)).map(|(id, _)| id.clone()).unwrap();
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{queued}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    let cancelled = eventually(SOON, async || {
        let (status, job) = server.get_json(&format!("/api/v1/jobs/{queued}")).await;
        (
            status == StatusCode::OK
                && job["status"] == "cancelled"
                && !queues.namespace.jobs().iter().any(|j| j["metadata"]["name"] == queued.as_str()),
            job,
        )
    })
    .await;
    assert!(cancelled.get("queue").is_none(), "{cancelled}");
    let last = ids[1..].iter().zip(&states).find(|(_, s)| s.2 == Some(1)).map(|(id, _)| id.clone()).unwrap();
    eventually(SOON, async || {
        let job = server.job(&last).await;
        (job["queue"]["position"] == 1, job)
    })
    .await;
    assert_eq!(queues.admitted(), 2, "still two running");
}

#[tokio::test]
async fn with_kueue_two_replicas_submitting_at_once_never_run_more_than_the_quota() {
    let queues = KueueQueues::create("kueue-two", 2);
    let dir = tempfile::tempdir().unwrap();
    let a = queues.start_oats(&dir.path().join("a"), "defaults: {}\n", "two").await;
    let b = queues.start_oats(&dir.path().join("b"), "defaults: {}\n", "two").await;
    let labels = json!({"kwok.oats.dev/outcome": "run"});
    let submissions = (0..8).map(|i| {
        let server = if i % 2 == 0 { &a } else { &b };
        submit(server, "in parallel", labels.clone(), None)
    });
    let ids: Vec<String> = futures::future::join_all(submissions).await.iter().map(id_of).collect();
    // Two admitted (their pods start), six waiting with a place; an admitted job may still show
    // its last queued state until the queue view's next poll, so wait for both to settle.
    eventually(SOON, async || {
        let states = queue_states(&a, &ids).await;
        let queued = states.iter().filter(|s| s.1 == "Queued" && s.2.is_some()).count();
        let started = states.iter().filter(|s| s.0 == "running" || s.0 == "pending" && s.1.is_empty()).count();
        (queued == 6 && started == 2, states)
    })
    .await;
    for _ in 0..8 {
        assert!(queues.admitted() <= 2, "more Jobs than the quota started");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(queue_states(&b, &ids).await.iter().filter(|s| s.1 == "Queued").count(), 6, "both replicas agree");
}

#[tokio::test]
async fn with_kueue_a_higher_priority_job_preempts_a_lower_one_which_waits_again() {
    let queues = KueueQueues::create("kueue-prio", 1);
    let dir = tempfile::tempdir().unwrap();
    let name = &queues.local_queue;
    let batch = queues
        .start_oats(&dir.path().join("batch"), &format!("defaults: {{priority_class: {name}-low}}\n"), "batch")
        .await;
    let urgent = queues
        .start_oats(&dir.path().join("urgent"), &format!("defaults: {{priority_class: {name}-high}}\n"), "urgent")
        .await;
    let low = id_of(&submit(&batch, "Batch work", json!({"kwok.oats.dev/outcome": "run"}), None).await);
    batch.wait_for(&low, "running", SOON).await;
    let high = id_of(&submit(&urgent, "Urgent work", json!({"kwok.oats.dev/outcome": "run"}), None).await);
    urgent.wait_for(&high, "running", SOON).await;
    let preempted = eventually(SOON, async || {
        let job = batch.job(&low).await;
        (job["status"] == "pending" && job["reason"] == "Preempted", job)
    })
    .await;
    assert_eq!(preempted["queue"]["name"], name.as_str(), "{preempted}");
    assert!(preempted["message"].as_str().unwrap().contains("make room"), "{preempted}");
    assert_eq!(queues.admitted(), 1);
}

#[tokio::test]
async fn with_kueue_a_tenant_that_fails_preempted_jobs_sees_them_failed_not_requeued() {
    let queues = KueueQueues::create("kueue-fail", 1);
    let dir = tempfile::tempdir().unwrap();
    let name = &queues.local_queue;
    let policy = format!("defaults: {{priority_class: {name}-low, on_preemption: fail}}\n");
    let batch = queues.start_oats(&dir.path().join("batch"), &policy, "batch").await;
    let urgent = queues
        .start_oats(&dir.path().join("urgent"), &format!("defaults: {{priority_class: {name}-high}}\n"), "urgent")
        .await;
    let low = id_of(&submit(&batch, "Must not run twice", json!({"kwok.oats.dev/outcome": "run"}), None).await);
    batch.wait_for(&low, "running", SOON).await;
    let high = id_of(&submit(&urgent, "Urgent work", json!({"kwok.oats.dev/outcome": "run"}), None).await);
    let failed = batch.wait_for(&low, "failed", SOON).await;
    assert_eq!(failed["reason"], "Preempted", "{failed}");
    assert!(failed.get("queue").is_none(), "{failed}");
    urgent.wait_for(&high, "running", SOON).await;
    // Its Job is gone from the queue (deleted), and the history answers for it.
    eventually(SOON, async || {
        let gone = !queues.namespace.jobs().iter().any(|j| j["metadata"]["name"] == low.as_str());
        (gone, queues.namespace.jobs().len())
    })
    .await;
    assert_eq!(batch.job(&low).await["reason"], "Preempted");
}

#[tokio::test]
async fn a_replica_killed_while_archiving_and_restarted_archives_every_job_once() {
    let namespace = cluster::TestNamespace::create(cluster::cluster(), "archive-restart");
    let run = cluster::unique("archive-restart");
    let dir = tempfile::tempdir().unwrap();
    let database = std::env::var("OATS_TEST_DATABASE_URL")
        .expect("OATS_TEST_DATABASE_URL is not set: run the suite with scripts/test.sh, which starts PostgreSQL");
    // The same pod name before and after (a container restarted in its pod): the restarted
    // replica holds the claims the killed one left.
    let holder = format!("oats-{run}");
    let env = [
        ("OATS_TENANT", run.as_str()),
        ("OATS_RETENTION_DAYS", "30"),
        ("OATS_DATABASE_URL", database.as_str()),
        ("HOSTNAME", holder.as_str()),
    ];
    let archived = async |server: &Server| -> u64 {
        let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("oats_archive_archived_total ")).unwrap().parse().unwrap()
    };
    let first = namespace.start_oats(&dir.path().join("first"), &env).await;
    // Jobs that finish 150 ms apart, so archiving is under way while later ones still run.
    const JOBS: usize = 16;
    let mut ids = HashSet::new();
    for i in 0..JOBS {
        let run_ms = (300 + 150 * i).to_string();
        let labels = json!({"e2e": run, "kwok.oats.dev/outcome": "succeed", "kwok.oats.dev/run-ms": run_ms});
        ids.insert(id_of(&submit(&first, "Archive me across a crash", labels, None).await));
    }
    let at_kill = eventually(SOON, async || {
        let n = archived(&first).await;
        (n >= 1, n)
    })
    .await;
    first.crash();
    assert!(at_kill < JOBS as u64, "killed before it archived every job ({at_kill} of {JOBS})");

    let restarted = namespace.start_oats(&dir.path().join("restarted"), &env).await;
    // Every Job finishes, and its record is then deleted from the cluster: from then on only the
    // history can answer. A takeover that waited for the killed replica's 60 s claims would
    // miss this deadline.
    eventually(Duration::from_secs(45), async || {
        let (_, page) = restarted.get_json(&format!("/api/v1/jobs?limit=100&label=e2e%3D{run}&status=succeeded")).await;
        let done = page["items"].as_array().map_or(0, Vec::len);
        (done == JOBS && archived(&restarted).await + at_kill >= JOBS as u64, done)
    })
    .await;
    namespace.cluster.kubectl_ok(&["delete", "jobs", "--all", "-n", &namespace.name, "--wait=true"]);
    let listed = eventually(Duration::from_secs(45), async || {
        let (status, page) = restarted.get_json(&format!("/api/v1/jobs?limit=100&label=e2e%3D{run}")).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        let gone = namespace.jobs().is_empty();
        (status == StatusCode::OK && gone && items.len() == JOBS, items)
    })
    .await;
    let listed_ids: HashSet<String> = listed.iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed_ids, ids, "every job, once, from the history");
    for job in &listed {
        assert_eq!(job["status"], "succeeded", "{job}");
        let id = job["id"].as_str().unwrap();
        let (status, events) = restarted.get_json(&format!("/api/v1/jobs/{id}/events")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!events["items"].as_array().unwrap().is_empty(), "{id}: its events were archived: {events}");
    }
}
