//! `oats launch -- <agent command>`: run an agent that reads `OPENAI_API_KEY` from its
//! environment at start (the OpenAI SDKs, most frameworks) on Kubernetes, where the job's
//! credential is a projected token file rather than a variable. The launcher reads the token,
//! sets `OPENAI_API_KEY`, and replaces itself with the agent (exec): no secret is stored in the
//! pod spec, and the token stays valid past the job's deadline.

use crate::jobs::agent_env;
use std::{os::unix::process::CommandExt, process::Command};

/// Exec `command` with `OPENAI_API_KEY` from `OATS_LLM_TOKEN_FILE`; returns only on failure,
/// with the exit code to use.
pub fn launch(command: &[String]) -> i32 {
    let Some((program, args)) = command.split_first() else {
        eprintln!("oats launch: name the agent command after `--`");
        return 2;
    };
    let mut agent = Command::new(program);
    agent.args(args);
    if std::env::var_os(agent_env::OPENAI_API_KEY).is_none()
        && let Some(file) = std::env::var_os(agent_env::LLM_TOKEN_FILE)
    {
        match std::fs::read_to_string(&file) {
            Ok(token) => {
                agent.env(agent_env::OPENAI_API_KEY, token.trim());
            }
            Err(error) => {
                eprintln!("oats launch: cannot read the job's credential from {}: {error}", file.to_string_lossy());
                return 1;
            }
        }
    }
    let error = agent.exec();
    eprintln!("oats launch: cannot start {program}: {error}");
    127
}

/// `oats install-launcher <path>`: copy this binary to `path` (the init container of agents of
/// other images; the OATS image has no shell or `cp`).
pub fn install(destination: &str) -> i32 {
    use std::os::unix::fs::PermissionsExt;
    let copied = std::env::current_exe()
        .and_then(|exe| std::fs::copy(exe, destination))
        .and_then(|_| std::fs::set_permissions(destination, std::fs::Permissions::from_mode(0o555)));
    match copied {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("oats install-launcher: cannot copy the launcher to {destination}: {error}");
            1
        }
    }
}
