//! OATS (one or several replicas) against the real control plane of `testenv/`, each test in a
//! namespace of its own (deleted when the test ends, passed or failed), so the metrics of its
//! replicas count its own Jobs and calls and nothing else.

use crate::{cluster, common};

use cluster::TestNamespace;
use common::Server;
use oats::backend::kubernetes::render;
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const SOON: Duration = Duration::from_secs(60);

async fn submit(server: &Server, body: Value) -> String {
    let response = server.submit(body).await;
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

/// `oats_jobs_finished_total` of one replica, by status.
async fn finished(server: &Server) -> BTreeMap<String, f64> {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("oats_jobs_finished_total{")) {
        let (labels, value) = line.split_once("} ").unwrap();
        let status = labels.split("status=\"").nth(1).unwrap().split('"').next().unwrap();
        *counts.entry(status.to_owned()).or_default() += value.split(' ').next().unwrap().parse::<f64>().unwrap();
    }
    counts
}

fn add(total: &mut BTreeMap<String, f64>, counts: &BTreeMap<String, f64>) {
    for (status, value) in counts {
        *total.entry(status.clone()).or_default() += value;
    }
}

fn expected(succeeded: f64, failed: f64) -> BTreeMap<String, f64> {
    [("succeeded".to_owned(), succeeded), ("failed".to_owned(), failed)].into()
}

/// Wait until the counts of the `live` replicas plus those already `banked` (of replicas that
/// are gone) reach `want`, and every Job in the namespace is marked as counted; then the
/// counts must stay exactly `want` (a second count would need a patch the marks now refuse).
async fn assert_counted_once(ns: &TestNamespace, live: &[&Server], banked: &BTreeMap<String, f64>, want: f64) {
    let deadline = Instant::now() + SOON;
    loop {
        let mut total = banked.clone();
        for server in live {
            add(&mut total, &finished(server).await);
        }
        let jobs = ns.jobs();
        let marked =
            jobs.iter().filter(|j| j["metadata"]["annotations"][render::COUNTED_ANNOTATION].is_string()).count();
        if total.values().sum::<f64>() >= want && marked == jobs.len() {
            assert_eq!(total.values().sum::<f64>(), want, "finishes counted: {total:?}");
            return;
        }
        assert!(Instant::now() < deadline, "counted {total:?} of {want}, {marked} of {} Jobs marked", jobs.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait (as the admin) until the Job has its Complete condition.
fn wait_complete(ns: &TestNamespace, id: &str) {
    let out = ns.cluster.kubectl(&[
        "wait",
        "--for=condition=Complete",
        "--timeout=60s",
        "-n",
        &ns.name,
        &format!("job/{id}"),
    ]);
    assert!(out.status.success(), "job {id} did not complete: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn two_replicas_count_each_finish_once_even_when_one_is_down() {
    let cluster = cluster::cluster();
    let ns = TestNamespace::create(cluster, "finish");
    let dir = tempfile::tempdir().unwrap();
    let a = ns.start_oats(&dir.path().join("a"), &[]).await;
    let b = ns.start_oats(&dir.path().join("b"), &[]).await;
    let job = |goal: &str, outcome: &str, run_ms: &str| {
        json!({"goal": goal, "max_turns": 1,
               "labels": {"kwok.oats.dev/outcome": outcome, "kwok.oats.dev/run-ms": run_ms}})
    };

    // Both replicas up: three succeed and one fails, submitted through either replica.
    let mut first = Vec::new();
    for (i, outcome) in ["succeed", "fail", "succeed", "succeed"].into_iter().enumerate() {
        let server = if i % 2 == 0 { &a } else { &b };
        first.push(submit(server, job(&format!("both up {i}"), outcome, "300")).await);
    }
    for id in &first {
        let status = if id == &first[1] { "failed" } else { "succeeded" };
        a.wait_for(id, status, SOON).await;
        b.wait_for(id, status, SOON).await;
    }
    assert_counted_once(&ns, &[&a, &b], &BTreeMap::new(), 4.0).await;
    let mut banked = finished(&b).await;

    // B is down: three more finish, A alone sees them.
    b.crash();
    for i in 0..3 {
        let id = submit(&a, job(&format!("b down {i}"), "succeed", "300")).await;
        a.wait_for(&id, "succeeded", SOON).await;
    }
    assert_counted_once(&ns, &[&a], &banked, 7.0).await;
    add(&mut banked, &finished(&a).await);

    // Both down: two finish with no replica watching; the two restarted replicas race to count them.
    let late: Vec<String> =
        futures::future::join_all((0..2).map(|i| submit(&a, job(&format!("all down {i}"), "succeed", "6000")))).await;
    for id in &late {
        a.wait_for(id, "running", SOON).await;
    }
    a.crash();
    let unmarked =
        ns.jobs().iter().filter(|j| j["metadata"]["annotations"][render::COUNTED_ANNOTATION].is_null()).count();
    assert_eq!(unmarked, 2, "the last two jobs finished before the replicas went down");
    for id in &late {
        wait_complete(&ns, id);
    }
    let (a_dir, b_dir) = (dir.path().join("a2"), dir.path().join("b2"));
    let (a, b) = tokio::join!(ns.start_oats(&a_dir, &[]), ns.start_oats(&b_dir, &[]));
    assert_counted_once(&ns, &[&a, &b], &banked, 9.0).await;
    let mut total = banked;
    add(&mut total, &finished(&a).await);
    add(&mut total, &finished(&b).await);
    assert_eq!(total, expected(8.0, 1.0));
}

/// The object as stored, without what the API server sets on its own (identity, bookkeeping,
/// the controller's uid labels and status).
fn without_server_fields(mut job: Value) -> Value {
    let metadata = job["metadata"].as_object_mut().unwrap();
    for key in ["uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"] {
        metadata.remove(key);
    }
    job.as_object_mut().unwrap().remove("status");
    for labels in ["/spec/selector/matchLabels", "/spec/template/metadata/labels"] {
        let labels = job.pointer_mut(labels).unwrap().as_object_mut().unwrap();
        labels.remove("controller-uid");
        labels.remove("batch.kubernetes.io/controller-uid");
    }
    job
}

#[tokio::test]
async fn render_job_prints_exactly_what_serve_creates() {
    let cluster = cluster::cluster();
    let ns = TestNamespace::create(cluster, "render");
    let dir = tempfile::tempdir().unwrap();
    let server = ns.start_oats(dir.path(), &[]).await;
    let request = json!({
        "goal": "Render me the same",
        "max_turns": 4,
        "timeout_seconds": 300,
        "labels": {"team": "blue", "kwok.oats.dev/outcome": "run"},
    });
    let id = submit(&server, request.clone()).await;
    let stored = without_server_fields(ns.cluster.kubectl_json(&["get", "job", &id, "-n", &ns.name]));

    // The CLI, with the configuration of that server (its namespace and providers file).
    let mut cli = Command::new(env!("CARGO_BIN_EXE_oats"))
        .arg("render-job")
        .env_remove("KUBECONFIG")
        .env("OATS_NAMESPACE", &ns.name)
        .env("OATS_LLM_PROVIDERS_FILE", dir.path().join("default-providers.yaml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cli.stdin.take().unwrap().write_all(request.to_string().as_bytes()).unwrap();
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut rendered: Value = serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    // Its own job id and creation time, everywhere they appear, become the served job's.
    let own_id = rendered["metadata"]["name"].as_str().unwrap().to_owned();
    let created = stored["metadata"]["annotations"][render::CREATED_AT_ANNOTATION].clone();
    rendered["metadata"]["annotations"][render::CREATED_AT_ANNOTATION] = created;
    let rendered: Value = serde_json::from_str(&rendered.to_string().replace(&own_id, &id)).unwrap();

    // Defaulted by the same API server (a server-side dry run, once the served Job is gone).
    ns.cluster.kubectl_ok(&["delete", "job", &id, "-n", &ns.name, "--cascade=foreground", "--wait=true"]);
    let file = dir.path().join("rendered.json");
    std::fs::write(&file, rendered.to_string()).unwrap();
    let dry = ns.cluster.kubectl_json(&["create", "--dry-run=server", "-n", &ns.name, "-f", file.to_str().unwrap()]);
    assert_eq!(without_server_fields(dry), stored);
}

/// `oats_kube_requests_total` of one replica by (verb, resource, code), and its
/// `oats_kube_cache_synced` by resource.
async fn kube_metrics(server: &Server) -> (BTreeMap<(String, String, String), f64>, BTreeMap<String, f64>) {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let label = |labels: &str, name: &str| {
        labels.split(',').find_map(|kv| kv.strip_prefix(&format!("{name}=\""))?.strip_suffix('"')).unwrap().to_owned()
    };
    let (mut requests, mut synced) = (BTreeMap::new(), BTreeMap::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("oats_kube_requests_total{") {
            let (labels, value) = rest.split_once("} ").unwrap();
            let key = (label(labels, "verb"), label(labels, "resource"), label(labels, "code"));
            requests.insert(key, value.split(' ').next().unwrap().parse().unwrap());
        } else if let Some(rest) = line.strip_prefix("oats_kube_cache_synced{") {
            let (labels, value) = rest.split_once("} ").unwrap();
            synced.insert(label(labels, "resource"), value.parse().unwrap());
        }
    }
    (requests, synced)
}

/// The Kubernetes metrics the alerts read (OatsKubernetesApiErrors: requests by code;
/// OatsWatchCacheNotSynced: the caches) count exactly the calls a scenario makes: two jobs that
/// succeed and one that is cancelled are three creates (201), four patches that succeed (200:
/// the cancel and three finishes counted), one read of the cancelled Job plus one per conflict.
#[tokio::test]
async fn the_kubernetes_metrics_the_alerts_read_count_each_call() {
    let cluster = cluster::cluster();
    let ns = TestNamespace::create(cluster, "kube-metrics");
    let dir = tempfile::tempdir().unwrap();
    let server = ns.start_oats(dir.path(), &[]).await;
    // Starting: the version check (as the client classifies GET /version), then one list and
    // one watch per cache.
    let call = |verb: &str, resource: &str| (verb.to_owned(), resource.to_owned(), "200".to_owned());
    let startup: BTreeMap<_, f64> = [
        (call("list", "version"), 1.0),
        (call("list", "jobs"), 1.0),
        (call("list", "pods"), 1.0),
        (call("watch", "jobs"), 1.0),
        (call("watch", "pods"), 1.0),
    ]
    .into();
    // Ready means both caches have listed; a watch is counted when its answer arrives, just after.
    let deadline = Instant::now() + SOON;
    let before = loop {
        let (now, synced) = kube_metrics(&server).await;
        assert_eq!(synced, [("jobs".to_owned(), 1.0), ("pods".to_owned(), 1.0)].into(), "ready: both caches synced");
        if now == startup {
            break now;
        }
        let within = now.iter().all(|(call, n)| startup.get(call).is_some_and(|most| n <= most));
        assert!(within && Instant::now() < deadline, "start-up calls: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let job = |outcome: &str| {
        json!({"goal": "count me", "max_turns": 1,
                                     "labels": {"kwok.oats.dev/outcome": outcome, "kwok.oats.dev/run-ms": "300"}})
    };
    let done = [submit(&server, job("succeed")).await, submit(&server, job("succeed")).await];
    let running = submit(&server, job("run")).await;
    for id in &done {
        server.wait_for(id, "succeeded", SOON).await;
    }
    server.wait_for(&running, "running", SOON).await;
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{running}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), reqwest::StatusCode::OK);

    let key = |verb: &str, code: &str| (verb.to_owned(), "jobs".to_owned(), code.to_owned());
    let deadline = Instant::now() + SOON;
    loop {
        let (after, synced) = kube_metrics(&server).await;
        // The calls on Jobs other than the watches' (lists and watches reconnect on their own).
        let mut delta: BTreeMap<_, f64> = after
            .iter()
            .filter(|((verb, resource, _), _)| resource == "jobs" && verb != "list" && verb != "watch")
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v != 0.0)
            .collect();
        let marked =
            ns.jobs().iter().filter(|j| j["metadata"]["annotations"][render::COUNTED_ANNOTATION].is_string()).count();
        if marked == 3 && delta.get(&key("patch", "200")) == Some(&4.0) {
            // A patch guarded by a version the Job controller has just replaced is refused (409,
            // normal operation, not an error for the alert) and made again: the cancel after
            // reading the Job again, the claim of a finish at the version the watch brings.
            let conflicts = delta.remove(&key("patch", "409")).unwrap_or(0.0);
            let reads = delta.remove(&key("get", "200")).unwrap_or(0.0);
            assert!((1.0..=1.0 + conflicts).contains(&reads), "{reads} reads for one cancel and {conflicts} conflicts");
            assert_eq!(delta, [(key("create", "201"), 3.0), (key("patch", "200"), 4.0)].into());
            assert_eq!(synced.values().copied().collect::<Vec<_>>(), [1.0, 1.0]);
            // What OatsKubernetesApiErrors counts as an error: none.
            let errors: Vec<_> = after
                .keys()
                .filter(|(_, _, code)| !["2", "3"].iter().any(|c| code.starts_with(c)) && code != "409")
                .collect();
            assert!(errors.is_empty(), "calls the alert counts as errors: {errors:?}");
            return;
        }
        assert!(Instant::now() < deadline, "calls on jobs: {delta:?}, {marked} finishes counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `backend=auto` (the default; OATS_BACKEND is not set) as README says: Kubernetes when a
/// kubeconfig works, else local (no kubeconfig, or one whose API server does not answer).
#[tokio::test]
async fn backend_auto_picks_kubernetes_with_a_working_kubeconfig_and_local_otherwise() {
    for inherited in ["OATS_BACKEND", "KUBERNETES_SERVICE_HOST"] {
        assert!(std::env::var_os(inherited).is_none(), "{inherited} is set: the server would inherit it");
    }
    let cluster = cluster::cluster();
    let ns = TestNamespace::create(cluster, "auto");
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let dead = dir.path().join("dead.kubeconfig");
    std::fs::write(
        &dead,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: dead\n  cluster:\n    server: https://127.0.0.1:1\n\
         users:\n- name: nobody\n  user:\n    token: x\ncontexts:\n- name: dead\n  context:\n    cluster: dead\n    \
         user: nobody\ncurrent-context: dead\n",
    )
    .unwrap();
    let kubeconfig = cluster.admin_kubeconfig.display().to_string();
    let cases = [
        ("none", None, "local"),
        ("dead", Some(dead.display().to_string()), "local"),
        ("working", Some(kubeconfig), "kubernetes"),
    ];
    for (name, kubeconfig, expected) in cases {
        let state = dir.path().join(name);
        let mut env = vec![
            ("HOME".to_owned(), home.display().to_string()),
            ("OATS_STATE_DIR".to_owned(), state.display().to_string()),
            ("OATS_NAMESPACE".to_owned(), ns.name.clone()),
            ("OATS_LOG_FORMAT".to_owned(), "json".to_owned()),
        ];
        env.extend(kubeconfig.map(|k| ("KUBECONFIG".to_owned(), k)));
        let server = Server::start(env, &state).await;
        let goal = format!("where do I run ({name})");
        let id =
            submit(&server, json!({"goal": goal, "max_turns": 1, "labels": {"kwok.oats.dev/outcome": "run"}})).await;
        let in_cluster = ns.jobs().iter().any(|j| j["metadata"]["name"] == id.as_str());
        let in_state_dir = state.join("jobs").join(&id).exists();
        let said = format!(
            "backend=auto: {}",
            if expected == "local" { "no usable cluster" } else { "a Kubernetes API server answered" }
        );
        assert!(
            server.log_text().contains(&said),
            "{name} kubeconfig: the log does not say {said:?}:\n{}",
            server.log_text()
        );
        assert_eq!(
            (in_cluster, in_state_dir),
            (expected == "kubernetes", expected == "local"),
            "{name} kubeconfig: expected {expected}"
        );
    }
}
