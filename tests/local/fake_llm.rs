//! Tests of the scripted fake OpenAI upstream (tests/common/fake_llm.rs) itself.

use crate::common;

use common::fake_llm::{FakeLlm, Reply, Usage};
use futures::StreamExt;
use reqwest::Client;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn client() -> Client {
    Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

async fn chat(fake: &FakeLlm, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", fake.base_url))
        .bearer_auth("sk-upstream")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Read a whole SSE answer: the `data:` payloads in order and how long the first to last took.
async fn read_sse(response: reqwest::Response) -> (Vec<String>, Duration) {
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut first = None;
    while let Some(frame) = body.next().await {
        text.push_str(std::str::from_utf8(&frame.unwrap()).unwrap());
        first.get_or_insert_with(Instant::now);
    }
    let spread = first.unwrap().elapsed();
    (data_lines(&text), spread)
}

fn data_lines(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| event.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {event:?}")).to_owned())
        .collect()
}

fn parse_chunks(data: &[String]) -> Vec<Value> {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1]
        .iter()
        .map(|d| {
            let chunk: Value = serde_json::from_str(d).unwrap();
            assert_eq!(chunk["object"], "chat.completion.chunk");
            chunk
        })
        .collect()
}

#[tokio::test]
async fn non_streaming_text_and_models() {
    let fake = FakeLlm::start().await;
    assert!(fake.base_url.starts_with("http://127.0.0.1:") && fake.base_url.ends_with("/v1"), "{}", fake.base_url);
    fake.push(Reply::text("hello there", 12, 3));

    let messages = json!([{"role": "user", "content": "hi"}]);
    let response = chat(&fake, json!({"model": "gpt-test", "messages": messages})).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["id"], "chatcmpl-1");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "gpt-test");
    assert_eq!(answer["choices"][0]["message"], json!({"role": "assistant", "content": "hello there"}));
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"], json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}));
    assert_eq!(fake.reported_usage(), Usage { prompt_tokens: 12, completion_tokens: 3 });

    // An empty queue answers "ok" with 10/5 tokens.
    let answer: Value = chat(&fake, json!({"model": "other", "messages": messages})).await.json().await.unwrap();
    assert_eq!(answer["id"], "chatcmpl-2");
    assert_eq!(answer["model"], "other");
    assert_eq!(answer["choices"][0]["message"]["content"], "ok");
    assert_eq!(fake.reported_usage(), Usage { prompt_tokens: 22, completion_tokens: 8 });

    let models: Value = client().get(format!("{}/models", fake.base_url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        models,
        json!({"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]})
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(requests[0].header("authorization"), Some("Bearer sk-upstream"));
    assert!(requests[0].headers.iter().all(|(name, _)| *name == name.to_lowercase()));
    assert_eq!(requests[0].body, json!({"model": "gpt-test", "messages": messages}));
    assert_eq!(requests[2].path, "/v1/models");
    assert_eq!(requests[2].body, Value::Null);
}

#[tokio::test]
async fn non_streaming_tool_calls() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool("get_weather", json!({"city": "Paris"}), 20, 7));
    fake.push(Reply::ToolCalls {
        calls: vec![("a".into(), "{\"x\":".into()), ("b".into(), "{}".into())],
        usage: Usage { prompt_tokens: 1, completion_tokens: 2 },
    });

    let answer: Value = chat(&fake, json!({"model": "m", "messages": []})).await.json().await.unwrap();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_1");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));

    let answer: Value = chat(&fake, json!({"model": "m", "messages": []})).await.json().await.unwrap();
    let calls = answer["choices"][0]["message"]["tool_calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["id"], "call_2");
    assert_eq!(calls[0]["function"]["arguments"], "{\"x\":", "malformed arguments are sent verbatim");
    assert_eq!(calls[1]["id"], "call_3");
    assert_eq!(fake.reported_usage(), Usage { prompt_tokens: 21, completion_tokens: 9 });
}

#[tokio::test]
async fn streaming_with_usage() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("The quick brown fox", 30, 4));
    let response = chat(
        &fake,
        json!({"model": "gpt-s", "messages": [], "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let (data, spread) = read_sse(response).await;
    let chunks = parse_chunks(&data);
    assert!(spread >= Duration::from_millis(20), "chunks arrived together ({spread:?})");

    assert!(chunks.iter().all(|c| c["id"] == "chatcmpl-1" && c["model"] == "gpt-s"));
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant"}));
    let contents: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(contents.len() > 1, "content in several chunks: {contents:?}");
    assert_eq!(contents.concat(), "The quick brown fox");

    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let finish = rest.last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert!(rest.iter().all(|c| c["usage"].is_null()));
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], json!({"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}));
    assert_eq!(fake.reported_usage(), Usage { prompt_tokens: 30, completion_tokens: 4 });
}

#[tokio::test]
async fn streaming_without_usage_and_tool_call_deltas() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("hello", 5, 1));
    fake.push(Reply::tool("search", json!({"query": "rust streams", "limit": 3}), 8, 2));

    let (data, _) = read_sse(chat(&fake, json!({"model": "m", "messages": [], "stream": true})).await).await;
    let chunks = parse_chunks(&data);
    assert!(chunks.iter().all(|c| c.get("usage").is_none() && !c["choices"].as_array().unwrap().is_empty()));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    let contents: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(contents, "hello");
    // Delivered without the usage chunk: still counted.
    assert_eq!(fake.reported_usage(), Usage { prompt_tokens: 5, completion_tokens: 1 });

    let (data, _) = read_sse(chat(&fake, json!({"model": "m", "messages": [], "stream": true})).await).await;
    let chunks = parse_chunks(&data);
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant"}));
    let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).collect();
    assert!(deltas.len() >= 2, "{deltas:?}");
    let head = &deltas[0][0];
    assert_eq!(head["index"], 0);
    assert_eq!(head["id"], "call_1");
    assert_eq!(head["type"], "function");
    assert_eq!(head["function"]["name"], "search");
    let arguments: String = deltas.iter().map(|d| d[0]["function"]["arguments"].as_str().unwrap()).collect();
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), json!({"query": "rust streams", "limit": 3}));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(fake.reported_usage(), Usage { prompt_tokens: 13, completion_tokens: 3 });
}

#[tokio::test]
async fn status_replies() {
    let fake = FakeLlm::start().await;
    let error = json!({"error": {"message": "Rate limit reached", "type": "rate_limit_error"}});
    fake.push(Reply::Status { code: 429, retry_after: Some(7), body: error.clone() });
    fake.push(Reply::Status { code: 500, retry_after: None, body: json!({"error": {"message": "boom"}}) });

    let response = chat(&fake, json!({"model": "m", "messages": [], "stream": true})).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(response.json::<Value>().await.unwrap(), error);

    let response = chat(&fake, json!({"model": "m", "messages": []})).await;
    assert_eq!(response.status(), 500);
    assert!(response.headers().get("retry-after").is_none());
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["message"], "boom");

    assert_eq!(fake.reported_usage(), Usage::default());
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn die_mid_stream_is_a_client_error() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::DieMidStream { content: "partial answer that never ends".into() });
    fake.push(Reply::DieMidStream { content: "unused".into() });

    let response = chat(&fake, json!({"model": "m", "messages": [], "stream": true})).await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = String::new();
    let error = loop {
        match body.next().await {
            Some(Ok(bytes)) => received.push_str(std::str::from_utf8(&bytes).unwrap()),
            Some(Err(error)) => break error,
            None => panic!("the stream ended cleanly: {received}"),
        }
    };
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    let data = data_lines(&received);
    assert!(data.len() >= 2, "a couple of chunks before dying: {data:?}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // Non-streaming: the connection closes without any answer.
    let error = client()
        .post(format!("{}/chat/completions", fake.base_url))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_request() && !error.is_timeout(), "{error:?}");

    assert_eq!(fake.reported_usage(), Usage::default());
    // The fake goes on serving.
    let answer: Value = chat(&fake, json!({"model": "m", "messages": []})).await.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "ok");
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn slow_replies_and_client_timeouts() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::Slow { delay: Duration::from_millis(300), then: Box::new(Reply::text("late", 1, 1)) });
    fake.push(Reply::Slow { delay: Duration::from_secs(5), then: Box::new(Reply::text("too late", 100, 100)) });

    let started = Instant::now();
    let answer: Value = chat(&fake, json!({"model": "m", "messages": []})).await.json().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(answer["choices"][0]["message"]["content"], "late");

    let impatient = Client::builder().no_proxy().timeout(Duration::from_millis(200)).build().unwrap();
    let error = impatient
        .post(format!("{}/chat/completions", fake.base_url))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    // Recorded on arrival, though never answered.
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(fake.reported_usage(), Usage { prompt_tokens: 1, completion_tokens: 1 });
}

#[tokio::test]
async fn stops_serving_when_dropped() {
    let fake = FakeLlm::start().await;
    let http = client();
    let url = format!("{}/models", fake.base_url);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    drop(fake);
    // Even the pooled keep-alive connection is gone.
    let error = http.get(&url).send().await.unwrap_err();
    assert!(error.is_connect() || error.is_request(), "{error:?}");
}
