//! End-to-end HTTP tests: the real server binary, the local backend, a real HTTP client.

use crate::common;

use common::{Server, assert_problem, outage::Outage};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{collections::HashSet, time::Duration};

const SOON: Duration = Duration::from_secs(20);

#[tokio::test]
async fn submit_run_to_success_and_read_logs_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[]).await;

    let response = server.submit(json!({"goal": "Write a haiku", "max_turns": 3, "labels": {"team": "ml"}})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let job: Value = response.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/jobs/{id}"));
    assert_eq!(job["status"], "pending");
    assert_eq!(job["goal"], "Write a haiku");
    assert_eq!(job["max_turns"], 3);
    assert_eq!(job["timeout_seconds"], 600);
    assert_eq!(job["labels"]["team"], "ml");
    assert_eq!(job["links"]["logs"], format!("{location}/logs"));

    let done = server.wait_for(&id, "succeeded", SOON).await;
    assert!(done["result"].as_str().unwrap().contains("finished 3 turns"), "{done}");
    assert_eq!(done["attempts"], 1);
    assert!(done["started_at"].is_string() && done["finished_at"].is_string());

    let logs = server.http.get(server.url(&format!("{location}/logs"))).send().await.unwrap();
    assert_eq!(logs.status(), StatusCode::OK);
    assert!(logs.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = logs.text().await.unwrap();
    for turn in 1..=3 {
        assert!(text.contains(&format!("turn {turn}/3")), "{text}");
    }
    let tail = server.http.get(server.url(&format!("{location}/logs?tail_lines=1&timestamps=true"))).send().await;
    let tail = tail.unwrap().text().await.unwrap();
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.starts_with("20") && tail.contains("demo agent: done"), "{tail}");

    let (status, events) = server.get_json(&format!("{location}/events")).await;
    assert_eq!(status, StatusCode::OK);
    let reasons: Vec<&str> =
        events["items"].as_array().unwrap().iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["Completed", "Started", "Submitted"], "newest first");
}

#[tokio::test]
async fn follow_streams_lines_as_they_are_written_until_exit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_DEMO_TURN_DELAY_MS", "200")]).await;
    let job = server.create("Count slowly", 5).await;
    let id = job["id"].as_str().unwrap();
    let response = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs?follow=true"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut chunks = 0;
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        chunks += 1;
        if chunks == 2 {
            let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
            assert!(metrics.contains("oats_log_streams 1"), "the follower is counted");
        }
    }
    assert!(chunks >= 3, "lines arrived in {chunks} chunk(s); they were not streamed");
    assert!(text.contains("turn 5/5") && text.contains("demo agent: done"), "{text}");
    // The stream ended because the agent exited, so the job is finished now.
    assert_eq!(server.job(id).await["status"], "succeeded");
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("oats_log_streams 0"), "the follower is gone");
}

#[tokio::test]
async fn cancel_stops_a_long_job_and_keeps_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_DEMO_TURN_DELAY_MS", "500")]).await;
    let job = server.create("Think for a long time", 100).await;
    let id = job["id"].as_str().unwrap();
    server.wait_for(id, "running", SOON).await;
    // "running" is the process started; its SIGTERM handler is there once it says it started
    // (before that, on a busy machine, SIGTERM would end it before it could say it was cancelled).
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let logs = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs"))).send().await.unwrap();
        if logs.text().await.unwrap().contains("demo agent: starting") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    let cancelled: Value = cancel.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["reason"], "Cancelled");

    // Cancelling twice is harmless.
    let again = server.http.post(server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);

    // The agent process group is gone: its output stops and says so.
    let deadline = std::time::Instant::now() + SOON;
    let text = loop {
        let logs = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs"))).send().await.unwrap();
        let text = logs.text().await.unwrap();
        if text.contains("cancelled during turn") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not see SIGTERM: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settled = server.job(id).await;
    assert_eq!(settled["status"], "cancelled");
    assert!(settled["finished_at"].is_string());
    assert!(!text.contains("turn 100/100"));

    // A finished job cannot be cancelled.
    let short = server.create("Quick", 1).await;
    let short_id = short["id"].as_str().unwrap();
    server.wait_for(short_id, "succeeded", SOON).await;
    let refused = server.http.post(server.url(&format!("/api/v1/jobs/{short_id}/cancel"))).send().await.unwrap();
    assert_problem(refused, 409, "job-finished").await;
}

#[tokio::test]
async fn failing_and_timed_out_agents_report_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_DEMO_TURN_DELAY_MS", "400")]).await;
    let failing = server.create("Please #fail", 3).await;
    let failed = server.wait_for(failing["id"].as_str().unwrap(), "failed", SOON).await;
    assert_eq!(failed["reason"], "AgentError");
    assert!(failed["message"].as_str().unwrap().contains("code 3"), "{failed}");

    let response = server.submit(json!({"goal": "Never ends", "max_turns": 100, "timeout_seconds": 10})).await;
    let slow: Value = response.json().await.unwrap();
    let timed_out = server.wait_for(slow["id"].as_str().unwrap(), "failed", Duration::from_secs(30)).await;
    assert_eq!(timed_out["reason"], "DeadlineExceeded");
}

#[tokio::test]
async fn concurrency_is_bounded_and_extra_jobs_wait_pending() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_local(dir.path(), &[("OATS_LOCAL_CONCURRENCY", "2"), ("OATS_DEMO_TURN_DELAY_MS", "300")]).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(server.create(&format!("job {i}"), 4).await["id"].as_str().unwrap().to_owned());
    }
    server.wait_for(&ids[0], "running", SOON).await;
    server.wait_for(&ids[1], "running", SOON).await;
    let (_, running) = server.get_json("/api/v1/jobs?status=running").await;
    assert_eq!(running["items"].as_array().unwrap().len(), 2, "{running}");
    let (_, pending) = server.get_json("/api/v1/jobs?status=pending").await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 2, "{pending}");
    for id in &ids {
        server.wait_for(id, "succeeded", SOON).await;
    }
}

#[tokio::test]
async fn list_filters_and_pages_over_200_jobs() {
    let dir = tempfile::tempdir().unwrap();
    // Jobs stay pending (one slot, busy with a long job), so the listing is stable.
    let server =
        Server::start_local(dir.path(), &[("OATS_LOCAL_CONCURRENCY", "1"), ("OATS_DEMO_TURN_DELAY_MS", "1000")]).await;
    let blocker = server.create("blocker", 100).await;
    let mut created = Vec::new();
    for i in 0..200 {
        let team = if i % 4 == 0 { "red" } else { "blue" };
        let response =
            server.submit(json!({"goal": format!("job {i}"), "max_turns": 1, "labels": {"team": team}})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        created.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    created.reverse(); // newest first

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = "/api/v1/jobs?status=pending&limit=30".to_owned();
        if let Some(t) = &token {
            url.push_str(&format!("&page_token={t}"));
        }
        let (status, page) = server.get_json(&url).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        pages += 1;
        if pages == 2 {
            // Jobs created mid-walk must not shift or repeat later pages.
            server.create("late arrival", 1).await;
        }
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 7);
    assert_eq!(seen, created, "every job once, newest first");

    let (_, red) = server.get_json("/api/v1/jobs?label=team%3Dred&limit=500").await;
    let red_items = red["items"].as_array().unwrap();
    assert_eq!(red_items.len(), 50);
    assert!(red_items.iter().all(|j| j["labels"]["team"] == "red"));
    let (_, not_red) = server.get_json("/api/v1/jobs?label=team%20notin%20(red)&limit=500").await;
    assert_eq!(not_red["items"].as_array().unwrap().len(), 150 + 1 + 1, "blue jobs, the blocker and the late one");
    let (_, default_page) = server.get_json("/api/v1/jobs").await;
    assert_eq!(default_page["items"].as_array().unwrap().len(), 50);

    let stop = server.http.post(server.url(&format!("/api/v1/jobs/{}/cancel", blocker["id"].as_str().unwrap())));
    assert_eq!(stop.send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn jobs_survive_a_restart_and_interrupted_runs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("OATS_LOCAL_CONCURRENCY", "1"), ("OATS_DEMO_TURN_DELAY_MS", "300")];
    let server = Server::start_local(dir.path(), &env).await;
    let finished = server.create("finish first", 1).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&finished, "succeeded", SOON).await;
    let running = server.create("interrupted", 100).await["id"].as_str().unwrap().to_owned();
    let queued = server.create("queued", 1).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&running, "running", SOON).await;
    assert_eq!(server.job(&queued).await["status"], "pending");
    server.crash();

    let server = Server::start_local(dir.path(), &env).await;
    assert_eq!(server.job(&finished).await["status"], "succeeded");
    let lost = server.job(&running).await;
    assert_eq!(lost["status"], "failed");
    assert_eq!(lost["reason"], "ServerRestarted");
    // The pending job was accepted, so it is not lost: it runs after the restart.
    server.wait_for(&queued, "succeeded", SOON).await;
    let (_, all) = server.get_json("/api/v1/jobs").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    // No agent of the crashed server is left running.
    let leftovers = std::process::Command::new("pgrep").args(["-f", "demo-agent"]).output().unwrap();
    let pids = String::from_utf8_lossy(&leftovers.stdout).to_string();
    for pid in pids.lines() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&environ).contains(&running), "agent of {running} survived the restart");
    }
    server.stop();
}

#[tokio::test]
async fn concurrent_idempotent_submissions_create_exactly_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[]).await;
    let body = json!({"goal": "Exactly once", "max_turns": 2});
    let requests = (0..20).map(|_| {
        server.http.post(server.url("/api/v1/jobs")).header("Idempotency-Key", "order-7f3a").json(&body).send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut ids = HashSet::new();
    let mut created = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}"),
        }
        ids.insert(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1, "exactly one request creates the job");
    assert_eq!(ids.len(), 1, "all requests see the same job");
    let (_, all) = server.get_json("/api/v1/jobs").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1);

    // Same key, different body: refused. Another tenant's key space is separate (see unit tests).
    let reuse = server
        .http
        .post(server.url("/api/v1/jobs"))
        .header("Idempotency-Key", "order-7f3a")
        .json(&json!({"goal": "Something else", "max_turns": 2}))
        .send()
        .await
        .unwrap();
    assert_problem(reuse, 409, "idempotency-key-reused").await;
    // An explicit default is the same request.
    let same = server
        .http
        .post(server.url("/api/v1/jobs"))
        .header("Idempotency-Key", "order-7f3a")
        .json(&json!({"goal": "Exactly once", "max_turns": 2, "timeout_seconds": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), StatusCode::OK);
}

/// Over a real connection (chunked, no Content-Length) an oversized body is refused, and the
/// server lives on without a panic in its log. The rest of the input checks run in process
/// (`app.rs`).
#[tokio::test]
async fn an_oversized_streamed_body_is_a_413_problem_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_MAX_BODY_BYTES", "32768")]).await;
    let huge = json!({"goal": "a".repeat(40_000), "max_turns": 1}).to_string();
    let chunks = futures::stream::iter(
        huge.into_bytes().chunks(1000).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
    );
    let streamed = server
        .http
        .post(server.url("/api/v1/jobs"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_problem(streamed, 413, "payload-too-large").await;

    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!server.log_text().contains("panicked"), "{}", server.log_text());
}

#[tokio::test]
async fn goals_and_labels_round_trip_byte_for_byte_and_finished_jobs_keep_their_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_DEMO_TURN_DELAY_MS", "50")]).await;
    let goal = "Print $(OATS_JOB_ID), $$(HOME), $$ and $5 as they are $";
    let labels = json!({"app.kubernetes.io/name": "summariser", "app.kubernetes.io/part-of": "", "team": "ml"});
    let response = server.submit(json!({"goal": goal, "max_turns": 1, "labels": labels})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let done = server.wait_for(&id, "succeeded", SOON).await;
    assert_eq!((done["goal"].as_str(), &done["labels"]), (Some(goal), &labels));
    // The demo agent quotes the goal it got in its environment: unexpanded.
    assert!(done["result"].as_str().unwrap().contains(&format!("{goal:?}")), "{done}");
    let (_, page) =
        server.get_json("/api/v1/jobs?label=app.kubernetes.io%2Fname%3Dsummariser,app.kubernetes.io%2Fpart-of").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");

    // Keys Kubernetes owns are refused here too, naming the key.
    let response = server.submit(json!({"goal": "g", "max_turns": 1, "labels": {"controller-uid": "x"}})).await;
    let problem = assert_problem(response, 422, "validation-failed").await;
    assert_eq!(problem["errors"][0]["field"], "labels.controller-uid");

    // A failed job cannot be cancelled either: 409, and it stays failed.
    let failing = server.create("Please #fail", 2).await;
    let failing = failing["id"].as_str().unwrap();
    server.wait_for(failing, "failed", SOON).await;
    let refused = server.http.post(server.url(&format!("/api/v1/jobs/{failing}/cancel"))).send().await.unwrap();
    let problem = assert_problem(refused, 409, "job-finished").await;
    assert!(problem["detail"].as_str().unwrap().contains("failed"), "{problem}");
    assert_eq!(server.job(failing).await["reason"], "AgentError");
}

#[tokio::test]
async fn a_burst_of_50_parallel_submissions_gets_exactly_max_concurrent_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  max_concurrent_jobs: 2\n").unwrap();
    let policy = policy.display().to_string();
    let env = [("OATS_POLICY_FILE", policy.as_str()), ("OATS_DEMO_TURN_DELAY_MS", "1000")];
    let server = Server::start_local(dir.path(), &env).await;
    // 50 submissions at once, each on its own connection.
    let submissions = (0..50).map(|i| {
        reqwest::Client::new()
            .post(server.url("/api/v1/jobs"))
            .json(&json!({"goal": format!("burst {i}"), "max_turns": 100}))
            .send()
    });
    let mut created = Vec::new();
    for response in futures::future::join_all(submissions).await {
        let response = response.unwrap();
        if response.status() == StatusCode::CREATED {
            created.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
            continue;
        }
        assert!(response.headers().contains_key("retry-after"));
        let problem = assert_problem(response, 429, "policy/max-concurrent-jobs").await;
        assert!(problem["detail"].as_str().unwrap().contains("the limit is 2"), "{problem}");
    }
    assert_eq!(created.len(), 2, "exactly the limit is accepted");
    let (_, all) = server.get_json("/api/v1/jobs").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2, "{all}");
    // Cancelling one frees its slot.
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{}/cancel", created[0]))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    assert_eq!(server.submit(json!({"goal": "after", "max_turns": 1})).await.status(), StatusCode::CREATED);
    assert_eq!(server.submit(json!({"goal": "over", "max_turns": 1})).await.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn finished_jobs_count_against_max_kept_jobs_for_ttl_seconds_after_finished() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  max_concurrent_jobs: 10\n  max_kept_jobs: 2\n").unwrap();
    let policy = policy.display().to_string();
    let env = [("OATS_POLICY_FILE", policy.as_str()), ("OATS_TTL_SECONDS_AFTER_FINISHED", "3")];
    let server = Server::start_local(dir.path(), &env).await;
    for goal in ["first", "second"] {
        let id = server.create(goal, 1).await["id"].as_str().unwrap().to_owned();
        server.wait_for(&id, "succeeded", SOON).await;
    }
    // Both finished: nothing is running, but both count until their TTL, as on Kubernetes.
    let response = server.submit(json!({"goal": "third", "max_turns": 1})).await;
    assert!(response.headers().contains_key("retry-after"));
    let problem = assert_problem(response, 429, "policy/max-kept-jobs").await;
    assert!(problem["detail"].as_str().unwrap().contains("the limit is 2"), "{problem}");
    // Once their TTL has passed they no longer count.
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let response = server.submit(json!({"goal": "third", "max_turns": 1})).await;
        if response.status() == StatusCode::CREATED {
            break;
        }
        assert_problem(response, 429, "policy/max-kept-jobs").await;
        assert!(std::time::Instant::now() < deadline, "the finished jobs kept counting after their TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn finished_local_jobs_leave_the_backend_after_their_ttl_and_are_answered_from_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_TTL_SECONDS_AFTER_FINISHED", "2")]).await;
    let id = server.create("brief", 2).await["id"].as_str().unwrap().to_owned();
    let running = server.create("long", 100).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&id, "succeeded", SOON).await;
    let job_dir = dir.path().join("jobs").join(&id);
    assert!(job_dir.join("workspace").is_dir() && job_dir.join("output.log").is_file());
    let reads = |server: &Server| {
        let paths = [
            format!("/api/v1/jobs/{id}"),
            format!("/api/v1/jobs/{id}/events"),
            format!("/api/v1/jobs/{id}/logs?timestamps=true"),
            format!("/api/v1/jobs/{id}/logs?tail_lines=1"),
            "/api/v1/jobs?status=succeeded".to_owned(),
        ];
        let http = server.http.clone();
        let urls: Vec<String> = paths.iter().map(|p| server.url(p)).collect();
        async move {
            let mut answers = Vec::new();
            for url in urls {
                let response = http.get(url).send().await.unwrap();
                answers.push((response.status(), response.text().await.unwrap()));
            }
            answers
        }
    };
    let live = reads(&server).await;
    assert!(live.iter().all(|(status, _)| *status == StatusCode::OK), "{live:?}");
    assert!(live[2].1.contains("brief"), "the output names the goal: {}", live[2].1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while job_dir.exists() {
        assert!(std::time::Instant::now() < deadline, "the finished job was never removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reads(&server).await, live, "the job, its events, its logs and the list answer as before");
    assert_eq!(server.job(&running).await["status"], "running", "unfinished jobs are kept whatever their age");
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{running}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    drop(server);

    // History outlives the process: a new server on the same state directory still answers.
    let server = Server::start_local(dir.path(), &[("OATS_TTL_SECONDS_AFTER_FINISHED", "2")]).await;
    let (status, job) = server.get_json(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!((status, job["status"].as_str()), (StatusCode::OK, Some("succeeded")));
}

/// Processes (not zombies) whose environment marks them as part of job `id`.
fn processes_of(id: &str) -> Vec<u32> {
    let marker = format!("OATS_JOB_ID={id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ.split(|b| *b == 0).any(|var| var == marker.as_bytes())
        })
        .collect()
}

/// Wait (up to `within`) until no process of job `id` is left; the survivors if some are.
async fn until_gone(id: &str, within: Duration) -> Vec<u32> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = processes_of(id);
        if left.is_empty() || std::time::Instant::now() > deadline {
            for pid in &left {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An agent that leaves its process group (`setsid`) and waits.
const ESCAPING_AGENT: &str = "sh,-c,setsid sleep 120 & sleep 120";

#[tokio::test]
async fn agents_that_leave_their_process_group_are_still_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_LOCAL_AGENT_COMMAND", ESCAPING_AGENT)]).await;

    let cancelled = server.create("cancel me", 1).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&cancelled, "running", SOON).await;
    let deadline = std::time::Instant::now() + SOON;
    while processes_of(&cancelled).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "the agent never started its processes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{cancelled}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    assert_eq!(until_gone(&cancelled, Duration::from_secs(10)).await, Vec::<u32>::new(), "cancel left processes");

    let response = server.submit(json!({"goal": "time out", "max_turns": 1, "timeout_seconds": 10})).await;
    let timed_out = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let failed = server.wait_for(&timed_out, "failed", Duration::from_secs(30)).await;
    assert_eq!(failed["reason"], "DeadlineExceeded");
    assert_eq!(until_gone(&timed_out, Duration::from_secs(10)).await, Vec::<u32>::new(), "the timeout left processes");

    // An agent that exits leaving a process behind: the job ends, and so does the process.
    let leaving = "sh,-c,setsid sleep 120 & echo left one behind";
    let server = Server::start_local(&dir.path().join("second"), &[("OATS_LOCAL_AGENT_COMMAND", leaving)]).await;
    let done = server.create("leave something", 1).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&done, "succeeded", SOON).await;
    assert_eq!(until_gone(&done, Duration::from_secs(10)).await, Vec::<u32>::new(), "a finished job left processes");
}

#[tokio::test]
async fn no_agent_process_of_any_phase_survives_a_crash_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("OATS_LOCAL_AGENT_COMMAND", ESCAPING_AGENT), ("OATS_LOCAL_CONCURRENCY", "1")];
    let server = Server::start_local(dir.path(), &env).await;
    let running = server.create("running at the crash", 1).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&running, "running", SOON).await;
    let queued = server.create("pending at the crash", 1).await["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + SOON;
    while processes_of(&running).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "the agent never started its processes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A pending job's agent started just before the crash, before its start was recorded.
    let mut early = std::process::Command::new("sleep").arg("120").env("OATS_JOB_ID", &queued).spawn().unwrap();
    server.crash();
    assert!(processes_of(&running).len() >= 2, "the crash itself stopped the agent; the test proves nothing");

    let server = Server::start_local(dir.path(), &env).await;
    assert_eq!(server.job(&running).await["reason"], "ServerRestarted");
    assert_eq!(
        until_gone(&running, Duration::from_secs(5)).await,
        Vec::<u32>::new(),
        "the running job's processes survived"
    );
    let status = early.try_wait().unwrap();
    assert!(status.is_some(), "the pending job's early agent survived the restart");
    // The pending job runs again, from scratch.
    server.wait_for(&queued, "running", SOON).await;
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{queued}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    assert_eq!(until_gone(&queued, Duration::from_secs(10)).await, Vec::<u32>::new());
}

#[tokio::test]
async fn local_jobs_are_private_bounded_and_tailed_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let chatty = r#"sh,-c,yes 'a line of output' | head -c 3000000; echo done > "$OATS_RESULT_FILE""#;
    let server =
        Server::start_local(&state, &[("OATS_LOCAL_AGENT_COMMAND", chatty), ("OATS_LOCAL_MAX_LOG_BYTES", "100000")])
            .await;
    let id = server.create("talk a lot", 1).await["id"].as_str().unwrap().to_owned();
    let done = server.wait_for(&id, "succeeded", SOON).await;
    assert_eq!(done["result"], "done");

    // Output is capped, and says so.
    let job_dir = state.join("jobs").join(&id);
    let size = std::fs::metadata(job_dir.join("output.log")).unwrap().len();
    assert!((90_000..=100_200).contains(&size), "output.log holds {size} bytes");
    let logs = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs?tail_lines=1"))).send().await.unwrap();
    let last = logs.text().await.unwrap();
    assert!(last.contains("[oats] output truncated") && last.lines().count() == 1, "{last}");

    // Directories 0700, files 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    for dir in [state.join("jobs"), job_dir.clone(), job_dir.join("workspace")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in ["output.log", "result"] {
        assert_eq!(mode(&job_dir.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&state.join("oats.db")), 0o600, "the store, which holds the records");

    // The tail of a large log is read from its end: memory follows the answer, not the log.
    let line = format!("2026-12-01T00:00:00.000000000Z {}\n", "y".repeat(200));
    let big: String = line.repeat(250_000); // ~58 MB
    std::fs::write(job_dir.join("output.log"), big.as_bytes()).unwrap();
    let before = peak_rss_kib(server.pid());
    let tail = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs?tail_lines=2"))).send().await.unwrap();
    assert_eq!(tail.text().await.unwrap(), format!("{}\n", "y".repeat(200)).repeat(2));
    let after = peak_rss_kib(server.pid());
    assert!(after < before + 16 * 1024, "peak memory grew from {before} KiB to {after} KiB for a 2-line tail");
    // Reading all of it streams it: memory stays bounded too.
    let all = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs"))).send().await.unwrap();
    assert_eq!(all.bytes().await.unwrap().len(), big.len() - 250_000 * 31);
    let after_all = peak_rss_kib(server.pid());
    assert!(after_all < before + 16 * 1024, "peak memory grew from {before} KiB to {after_all} KiB streaming the log");
}

/// An agent that answers with its goal, or with what it sees of two variables of the server's
/// environment when the goal is `env`.
const ECHO_AGENT: &str = r#"sh,-c,if [ "$OATS_GOAL" = env ]; then printf '%s %s' "${SERVER_ONLY_SECRET-absent}" "${VISIBLE_TO_AGENT-absent}"; else printf %s "$OATS_GOAL"; fi > "$OATS_RESULT_FILE""#;

#[tokio::test]
async fn agents_see_only_allowlisted_variables_and_results_are_cut_on_a_character_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(
        dir.path(),
        &[
            ("OATS_LOCAL_AGENT_COMMAND", ECHO_AGENT),
            ("OATS_LOCAL_ENV_ALLOWLIST", "PATH,VISIBLE_TO_AGENT"),
            ("SERVER_ONLY_SECRET", "s3cret"),
            ("VISIBLE_TO_AGENT", "shown"),
        ],
    )
    .await;
    let environ = std::fs::read(format!("/proc/{}/environ", server.pid())).unwrap();
    assert!(environ.split(|b| *b == 0).any(|v| v == b"SERVER_ONLY_SECRET=s3cret"), "the server holds the secret");

    let id = server.create("env", 1).await["id"].as_str().unwrap().to_owned();
    let done = server.wait_for(&id, "succeeded", SOON).await;
    assert_eq!(done["result"], "absent shown");

    // 5,000 bytes whose byte 4,096 is inside a two-byte character: cut to the 4,095 before it.
    let long = format!("a{}z", "é".repeat(2499));
    assert_eq!(long.len(), 5000);
    let id = server.create(&long, 1).await["id"].as_str().unwrap().to_owned();
    let done = server.wait_for(&id, "succeeded", SOON).await;
    assert_eq!(done["result"].as_str().unwrap(), format!("a{}", "é".repeat(2047)));
}

#[tokio::test]
async fn jobs_that_finish_while_the_database_is_down_are_archived_when_it_answers_again() {
    let (outage, proxied) = Outage::before_postgres(&common::stores::postgres_url()).await;
    let dir = tempfile::tempdir().unwrap();
    // Jobs are submitted while the database answers (a submission is stored before it is
    // answered) and finish once it is down: each waits for this file.
    let gate = dir.path().join("go");
    let agent = format!(
        r#"sh,-c,echo "$OATS_GOAL"; while [ ! -e {} ]; do sleep 0.05; done; echo done > "$OATS_RESULT_FILE""#,
        gate.display()
    );
    let env = [
        ("OATS_TTL_SECONDS_AFTER_FINISHED", "1"),
        ("OATS_DATABASE_URL", proxied.as_str()),
        ("OATS_LOCAL_AGENT_COMMAND", agent.as_str()),
    ];
    let server = Server::start_local(dir.path(), &env).await;

    let mut ids = Vec::new();
    for goal in ["first while down", "second while down", "third while down"] {
        ids.push(server.create(goal, 2).await["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        server.wait_for(id, "running", SOON).await;
    }
    outage.cut();
    std::fs::write(&gate, "").unwrap();
    for id in &ids {
        server.wait_for(id, "succeeded", SOON).await;
    }
    // The local backend forgets them after their 1 s TTL, with the database still down.
    let deadline = std::time::Instant::now() + SOON;
    while ids.iter().any(|id| dir.path().join("jobs").join(id).exists()) {
        assert!(std::time::Instant::now() < deadline, "the finished jobs were never removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = server.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "a database outage leaves the API ready");
    let response = server.http.get(server.url(&format!("/api/v1/jobs/{}", ids[0]))).send().await.unwrap();
    assert_problem(response, 503, "backend-unavailable").await;
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let lag: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("oats_archive_lag_seconds "))
        .expect("the lag gauge is exported")
        .parse()
        .unwrap();
    assert!(lag > 0.0, "the archive is reported behind:\n{metrics}");
    assert!(!metrics.contains("oats_archive_failures_total{stage=\"store\"} 0\n"), "{metrics}");

    outage.restore();
    for (id, goal) in ids.iter().zip(["first", "second", "third"]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        let job = loop {
            let (status, job) = server.get_json(&format!("/api/v1/jobs/{id}")).await;
            if status == StatusCode::OK {
                break job;
            }
            assert!(std::time::Instant::now() < deadline, "{id} was never archived after the outage: {status} {job}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(job["status"], "succeeded");
        let logs = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs"))).send().await.unwrap();
        let logs = logs.text().await.unwrap();
        assert!(logs.contains(goal), "the output collected during the outage was kept: {logs}");
    }
}

/// Every listener bound to port 0 gets a port of its own, which the addresses file names
/// (`oats serve --addresses-file`, what the test kit reads), and serves there.
#[tokio::test]
async fn every_listener_on_port_0_reports_the_port_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_METRICS_LISTEN", "127.0.0.1:0")]).await;
    let (api, metrics) = (server.address("api").unwrap(), server.address("metrics").expect("a metrics line"));
    assert!(api.port() != 0 && metrics.port() != 0 && api != metrics, "api {api}, metrics {metrics}");
    assert_eq!(server.address("llm"), None, "no gateway without a providers file");
    let scraped = server.http.get(format!("http://{metrics}/metrics")).send().await.unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("# HELP oats_jobs "), "the metrics port serves metrics");
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
}
