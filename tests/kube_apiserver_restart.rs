//! Kill kube-apiserver in the middle of a run: OATS reports not ready, refuses writes with 503,
//! then recovers by itself with no job lost or duplicated. A binary of its own, so no other test
//! runs while the API server is down.

#[path = "kube/cluster.rs"]
mod cluster;
mod common;

use common::assert_problem;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn wait_for_readiness(server: &common::Server, expected: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = server.http.get(server.url("/readyz")).send().await.unwrap().status();
        if status == expected {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz never became {expected}; log:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `oats_kube_cache_synced` of the jobs and the pods caches.
async fn cache_synced(server: &common::Server) -> [f64; 2] {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    ["jobs", "pods"].map(|resource| {
        let prefix = format!("oats_kube_cache_synced{{resource=\"{resource}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix}")).parse().unwrap()
    })
}

#[tokio::test]
async fn oats_recovers_from_an_api_server_restart() {
    let cluster = cluster::cluster();
    let dir = tempfile::tempdir().unwrap();
    let server = cluster.start_oats(dir.path()).await;
    let run = cluster::unique("apiserver");
    let _cleanup = cluster.delete_jobs_on_drop(&run);
    let labels = json!({"e2e": run, "kwok.oats.dev/outcome": "run"});
    let mut ids = Vec::new();
    for i in 0..5 {
        let response = server.submit(json!({"goal": format!("survive {i}"), "max_turns": 1, "labels": labels})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }

    assert_eq!(cache_synced(&server).await, [1.0, 1.0]);
    cluster.testenv("stop-apiserver");
    wait_for_readiness(&server, StatusCode::SERVICE_UNAVAILABLE).await;
    // What OatsWatchCacheNotSynced reads: the caches say so.
    assert!(cache_synced(&server).await.contains(&0.0), "not ready, yet every cache says synced");
    let refused = server.submit(json!({"goal": "while down", "max_turns": 1, "labels": labels})).await;
    let retry_after = refused.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    assert_problem(refused, 503, "backend-unavailable").await;
    assert!(retry_after.is_some_and(|v| v.parse::<u64>().unwrap() >= 1), "503 without Retry-After");

    cluster.testenv("start-apiserver");
    wait_for_readiness(&server, StatusCode::OK).await;
    assert_eq!(cache_synced(&server).await, [1.0, 1.0]);
    for id in &ids {
        let (status, job) = server.get_json(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{job}");
    }
    let (_, all) = server.get_json(&format!("/api/v1/jobs?label=e2e%3D{run}")).await;
    let listed: Vec<&str> = all["items"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), 5, "no job lost or duplicated: {all}");
    assert_eq!(cluster.jobs_labelled(&format!("e2e={run}")).len(), 5);
    let after = server.submit(json!({"goal": "after", "max_turns": 1, "labels": labels})).await;
    assert_eq!(after.status(), StatusCode::CREATED);
    // The whole control plane recovers: a job submitted after the restart runs (its controllers
    // may be in their watch backoff for a while; the suites after this one need them back).
    let after = after.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    server.wait_for(&after, "running", std::time::Duration::from_secs(180)).await;
}
