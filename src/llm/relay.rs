//! Streamed answers, relayed event by event as they arrive (never buffered whole).
//!
//! The gateway always asks the provider for the usage chunk (`stream_options.include_usage`), so
//! the call is charged what it used; a client that did not ask for that chunk does not get it.
//! The call is settled when the stream ends, breaks, or the client goes away. A stream that
//! breaks upstream ends with an error event, as OpenAI's own do.

use super::{
    openai,
    settle::{Call, Used, stream_response},
};
use crate::jobs::TokenCounts;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, stream::BoxStream};
use poem::Response;
use serde_json::Value;

/// What the relay learnt from the events it passed on.
#[derive(Default)]
struct Seen {
    usage: Option<TokenCounts>,
    finish_reasons: Vec<String>,
    model: Option<String>,
    chunks: usize,
    /// `data: [DONE]` arrived: the answer is complete.
    done: bool,
}

/// The call, until it is settled; settled at its reservation if the stream is dropped first.
struct Unsettled {
    call: Option<Call>,
    seen: Seen,
}

impl Unsettled {
    async fn settle(&mut self, error_type: Option<&'static str>) {
        let Some(call) = self.call.take() else { return };
        if let Some(model) = &self.seen.model {
            call.span.record("gen_ai.response.model", model.as_str());
        }
        let used = self.seen.usage.map_or(Used::Unknown, Used::Reported);
        call.finish(used, error_type, &self.seen.finish_reasons).await;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            let used = self.seen.usage.map_or(Used::Unknown, Used::Reported);
            let reasons = std::mem::take(&mut self.seen.finish_reasons);
            tokio::spawn(async move { call.finish(used, Some("client_gone"), &reasons).await });
        }
    }
}

struct Relay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    pending: BytesMut,
    client_wants_usage: bool,
    unsettled: Unsettled,
}

pub(super) fn stream(call: Call, upstream: reqwest::Response, client_wants_usage: bool) -> Response {
    let relay = Relay {
        upstream: upstream.bytes_stream().boxed(),
        pending: BytesMut::new(),
        client_wants_usage,
        unsettled: Unsettled { call: Some(call), seen: Seen::default() },
    };
    stream_response(events(relay))
}

fn events(relay: Relay) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(relay, |mut relay| async move {
        loop {
            let out = relay.complete_events();
            // Settled before the client reads `[DONE]`: its next call sees this one charged.
            if relay.unsettled.seen.done {
                relay.unsettled.settle(None).await;
            }
            if !out.is_empty() {
                return Some((Ok(out), relay));
            }
            relay.unsettled.call.as_ref()?;
            match relay.upstream.next().await {
                Some(Ok(bytes)) => {
                    if relay.unsettled.seen.chunks == 0
                        && let Some(call) = &relay.unsettled.call
                    {
                        call.first_chunk();
                    }
                    relay.unsettled.seen.chunks += 1;
                    relay.pending.extend_from_slice(&bytes);
                }
                Some(Err(_)) => {
                    relay.unsettled.settle(Some("stream_interrupted")).await;
                    // As OpenAI reports a failure mid-stream: an event with an error object,
                    // which the SDKs raise as an API error. No `[DONE]` follows.
                    let error = serde_json::json!({"error": {"message": "the provider's stream broke off",
                        "type": "api_error", "param": null, "code": "upstream_interrupted"}});
                    return Some((Ok(Bytes::from(format!("data: {error}\n\n"))), relay));
                }
                None => {
                    let rest = relay.pending.split().freeze();
                    relay.unsettled.settle(None).await;
                    return (!rest.is_empty()).then_some((Ok(rest), relay));
                }
            }
        }
    })
}

impl Relay {
    /// The complete events received so far, as they go to the client.
    fn complete_events(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        while let Some(end) = find_event_end(&self.pending) {
            let event = self.pending.split_to(end.0 + end.1).freeze();
            if let Some(kept) = self.inspect(&event[..end.0]) {
                out.extend_from_slice(&kept);
                out.extend_from_slice(b"\n\n");
            }
        }
        out.freeze()
    }

    /// Learn from one event; `None` drops it (the usage chunk the client did not ask for).
    fn inspect(&mut self, event: &[u8]) -> Option<Bytes> {
        let text = std::str::from_utf8(event).ok()?;
        let Some(data) = text.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim) else {
            return Some(Bytes::copy_from_slice(event));
        };
        if data == "[DONE]" {
            self.unsettled.seen.done = true;
            return Some(Bytes::copy_from_slice(event));
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(data) else { return Some(Bytes::copy_from_slice(event)) };
        let seen = &mut self.unsettled.seen;
        if seen.model.is_none() {
            seen.model = chunk.get("model").and_then(Value::as_str).map(str::to_owned);
        }
        seen.finish_reasons.extend(openai::finish_reasons(&chunk));
        let usage = chunk.get("usage").filter(|u| !u.is_null()).and_then(openai::usage_of);
        if usage.is_none() || self.client_wants_usage {
            seen.usage = usage.or(seen.usage);
            return Some(Bytes::copy_from_slice(event));
        }
        seen.usage = usage;
        let only_usage = chunk.get("choices").and_then(Value::as_array).is_none_or(Vec::is_empty);
        if only_usage {
            return None;
        }
        chunk.as_object_mut()?.remove("usage");
        Some(Bytes::from(format!("data: {chunk}")))
    }
}

/// Where the first complete event in `buffer` ends: (length of the event, length of the blank
/// line after it).
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_a_blank_line_of_either_style() {
        assert_eq!(find_event_end(b"data: 1\n\ndata: 2"), Some((7, 2)));
        assert_eq!(find_event_end(b"data: 1\r\n\r\n"), Some((7, 4)));
        assert_eq!(find_event_end(b"data: 1\n"), None);
    }
}
