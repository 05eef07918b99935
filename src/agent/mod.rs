//! `oats agent`: works a goal through the LLM gateway with tools in its workspace.
//!
//! It reads the agent contract (docs/agent-contract.md) from its environment and loops: system
//! prompt and goal, a chat completion with tools, the tool calls run, their results fed back,
//! until the model answers without a tool call (or calls `final_answer`), the gateway refuses
//! (budget or call cap), the deadline nears, or SIGTERM arrives. It always leaves a result: the
//! answer, or why it stopped and what it had so far. Exit codes tell OATS which.

mod client;
mod launch;
pub mod tools;

pub use launch::{install as install_launcher, launch};

use crate::jobs::agent_env;
use client::{ChatError, Credential, ModelClient};
use serde_json::{Value, json};
use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};
use tools::{ToolOutcome, Workspace};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The job's answer, within the result limit.
const EXIT_ANSWERED: i32 = 0;
const EXIT_FAILED: i32 = 1;
/// As the local backend and the Kubernetes status mapping read them.
const EXIT_BUDGET_EXHAUSTED: i32 = crate::jobs::agent_exit::BUDGET_EXHAUSTED;
const EXIT_MAX_TURNS_REACHED: i32 = crate::jobs::agent_exit::MAX_TURNS_REACHED;
const EXIT_DEADLINE_NEAR: i32 = crate::jobs::agent_exit::DEADLINE_NEAR;
/// 128 + SIGTERM, as shells report it.
const EXIT_TERMINATED: i32 = 143;
/// Time kept back before the deadline to write the result and exit: a fifth of the timeout, at
/// most this.
const DEADLINE_MARGIN: Duration = Duration::from_secs(10);

const SYSTEM_PROMPT: &str = "You are an autonomous agent working in a sandboxed workspace directory. \
Use the tools to inspect and change files in the workspace. Paths are relative to the workspace. \
Work step by step; when the task is done, call final_answer with a concise answer for the user \
(or reply without calling a tool).";

/// The job as the contract gives it.
struct Contract {
    goal: String,
    max_turns: u32,
    model: Option<String>,
    workspace: PathBuf,
    result_file: PathBuf,
    timeout: Duration,
    base_url: String,
    credential: Credential,
    traceparent: Option<String>,
}

impl Contract {
    fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let need = |name: &str| var(name).ok_or_else(|| format!("{name} is not set"));
        Ok(Self {
            goal: need(agent_env::GOAL)?,
            max_turns: var(agent_env::MAX_TURNS).and_then(|v| v.parse().ok()).unwrap_or(10),
            model: var(agent_env::MODEL),
            workspace: PathBuf::from(var(agent_env::WORKSPACE).unwrap_or_else(|| ".".into())),
            result_file: PathBuf::from(var(agent_env::RESULT_FILE).unwrap_or_else(|| "/dev/termination-log".into())),
            timeout: Duration::from_secs(var(agent_env::TIMEOUT_SECONDS).and_then(|v| v.parse().ok()).unwrap_or(600)),
            base_url: need(agent_env::OPENAI_BASE_URL)?,
            credential: match (var(agent_env::OPENAI_API_KEY), var(agent_env::LLM_TOKEN_FILE)) {
                (Some(key), _) => Credential::Fixed(key),
                (None, Some(file)) => Credential::File(file.into()),
                (None, None) => {
                    return Err(format!(
                        "neither {} nor {} is set",
                        agent_env::OPENAI_API_KEY,
                        agent_env::LLM_TOKEN_FILE
                    ));
                }
            },
            traceparent: var("TRACEPARENT"),
        })
    }
}

/// What the run has done so far, for a partial result.
#[derive(Default)]
struct Progress {
    turns: u32,
    tool_calls: Vec<String>,
    files_written: Vec<String>,
    last_text: Option<String>,
    input_tokens: u64,
    output_tokens: u64,
}

impl Progress {
    fn summary(&self, why: &str) -> String {
        let mut text = format!("Stopped before finishing: {why}\nModel calls: {}", self.turns);
        text.push_str(&format!(" ({} input, {} output tokens).", self.input_tokens, self.output_tokens));
        if !self.files_written.is_empty() {
            text.push_str(&format!("\nFiles written: {}.", self.files_written.join(", ")));
        }
        if !self.tool_calls.is_empty() {
            text.push_str(&format!("\nTool calls: {}.", self.tool_calls.join(", ")));
        }
        if let Some(last) = &self.last_text {
            text.push_str(&format!("\nThe model's last words: {last}"));
        }
        text
    }
}

/// Run the agent; returns its exit code. Its spans (`invoke_agent`, `execute_tool {name}`) are
/// exported when an OTLP endpoint is configured for agents, in the job's trace.
pub async fn run() -> i32 {
    if std::env::var_os(agent_env::OPENAI_BASE_URL).is_none() {
        // The agent image's default: without a gateway there is no model to talk to.
        println!("agent: no LLM gateway configured (OPENAI_BASE_URL is not set); running the demo agent");
        return crate::demo_agent::run().await;
    }
    let exporting = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|e| !e.is_empty()));
    let telemetry = exporting.then(|| crate::telemetry::init_as(crate::config::LogFormat::Json, "oats-agent"));
    let code = run_traced().await;
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    code
}

async fn run_traced() -> i32 {
    let contract = match Contract::from_env() {
        Ok(contract) => contract,
        Err(problem) => {
            eprintln!("agent: the job's environment is incomplete: {problem}");
            let result = PathBuf::from(std::env::var(agent_env::RESULT_FILE).unwrap_or_default());
            return finish(&result, None, EXIT_FAILED, &format!("Failed: {problem}"));
        }
    };
    let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return finish(&contract.result_file, None, EXIT_FAILED, "Failed: cannot handle SIGTERM");
    };
    let workspace = match Workspace::new(&contract.workspace) {
        Ok(workspace) => workspace,
        Err(error) => {
            return finish(
                &contract.result_file,
                None,
                EXIT_FAILED,
                &format!("Failed: the workspace is unusable: {error}"),
            );
        }
    };
    let mut progress = Progress::default();
    let deadline = Instant::now() + contract.timeout.saturating_sub(DEADLINE_MARGIN.min(contract.timeout / 5));
    let span = agent_span(&contract);
    let (code, text) = tokio::select! {
        outcome = work(&contract, &workspace, &mut progress, deadline).instrument(span.clone()) => outcome,
        _ = terminate.recv() => (EXIT_TERMINATED, String::new()),
    };
    span.record("oats.agent.exit_code", code);
    drop(span);
    let text = if code == EXIT_TERMINATED { progress.summary("SIGTERM (cancelled, or the deadline).") } else { text };
    finish(&contract.result_file, Some(&workspace), code, &text)
}

/// The `invoke_agent` span, a child of the job's trace (`TRACEPARENT`).
fn agent_span(contract: &Contract) -> tracing::Span {
    let span = tracing::info_span!(
        "invoke_agent",
        otel.name = "invoke_agent oats",
        otel.kind = "internal",
        gen_ai.operation.name = "invoke_agent",
        gen_ai.agent.name = "oats",
        gen_ai.request.model = contract.model.as_deref().unwrap_or(""),
        oats.agent.exit_code = tracing::field::Empty,
    );
    if let Some(traceparent) = &contract.traceparent {
        let parent = crate::jobs::TraceContext { traceparent: traceparent.clone(), tracestate: None };
        let _ = span.set_parent(crate::telemetry::trace::context_of(&parent));
    }
    span
}

/// The loop; returns the exit code and the result text.
async fn work(contract: &Contract, workspace: &Workspace, progress: &mut Progress, deadline: Instant) -> (i32, String) {
    let client = ModelClient::new(&contract.base_url, contract.credential.clone(), contract.traceparent.clone());
    let model = match &contract.model {
        Some(model) => model.clone(),
        None => match client.first_model().await {
            Ok(model) => model,
            Err(error) => return (EXIT_FAILED, progress.summary(&format!("no model to use: {error}"))),
        },
    };
    say(&format!("agent: model={model} max_turns={} workspace={}", contract.max_turns, workspace.root().display()));
    let mut messages =
        vec![json!({"role": "system", "content": SYSTEM_PROMPT}), json!({"role": "user", "content": contract.goal})];
    for turn in 1..=contract.max_turns {
        if Instant::now() >= deadline {
            return (EXIT_DEADLINE_NEAR, progress.summary("the job's deadline is near."));
        }
        let answer = match client.chat(&model, &messages, tools::declarations()).await {
            Ok(answer) => answer,
            Err(ChatError::BudgetExhausted(why)) => {
                return (EXIT_BUDGET_EXHAUSTED, progress.summary(&format!("the budget is exhausted ({why}).")));
            }
            Err(ChatError::CallCap(why)) => {
                return (EXIT_MAX_TURNS_REACHED, progress.summary(&format!("the call cap was reached ({why}).")));
            }
            Err(ChatError::Other(why)) => {
                return (EXIT_FAILED, progress.summary(&format!("the model call failed: {why}")));
            }
        };
        progress.turns = turn;
        progress.input_tokens += answer.input_tokens;
        progress.output_tokens += answer.output_tokens;
        let message = answer.message;
        let content = message.get("content").and_then(Value::as_str).map(str::to_owned);
        if let Some(text) = content.as_ref().filter(|t| !t.trim().is_empty()) {
            progress.last_text = Some(text.chars().take(500).collect());
        }
        let calls = message.get("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default();
        let names: Vec<String> = calls
            .iter()
            .map(|c| c.pointer("/function/name").and_then(Value::as_str).unwrap_or("?").to_owned())
            .collect();
        say(&format!(
            "turn={turn} tools={} input_tokens={} output_tokens={}",
            if names.is_empty() { "-".to_owned() } else { names.join(",") },
            answer.input_tokens,
            answer.output_tokens
        ));
        if calls.is_empty() {
            return (EXIT_ANSWERED, content.unwrap_or_default());
        }
        messages.push(message.clone());
        for (call, name) in calls.iter().zip(&names) {
            let id = call.get("id").and_then(Value::as_str).unwrap_or_default();
            let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
            progress.tool_calls.push(name.clone());
            let outcome = tracing::info_span!(
                "execute_tool",
                otel.name = format!("execute_tool {name}"),
                otel.kind = "internal",
                gen_ai.operation.name = "execute_tool",
                gen_ai.tool.name = name.as_str(),
                gen_ai.tool.call.id = id,
            )
            .in_scope(|| workspace.run(name, arguments));
            let output = match outcome {
                ToolOutcome::Answer(answer) => return (EXIT_ANSWERED, answer),
                ToolOutcome::Output(output) => output,
            };
            if name == "write_file" && output.starts_with("wrote ") {
                progress.files_written.extend(output.rsplit(" to ").next().map(str::to_owned));
            }
            messages.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
        }
    }
    (EXIT_MAX_TURNS_REACHED, progress.summary(&format!("the cap of {} model calls was reached.", contract.max_turns)))
}

/// Write the result (a longer answer also goes to `result.md` in the workspace) and exit.
fn finish(result_file: &std::path::Path, workspace: Option<&Workspace>, code: i32, text: &str) -> i32 {
    let mut result = text.to_owned();
    if result.len() > crate::jobs::MAX_RESULT_BYTES
        && let Some(workspace) = workspace
    {
        let full = workspace.root().join("result.md");
        let note = "\n\n[The full answer is in result.md in the workspace.]";
        if std::fs::write(&full, text).is_ok() {
            result = crate::jobs::truncate_result(text.to_owned());
            let mut end = crate::jobs::MAX_RESULT_BYTES - note.len();
            while !result.is_char_boundary(end) {
                end -= 1;
            }
            result.truncate(end);
            result.push_str(note);
        }
    }
    let result = crate::jobs::truncate_result(result);
    if !result_file.as_os_str().is_empty()
        && let Err(error) = std::fs::write(result_file, &result)
    {
        eprintln!("agent: cannot write the result to {}: {error}", result_file.display());
    }
    say(&format!("agent: exit={code}"));
    code
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
