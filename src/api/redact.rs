//! What a dry run shows a caller who is not an admin: the job as it would be submitted, without the
//! service's internal configuration (names of Secrets, ConfigMaps and service accounts, file
//! paths on the server or in the pod, internal addresses). Admins see everything.

use serde_json::Value;

/// What replaces a hidden value.
pub const REDACTED: &str = "(redacted)";

/// Keys whose value names internal configuration, wherever they appear.
const INTERNAL_KEYS: [&str; 5] = ["serviceAccountName", "serviceAccount", "secretName", "claimName", "nodeName"];

/// Objects whose `name` is a reference to a Secret or ConfigMap.
const REFERENCES: [&str; 6] = ["secret", "secretKeyRef", "secretRef", "configMap", "configMapKeyRef", "configMapRef"];

/// The caller's own goal, passed to the agent as it is: never hidden, whatever it looks like.
const GOAL: &str = crate::jobs::agent_env::GOAL;

/// Hide the internal configuration in a preview (the rendered Kubernetes Job, or the local
/// backend's command and environment).
pub fn redact_internal(manifest: &mut Value) {
    walk(manifest, None);
}

fn walk(value: &mut Value, parent: Option<&str>) {
    match value {
        Value::Object(map) => {
            // An env entry `{name: OATS_GOAL, value: ...}` carries the caller's goal.
            if map.get("name").and_then(Value::as_str) == Some(GOAL) {
                return;
            }
            for (key, child) in map.iter_mut() {
                let internal = INTERNAL_KEYS.contains(&key.as_str())
                    || (key == "name" && parent.is_some_and(|p| REFERENCES.contains(&p)));
                if internal && child.is_string() {
                    *child = REDACTED.into();
                } else if key != GOAL {
                    walk(child, Some(key));
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| walk(item, parent)),
        Value::String(text) if internal_text(text) => *text = REDACTED.into(),
        _ => {}
    }
}

/// A file path (on the server or in the pod) or an address.
fn internal_text(text: &str) -> bool {
    text.starts_with('/') || text.contains("://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::kubernetes::render,
        config::Config,
        jobs::{JobId, JobLimits, JobRequest, NewJob},
    };

    fn job(goal: &str) -> NewJob {
        let spec = JobRequest { goal: goal.into(), max_turns: 2, ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        NewJob {
            id: JobId::random(),
            tenant: "acme".into(),
            spec,
            created_at: chrono::Utc::now(),
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        }
    }

    #[test]
    fn a_rendered_job_keeps_its_shape_and_loses_its_internals() {
        let config = Config {
            llm_secret_name: Some("prod-openai-credentials".into()),
            llm_secret_keys: vec!["api-key".into()],
            llm_providers_file: Some("/etc/oats/providers.yaml".into()),
            agent_service_account: "agents-in-prod".into(),
            ..Config::default()
        };
        let template = render::AgentTemplate::from_config(&config, "oats-agents");
        let mut manifest = serde_json::to_value(render::render_job(&job("/plan the picnic"), &template)).unwrap();
        let before = manifest.to_string();
        for internal in ["prod-openai-credentials", "agents-in-prod", "/var/run/secrets", "/workspace", "svc:8001"] {
            assert!(before.contains(internal), "the test's manifest lacks {internal}");
        }
        redact_internal(&mut manifest);
        let after = manifest.to_string();
        for internal in ["prod-openai-credentials", "agents-in-prod", "/var/run/secrets", "/workspace", "svc:8001"] {
            assert!(!after.contains(internal), "{internal} is shown: {after}");
        }
        let pod = &manifest["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], REDACTED);
        let container = &pod["containers"][0];
        assert_eq!(container["image"], config.agent_image, "what is not internal stays");
        assert_eq!(container["resources"]["limits"]["memory"], "512Mi");
        let goal = container["env"].as_array().unwrap().iter().find(|e| e["name"] == "OATS_GOAL").unwrap();
        assert_eq!(goal["value"], "/plan the picnic", "the caller's own goal is never hidden");
    }

    #[test]
    fn a_local_preview_hides_paths_and_addresses() {
        let mut preview = serde_json::json!({
            "command": ["/usr/local/bin/oats", "agent"],
            "environment": {
                "OATS_GOAL": "/etc/passwd is the goal",
                "OATS_RESULT_FILE": "/home/ops/.local/share/oats/jobs/job-x/result",
                "OPENAI_BASE_URL": "http://127.0.0.1:8001/v1",
                "OATS_MAX_TURNS": "2"
            }
        });
        redact_internal(&mut preview);
        assert_eq!(preview["command"], serde_json::json!([REDACTED, "agent"]));
        assert_eq!(preview["environment"]["OATS_RESULT_FILE"], REDACTED);
        assert_eq!(preview["environment"]["OPENAI_BASE_URL"], REDACTED);
        assert_eq!(preview["environment"]["OATS_GOAL"], "/etc/passwd is the goal");
        assert_eq!(preview["environment"]["OATS_MAX_TURNS"], "2");
    }
}
