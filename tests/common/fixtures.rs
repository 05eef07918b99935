//! Test jobs: the `NewJob` a submission makes of a request, written once instead of a literal in
//! every test (tenant `default`, the default limits).

use oats::jobs::{JobId, JobLimits, JobRequest, NewJob};

/// A request for `goal` in at most `max_turns` turns, nothing else set.
pub fn request(goal: &str, max_turns: u32) -> JobRequest {
    JobRequest { goal: goal.into(), max_turns, ..Default::default() }
}

/// The job `request` becomes once validated against the default limits.
pub fn new_job(request: JobRequest) -> NewJob {
    let spec = request.validate(&JobLimits::default()).expect("a valid test request");
    NewJob {
        id: JobId::random(),
        tenant: "default".into(),
        request_hash: spec.fingerprint(),
        trace: None,
        resources: None,
        queue: Default::default(),
        spec,
        created_at: chrono::Utc::now(),
    }
}
