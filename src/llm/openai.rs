//! The OpenAI wire format, as far as the gateway reads or writes it: error bodies and usage.

use crate::jobs::TokenCounts;
use poem::{Response, http::StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

/// An error answered to the agent, in OpenAI's format (`{"error": {...}}`), so SDKs raise their
/// usual exception types.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// Whether the OpenAI SDKs may retry (`x-should-retry`); budget refusals are final.
    pub retryable: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code, message: message.into(), retry_after: None, retryable: false }
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
    }

    /// A budget or call cap refusal: final, never retried.
    pub fn quota(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", code, message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            retryable: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", "service_unavailable", message)
        }
    }

    pub fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        let mut response = Response::builder()
            .status(self.status)
            .content_type("application/json")
            .header("x-should-retry", if self.retryable { "true" } else { "false" });
        if let Some(after) = self.retry_after {
            response = response.header("retry-after", after.as_secs().max(1).to_string());
        }
        response.body(body.to_string())
    }
}

/// The token counts in an OpenAI `usage` object (chat completions).
pub fn usage_of(usage: &Value) -> Option<TokenCounts> {
    let count = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64);
    let input = count(usage, "prompt_tokens")?;
    let output = count(usage, "completion_tokens").unwrap_or(0);
    let cached_input = usage.get("prompt_tokens_details").and_then(|d| count(d, "cached_tokens")).unwrap_or(0);
    let reasoning = usage.get("completion_tokens_details").and_then(|d| count(d, "reasoning_tokens")).unwrap_or(0);
    Some(TokenCounts { input, output, cached_input, reasoning })
}

/// The finish reasons of an answer's choices (`stop`, `tool_calls`, ...).
pub fn finish_reasons(answer: &Value) -> Vec<String> {
    answer
        .get("choices")
        .and_then(Value::as_array)
        .map(|choices| {
            choices.iter().filter_map(|c| c.get("finish_reason").and_then(Value::as_str).map(str::to_owned)).collect()
        })
        .unwrap_or_default()
}

/// Remove what must never reach an agent from an upstream's error message: the provider key
/// (some providers echo part of it) and anything shaped like a key.
pub fn sanitize(message: &str, key: Option<&str>) -> String {
    let mut text: String = message.chars().take(500).collect();
    if let Some(key) = key.filter(|k| k.len() >= 4) {
        text = text.replace(key, "<redacted>");
    }
    text.split(' ')
        .map(|word| {
            let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_');
            let key_like = (bare.starts_with("sk-") || bare.starts_with("key-")) && bare.len() >= 8;
            if key_like { "<redacted>" } else { word }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_cached_and_reasoning_tokens() {
        let usage = json!({"prompt_tokens": 100, "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 5}});
        assert_eq!(usage_of(&usage), Some(TokenCounts { input: 100, output: 20, cached_input: 64, reasoning: 5 }));
        assert_eq!(usage_of(&json!(null)), None);
    }

    #[test]
    fn upstream_messages_lose_keys() {
        let message = "Incorrect API key provided: sk-proj-abcdef123456. You can find your key at ...";
        let clean = sanitize(message, Some("sk-proj-abcdef123456"));
        assert!(!clean.contains("abcdef123456"), "{clean}");
        assert!(!sanitize("bad key sk-other-0123456789", None).contains("0123456789"));
        assert_eq!(sanitize("model overloaded", Some("sk-x")), "model overloaded");
    }
}
