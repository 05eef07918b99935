//! Authentication, tenancy, roles, the policy file, and hostile input, against the real server.

use crate::common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{Server, assert_problem};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{path::Path, process::Command, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn hash(token: &str) -> String {
    oats::auth::hash_token(token)
}

fn write_tokens(path: &Path, tokens: &[(&str, &str, &str, &str)]) {
    let mut text = String::from("tokens:\n");
    for (name, token, tenant, role) in tokens {
        text.push_str(&format!("  - {{name: {name}, sha256: {}, tenant: {tenant}, role: {role}}}\n", hash(token)));
    }
    std::fs::write(path, text).unwrap();
}

const ACME: &str = "acme-submitter-token";
const ACME_VIEWER: &str = "acme-viewer-token";
const BETA: &str = "beta-submitter-token";
const ADMIN: &str = "ops-admin-token";

async fn server_with_tokens(dir: &Path, extra: &[(&str, &str)]) -> Server {
    let tokens = dir.join("tokens.yaml");
    write_tokens(
        &tokens,
        &[
            ("acme-ci", ACME, "acme", "submitter"),
            ("acme-dashboard", ACME_VIEWER, "acme", "viewer"),
            ("beta-ci", BETA, "beta", "submitter"),
            ("ops", ADMIN, "ops", "admin"),
        ],
    );
    let tokens = tokens.display().to_string();
    let mut env = vec![("OATS_AUTH_TOKENS_FILE", tokens.as_str()), ("OATS_DEMO_TURN_DELAY_MS", "300")];
    env.extend_from_slice(extra);
    Server::start_local(dir, &env).await
}

async fn call(server: &Server, method: reqwest::Method, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = server.http.request(method.clone(), server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if method == reqwest::Method::POST && path == "/api/v1/jobs" {
        request = request.json(&json!({"goal": "tenant test", "max_turns": 3}));
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn tokens_tenants_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_tokens(dir.path(), &[]).await;
    use reqwest::Method as M;

    // No or bad credentials: 401 with a challenge.
    for token in [None, Some("wrong-token"), Some("")] {
        let response = call(&server, M::GET, "/api/v1/jobs", token).await;
        let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        assert_problem(response, 401, "unauthenticated").await;
        assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="oats""#));
    }
    // Probes, metrics, docs and the spec stay open; the spec declares the scheme.
    for path in ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"] {
        assert_eq!(call(&server, M::GET, path, None).await.status(), StatusCode::OK, "{path}");
    }
    let (_, spec) = server.get_json("/openapi.json").await;
    assert_eq!(spec["components"]["securitySchemes"]["BearerToken"]["scheme"], "bearer");

    let created = call(&server, M::POST, "/api/v1/jobs", Some(ACME)).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let job = format!("/api/v1/jobs/{id}");

    // Another tenant sees nothing: 404, never 403, so ids do not leak.
    for path in [job.clone(), format!("{job}/logs"), format!("{job}/events")] {
        assert_problem(call(&server, M::GET, &path, Some(BETA)).await, 404, "not-found").await;
    }
    assert_problem(call(&server, M::POST, &format!("{job}/cancel"), Some(BETA)).await, 404, "not-found").await;
    let beta_list: Value = call(&server, M::GET, "/api/v1/jobs", Some(BETA)).await.json().await.unwrap();
    assert!(beta_list["items"].as_array().unwrap().is_empty());
    // The same idempotency key in two tenants names two jobs.
    let keyed = |token: &'static str| {
        server
            .http
            .post(server.url("/api/v1/jobs"))
            .bearer_auth(token)
            .header("Idempotency-Key", "shared-key")
            .json(&json!({"goal": "same", "max_turns": 1}))
            .send()
    };
    let (a, b) = (keyed(ACME).await.unwrap(), keyed(BETA).await.unwrap());
    assert_eq!((a.status(), b.status()), (StatusCode::CREATED, StatusCode::CREATED));

    // A viewer reads its tenant's jobs but cannot create or cancel.
    assert_eq!(call(&server, M::GET, &job, Some(ACME_VIEWER)).await.status(), StatusCode::OK);
    assert_problem(call(&server, M::POST, "/api/v1/jobs", Some(ACME_VIEWER)).await, 403, "forbidden").await;
    assert_problem(call(&server, M::POST, &format!("{job}/cancel"), Some(ACME_VIEWER)).await, 403, "forbidden").await;
    // An admin sees every tenant.
    let all: Value = call(&server, M::GET, "/api/v1/jobs", Some(ADMIN)).await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    assert_eq!(call(&server, M::POST, &format!("{job}/cancel"), Some(ACME)).await.status(), StatusCode::OK);

    // The token file is reloaded: new tokens work, a broken file keeps the old ones.
    let path = dir.path().join("tokens.yaml");
    write_tokens(&path, &[("acme-ci", ACME, "acme", "submitter"), ("gamma", "gamma-token", "gamma", "viewer")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while call(&server, M::GET, "/api/v1/jobs", Some("gamma-token")).await.status() != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "the new token file was never loaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(call(&server, M::GET, "/api/v1/jobs", Some(BETA)).await.status(), StatusCode::UNAUTHORIZED);
    std::fs::write(&path, "tokens: [this is not valid\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !server.log_text().contains("token file rejected") {
        assert!(std::time::Instant::now() < deadline, "the broken token file was never read");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(call(&server, M::GET, "/api/v1/jobs", Some("gamma-token")).await.status(), StatusCode::OK);

    // No credential ever reaches the logs.
    let log = server.log_text();
    for secret in [ACME, ACME_VIEWER, BETA, ADMIN, "gamma-token", "wrong-token"] {
        assert!(!log.contains(secret), "{secret} leaked into the logs");
    }
}

/// An RSA key made by openssl, as PKCS#1 DER for signing and a JWK for the key set.
struct SigningKey {
    der: Vec<u8>,
    jwk: Value,
}

fn rsa_key(kid: &str, dir: &Path) -> SigningKey {
    let path = dir.join(format!("{kid}.pem"));
    let status = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&path)
        .status()
        .expect("openssl runs");
    assert!(status.success());
    let der_path = dir.join(format!("{kid}.der"));
    let status = Command::new("openssl")
        .args(["rsa", "-traditional", "-outform", "DER", "-in"])
        .arg(&path)
        .arg("-out")
        .arg(&der_path)
        .status()
        .unwrap();
    assert!(status.success());
    let modulus = Command::new("openssl").args(["rsa", "-noout", "-modulus", "-in"]).arg(&path).output().unwrap();
    let hex = String::from_utf8(modulus.stdout).unwrap().trim().trim_start_matches("Modulus=").to_owned();
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    SigningKey {
        der: std::fs::read(&der_path).unwrap(),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": URL_SAFE_NO_PAD.encode(bytes), "e": "AQAB"}),
    }
}

/// An identity provider on loopback: discovery document and key set.
async fn start_issuer(keys: Vec<Value>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/keys")}).to_string();
    let jwks = json!({"keys": keys}).to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let (discovery, jwks) = (discovery.clone(), jwks.clone());
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                let n = socket.read(&mut buffer).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buffer[..n]);
                let body = if request.starts_with("GET /.well-known/openid-configuration") { discovery } else { jwks };
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    issuer
}

fn jwt(key: &SigningKey, kid: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_der(&key.der)).unwrap()
}

#[tokio::test]
async fn oidc_tokens_are_verified_against_the_issuers_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = rsa_key("key-1", dir.path());
    let rogue = rsa_key("rogue", dir.path());
    let issuer = start_issuer(vec![good.jwk.clone()]).await;
    let server = Server::start_local(
        dir.path(),
        &[("OATS_OIDC_ISSUER", &issuer), ("OATS_OIDC_AUDIENCE", "oats-api"), ("OATS_OIDC_CLOCK_SKEW_SECONDS", "30")],
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let claims = |changes: Value| {
        let mut claims = json!({"iss": issuer, "aud": "oats-api", "sub": "alice", "exp": now + 300, "iat": now,
            "tenant": "acme", "oats_role": "submitter"});
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let submit = |token: String| {
        server
            .http
            .post(server.url("/api/v1/jobs"))
            .bearer_auth(token)
            .json(&json!({"goal": "jwt", "max_turns": 1}))
            .send()
    };

    let accepted = submit(jwt(&good, "key-1", claims(json!({})))).await.unwrap();
    assert_eq!(accepted.status(), StatusCode::CREATED);
    // Within the clock skew an expired token still passes; beyond it, not.
    assert_eq!(
        submit(jwt(&good, "key-1", claims(json!({"exp": now - 10})))).await.unwrap().status(),
        StatusCode::CREATED
    );
    for (why, token) in [
        ("expired", jwt(&good, "key-1", claims(json!({"exp": now - 600})))),
        ("wrong audience", jwt(&good, "key-1", claims(json!({"aud": "someone-else"})))),
        ("wrong issuer", jwt(&good, "key-1", claims(json!({"iss": "http://evil.invalid"})))),
        ("wrongly signed", jwt(&rogue, "key-1", claims(json!({})))),
        ("unknown key", jwt(&rogue, "rogue", claims(json!({})))),
        ("bad role", jwt(&good, "key-1", claims(json!({"oats_role": "root"})))),
        (
            "shared-secret algorithm",
            jsonwebtoken::encode(
                &Header { kid: Some("key-1".into()), ..Header::new(Algorithm::HS256) },
                &claims(json!({})),
                &EncodingKey::from_secret(b"guess"),
            )
            .unwrap(),
        ),
        (
            "unsigned",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"key-1"}"#),
                URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
            ),
        ),
    ] {
        let response = submit(token).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{why} was accepted");
    }
    // A genuine token without a tenant: 403, saying so (tests/local/oidc.rs has the other cases).
    let problem =
        assert_problem(submit(jwt(&good, "key-1", claims(json!({"tenant": null})))).await.unwrap(), 403, "forbidden")
            .await;
    assert!(problem["detail"].as_str().unwrap().contains("no tenant claim"), "{problem}");
    // A viewer from the token's claims may read but not write.
    let viewer = jwt(&good, "key-1", claims(json!({"oats_role": "viewer"})));
    assert_eq!(submit(viewer.clone()).await.unwrap().status(), StatusCode::FORBIDDEN);
    let list = server.http.get(server.url("/api/v1/jobs")).bearer_auth(viewer).send().await.unwrap();
    let list: Value = list.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "the acme jobs");
}

const POLICY: &str = r#"
defaults:
  max_concurrent_jobs: 50
  submissions_per_minute: 100
  resource_profiles:
    small: {cpu_request: 100m, cpu_limit: 500m, memory_request: 128Mi, memory_limit: 256Mi}
tenants:
  trial:
    max_concurrent_jobs: 2
    submissions_per_minute: 4
    max_turns: 10
    allowed_models: [small-model]
    allowed_label_keys: [team]
"#;

#[tokio::test]
async fn the_policy_file_denies_by_rule() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let tokens = dir.path().join("tokens.yaml");
    write_tokens(&tokens, &[("trial", "trial-token", "trial", "submitter")]);
    let (policy, tokens) = (policy.display().to_string(), tokens.display().to_string());
    let server = Server::start_local(
        dir.path(),
        &[("OATS_POLICY_FILE", &policy), ("OATS_AUTH_TOKENS_FILE", &tokens), ("OATS_DEMO_TURN_DELAY_MS", "2000")],
    )
    .await;
    let submit =
        |body: Value| server.http.post(server.url("/api/v1/jobs")).bearer_auth("trial-token").json(&body).send();

    // Rules judged before anything is created; none of these consume the rate limit.
    let body =
        assert_problem(submit(json!({"goal": "g", "max_turns": 11})).await.unwrap(), 422, "policy/max-turns").await;
    assert!(body["detail"].as_str().unwrap().contains("10"));
    assert_problem(
        submit(json!({"goal": "g", "max_turns": 1, "model": "big-model"})).await.unwrap(),
        403,
        "policy/allowed-models",
    )
    .await;
    assert_problem(
        submit(json!({"goal": "g", "max_turns": 1, "labels": {"other": "x"}})).await.unwrap(),
        422,
        "policy/allowed-label-keys",
    )
    .await;
    assert_problem(
        submit(json!({"goal": "g", "max_turns": 1, "profile": "huge"})).await.unwrap(),
        403,
        "policy/resource-profile",
    )
    .await;

    // A dry run shows every verdict and the job, and creates nothing.
    let dry = server
        .http
        .post(server.url("/api/v1/jobs?dry_run=true"))
        .bearer_auth("trial-token")
        .json(&json!({"goal": "g", "max_turns": 1, "model": "big-model", "profile": "small"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dry.status(), StatusCode::ACCEPTED);
    let dry: Value = dry.json().await.unwrap();
    assert_eq!(dry["allowed"], false);
    let verdicts: Vec<(&str, bool)> = dry["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["rule"].as_str().unwrap(), v["allowed"].as_bool().unwrap()))
        .collect();
    assert!(verdicts.contains(&("allowed-models", false)) && verdicts.contains(&("max-turns", true)), "{verdicts:?}");
    assert!(
        verdicts.iter().any(|(r, _)| *r == "pod-security")
            && verdicts.iter().any(|(r, _)| *r == "submissions-per-minute")
    );
    assert!(dry["job"]["environment"]["OATS_GOAL"].is_string(), "the local backend shows its command: {dry}");
    let listed: Value = server
        .http
        .get(server.url("/api/v1/jobs"))
        .bearer_auth("trial-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "nothing was created");

    // Concurrency: two long jobs, then 429 with Retry-After.
    for _ in 0..2 {
        assert_eq!(submit(json!({"goal": "long", "max_turns": 10})).await.unwrap().status(), StatusCode::CREATED);
    }
    let busy = submit(json!({"goal": "third", "max_turns": 1})).await.unwrap();
    assert!(busy.headers().get("retry-after").is_some());
    assert_problem(busy, 429, "policy/max-concurrent-jobs").await;

    // Rate: the bucket holds 4 and only accepted submissions take from it (denials do not), so
    // after the two long jobs (cancelled to free the concurrency slots) two more fit, then 429.
    let items: Value = server
        .http
        .get(server.url("/api/v1/jobs"))
        .bearer_auth("trial-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for job in items["items"].as_array().unwrap() {
        let cancel = server.url(&format!("/api/v1/jobs/{}/cancel", job["id"].as_str().unwrap()));
        server.http.post(cancel).bearer_auth("trial-token").send().await.unwrap();
    }
    for _ in 0..2 {
        let response = submit(json!({"goal": "quick", "max_turns": 1})).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        server
            .http
            .post(server.url(&format!("/api/v1/jobs/{id}/cancel")))
            .bearer_auth("trial-token")
            .send()
            .await
            .unwrap();
    }
    let limited = submit(json!({"goal": "one too many", "max_turns": 1})).await.unwrap();
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_problem(limited, 429, "policy/submissions-per-minute").await;

    // Every denial is counted by rule.
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for rule in [
        "max-turns",
        "allowed-models",
        "allowed-label-keys",
        "resource-profile",
        "max-concurrent-jobs",
        "submissions-per-minute",
    ] {
        assert!(
            metrics.contains(&format!("oats_policy_denials_total{{rule=\"{rule}\"}} 1")),
            "{rule} not counted:\n{metrics}"
        );
    }
}

/// The policy file is polled: a running server judges by the new file, without a restart.
#[tokio::test]
async fn a_changed_policy_file_changes_decisions_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  max_turns: 10\n").unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_POLICY_FILE", &policy.display().to_string())]).await;
    let eleven = json!({"goal": "eleven turns", "max_turns": 11});
    assert_problem(server.submit(eleven.clone()).await, 422, "policy/max-turns").await;

    std::fs::write(&policy, "defaults:\n  max_turns: 100\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = server.submit(eleven.clone()).await;
        if response.status() == StatusCode::CREATED {
            break;
        }
        assert_problem(response, 422, "policy/max-turns").await;
        assert!(std::time::Instant::now() < deadline, "the new policy was never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And back: a tighter file denies what the looser one allowed.
    std::fs::write(&policy, "defaults:\n  max_turns: 5\n").unwrap();
    let six = json!({"goal": "six turns", "max_turns": 6});
    loop {
        let response = server.submit(six.clone()).await;
        if response.status() != StatusCode::CREATED {
            assert_problem(response, 422, "policy/max-turns").await;
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the tighter policy was never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn hostile_input_never_breaks_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[("OATS_REQUEST_READ_TIMEOUT_SECONDS", "2")]).await;
    // Hostile bodies (deep nesting, invalid UTF-8, NUL bytes, huge numbers) are checked in process
    // (app.rs); here what needs the HTTP server and a socket.

    // A huge header is refused by the HTTP layer, not by a crash.
    let big_header = "x".repeat(1 << 20);
    match server.http.get(server.url("/api/v1/jobs")).header("x-filler", big_header).send().await {
        Ok(response) => assert!(response.status().is_client_error(), "{}", response.status()),
        Err(error) => assert!(error.is_request() || error.is_connect() || error.is_body(), "{error}"),
    }

    // A slow client that stops sending its body gets 408 after the read timeout.
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"POST /api/v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"goal\"")
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let read =
        tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer)).await.expect("answered in time").unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request-timeout"), "{answer}");

    // A flood: the server keeps answering probes while it works through it.
    let flood = (0..400).map(|i| server.submit(json!({"goal": format!("flood {i}"), "max_turns": 1})));
    let probe = async {
        let started = std::time::Instant::now();
        let (status, _) = server.get_json("/healthz").await;
        (status, started.elapsed())
    };
    let (responses, (probe_status, _)) = tokio::join!(futures::future::join_all(flood), probe);
    assert_eq!(probe_status, StatusCode::OK);
    assert!(responses.iter().all(|r| matches!(r.status().as_u16(), 201 | 429)), "only created or rate-limited");
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!server.log_text().contains("panicked"));
}

#[tokio::test]
async fn floods_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  submissions_per_minute: 30\n").unwrap();
    let policy = policy.display().to_string();
    let server = Server::start_local(dir.path(), &[("OATS_POLICY_FILE", &policy)]).await;
    let flood = (0..100).map(|i| {
        let (http, url) = (server.http.clone(), server.url("/api/v1/jobs"));
        async move { http.post(url).json(&json!({"goal": format!("flood {i}"), "max_turns": 1})).send().await.unwrap() }
    });
    let flood = tokio::spawn(futures::future::join_all(flood));
    // The readiness probe, on a connection of its own as the kubelet's, answers throughout the
    // flood well within the shipped probe timeout (timeoutSeconds: 2).
    let probe = reqwest::Client::new();
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while !flood.is_finished() || probes == 0 {
        let started = std::time::Instant::now();
        let status = probe.get(server.url("/readyz")).send().await.unwrap().status();
        slowest = slowest.max(started.elapsed());
        probes += 1;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(slowest < Duration::from_secs(1), "a readiness probe took {slowest:?} during the flood");
    let statuses: Vec<u16> = flood.await.unwrap().iter().map(|r| r.status().as_u16()).collect();
    let created = statuses.iter().filter(|s| **s == 201).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(created + limited, 100, "{statuses:?}");
    assert!((30..=32).contains(&created), "the bucket holds 30 (plus refill during the flood): {created}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Read a raw connection until the server closes it (or `within` passes): the bytes received.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(received),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

#[tokio::test]
async fn http_limits_hold_against_slow_and_greedy_clients() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(
        dir.path(),
        &[
            ("OATS_HTTP_HEADER_READ_TIMEOUT_SECONDS", "2"),
            ("OATS_HTTP_IDLE_TIMEOUT_SECONDS", "3"),
            ("OATS_HTTP2_MAX_CONCURRENT_STREAMS", "7"),
            ("OATS_DEMO_TURN_DELAY_MS", "300"),
        ],
    )
    .await;
    let address = server.base.trim_start_matches("http://").to_owned();
    for _ in 0..20 {
        server.get_json("/healthz").await;
    }
    let rss_before = rss_kib(server.pid());

    // 200 connections send half a request head and stall: each is closed within the header read
    // timeout, while the server keeps answering.
    let started = std::time::Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(b"GET /api/v1/jobs HTTP/1.1\r\nhost: x\r\nx-half: ").await.unwrap();
        stalled.push(stream);
    }
    for _ in 0..5 {
        let probe = std::time::Instant::now();
        let (status, _) = server.get_json("/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert!(probe.elapsed() < Duration::from_secs(1), "/healthz took {:?}", probe.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed =
        futures::future::join_all(stalled.iter_mut().map(|stream| read_until_closed(stream, Duration::from_secs(10))))
            .await;
    let elapsed = started.elapsed();
    assert!(closed.iter().all(Option::is_some), "a stalled connection was never closed");
    assert!(elapsed < Duration::from_secs(5), "the stalled connections were closed after {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(1500), "closed before the timeout: {elapsed:?}");
    let rss_after = rss_kib(server.pid());
    assert!(rss_after < rss_before + 16 * 1024, "memory grew from {rss_before} KiB to {rss_after} KiB");
    drop(stalled);

    // A 100 KB request head gets exactly 431.
    let mut greedy = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!("GET /api/v1/jobs HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n", "x".repeat(100 * 1024));
    greedy.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut greedy, Duration::from_secs(5)).await.expect("answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A large but allowed head still works.
    let fine = server.http.get(server.url("/healthz")).header("x-filler", "y".repeat(8 * 1024)).send().await.unwrap();
    assert_eq!(fine.status(), StatusCode::OK);

    // An idle kept-alive connection is closed after the idle timeout; a slow stream is not cut.
    let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let idle_since = std::time::Instant::now();
    let answer = read_until_closed(&mut idle, Duration::from_secs(8)).await.expect("the idle connection was closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let idle_for = idle_since.elapsed();
    assert!((Duration::from_millis(2500)..Duration::from_secs(6)).contains(&idle_for), "closed after {idle_for:?}");
    // On a new connection: the client's pooled one has been idle as long as the idle timeout, and
    // a request sent on it as the server closes it would be lost (a POST is not retried).
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let submitted = fresh.post(server.url("/api/v1/jobs")).json(&json!({"goal": "a slow stream", "max_turns": 20}));
    let created: Value = submitted.send().await.unwrap().json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let logs = fresh.get(server.url(&format!("/api/v1/jobs/{id}/logs?follow=true"))).send().await.unwrap();
    let text = logs.text().await.expect("the stream outlived the idle and header timeouts");
    assert!(text.contains("turn 20/20") && text.contains("demo agent: done"), "{text}");

    // HTTP/2 (prior knowledge): the server announces its cap on concurrent streams.
    let mut h2 = tokio::net::TcpStream::connect(&address).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut header = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), h2.read_exact(&mut header)).await.unwrap().unwrap();
    assert_eq!(header[3], 0x4, "the server's first frame is SETTINGS");
    let mut settings = vec![0u8; usize::from(header[1]) << 8 | usize::from(header[2])];
    h2.read_exact(&mut settings).await.unwrap();
    let values: Vec<(u16, u32)> = settings
        .chunks(6)
        .map(|s| (u16::from_be_bytes([s[0], s[1]]), u32::from_be_bytes([s[2], s[3], s[4], s[5]])))
        .collect();
    assert!(values.contains(&(0x3, 7)), "SETTINGS_MAX_CONCURRENT_STREAMS is not 7: {values:?}");
    assert!(values.contains(&(0x6, 32_768)), "SETTINGS_MAX_HEADER_LIST_SIZE is not the limit: {values:?}");
}

/// A raw exchange: send `request` on a new connection and read until the server closes it.
async fn exchange(address: &str, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(30)).await.expect("answered and closed");
    String::from_utf8(answer).unwrap()
}

/// An answer's status line, its headers (lowercase, sorted, without `date`) and its body.
fn answer_parts(answer: &str) -> (&str, Vec<String>, &str) {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    let mut headers: Vec<String> = lines.map(str::to_ascii_lowercase).filter(|h| !h.starts_with("date: ")).collect();
    headers.sort();
    (status, headers, body)
}

/// A chunked body's data; `None` unless it ends with the last chunk.
fn dechunk(mut body: &str) -> Option<String> {
    let mut data = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            return (rest == "\r\n").then_some(data);
        }
        data.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The `id` and `data` of each SSE event in `text`.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name).map(str::to_owned));
            Some((field("id: ")?, serde_json::from_str(&field("data: ")?).unwrap()))
        })
        .collect()
}

/// Watch streams over plain HTTP/1.1 are served outside hyper (issue 16); to a client nothing
/// changes: the same events, answers and limits as the rest of the listener.
#[tokio::test]
async fn watch_streams_over_plain_http1_keep_the_listeners_answers_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_tokens(
        dir.path(),
        &[("OATS_HTTP_HEADER_READ_TIMEOUT_SECONDS", "2"), ("OATS_SHUTDOWN_DELAY_SECONDS", "0")],
    )
    .await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let created: Value = call(&server, reqwest::Method::POST, "/api/v1/jobs", Some(ACME)).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let watch = |extra: &str| {
        format!("GET /api/v1/jobs/{id}/watch HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME}\r\n{extra}\r\n")
    };

    // The stream: chunked, every state up to the final one, then the connection closes.
    let answer = exchange(&address, &watch("")).await;
    let (status, headers, body) = answer_parts(&answer);
    assert_eq!(status, "HTTP/1.1 200 OK");
    for header in ["connection: close", "transfer-encoding: chunked", "content-type: text/event-stream"] {
        assert!(headers.iter().any(|h| h.starts_with(header)), "{header} missing: {headers:?}");
    }
    let events = sse_events(&dechunk(body).unwrap_or_else(|| panic!("not a whole chunked body: {body:?}")));
    assert_eq!(events.last().map(|(_, data)| data["job"]["status"].as_str().unwrap()), Some("succeeded"), "{events:?}");

    // Resuming from the first event skips it and sends the job as it is now: finished.
    let (first, _) = &events[0];
    let resumed = exchange(&address, &watch(&format!("last-event-id: {first}\r\n"))).await;
    let resumed = sse_events(&dechunk(answer_parts(&resumed).2).unwrap());
    assert!(resumed.iter().all(|(state, _)| state != first), "{resumed:?}");
    assert_eq!(resumed.last(), events.last(), "resumed after {first}");

    // Refusals are what hyper answers to the same request (whose bare LF line ends keep it off
    // the watch path).
    let unauthenticated = format!("GET /api/v1/jobs/{id}/watch HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let unknown = format!(
        "GET /api/v1/jobs/job-nosuchjob/watch HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME}\r\nconnection: close\r\n\r\n"
    );
    for (request, status) in [(unauthenticated, "401"), (unknown, "404")] {
        let ours = exchange(&address, &request).await;
        let hypers = exchange(&address, &request.replace("\r\n", "\n")).await;
        let (ours, hypers) = (answer_parts(&ours), answer_parts(&hypers));
        assert!(ours.0.starts_with(&format!("HTTP/1.1 {status} ")), "{ours:?}");
        assert!(ours.1.iter().any(|h| h == "content-type: application/problem+json"), "{ours:?}");
        assert_eq!(ours, hypers);
    }
    // A watch request declaring a body is refused.
    let with_body = exchange(&address, &watch("content-length: 2\r\n\r\n{}")).await;
    assert!(with_body.starts_with("HTTP/1.1 400 "), "{with_body}");

    // A head within the limit is served however large; one over it gets 431; one that stalls is
    // closed at the header read timeout.
    let large = exchange(&address, &watch(&format!("x-filler: {}\r\n", "x".repeat(20 * 1024)))).await;
    assert!(large.starts_with("HTTP/1.1 200 OK"), "{large}");
    let greedy = exchange(&address, &watch(&format!("x-filler: {}\r\n", "x".repeat(100 * 1024)))).await;
    assert!(greedy.starts_with("HTTP/1.1 431 "), "{greedy}");
    let started = std::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(format!("GET /api/v1/jobs/{id}/watch HTTP/1.1\r\nhost: x\r\nx-half: ").as_bytes()).await.unwrap();
    let closed = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    assert_eq!(closed, Some(Vec::new()), "the stalled head was not closed, or was answered");
    assert!(started.elapsed() >= Duration::from_millis(1500), "closed before the timeout: {:?}", started.elapsed());

    // Other requests are hyper's as before: kept alive.
    let mut kept = tokio::net::TcpStream::connect(&address).await.unwrap();
    for _ in 0..2 {
        let request = format!("GET /api/v1/jobs/{id} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME}\r\n\r\n");
        kept.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 16 * 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), kept.read(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).to_string();
        assert!(answer.starts_with("HTTP/1.1 200 OK") && !answer.contains("connection: close"), "{answer}");
    }

    // At shutdown a stream ends with its closing event, then the connection closes.
    let long = json!({"goal": "outlives the server", "max_turns": 100});
    let submitted = server.http.post(server.url("/api/v1/jobs")).bearer_auth(ACME).json(&long).send().await.unwrap();
    let running: Value = submitted.json().await.unwrap();
    let running = running["id"].as_str().unwrap();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request =
        format!("GET /api/v1/jobs/{running}/watch HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut first)).await.unwrap().unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap().success());
    let rest = read_until_closed(&mut stream, Duration::from_secs(20)).await.expect("the stream ended");
    let rest = String::from_utf8(rest).unwrap();
    let body = dechunk(rest.split_once("\r\n\r\n").unwrap().1).unwrap_or_else(|| panic!("not a whole body: {rest}"));
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.lines().any(|line| line == "event: shutdown"), "{body}");
}

#[tokio::test]
async fn open_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(
        dir.path(),
        &[("OATS_HTTP_MAX_CONNECTIONS", "10"), ("OATS_HTTP_HEADER_READ_TIMEOUT_SECONDS", "2")],
    )
    .await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    // The client's pooled connection is one of the ten; drop it.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An eleventh connection waits for a slot: the held ones are closed by the header timeout.
    let started = std::time::Instant::now();
    let probe = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(probe.status(), StatusCode::OK);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1000), "served at once ({waited:?}): connections are not bounded");
    assert!(waited < Duration::from_secs(6), "{waited:?}");
}

/// A dry run shows a tenant what would run, but not the service's internals (paths on the server,
/// the agent binary, internal addresses, Secret and service-account names): only admins see them.
#[tokio::test]
async fn a_dry_run_shows_non_admins_no_internal_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_tokens(dir.path(), &[]).await;
    let dry_run = |token: &'static str| {
        server
            .http
            .post(server.url("/api/v1/jobs?dry_run=true"))
            .bearer_auth(token)
            .json(&json!({"goal": "what would run", "max_turns": 1}))
            .send()
    };
    let state_dir = dir.path().display().to_string();
    let binary = env!("CARGO_BIN_EXE_oats");

    let tenant = dry_run(ACME).await.unwrap();
    assert_eq!(tenant.status(), StatusCode::ACCEPTED);
    let tenant: Value = tenant.json().await.unwrap();
    let text = tenant.to_string();
    assert!(!text.contains(&state_dir) && !text.contains(binary), "internals shown to a submitter: {text}");
    assert_eq!(tenant["job"]["environment"]["OATS_RESULT_FILE"], "(redacted)", "{text}");
    assert_eq!(tenant["job"]["environment"]["OATS_GOAL"], "what would run");
    assert!(tenant["verdicts"].as_array().is_some_and(|v| !v.is_empty()));

    let admin: Value = dry_run(ADMIN).await.unwrap().json().await.unwrap();
    let text = admin.to_string();
    assert!(text.contains(&state_dir) && text.contains(binary), "an admin sees everything: {text}");
}
