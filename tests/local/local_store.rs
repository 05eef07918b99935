//! The local backend keeps its jobs in the store: a state directory written before the store
//! (tests/fixtures/state-dir-3075997, made by the binary of that revision, with that server's
//! answers) is imported at the first start and answered as that server answered, on both
//! engines; jobs survive a restart and a crash of the server with their state.

use crate::common::{self, Server, outage::Outage};
use reqwest::StatusCode;
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

const SOON: Duration = Duration::from_secs(30);
/// Finished jobs of the fixture stay in the backend for as long as the test needs them.
const KEEP: (&str, &str) = ("OATS_TTL_SECONDS_AFTER_FINISHED", "4000000000");
/// The fixture's job that was running when its server was killed, and the one still queued.
const RUNNING_AT_CRASH: &str = "job-yzoocnrfcduw5uvqxi2n";
const QUEUED_AT_CRASH: &str = "job-4yihsjmgg477db4mu2uw";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-dir-3075997")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

async fn text(server: &Server, path: &str) -> (StatusCode, String) {
    let response = server.http.get(server.url(path)).send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// The ids of the jobs the fixture's server had finished, with what it answered for each.
fn finished_in_fixture() -> Vec<(String, Value, Value, String)> {
    let expected = fixture().join("expected");
    let list: Value = serde_json::from_slice(&std::fs::read(expected.join("list.json")).unwrap()).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| {
            let id = job["id"].as_str().unwrap().to_owned();
            let read = |suffix: &str| std::fs::read(expected.join(format!("{id}{suffix}"))).unwrap();
            let events: Value = serde_json::from_slice(&read(".events.json")).unwrap();
            let job: Value = serde_json::from_slice(&read(".json")).unwrap();
            let logs = String::from_utf8(read(".log")).unwrap();
            (id, job, events, logs)
        })
        .collect()
}

/// Every finished job of the fixture answers as the server that wrote it answered.
async fn answers_as_before(server: &Server) {
    let finished = finished_in_fixture();
    assert_eq!(finished.len(), 5);
    for (id, job, events, logs) in &finished {
        let (status, got) = server.get_json(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{id}: {got}");
        assert_eq!(&got, job, "{id}");
        let (_, got) = server.get_json(&format!("/api/v1/jobs/{id}/events")).await;
        assert_eq!(&got, events, "{id}");
        let (status, got) = text(server, &format!("/api/v1/jobs/{id}/logs?timestamps=true")).await;
        assert_eq!((status, &got), (StatusCode::OK, logs), "{id}");
    }
    // The list, in the same order, holds them as it did (with the two jobs the crash left).
    let (_, list) = server.get_json("/api/v1/jobs?limit=100").await;
    let items: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["id"] != RUNNING_AT_CRASH && j["id"] != QUEUED_AT_CRASH)
        .collect();
    let expected: Vec<&Value> = finished.iter().map(|(_, job, _, _)| job).collect();
    let strip = |job: &Value| {
        let mut job = job.clone();
        job.as_object_mut().unwrap().remove("links");
        job
    };
    assert_eq!(
        items.iter().map(|j| strip(j)).collect::<Vec<_>>(),
        expected.iter().map(|j| strip(j)).collect::<Vec<_>>()
    );
    assert_eq!(list["items"].as_array().unwrap().len(), 7, "{list}");
}

/// The job that was running when the fixture's server died: failed, `ServerRestarted`, its
/// events and output kept.
async fn the_interrupted_job_is_reported(server: &Server) {
    let file: Value =
        serde_json::from_slice(&std::fs::read(fixture().join(format!("jobs/{RUNNING_AT_CRASH}/record.json"))).unwrap())
            .unwrap();
    let job = server.job(RUNNING_AT_CRASH).await;
    assert_eq!((job["status"].as_str(), job["reason"].as_str()), (Some("failed"), Some("ServerRestarted")), "{job}");
    assert_eq!(job["created_at"].as_str().unwrap().get(..19), file["record"]["created_at"].as_str().unwrap().get(..19));
    let (_, events) = server.get_json(&format!("/api/v1/jobs/{RUNNING_AT_CRASH}/events")).await;
    let reasons: Vec<&str> =
        events["items"].as_array().unwrap().iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["ServerRestarted", "Started", "Submitted"]);
    let (_, logs) = text(server, &format!("/api/v1/jobs/{RUNNING_AT_CRASH}/logs?timestamps=true")).await;
    let output = std::fs::read_to_string(fixture().join(format!("jobs/{RUNNING_AT_CRASH}/output.log"))).unwrap();
    assert_eq!(logs, output);
}

async fn an_old_state_directory_is_imported(database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    copy_dir(&fixture().join("jobs"), &state.join("jobs"));
    // The history off: the list is the backend's alone (the shared PostgreSQL's history holds
    // other tests' jobs).
    let mut env = vec![KEEP, ("OATS_RETENTION_DAYS", "0")];
    if let Some(url) = &database {
        env.push(("OATS_DATABASE_URL", url.as_str()));
    }
    let server = Server::start_local(&state, &env).await;
    answers_as_before(&server).await;
    the_interrupted_job_is_reported(&server).await;
    // The job that was queued runs now.
    let done = server.wait_for(QUEUED_AT_CRASH, "succeeded", SOON).await;
    assert!(done["result"].as_str().unwrap().contains("queued when the server died"), "{done}");
    // Each record file was imported and renamed; the output stays.
    for entry in std::fs::read_dir(state.join("jobs")).unwrap() {
        let job_dir = entry.unwrap().path();
        assert!(!job_dir.join("record.json").exists(), "{}", job_dir.display());
        assert!(job_dir.join("record.json.imported").is_file(), "{}", job_dir.display());
    }
    assert!(state.join(format!("jobs/{RUNNING_AT_CRASH}/output.log")).is_file());

    // A second start reads it all from the store, once.
    server.stop();
    let server = Server::start_local(&state, &env).await;
    answers_as_before(&server).await;
    the_interrupted_job_is_reported(&server).await;
    assert_eq!(server.job(QUEUED_AT_CRASH).await, done);
}

#[tokio::test]
async fn an_old_state_directory_is_imported_into_sqlite_and_answered_as_before() {
    an_old_state_directory_is_imported(None).await;
}

#[tokio::test]
async fn an_old_state_directory_is_imported_into_postgres_and_answered_as_before() {
    an_old_state_directory_is_imported(Some(common::stores::postgres_url())).await;
}

/// Every read of a job: record, events, output.
async fn reads(server: &Server, id: &str) -> (Value, Value, String) {
    let job = server.job(id).await;
    let (_, events) = server.get_json(&format!("/api/v1/jobs/{id}/events")).await;
    let (_, logs) = text(server, &format!("/api/v1/jobs/{id}/logs?timestamps=true")).await;
    (job, events, logs)
}

#[tokio::test]
async fn jobs_survive_a_restart_and_a_crash_of_the_server_with_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let env = [KEEP, ("OATS_LOCAL_CONCURRENCY", "1")];
    let server = Server::start_local(&state, &env).await;
    let succeeded = server.create("finish", 2).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&succeeded, "succeeded", SOON).await;
    let failed = server.create("fail #fail", 2).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&failed, "failed", SOON).await;
    let long = server.create("run long", 100).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&long, "running", SOON).await;
    let queued = server.create("wait in line", 1).await["id"].as_str().unwrap().to_owned();
    let cancelled = server.create("cancelled in line", 1).await["id"].as_str().unwrap().to_owned();
    let response = server.http.post(server.url(&format!("/api/v1/jobs/{cancelled}/cancel"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut before = Vec::new();
    for id in [&succeeded, &failed, &cancelled] {
        before.push(reads(&server, id).await);
    }
    assert_eq!(server.job(&queued).await["status"], "pending");

    // A restart: finished jobs are as they were, the running one was lost, the queued one runs.
    server.stop();
    let server = Server::start_local(&state, &env).await;
    for (id, expected) in [&succeeded, &failed, &cancelled].into_iter().zip(&before) {
        assert_eq!(&reads(&server, id).await, expected, "{id}");
    }
    let lost = server.job(&long).await;
    assert_eq!((lost["status"].as_str(), lost["reason"].as_str()), (Some("failed"), Some("ServerRestarted")));
    server.wait_for(&queued, "succeeded", SOON).await;
    let mut after_restart = before.clone();
    after_restart.push(reads(&server, &long).await);
    after_restart.push(reads(&server, &queued).await);

    // A crash (SIGKILL) with a job running and one accepted just before: both are kept.
    let running = server.create("run through the crash", 100).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&running, "running", SOON).await;
    let accepted = server.create("accepted before the crash", 1).await["id"].as_str().unwrap().to_owned();
    server.crash();
    let server = Server::start_local(&state, &env).await;
    for (id, expected) in [&succeeded, &failed, &cancelled, &long, &queued].into_iter().zip(&after_restart) {
        assert_eq!(&reads(&server, id).await, expected, "{id}");
    }
    let lost = server.job(&running).await;
    assert_eq!((lost["status"].as_str(), lost["reason"].as_str()), (Some("failed"), Some("ServerRestarted")));
    server.wait_for(&accepted, "succeeded", SOON).await;
    let (_, list) = server.get_json("/api/v1/jobs?limit=100").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 7, "{list}");
    assert!(std::fs::read_dir(state.join("jobs")).unwrap().all(|e| !e.unwrap().path().join("record.json").exists()));
}

#[tokio::test]
async fn while_the_database_is_down_submissions_are_refused_and_accepted_jobs_are_kept() {
    let (outage, proxied) = Outage::before_postgres(&common::stores::postgres_url()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let gate = dir.path().join("go");
    let agent =
        format!(r#"sh,-c,while [ ! -e {} ]; do sleep 0.05; done; echo done > "$OATS_RESULT_FILE""#, gate.display());
    let env =
        [KEEP, ("OATS_RETENTION_DAYS", "0"), ("OATS_DATABASE_URL", &proxied), ("OATS_LOCAL_AGENT_COMMAND", &agent)];
    let server = Server::start_local(&state, &env).await;
    let running = server.create("runs through the outage", 1).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&running, "running", SOON).await;

    outage.cut();
    let response = server.submit(serde_json::json!({"goal": "while down", "max_turns": 1})).await;
    assert_eq!(response.headers()["retry-after"], "5");
    common::assert_problem(response, 503, "backend-unavailable").await;
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{running}/cancel"))).send().await.unwrap();
    common::assert_problem(cancel, 503, "backend-unavailable").await;
    // The job runs on and finishes; reads answer from memory.
    std::fs::write(&gate, "").unwrap();
    server.wait_for(&running, "succeeded", SOON).await;
    let (_, list) = server.get_json("/api/v1/jobs").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");

    // Once the database answers, the finish is stored; a restart finds the job as it ended.
    outage.restore();
    let deadline = std::time::Instant::now() + SOON;
    while !server.log_text().lines().any(|l| l.contains("after a failed write") && l.contains(&running)) {
        assert!(std::time::Instant::now() < deadline, "the finish was never stored:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = reads(&server, &running).await;
    server.stop();
    let server = Server::start_local(&state, &env).await;
    assert_eq!(reads(&server, &running).await, before);
    let (_, list) = server.get_json("/api/v1/jobs").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "the refused submission was not kept: {list}");
}
