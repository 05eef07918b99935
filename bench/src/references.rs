//! The references the benchmark compares OATS with, run as hidden subcommands of this program
//! (so they can be pinned to a core): a bare poem server answering OATS's bytes, and a fake
//! OpenAI-compatible upstream. Like `oats serve`, each binds `listen` (port 0: any free port)
//! and writes the address it got to its addresses file.

use anyhow::Result;
use serde_json::json;
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

/// The fake OpenAI-compatible upstream: a fixed `chat.completion`, or a stream of a role chunk,
/// `chunks` content chunks `delay` apart, a finish chunk, the usage chunk and `[DONE]`. A request
/// for the model `fake-slow` streams one content chunk per second for `slow_seconds`.
pub(crate) fn fake_llm_server(
    listen: SocketAddr,
    addresses_file: Option<&Path>,
    chunks: usize,
    delay: Duration,
    slow_seconds: u64,
) -> Result<()> {
    use poem::{Body, EndpointExt as _, Response, Route, get, handler, post, web::Data};
    struct Fake {
        completion: bytes::Bytes,
        role: bytes::Bytes,
        content: bytes::Bytes,
        last: bytes::Bytes,
        chunks: usize,
        delay: Duration,
        slow_seconds: u64,
    }
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let chunk = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_767_225_600,
            "model": "fake-model", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null});
        format!("data: {chunk}\n\n")
    };
    let usage = json!({"prompt_tokens": 24, "completion_tokens": 9, "total_tokens": 33});
    let usage_chunk = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_767_225_600,
        "model": "fake-model", "choices": [], "usage": usage});
    let fake = Arc::new(Fake {
        completion: bytes::Bytes::from(
            json!({"id": "chatcmpl-bench", "object": "chat.completion", "created": 1_767_225_600, "model": "fake-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                    "finish_reason": "stop"}],
                "usage": usage})
            .to_string(),
        ),
        role: chunk(json!({"role": "assistant", "content": ""}), serde_json::Value::Null).into(),
        content: chunk(json!({"content": "Hello "}), serde_json::Value::Null).into(),
        last: format!("{}data: {usage_chunk}\n\ndata: [DONE]\n\n", chunk(json!({}), json!("stop"))).into(),
        chunks,
        delay,
        slow_seconds,
    });

    #[handler]
    pub(crate) async fn chat(body: Body, fake: Data<&Arc<Fake>>) -> Response {
        let body = body.into_bytes().await.unwrap_or_default();
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        if !has(b"\"stream\":true") {
            return Response::builder().content_type("application/json").body(fake.completion.clone());
        }
        let fake = fake.0.clone();
        let (events, pause) = if has(b"fake-slow") {
            (fake.slow_seconds as usize + 2, Duration::from_secs(1))
        } else {
            (fake.chunks + 2, fake.delay)
        };
        let stream = futures::stream::unfold(0usize, move |i| {
            let fake = fake.clone();
            async move {
                if i >= events {
                    return None;
                }
                if i > 0 && !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let bytes = match i {
                    0 => fake.role.clone(),
                    i if i + 1 == events => fake.last.clone(),
                    _ => fake.content.clone(),
                };
                Some((Ok::<_, std::io::Error>(bytes), i + 1))
            }
        });
        Response::builder()
            .content_type("text/event-stream")
            .header("cache-control", "no-cache")
            .body(Body::from_bytes_stream(stream))
    }

    #[handler]
    pub(crate) fn ready() -> &'static str {
        "ok"
    }

    let app = Route::new().at("/v1/chat/completions", post(chat)).at("/readyz", get(ready)).data(fake);
    serve(listen, addresses_file, app)
}

pub(crate) fn bare_server(
    listen: SocketAddr,
    addresses_file: Option<&Path>,
    job_body: &Path,
    list_body: &Path,
) -> Result<()> {
    use poem::{EndpointExt as _, Response, Route, endpoint::make_sync, get};
    let job = bytes::Bytes::from(std::fs::read(job_body)?);
    let list = bytes::Bytes::from(std::fs::read(list_body)?);
    let json = |body: bytes::Bytes| {
        make_sync(move |_| Response::builder().content_type("application/json; charset=utf-8").body(body.clone()))
    };
    let app = Route::new()
        .at("/api/v1/jobs/:id", get(json(job)))
        .at("/api/v1/jobs", get(json(list)))
        .at("/readyz", get(json(bytes::Bytes::from_static(b"{\"status\":\"ok\"}"))))
        .map_to_response();
    serve(listen, addresses_file, app)
}

/// Serve `app` on `listen` until killed, having written the bound address to `addresses_file`.
fn serve(listen: SocketAddr, addresses_file: Option<&Path>, app: impl poem::IntoEndpoint + 'static) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        if let Some(path) = addresses_file {
            oats::http_server::write_addresses(path, &[("api", listener.local_addr()?)])?;
        }
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener)?;
        poem::Server::new_with_acceptor(acceptor).run(app).await?;
        Ok(())
    })
}
