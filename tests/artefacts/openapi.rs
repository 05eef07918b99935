//! The committed OpenAPI document is the code's, and it documents everything a client needs.

use oats::jobs::JobLimits;
use serde_json::Value;

const REGENERATE: &str = "regenerate with: cargo run -- openapi > openapi/openapi.json && \
                          cargo run -- openapi --yaml > openapi/openapi.yaml";

/// JSON numbers in the spec are floats; compare them as such.
fn num(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn spec() -> Value {
    oats::api::spec()
}

#[test]
fn committed_spec_matches_the_code() {
    let json = std::fs::read_to_string("openapi/openapi.json").expect("openapi/openapi.json exists");
    assert!(
        json.trim_end() == oats::api::spec_json().trim_end(),
        "openapi/openapi.json drifted from the code; {REGENERATE}"
    );
    let yaml = std::fs::read_to_string("openapi/openapi.yaml").expect("openapi/openapi.yaml exists");
    assert!(
        yaml.trim_end() == oats::api::spec_yaml().trim_end(),
        "openapi/openapi.yaml drifted from the code; {REGENERATE}"
    );
}

#[test]
fn every_operation_is_documented() {
    let spec = spec();
    let mut ids = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = format!("{method} {path}");
            for key in ["operationId", "summary", "description"] {
                assert!(op[key].as_str().is_some_and(|s| !s.is_empty()), "{name} lacks {key}");
            }
            assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{name} has no tag");
            ids.push(op["operationId"].as_str().unwrap().to_owned());
            for param in op["parameters"].as_array().into_iter().flatten() {
                assert!(param["description"].is_string(), "{name}: parameter {} has no description", param["name"]);
            }
            if path.starts_with("/api/v1") {
                let responses = op["responses"].as_object().unwrap();
                for status in ["400", "404", "422", "503"] {
                    let problem = &responses[status]["content"]["application/problem+json"];
                    assert!(problem.is_object(), "{name} does not document {status} as problem+json");
                }
            }
        }
    }
    ids.sort();
    assert_eq!(
        ids,
        [
            "cancelJob",
            "createJob",
            "getHealth",
            "getJob",
            "getJobLogs",
            "getReadiness",
            "getUsage",
            "listJobEvents",
            "listJobs",
            "watchJob"
        ]
    );
    let examples = ["CreateJobRequest", "Job"];
    for schema in examples {
        assert!(spec["components"]["schemas"][schema]["example"].is_object(), "{schema} has no example");
    }
    assert_eq!(spec["components"]["schemas"]["CreateJobRequest"]["additionalProperties"], false);
    let logs = &spec["paths"]["/api/v1/jobs/{id}/logs"]["get"]["responses"]["200"]["content"];
    assert!(logs["text/plain; charset=utf-8"].is_object(), "logs are documented as plain text: {logs}");
}

#[test]
fn every_schema_property_has_a_description() {
    let spec = spec();
    for (name, schema) in spec["components"]["schemas"].as_object().unwrap() {
        for (property, body) in schema["properties"].as_object().into_iter().flatten() {
            let target = body["$ref"].as_str().and_then(|r| r.rsplit('/').next());
            let described = body["description"].is_string()
                || target.is_some_and(|t| spec["components"]["schemas"][t]["description"].is_string());
            assert!(described, "{name}.{property} has no description: {body}");
        }
    }
}

#[test]
fn schema_bounds_are_the_server_limits() {
    let spec = spec();
    let request = &spec["components"]["schemas"]["CreateJobRequest"]["properties"];
    assert_eq!(num(&request["goal"]["maxLength"]), JobLimits::GOAL_BYTES_CEILING as f64);
    assert_eq!(num(&request["goal"]["minLength"]), 1_f64);
    assert_eq!(num(&request["max_turns"]["maximum"]), JobLimits::MAX_TURNS_CEILING as f64);
    assert_eq!(num(&request["max_turns"]["minimum"]), 1_f64);
    assert_eq!(num(&request["labels"]["maxProperties"]), JobLimits::LABELS_CEILING as f64);
    assert_eq!(num(&request["timeout_seconds"]["minimum"]), JobLimits::MIN_TIMEOUT_SECONDS as f64);
    assert_eq!(num(&request["timeout_seconds"]["maximum"]), JobLimits::TIMEOUT_CEILING_SECONDS as f64);
    assert_eq!(num(&request["model"]["maxLength"]), JobLimits::MODEL_LEN_CEILING as f64);
    let required: Vec<&str> = spec["components"]["schemas"]["CreateJobRequest"]["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["goal", "max_turns"]);
    let list = &spec["paths"]["/api/v1/jobs"]["get"]["parameters"];
    let limit = list.as_array().unwrap().iter().find(|p| p["name"] == "limit").unwrap();
    assert_eq!(num(&limit["schema"]["maximum"]), oats::jobs::ListQuery::MAX_LIMIT as f64);
}

/// JSON bodies are declared as plain `application/json`: a `charset` parameter ends up in the
/// method names some generators produce (`CreateJobWithApplicationJSONCharsetUTF8BodyWithResponse`).
#[test]
fn json_bodies_are_plain_application_json() {
    let spec = spec();
    let mut json_bodies = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let request = op["requestBody"]["content"].as_object().into_iter().flatten();
            let responses = op["responses"].as_object().into_iter().flatten();
            let contents = responses.flat_map(|(_, r)| r["content"].as_object().into_iter().flatten()).chain(request);
            for (media_type, _) in contents {
                assert!(
                    !(media_type.contains("json") && media_type.contains(';')),
                    "{method} {path} declares {media_type}"
                );
                json_bodies += usize::from(media_type == "application/json");
            }
        }
    }
    assert!(json_bodies >= 8, "only {json_bodies} JSON bodies");
    let create = &spec["paths"]["/api/v1/jobs"]["post"];
    assert!(create["requestBody"]["content"]["application/json"].is_object(), "{create}");
}
