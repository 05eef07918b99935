//! A demo agent, not an LLM: it shows the agent contract end to end without any model or key.
//!
//! It reads the job from `OATS_GOAL` and `OATS_MAX_TURNS`, prints one line per turn at a steady
//! pace (`OATS_DEMO_TURN_DELAY_MS`, default 500), stops cleanly on SIGTERM, and writes its answer
//! to `OATS_RESULT_FILE` (on Kubernetes, the container's termination message). A goal containing
//! `#fail` makes it exit with code 3 after the first turn, to show a failing job.

use crate::jobs::agent_env;
use std::{io::Write, time::Duration};

/// Exit code of an agent stopped by SIGTERM (128 + 15), as shells report it.
const TERMINATED: i32 = 143;
/// Exit code of a deliberately failing demo run.
const DEMO_FAILURE: i32 = 3;

/// Run the demo agent; returns its exit code.
pub async fn run() -> i32 {
    let goal = std::env::var(agent_env::GOAL).unwrap_or_default();
    let max_turns: u32 = std::env::var(agent_env::MAX_TURNS).ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let delay = std::env::var("OATS_DEMO_TURN_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let result_file = std::env::var(agent_env::RESULT_FILE).unwrap_or_else(|_| "/dev/termination-log".into());
    let short_goal: String = goal.chars().take(80).collect();
    let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        eprintln!("demo agent: cannot install a SIGTERM handler");
        return 1;
    };

    say(&format!("demo agent: starting, goal: {short_goal:?}, {max_turns} turns"));
    if let Ok(traceparent) = std::env::var("TRACEPARENT") {
        say(&format!("demo agent: continuing trace TRACEPARENT={traceparent}"));
    }
    for turn in 1..=max_turns {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(delay)) => {}
            _ = terminate.recv() => {
                say(&format!("demo agent: cancelled during turn {turn}"));
                return TERMINATED;
            }
        }
        say(&format!("turn {turn}/{max_turns}: working on {short_goal:?}"));
        if goal.contains("#fail") {
            eprintln!("demo agent: failing on purpose (#fail in the goal)");
            return DEMO_FAILURE;
        }
    }
    let answer = format!("demo result: finished {max_turns} turns on {short_goal:?}");
    if let Err(error) = std::fs::write(&result_file, &answer) {
        eprintln!("demo agent: cannot write the result to {result_file}: {error}");
        return 1;
    }
    say("demo agent: done");
    0
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
