//! The CLI against a live server, live status over Server-Sent Events, and graceful shutdown.

use crate::common;

use common::Server;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

fn cli(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oats"))
        .arg("jobs")
        .args(args)
        .env("OATS_URL", &server.base)
        .env("NO_COLOR", "1")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .expect("the CLI runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn the_cli_drives_jobs_with_meaningful_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_DEMO_TURN_DELAY_MS", "100")]).await;

    let ok = cli(&server, &["submit", "--goal", "from the cli", "--max-turns", "3", "--label", "team=ml", "--follow"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    let stdout = text(&ok.stdout);
    assert!(stdout.contains("turn 3/3") && stdout.contains("demo result: finished 3 turns"), "{stdout}");
    assert!(text(&ok.stderr).contains("succeeded"));

    let failed = cli(&server, &["submit", "--goal", "please #fail", "--follow"]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        text(&failed.stderr).contains("failed (AgentError): the agent exited with code 3"),
        "{}",
        text(&failed.stderr)
    );

    let created = cli(&server, &["submit", "--goal", "json please", "--max-turns", "100", "-o", "json"]);
    let job: Value = serde_json::from_slice(&created.stdout).expect("-o json prints the API object");
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["links"]["self"], format!("/api/v1/jobs/{id}"));
    let yaml = cli(&server, &["get", &id, "-o", "yaml"]);
    assert!(text(&yaml.stdout).contains(&format!("id: {id}")), "{}", text(&yaml.stdout));

    let table = text(&cli(&server, &["list"]).stdout);
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("STATUS") && header.contains("CREATED"), "{table}");
    assert!(table.contains(&id) && table.contains("ago"), "{table}");
    assert!(!table.contains('\x1b'), "no colour when piped");

    let watcher = {
        let base = server.base.clone();
        let id = id.clone();
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_oats"))
                .args(["jobs", "watch", &id, "--url", &base])
                .env("NO_COLOR", "1")
                .output()
                .unwrap()
        })
    };
    // Cancel once the watch is connected (the server counts its stream).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.lines().any(|l| l == "oats_watch_streams 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the CLI's watch never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancelled = cli(&server, &["cancel", &id]);
    assert_eq!(cancelled.status.code(), Some(0));
    let watched = tokio::task::spawn_blocking(move || watcher.join().unwrap()).await.unwrap();
    assert_eq!(watched.status.code(), Some(2), "a cancelled job exits 2: {}", text(&watched.stdout));
    assert!(text(&watched.stdout).contains("cancelled (Cancelled)"), "{}", text(&watched.stdout));

    let logs = cli(&server, &["logs", &id, "--tail", "1"]);
    assert_eq!(text(&logs.stdout).lines().count(), 1);

    let missing = cli(&server, &["get", "job-aaaaaaaaaaaaaaaaaaaa"]);
    assert_eq!(missing.status.code(), Some(3));
    let line = text(&missing.stderr);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("HTTP 404") && line.contains("not found"), "{line}");
    let invalid = cli(&server, &["submit", "--goal", "x", "--label", "bad key=v"]);
    assert_eq!(invalid.status.code(), Some(3));
    assert!(text(&invalid.stderr).contains("validation-failed"), "{}", text(&invalid.stderr));
    let unreachable = cli(&server, &["list", "--url", "http://127.0.0.1:9"]);
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(text(&unreachable.stderr).contains("cannot reach http://127.0.0.1:9"), "{}", text(&unreachable.stderr));
}

/// Read SSE events from a response until `stop` says so; returns (event, id, data) triples.
async fn read_events(
    response: reqwest::Response,
    mut stop: impl FnMut(&str, &Value) -> bool,
) -> Vec<(String, String, Value)> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                block.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(String::from)).unwrap_or_default()
            };
            if field("data").is_empty() {
                continue;
            }
            let data: Value = serde_json::from_str(&field("data")).unwrap();
            let done = stop(&field("event"), &data);
            events.push((field("event"), field("id"), data));
            if done {
                return events;
            }
        }
    }
    events
}

#[tokio::test]
async fn watch_streams_changes_and_resumes_from_the_last_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_DEMO_TURN_DELAY_MS", "300")]).await;
    let job = server.create("watch me", 4).await;
    let id = job["id"].as_str().unwrap();
    let url = server.url(&format!("/api/v1/jobs/{id}/watch"));

    let response = server.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let first = read_events(response, |_, _| true).await;
    let (event, first_id, data) = &first[0];
    assert_eq!(event, "job");
    assert_eq!(&data["state"], first_id);
    assert_eq!(data["job"]["id"], id);

    // Resuming from the first event never repeats it, and ends with the final state.
    let resumed = server.http.get(&url).header("Last-Event-ID", first_id).send().await.unwrap();
    let rest = read_events(resumed, |_, data| data["job"]["status"] == "succeeded").await;
    assert!(rest.iter().all(|(_, event_id, _)| event_id != first_id), "{rest:?}");
    let statuses: Vec<&str> = rest.iter().map(|(_, _, d)| d["job"]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.last(), Some(&"succeeded"), "{statuses:?}");
    let final_id = rest.last().unwrap().1.clone();

    // Resuming from the final state sends nothing and ends.
    let after = server.http.get(&url).header("Last-Event-ID", final_id).send().await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_secs(5), read_events(after, |_, _| false)).await.unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");

    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("oats_watch_streams 0"), "every watcher was released");
}

/// An idle watch stream gets the heartbeat comment (`:` and a blank line) from the server's
/// shared timer, every 15 s, so it arrives within one period of the first event.
#[tokio::test]
async fn idle_watch_streams_get_heartbeat_comments() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_DEMO_TURN_DELAY_MS", "1000")]).await;
    let id = server.create("idle", 100).await["id"].as_str().unwrap().to_owned();
    let response = server.http.get(server.url(&format!("/api/v1/jobs/{id}/watch"))).send().await.unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let chunk = tokio::time::timeout_at(deadline.into(), body.next()).await;
        let chunk = chunk.expect("no heartbeat within two periods").expect("the stream stays open").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        // Events end in a blank line; the comment is a block of its own between them.
        if text.starts_with("id: ") && text.split("\n\n").any(|block| block == ":") {
            break;
        }
    }
}

#[tokio::test]
async fn streams_per_tenant_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  max_streams: 2\n").unwrap();
    let policy = policy.display().to_string();
    let server =
        Server::start_local(dir.path(), &[("OATS_POLICY_FILE", &policy), ("OATS_DEMO_TURN_DELAY_MS", "1000")]).await;
    let id = server.create("long", 100).await["id"].as_str().unwrap().to_owned();
    let watch = server.url(&format!("/api/v1/jobs/{id}/watch"));
    let one = server.http.get(&watch).send().await.unwrap();
    let two = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs?follow=true"))).send().await.unwrap();
    assert_eq!((one.status(), two.status()), (StatusCode::OK, StatusCode::OK));
    let third = server.http.get(&watch).send().await.unwrap();
    assert!(third.headers().get("retry-after").is_some());
    common::assert_problem(third, 429, "policy/max-streams").await;
    drop((one, two));
    // The server notices a client is gone at its next write (a log line, or the 15 s heartbeat).
    let deadline = Instant::now() + Duration::from_secs(25);
    while server.http.get(&watch).send().await.unwrap().status() != StatusCode::OK {
        assert!(Instant::now() < deadline, "the slots were never released");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The drain as a rolling update sees it: SIGTERM, readiness 503 at once, the load balancer
/// still sending for a while (every request served), the listener closing at the end of
/// `shutdown_delay_seconds`, and a request in flight then finishing within the grace period.
#[tokio::test]
async fn sigterm_drains_without_failing_requests() {
    const DELAY: Duration = Duration::from_secs(4);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_local(
        dir.path(),
        &[
            ("OATS_SHUTDOWN_DELAY_SECONDS", "4"),
            ("OATS_SHUTDOWN_GRACE_SECONDS", "10"),
            ("OATS_DEMO_TURN_DELAY_MS", "1000"),
        ],
    )
    .await;
    let long = server.create("outlives the server", 100).await["id"].as_str().unwrap().to_owned();
    server.wait_for(&long, "running", Duration::from_secs(10)).await;
    let follow = server.http.get(server.url(&format!("/api/v1/jobs/{long}/logs?follow=true"))).send().await.unwrap();
    let watch = server.http.get(server.url(&format!("/api/v1/jobs/{long}/watch"))).send().await.unwrap();

    // Load, as a load balancer would send it: it goes on after readiness flips, until the
    // endpoints controller would have caught up (half the delay).
    let draining = Arc::new(AtomicBool::new(false));
    let flipped = Arc::new(AtomicBool::new(false));
    let (done, after_flip) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (http, base) = (reqwest::Client::new(), server.base.clone());
        let (draining, flipped, done, after_flip, failures) =
            (draining.clone(), flipped.clone(), done.clone(), after_flip.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !draining.load(Ordering::SeqCst) {
                let late = flipped.load(Ordering::SeqCst);
                let result = if i % 2 == 0 {
                    http.post(format!("{base}/api/v1/jobs"))
                        .json(&json!({"goal": format!("load {worker}-{i}"), "max_turns": 1}))
                        .send()
                        .await
                } else {
                    http.get(format!("{base}/api/v1/jobs?limit=5")).send().await
                };
                match result {
                    Ok(r) if r.status().is_success() => {
                        done.fetch_add(1, Ordering::SeqCst);
                        if late {
                            after_flip.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(r) => failures.lock().unwrap().push(format!("HTTP {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("{e:?}")),
                }
                i += 1;
                // Paced, as steady traffic: four workers send about 200 requests a second, half of
                // them submissions, within the tenant's 1,200 submissions a minute (unpaced, a fast
                // server answers so quickly that the rate limit rightly answers 429).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.load(Ordering::SeqCst) < 10 {
        assert!(Instant::now() < deadline, "the load never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = server.pid();
    let sent = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    loop {
        let ready = server.http.get(server.url("/readyz")).send().await.map(|r| r.status());
        if matches!(ready, Ok(StatusCode::SERVICE_UNAVAILABLE)) {
            break;
        }
        assert!(sent.elapsed() < Duration::from_secs(2), "readiness did not flip: {ready:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sent.elapsed() < Duration::from_secs(1), "readiness must flip at once");
    flipped.store(true, Ordering::SeqCst);

    // A submission whose body is still arriving when the listener closes.
    let (body, body_stream) = futures::channel::mpsc::unbounded::<Result<&'static str, std::io::Error>>();
    body.unbounded_send(Ok(r#"{"goal": "in flight at the close", "#)).unwrap();
    let in_flight = tokio::spawn(
        reqwest::Client::new()
            .post(server.url("/api/v1/jobs"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(body_stream))
            .send(),
    );

    tokio::time::sleep_until((sent + DELAY / 2).into()).await;
    draining.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(failures.lock().unwrap().is_empty(), "requests failed during shutdown: {:?}", failures.lock().unwrap());
    assert!(after_flip.load(Ordering::SeqCst) >= 5, "the load went on during the delay");

    // The listener closes at the end of the delay; then the request's body is completed.
    let address = server.base.trim_start_matches("http://").to_owned();
    let deadline = Instant::now() + DELAY + Duration::from_secs(5);
    while std::net::TcpStream::connect(&address).is_ok() {
        assert!(Instant::now() < deadline, "the listener never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    body.unbounded_send(Ok(r#""max_turns": 1}"#)).unwrap();
    drop(body);
    let answer = in_flight.await.unwrap().expect("the request in flight got an answer");
    assert_eq!(answer.status(), StatusCode::CREATED, "the request in flight was served");

    // Streams end cleanly: the log body completes, the watch says goodbye.
    let body = tokio::time::timeout(Duration::from_secs(5), follow.bytes()).await.expect("the log stream ended");
    assert!(body.is_ok(), "the log stream ended with an error: {body:?}");
    let events =
        tokio::time::timeout(Duration::from_secs(5), read_events(watch, |event, _| event == "shutdown")).await.unwrap();
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("shutdown"), "{events:?}");

    let status = server.wait_exit(Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "the server exits cleanly within the grace period");
}

/// The numbers after every `key` in `text` (`key: 5`, `key=5`, `key: "5"`).
fn numbers_after(text: &str, key: &str) -> Vec<u64> {
    text.match_indices(key)
        .filter_map(|(at, _)| {
            let rest = text[at + key.len()..].trim_start_matches([':', '=', ' ', '"', '\'']);
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The preStop sleep of a pod template: the first `seconds:` after `preStop:`.
fn pre_stop_seconds(text: &str) -> u64 {
    let at = text.find("preStop:").expect("the API pods have a preStop hook");
    numbers_after(&text[at..], "seconds")[0]
}

/// `OATS_<key>` as set anywhere in `texts` (the largest value, the worst case), else the default.
fn shutdown_setting(texts: &[String], key: &str, default: u32) -> u64 {
    let name = format!("OATS_{}", key.to_ascii_uppercase());
    texts.iter().flat_map(|text| numbers_after(text, &name)).max().unwrap_or(default.into())
}

fn read_all(paths: &[&str]) -> Vec<String> {
    let mut texts = Vec::new();
    for path in paths {
        let path = std::path::Path::new(path);
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                let entry = entry.unwrap().path();
                if entry.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "tpl") {
                    texts.push(std::fs::read_to_string(entry).unwrap());
                }
            }
        } else {
            texts.push(std::fs::read_to_string(path).unwrap());
        }
    }
    texts
}

/// preStop, then `shutdown_delay_seconds` (readiness 503, endpoints update), then up to
/// `shutdown_grace_seconds` for requests in progress must end at least 5 s before the kubelet's
/// SIGKILL at `terminationGracePeriodSeconds`, in the kustomize base and overlays and in the Helm
/// chart with each of its values files.
#[test]
fn shutdown_ends_well_before_the_termination_grace_period() {
    const MARGIN: u64 = 5;
    let defaults = oats::config::Config::default();
    let check = |what: &str, pod: &str, settings: &[String]| {
        let periods = numbers_after(pod, "terminationGracePeriodSeconds");
        assert_eq!(periods.len(), 1, "{what}: one literal terminationGracePeriodSeconds expected");
        let period = periods[0];
        let pre_stop = pre_stop_seconds(pod);
        let delay = shutdown_setting(settings, "shutdown_delay_seconds", defaults.shutdown_delay_seconds);
        let grace = shutdown_setting(settings, "shutdown_grace_seconds", defaults.shutdown_grace_seconds);
        assert!(
            pre_stop + delay + grace + MARGIN <= period,
            "{what}: preStop {pre_stop} s + shutdown delay {delay} s + grace {grace} s leaves less than \
             {MARGIN} s below terminationGracePeriodSeconds {period}"
        );
    };
    let deployment = std::fs::read_to_string("infra/base/backend-api-deployment.yaml").unwrap();
    let pod = &deployment[..deployment.find("\n---").unwrap_or(deployment.len())];
    check("infra/base", pod, &read_all(&["infra/base", "infra/overlays/dev", "infra/overlays/prod"]));
    let template = std::fs::read_to_string("infra/helm/oats/templates/backend-api.yaml").unwrap();
    for values in ["values.yaml", "values-dev.yaml", "values-prod.yaml"] {
        let files = read_all(&["infra/helm/oats/values.yaml", &format!("infra/helm/oats/{values}")]);
        check(&format!("helm with {values}"), &template, &files);
    }
}

/// What the server hands the CLI (a goal, an agent's output and result, messages) may hold
/// terminal escape sequences: the CLI strips them before printing, in every command.
#[tokio::test]
async fn the_cli_never_prints_terminal_control_sequences() {
    let dir = tempfile::tempdir().unwrap();
    // An agent that echoes its goal to its output and as its result, byte for byte.
    let echo = r#"sh,-c,printf '%s\n' "$OATS_GOAL"; printf '%s' "$OATS_GOAL" > "$OATS_RESULT_FILE""#;
    let server = Server::start_local(dir.path(), &[("OATS_LOCAL_AGENT_COMMAND", echo)]).await;
    let goal = "wipe \u{1b}[2J\u{1b}]0;owned\u{7} ring \u{9b}31m red\r over";
    let job = server.create(goal, 1).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = server.wait_for(&id, "succeeded", Duration::from_secs(20)).await;
    assert_eq!(done["result"], goal, "the server keeps the data as it is");
    let raw = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs"))).send().await.unwrap();
    assert!(raw.text().await.unwrap().contains('\u{1b}'), "the agent's output holds the escape sequence");

    let safe = |what: &str, output: &Output| {
        for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
            let text = text(bytes);
            let bad = text.chars().find(|c| c.is_control() && *c != '\n' && *c != '\t');
            assert!(bad.is_none(), "{what} printed {bad:?} on {stream}: {text:?}");
        }
    };
    let get = cli(&server, &["get", &id]);
    safe("get", &get);
    assert!(text(&get.stdout).contains("wipe [2J]0;owned ring 31m red over"), "{}", text(&get.stdout));
    safe("list", &cli(&server, &["list"]));
    safe("logs", &cli(&server, &["logs", &id]));
    safe("get -o yaml", &cli(&server, &["get", &id, "-o", "yaml"]));
    let json = cli(&server, &["get", &id, "-o", "json"]);
    safe("get -o json", &json);
    let parsed: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["goal"], goal, "-o json stays exact (escaped, not printed raw)");
    let followed = cli(&server, &["submit", "--goal", goal, "--max-turns", "1", "--follow"]);
    assert_eq!(followed.status.code(), Some(0), "{}", text(&followed.stderr));
    safe("submit --follow", &followed);
    assert!(text(&followed.stdout).contains("wipe [2J"), "{}", text(&followed.stdout));
}
