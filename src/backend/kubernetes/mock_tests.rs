//! Backend logic against kube's tower-test mock: an API server scripted per scenario, checking
//! the exact calls the backend makes. The real control plane is exercised by tests/.

use super::{KubernetesBackend, render};
use crate::{
    config::Config,
    jobs::{Caller, JobBackend, JobError, JobLimits, JobPhase, JobRequest, JobService, Role, policy::Policy},
};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::Job;
use kube::client::Body;
use serde_json::{Value, json};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

/// How the fake API server answers writes.
#[derive(Clone, Copy, PartialEq)]
enum Writes {
    Accept,
    AlreadyExists,
    Unavailable,
}

/// A scripted API server: lists return `jobs`, watches hang, writes follow `writes`; every call
/// is recorded as (method, path and query, body).
#[derive(Clone)]
struct FakeApiServer {
    jobs: Arc<Mutex<Vec<Value>>>,
    calls: Arc<Mutex<Vec<(Method, String, Value)>>>,
    writes: Writes,
    /// Every write bumps the Job's resourceVersion; a patch naming another one gets 409.
    versions: Arc<Mutex<u64>>,
    /// Applied to the Job just before the next patch is judged (a change that raced it).
    before_patch: Arc<Mutex<Option<Value>>>,
}

impl FakeApiServer {
    fn new(writes: Writes) -> Self {
        Self {
            jobs: Arc::default(),
            calls: Arc::default(),
            writes,
            versions: Arc::default(),
            before_patch: Arc::default(),
        }
    }

    fn next_version(&self) -> Value {
        let mut version = self.versions.lock().unwrap();
        *version += 1;
        json!(version.to_string())
    }

    fn writes(&self) -> Vec<(Method, String, Value)> {
        self.calls.lock().unwrap().iter().filter(|(m, _, _)| m != Method::GET).cloned().collect()
    }

    fn start(self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut hanging = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let uri = parts.uri.to_string();
                self.calls.lock().unwrap().push((parts.method.clone(), uri.clone(), body.clone()));
                let path = parts.uri.path().to_owned();
                let (status, answer) = match parts.method {
                    Method::GET if uri.contains("watch=true") => {
                        hanging.push(send);
                        continue;
                    }
                    Method::GET if path.ends_with("/jobs") => {
                        let items = self.jobs.lock().unwrap().clone();
                        (
                            200,
                            json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {"resourceVersion": "1"}, "items": items}),
                        )
                    }
                    Method::GET if path.ends_with("/events") => (
                        200,
                        json!({"apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": "1"}, "items": []}),
                    ),
                    Method::GET if path.ends_with("/pods") => (
                        200,
                        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": []}),
                    ),
                    Method::GET => {
                        let name = path.rsplit('/').next().unwrap();
                        let jobs = self.jobs.lock().unwrap();
                        match jobs.iter().find(|j| j["metadata"]["name"] == name) {
                            Some(job) => (200, job.clone()),
                            None => (404, status(404, "NotFound")),
                        }
                    }
                    _ if self.writes == Writes::Unavailable => (503, status(503, "ServiceUnavailable")),
                    Method::POST if self.writes == Writes::AlreadyExists => (409, status(409, "AlreadyExists")),
                    Method::POST => {
                        let mut created = body.clone();
                        created["metadata"]["resourceVersion"] = self.next_version();
                        self.jobs.lock().unwrap().push(created.clone());
                        (201, created)
                    }
                    Method::PATCH => {
                        let name = path.rsplit('/').next().unwrap();
                        let raced = self.before_patch.lock().unwrap().take();
                        let mut jobs = self.jobs.lock().unwrap();
                        let job = jobs.iter_mut().find(|j| j["metadata"]["name"] == name).unwrap();
                        if let Some(change) = raced {
                            merge(job, &change);
                            job["metadata"]["resourceVersion"] = self.next_version();
                        }
                        let precondition = &body["metadata"]["resourceVersion"];
                        if precondition.is_string() && *precondition != job["metadata"]["resourceVersion"] {
                            (409, status(409, "Conflict"))
                        } else {
                            merge(job, &body);
                            job["metadata"]["resourceVersion"] = self.next_version();
                            (200, job.clone())
                        }
                    }
                    _ => (405, status(405, "MethodNotAllowed")),
                };
                let response = Response::builder()
                    .status(StatusCode::from_u16(status).unwrap())
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        kube::Client::new(service, "oats")
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": reason})
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn backend(fake: &FakeApiServer) -> Arc<KubernetesBackend> {
    let client = fake.clone().start();
    let backend = Arc::new(KubernetesBackend::start(
        client,
        render::AgentTemplate::from_config(&Config::default(), "oats"),
        Arc::default(),
        Default::default(),
    ));
    for _ in 0..200 {
        if backend.is_ready() {
            return backend;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the watch caches never synced against the fake API server");
}

async fn job_service(fake: &FakeApiServer) -> JobService {
    JobService::new(backend(fake).await, JobLimits::default(), Policy::builtin(), Arc::default())
}

fn caller(tenant: &str) -> Caller {
    Caller { tenant: tenant.into(), role: Role::Submitter, name: "test".into() }
}

fn request(goal: &str) -> JobRequest {
    JobRequest { goal: goal.into(), max_turns: 2, ..Default::default() }
}

#[tokio::test]
async fn create_posts_exactly_the_rendered_job() {
    let fake = FakeApiServer::new(Writes::Accept);
    let service = job_service(&fake).await;
    let submitted = service.submit(&caller("default"), request("Ship it"), None).await.unwrap();
    assert!(submitted.created);
    assert_eq!(submitted.job.status.phase, JobPhase::Pending);

    let writes = fake.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    let (method, uri, body) = &writes[0];
    assert_eq!((method, uri.as_str()), (&Method::POST, "/apis/batch/v1/namespaces/oats/jobs?"));
    let posted: Job = serde_json::from_value(body.clone()).unwrap();
    let spec = request("Ship it").validate(&JobLimits::default()).unwrap();
    let expected = render::render_job(
        &crate::jobs::NewJob {
            id: submitted.job.id.clone(),
            tenant: "default".into(),
            request_hash: spec.fingerprint(),
            trace: None,
            resources: None,
            queue: Default::default(),
            spec,
            created_at: submitted.job.created_at,
        },
        &render::AgentTemplate::from_config(&Config::default(), "oats"),
    );
    assert_eq!(posted, expected);
}

#[tokio::test]
async fn idempotent_retry_returns_the_existing_job_and_a_reused_key_conflicts() {
    let fake = FakeApiServer::new(Writes::Accept);
    let service = job_service(&fake).await;
    let first = service.submit(&caller("default"), request("Once"), Some("key-1")).await.unwrap();
    assert!(first.created);

    // A second replica (same cluster) finds the Job by its key; were both to create at once, the
    // loser would get AlreadyExists and read the Job back the same way.
    let replica = FakeApiServer { writes: Writes::AlreadyExists, ..fake.clone() };
    let other = job_service(&replica).await;
    let retry = other.submit(&caller("default"), request("Once"), Some("key-1")).await.unwrap();
    assert!(!retry.created);
    assert_eq!(retry.job.id, first.job.id);
    let reused = other.submit(&caller("default"), request("Something else"), Some("key-1")).await;
    assert!(matches!(reused, Err(JobError::IdempotencyConflict(_))), "{reused:?}");
    // The same key of another tenant names another Job.
    let elsewhere = service.submit(&caller("acme"), request("Once"), Some("key-1")).await.unwrap();
    assert_ne!(elsewhere.job.id, first.job.id);
}

#[tokio::test]
async fn cancel_sets_a_one_second_deadline_and_marks_the_job() {
    let fake = FakeApiServer::new(Writes::Accept);
    let service = job_service(&fake).await;
    let job = service.submit(&caller("default"), request("Long"), None).await.unwrap().job;
    let cancelled = service.cancel(&caller("default"), job.id.as_str()).await.unwrap();
    assert_eq!(cancelled.status.phase, JobPhase::Cancelled);

    let writes = fake.writes();
    let (method, uri, body) = writes.last().unwrap();
    assert_eq!(method, Method::PATCH);
    assert_eq!(uri, &format!("/apis/batch/v1/namespaces/oats/jobs/{}?", job.id));
    assert_eq!(body["spec"]["activeDeadlineSeconds"], 1);
    assert!(body["metadata"]["annotations"][render::CANCELLED_AT_ANNOTATION].is_string());
    assert_eq!(body["metadata"]["resourceVersion"], "1", "the patch is guarded by the version it judged");
    // Cancelling again makes no second call.
    service.cancel(&caller("default"), job.id.as_str()).await.unwrap();
    assert_eq!(fake.writes().len(), writes.len());
}

#[tokio::test]
async fn a_job_that_fails_while_being_cancelled_stays_failed() {
    let fake = FakeApiServer::new(Writes::Accept);
    let service = job_service(&fake).await;
    let job = service.submit(&caller("default"), request("Racing"), None).await.unwrap().job;
    // Between the cancel's read of the Job and its patch, the Job controller marks it failed.
    let failed = json!({"status": {"failed": 1, "conditions": [{
        "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
        "lastTransitionTime": "2027-01-15T08:00:00Z",
    }]}});
    *fake.before_patch.lock().unwrap() = Some(failed);
    match service.cancel(&caller("default"), job.id.as_str()).await {
        Err(JobError::AlreadyFinished { phase, .. }) => assert_eq!(phase, "failed"),
        other => panic!("expected the job to have finished, got {other:?}"),
    }
    let writes = fake.writes();
    assert_eq!(writes.len(), 2, "one create and one refused patch, nothing after: {writes:?}");
    let stored = service.get(&caller("default"), job.id.as_str()).await.unwrap();
    assert_eq!(stored.status.phase, JobPhase::Failed, "the failure stands");
}

#[tokio::test]
async fn an_unavailable_api_server_is_a_retryable_error_and_nothing_is_claimed() {
    let fake = FakeApiServer::new(Writes::Unavailable);
    let service = job_service(&fake).await;
    match service.submit(&caller("default"), request("Later"), None).await {
        Err(JobError::Unavailable { retry_after, .. }) => assert!(retry_after >= Duration::from_secs(1)),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let listed =
        service.list(&caller("default"), &crate::jobs::ListQuery::parse(None, None, None, None).unwrap()).await;
    assert!(listed.unwrap().items.is_empty());
}

#[tokio::test]
async fn not_ready_until_both_caches_sync() {
    let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "oats");
    let backend = KubernetesBackend::start(
        client,
        render::AgentTemplate::from_config(&Config::default(), "oats"),
        Arc::default(),
        Default::default(),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!backend.is_ready(), "ready before any list answered");
    let listed = backend.list().await;
    assert!(matches!(listed, Err(crate::jobs::BackendError::Unavailable { .. })));
}

impl FakeApiServer {
    /// The calls that were not watches, as (method, path and query).
    fn requests(&self) -> Vec<(Method, String)> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(_, uri, _)| !uri.contains("watch=true"))
            .map(|(m, uri, _)| (m.clone(), uri.clone()))
            .collect()
    }
}

#[tokio::test]
async fn a_job_counts_from_its_create_not_from_when_the_watch_delivers_it() {
    // The fake's watches never deliver anything: the cache learns of no Job by watching.
    let fake = FakeApiServer::new(Writes::Accept);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, "defaults:\n  max_concurrent_jobs: 2\n").unwrap();
    let service =
        JobService::new(backend(&fake).await, JobLimits::default(), Policy::load(&path).unwrap(), Arc::default());
    let mut accepted = Vec::new();
    for i in 0..5 {
        match service.submit(&caller("t"), request(&format!("job {i}")), None).await {
            Ok(submitted) => accepted.push(submitted.job.id),
            Err(JobError::PolicyDenied { rule, .. }) => assert_eq!(rule, crate::jobs::policy::Rule::MaxConcurrentJobs),
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(accepted.len(), 2);
    // Both read at once (from the create's answer), and listed, without a call to the API server.
    let before = fake.requests().len();
    for id in &accepted {
        assert_eq!(service.get(&caller("t"), id.as_str()).await.unwrap().status.phase, JobPhase::Pending);
    }
    let all = service.list(&caller("t"), &crate::jobs::ListQuery::parse(None, None, None, None).unwrap()).await;
    assert_eq!(all.unwrap().items.len(), 2);
    assert_eq!(fake.requests().len(), before, "{:?}", &fake.requests()[before..]);
}

#[tokio::test]
async fn an_unknown_job_id_never_reaches_the_api_server() {
    let fake = FakeApiServer::new(Writes::Accept);
    let service = job_service(&fake).await;
    let before = fake.requests();
    for id in ["job-aaaaaaaaaaaaaaaaaaaa", "job-bbbbbbbbbbbbbbbbbbbb"] {
        for result in [
            service.get(&caller("default"), id).await.map(drop),
            service.events(&caller("default"), id).await.map(drop),
            service.cancel(&caller("default"), id).await.map(drop),
            service.logs(&caller("default"), id, Default::default()).await.map(drop),
        ] {
            assert!(matches!(result, Err(JobError::NotFound(_))), "{result:?}");
        }
        let keyed = service.submit(&caller("default"), request("keyed"), Some(id)).await.unwrap();
        assert!(keyed.created);
    }
    let after = fake.requests();
    let extra: Vec<_> = after[before.len()..].iter().filter(|(m, _)| m != Method::POST).collect();
    assert!(extra.is_empty(), "unknown ids reached the API server: {extra:?}");
}

#[tokio::test]
async fn a_jobs_events_are_listed_at_most_once_per_ttl() {
    let fake = FakeApiServer::new(Writes::Accept);
    let service = Arc::new(job_service(&fake).await);
    let id = service.submit(&caller("default"), request("Eventful"), None).await.unwrap().job.id;
    let lists = || fake.requests().iter().filter(|(_, uri)| uri.contains("/events")).count();
    let calls = (0..20).map(|_| {
        let service = service.clone();
        let id = id.clone();
        async move { service.events(&caller("default"), id.as_str()).await.unwrap() }
    });
    futures::future::join_all(calls).await;
    for _ in 0..20 {
        service.events(&caller("default"), id.as_str()).await.unwrap();
    }
    assert_eq!(lists(), 1, "one listing (the Job has no pods) for 40 requests");
    tokio::time::sleep(super::EVENTS_TTL + Duration::from_millis(100)).await;
    service.events(&caller("default"), id.as_str()).await.unwrap();
    assert_eq!(lists(), 2, "listed again once the listing expired");
}

/// The fake's copy of Job `name`.
fn stored(fake: &FakeApiServer, name: &str) -> Value {
    fake.jobs.lock().unwrap().iter().find(|j| j["metadata"]["name"] == name).unwrap().clone()
}

/// The fake's copy of Job `name` as the watch would deliver it.
fn delivered(fake: &FakeApiServer, name: &str) -> super::wire::CachedJob {
    serde_json::from_value(stored(fake, name)).unwrap()
}

#[tokio::test]
async fn a_finish_whose_claim_loses_to_a_change_is_claimed_again_and_counted_once() {
    let fake = FakeApiServer::new(Writes::Accept);
    let service = job_service(&fake).await;
    let id = service.submit(&caller("default"), request("Finish"), None).await.unwrap().job.id.to_string();
    // The Job controller marks the Job complete (version 2) and the watch delivers it.
    {
        let mut jobs = fake.jobs.lock().unwrap();
        let job = jobs.iter_mut().find(|j| j["metadata"]["name"] == id.as_str()).unwrap();
        merge(
            job,
            &json!({"status": {"succeeded": 1, "startTime": "2027-01-15T07:59:00Z",
            "completionTime": "2027-01-15T08:00:00Z",
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2027-01-15T08:00:00Z"}]}}),
        );
        job["metadata"]["resourceVersion"] = fake.next_version();
    }
    let cache = super::cache::JobCache::default();
    let (name, complete) = cache.apply_job_event(kube::runtime::watcher::Event::Apply(delivered(&fake, &id))).unwrap();
    assert!(complete.record.status.phase.is_terminal());

    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
    let counter = Arc::new(super::FinishCounter {
        api: kube::Api::namespaced(fake.clone().start(), "oats"),
        metrics: metrics.clone(),
        replica: "replica-a".into(),
        claiming: Mutex::default(),
    });
    // While the claim of version 2 is in flight the Job changes again (version 3, which the
    // watch delivers at once): the claim gets 409.
    let change = json!({"metadata": {"annotations": {"example.com/note": "changed"}}});
    *fake.before_patch.lock().unwrap() = Some(change.clone());
    counter.count_finish(name.clone(), &complete);
    let mut changed = stored(&fake, &id);
    merge(&mut changed, &change);
    changed["metadata"]["resourceVersion"] = json!("3");
    let (_, newer) =
        cache.apply_job_event(kube::runtime::watcher::Event::Apply(serde_json::from_value(changed).unwrap())).unwrap();
    counter.count_finish(name, &newer);

    let finished = || -> f64 {
        let text = metrics.encode(false);
        text.lines()
            .filter(|l| l.starts_with("oats_jobs_finished_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while finished() < 1.0 {
        let patches: Vec<_> = fake.writes().into_iter().filter(|(m, _, _)| m == Method::PATCH).collect();
        assert!(std::time::Instant::now() < deadline, "the finish was never counted: {patches:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let patches: Vec<Value> =
        fake.writes().into_iter().filter(|(m, _, _)| m == Method::PATCH).map(|(_, _, body)| body).collect();
    let versions: Vec<&Value> = patches.iter().map(|p| &p["metadata"]["resourceVersion"]).collect();
    assert_eq!(versions, [&json!("2"), &json!("3")], "the claim of version 2 lost, the one of version 3 won");
    assert_eq!(stored(&fake, &id)["metadata"]["annotations"][render::COUNTED_ANNOTATION], "replica-a");
    assert_eq!(finished(), 1.0);
}
