//! OIDC against a real identity provider on loopback whose keys rotate and which fails: `nbf`,
//! unusable tenants, the refetch on an unknown key id, the cache's expiry, and what an outage
//! costs (one fetch at a time, backoff, no request waiting on it).

use crate::common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{Server, assert_problem};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An RSA key made by openssl, as PKCS#1 DER for signing and a JWK for the key set.
struct SigningKey {
    kid: String,
    der: Vec<u8>,
    jwk: Value,
}

fn rsa_key(kid: &str, dir: &Path) -> SigningKey {
    let pem = dir.join(format!("{kid}.pem"));
    let der = dir.join(format!("{kid}.der"));
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let (pem_path, der_path) = (pem.to_str().unwrap(), der.to_str().unwrap());
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", pem_path]);
    openssl(&["rsa", "-traditional", "-outform", "DER", "-in", pem_path, "-out", der_path]);
    let modulus = openssl(&["rsa", "-noout", "-modulus", "-in", pem_path]);
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    SigningKey {
        kid: kid.into(),
        der: std::fs::read(&der).unwrap(),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": URL_SAFE_NO_PAD.encode(bytes), "e": "AQAB"}),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Serve the key set.
    Up,
    /// Answer 503 at once.
    Failing,
    /// Accept and never answer.
    Hanging,
}

struct IssuerState {
    keys: Vec<Value>,
    mode: Mode,
    /// Key-set requests received (each fetch is one: the server is given the JWKS address).
    fetches: usize,
}

/// A plain-HTTP identity provider on loopback serving `/keys`, steerable while it runs.
#[derive(Clone)]
struct Issuer {
    url: String,
    state: Arc<Mutex<IssuerState>>,
}

impl Issuer {
    async fn start(keys: &[&SigningKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(IssuerState { keys: vec![], mode: Mode::Up, fetches: 0 }));
        let issuer = Self { url, state: state.clone() };
        issuer.serve(keys);
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let state = state.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 8192];
                    let _ = socket.read(&mut buffer).await;
                    let (mode, body) = {
                        let mut state = state.lock().unwrap();
                        state.fetches += 1;
                        (state.mode, json!({"keys": state.keys}).to_string())
                    };
                    let response = match mode {
                        Mode::Up => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        Mode::Failing => {
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
                        }
                        Mode::Hanging => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                    };
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        issuer
    }

    fn serve(&self, keys: &[&SigningKey]) {
        self.state.lock().unwrap().keys = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn fetches(&self) -> usize {
        self.state.lock().unwrap().fetches
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    server: Server,
    issuer: Issuer,
    keys: Vec<SigningKey>,
}

const REFRESH: Duration = Duration::from_secs(2);

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<SigningKey> = (1..=3).map(|i| rsa_key(&format!("key-{i}"), dir.path())).collect();
    let issuer = Issuer::start(&[&keys[0]]).await;
    let jwks = format!("{}/keys", issuer.url);
    let server = Server::start_local(
        dir.path(),
        &[
            ("OATS_OIDC_ISSUER", issuer.url.as_str()),
            ("OATS_OIDC_JWKS_URL", jwks.as_str()),
            ("OATS_OIDC_AUDIENCE", "oats-api"),
            ("OATS_OIDC_CLOCK_SKEW_SECONDS", "5"),
            ("OATS_OIDC_JWKS_REFRESH_SECONDS", &REFRESH.as_secs().to_string()),
        ],
    )
    .await;
    Setup { _dir: dir, server, issuer, keys }
}

impl Setup {
    /// A token signed by `key` with the usual claims, changed by `changes`.
    fn token(&self, key: &SigningKey, changes: Value) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut claims = json!({"iss": self.issuer.url, "aud": "oats-api", "sub": "alice", "exp": now + 300,
            "iat": now, "tenant": "acme", "oats_role": "submitter"});
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_der(&key.der)).unwrap()
    }

    async fn list(&self, token: &str) -> reqwest::Response {
        self.server.http.get(self.server.url("/api/v1/jobs")).bearer_auth(token).send().await.unwrap()
    }

    async fn status(&self, token: &str) -> StatusCode {
        self.list(token).await.status()
    }
}

#[tokio::test]
async fn not_before_is_checked_with_the_clock_skew() {
    let s = setup().await;
    let now = chrono::Utc::now().timestamp();
    let key = &s.keys[0];
    assert_eq!(s.status(&s.token(key, json!({"nbf": now - 60}))).await, StatusCode::OK);
    assert_eq!(s.status(&s.token(key, json!({"nbf": now + 2}))).await, StatusCode::OK, "within the skew");
    let early = s.list(&s.token(key, json!({"nbf": now + 120}))).await;
    assert_problem(early, 401, "unauthenticated").await;
    assert!(s.server.log_text().contains("ImmatureSignature"), "{}", s.server.log_text());
}

#[tokio::test]
async fn a_token_with_an_unusable_tenant_is_a_403_saying_why_never_a_500() {
    let s = setup().await;
    let key = &s.keys[0];
    for (tenant, expected) in [
        (json!("Acme Corp"), r#"is "Acme Corp", not a usable tenant"#),
        (json!("acme/ml"), "not a usable tenant"),
        (json!("a".repeat(64)), "at most 63 characters"),
        (json!("-acme"), "starting and ending with an alphanumeric"),
        (json!(""), "must not be empty"),
        (json!(42), "is not a string"),
        (json!(null), "has no tenant claim `tenant`"),
    ] {
        let token = s.token(key, json!({"tenant": tenant}));
        let problem = assert_problem(s.list(&token).await, 403, "forbidden").await;
        assert!(problem["detail"].as_str().unwrap().contains(expected), "{tenant}: {problem}");
        let submit = s
            .server
            .http
            .post(s.server.url("/api/v1/jobs"))
            .bearer_auth(&token)
            .json(&json!({"goal": "g", "max_turns": 1}))
            .send()
            .await
            .unwrap();
        assert_problem(submit, 403, "forbidden").await;
    }
    // A usable one (the label alphabet, up to 63 characters) works, for reads and submissions.
    let token = s.token(key, json!({"tenant": format!("team.{}_x-1", "a".repeat(50))}));
    let submit = s.server.http.post(s.server.url("/api/v1/jobs")).bearer_auth(&token);
    let submit = submit.json(&json!({"goal": "g", "max_turns": 1})).send().await.unwrap();
    assert_eq!(submit.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn key_rotation_cache_expiry_and_an_outage_of_the_identity_provider() {
    let s = setup().await;
    let [k1, k2, k3] = [&s.keys[0], &s.keys[1], &s.keys[2]];
    assert_eq!(s.status(&s.token(k1, json!({}))).await, StatusCode::OK);
    assert_eq!(s.issuer.fetches(), 1);

    // Rotation: the issuer now signs with key-2 only. A token naming it makes one refetch.
    s.issuer.serve(&[k2]);
    assert_eq!(s.status(&s.token(k2, json!({}))).await, StatusCode::OK, "refetched on the unknown key id");
    assert_eq!(s.issuer.fetches(), 2);
    assert_eq!(s.status(&s.token(k1, json!({}))).await, StatusCode::UNAUTHORIZED, "the retired key");
    // Unknown key ids cannot make the server hammer the issuer: one forced refetch per 30 s.
    s.issuer.serve(&[k2, k3]);
    for _ in 0..10 {
        assert_eq!(s.status(&s.token(k3, json!({}))).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(s.issuer.fetches(), 2);

    // Expiry: once the cached set is older than the refresh interval, a request (answered with
    // the cached keys at once) starts a refresh in the background, which brings key-3.
    tokio::time::sleep(REFRESH + Duration::from_millis(300)).await;
    assert_eq!(s.status(&s.token(k2, json!({}))).await, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.status(&s.token(k3, json!({}))).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "the expired key set was never refreshed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.issuer.fetches(), 3);

    // An outage where the issuer accepts and never answers: requests go on with the cached keys,
    // none waits for the fetch, and only one fetch is in flight.
    s.issuer.set_mode(Mode::Hanging);
    tokio::time::sleep(REFRESH + Duration::from_millis(300)).await;
    let before = s.issuer.fetches();
    let started = Instant::now();
    let token = s.token(k2, json!({}));
    let burst = (0..20).map(|_| s.list(&token));
    for response in futures::future::join_all(burst).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert!(started.elapsed() < Duration::from_secs(2), "20 requests took {:?}", started.elapsed());
    for _ in 0..30 {
        let one = Instant::now();
        assert_eq!(s.status(&token).await, StatusCode::OK);
        assert!(one.elapsed() < Duration::from_secs(1), "a request waited {:?} on the issuer", one.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // About 6.5 s of outage: the first fetch hangs until its 5 s timeout, then backs off.
    let during = s.issuer.fetches() - before;
    assert!((1..=2).contains(&during), "{during} fetches during the outage");

    // An issuer that fails at once: fetches back off (1 s, 2 s, 4 s...) instead of one per request.
    s.issuer.set_mode(Mode::Failing);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = s.issuer.fetches();
    for _ in 0..30 {
        assert_eq!(s.status(&token).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = s.issuer.fetches() - before;
    assert!(during <= 3, "{during} fetches in 3 s of failures: no backoff");
    assert!(s.server.log_text().contains("cannot fetch the OIDC key set"));

    // Recovery: the next fetch after the backoff brings the issuer's keys back.
    s.issuer.serve(&[k3]);
    s.issuer.set_mode(Mode::Up);
    let deadline = Instant::now() + Duration::from_secs(70);
    while s.status(&s.token(k2, json!({}))).await != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "the key set was never fetched again after the outage");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.status(&s.token(k3, json!({}))).await, StatusCode::OK);
}
