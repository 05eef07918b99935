//! `oats jobs …`: the command-line client of the API.
//!
//! Exit codes: 0 success (or a job that succeeded), 1 a job that failed, 2 a job that was
//! cancelled, 3 an error talking to the server (problem responses print as one line).

mod client;
mod output;
mod sse;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use client::{ApiClient, ClientError};
use serde_json::{Value, json};
use std::{io::Write, path::PathBuf, time::Duration};

/// Where the server is and who we are.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// Server URL (default from OATS_URL, the CLI config file, or http://localhost:8000).
    #[arg(long, global = true, env = "OATS_URL")]
    pub url: Option<String>,
    /// API token (default from OATS_TOKEN or the CLI config file).
    #[arg(long, global = true, env = "OATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output: a table for people, or the API objects exactly as JSON or YAML.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    pub output: Format,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Submit a job.
    Submit {
        /// What the agent should achieve.
        #[arg(long, conflicts_with = "goal_file", required_unless_present = "goal_file")]
        goal: Option<String>,
        /// Read the goal from a file (`-` for stdin).
        #[arg(long)]
        goal_file: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        max_turns: u32,
        /// A label, `key=value` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Timeout in seconds.
        #[arg(long)]
        timeout: Option<u32>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        /// Makes retrying this command safe.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait for the job: show progress while pending, stream logs while running, exit with its outcome.
        #[arg(long)]
        follow: bool,
    },
    /// Show a job.
    Get { id: String },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        /// Label selector, e.g. `team=ml,env in (dev,prod)`.
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
    },
    /// Print a job's output.
    Logs {
        id: String,
        /// Keep printing new lines until the agent exits.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u32>,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// Print each change of a job's status until it finishes; exit with its outcome.
    Watch { id: String },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("`{text}` is not key=value"))
}

/// Exit code of a finished job.
fn exit_code(job: &Value) -> i32 {
    match job["status"].as_str() {
        Some("succeeded") => 0,
        Some("failed") => 1,
        Some("cancelled") => 2,
        _ => 0,
    }
}

/// Run one `oats jobs` command; returns the process exit code.
pub async fn run(connection: Connection, command: JobsCommand) -> i32 {
    let client = match ApiClient::new(&connection) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: {error:#}");
            return 3;
        }
    };
    let format = connection.output;
    match execute(&client, format, command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            3
        }
    }
}

async fn execute(client: &ApiClient, format: Format, command: JobsCommand) -> Result<i32, ClientError> {
    let mut out = std::io::stdout();
    match command {
        JobsCommand::Submit {
            goal,
            goal_file,
            max_turns,
            labels,
            timeout,
            model,
            profile,
            idempotency_key,
            follow,
        } => {
            let mut body = json!({"goal": read_goal(goal, goal_file)?, "max_turns": max_turns});
            if !labels.is_empty() {
                body["labels"] =
                    labels.into_iter().map(|(k, v)| (k, Value::from(v))).collect::<serde_json::Map<_, _>>().into();
            }
            for (key, value) in [
                ("timeout_seconds", timeout.map(Value::from)),
                ("model", model.map(Value::from)),
                ("profile", profile.map(Value::from)),
            ] {
                if let Some(value) = value {
                    body[key] = value;
                }
            }
            let job = client.submit(&body, idempotency_key.as_deref()).await?;
            if !follow {
                output::print_job(&mut out, &job, format);
                return Ok(0);
            }
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            if format == Format::Table {
                eprintln!("submitted {}", output::clean(&id));
            }
            follow_job(client, &id, format).await
        }
        JobsCommand::Get { id } => {
            output::print_job(&mut out, &client.get(&id).await?, format);
            Ok(0)
        }
        JobsCommand::List { status, label, limit, all } => {
            let (items, token) = list(client, status.as_deref(), label.as_deref(), limit, all).await?;
            output::print_list(&mut out, &items, token.as_deref(), format);
            Ok(0)
        }
        JobsCommand::Logs { id, follow, tail } => {
            client.stream_logs(&id, follow, tail, &mut out).await?;
            Ok(0)
        }
        JobsCommand::Cancel { id } => {
            output::print_job(&mut out, &client.cancel(&id).await?, format);
            Ok(0)
        }
        JobsCommand::Watch { id } => {
            let job = client.watch(&id, |job| print_change(job, format)).await?;
            Ok(exit_code(&job))
        }
    }
}

/// The goal given inline, or read from a file (`-`: standard input).
fn read_goal(goal: Option<String>, goal_file: Option<PathBuf>) -> Result<String, ClientError> {
    Ok(match (goal, goal_file) {
        (Some(goal), _) => goal,
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| ClientError::Local(format!("cannot read the goal from stdin: {e}")))?;
            text
        }
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| ClientError::Local(format!("cannot read {}: {e}", path.display())))?,
        (None, None) => unreachable!("clap requires --goal or --goal-file"),
    })
}

/// One page of jobs and the token of the next, or with `all` every page (and no token).
async fn list(
    client: &ApiClient,
    status: Option<&str>,
    label: Option<&str>,
    limit: u32,
    all: bool,
) -> Result<(Vec<Value>, Option<String>), ClientError> {
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client.list(status, label, limit, token.as_deref()).await?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        token = page["next_page_token"].as_str().map(String::from);
        if !all || token.is_none() {
            return Ok((items, if all { None } else { token }));
        }
    }
}

/// One change of a watched job: a timestamped status line, or the job in JSON or YAML.
fn print_change(job: &Value, format: Format) {
    if format == Format::Table {
        let status = output::clean(job["status"].as_str().unwrap_or("?"));
        let reason = job["reason"].as_str().map(|r| format!(" ({})", output::clean(r))).unwrap_or_default();
        let now = chrono::Local::now().format("%H:%M:%S");
        let _ = writeln!(std::io::stdout(), "{now}  {}{reason}", output::paint_status(&status));
    } else {
        output::print_job(&mut std::io::stdout(), job, format);
    }
}

/// Follow a submitted job to its end: progress while pending, its output while running.
async fn follow_job(client: &ApiClient, id: &str, format: Format) -> Result<i32, ClientError> {
    let mut spinner = output::Spinner::new(format == Format::Table);
    let mut streamed = false;
    let final_job = loop {
        let job = client.watch_until_started(id, &mut spinner).await?;
        spinner.clear();
        let status = job["status"].as_str().unwrap_or_default().to_owned();
        if status == "running" && !streamed {
            streamed = true;
            client.stream_logs(id, true, None, &mut std::io::stdout()).await?;
            continue;
        }
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    match format {
        Format::Table => {
            let reason = final_job["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
            let message = final_job["message"].as_str().map(|m| format!(": {m}")).unwrap_or_default();
            let status = output::clean(final_job["status"].as_str().unwrap_or("?"));
            eprintln!("{} {}{}", output::clean(id), output::paint_status(&status), output::clean(&(reason + &message)));
            if final_job["usage"].is_object() {
                eprintln!("usage: {}", output::clean(&output::usage_summary(&final_job)));
            }
            if let Some(result) = final_job["result"].as_str() {
                println!("{}", output::clean(result));
            }
        }
        _ => output::print_job(&mut std::io::stdout(), &final_job, format),
    }
    Ok(exit_code(&final_job))
}
