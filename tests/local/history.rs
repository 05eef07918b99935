//! The job history on both engines, with the same cases: SQLite in process, and a real
//! PostgreSQL server (`OATS_TEST_DATABASE_URL`, started by scripts/test.sh).

use crate::common::stores::{engines, tenant};
use chrono::{DateTime, Duration as Days, Utc};
use oats::jobs::{
    JobEvent, JobId, JobPhase, JobRecord, ListQuery,
    history::{ArchivedJob, JobHistory, OutputTail},
};
use std::{collections::HashSet, time::Duration};

/// A finished job's record, written as the JSON a backend keeps (independent of any builder).
fn record(tenant: &str, created_at: DateTime<Utc>, phase: &str, labels: serde_json::Value) -> JobRecord {
    serde_json::from_value(serde_json::json!({
        "id": JobId::random().as_str(),
        "tenant": tenant,
        "spec": {"goal": "summarise the report", "max_turns": 5, "labels": labels, "timeout_seconds": 600, "model": null},
        "status": {"phase": phase, "reason": null, "message": null},
        "created_at": created_at,
        "started_at": created_at + Days::seconds(1),
        "finished_at": created_at + Days::seconds(30),
        "attempts": 1,
        "result": "done",
        "request_hash": "h",
        "trace": null,
    }))
    .expect("a record in the backends' JSON form")
}

fn archived(record: JobRecord) -> ArchivedJob {
    let event = JobEvent {
        time: record.created_at,
        kind: "Normal".into(),
        reason: "Completed".into(),
        message: "Job completed".into(),
        object: format!("Job/{}", record.id),
        count: 1,
    };
    ArchivedJob { record, events: vec![event], logs: b"2026-12-01T10:00:00Z hello\n".to_vec(), logs_truncated: false }
}

fn query(status: Option<JobPhase>, selector: Option<&str>, limit: u32, token: Option<&str>) -> ListQuery {
    ListQuery::parse(status, selector, Some(limit), token).unwrap()
}

#[tokio::test]
async fn an_archived_job_reads_back_exactly_and_archiving_twice_keeps_one_row() {
    for (engine, store, _dir) in engines().await {
        let tenant = tenant();
        let labels: serde_json::Map<_, _> =
            (0..16).map(|i| (format!("key-{i}"), serde_json::Value::from(format!("value-{i}")))).collect();
        let mut job = record(&tenant, Utc::now(), "succeeded", labels.into());
        job.spec.goal = "é".repeat(8 * 1024); // 16 KiB of UTF-8
        let job = archived(job);
        store.archive(&job).await.unwrap();
        store.archive(&job).await.unwrap();
        let id = &job.record.id;
        let read = store.record(id).await.unwrap().expect("archived");
        assert_eq!(*read, job.record, "{engine}: the record round-trips");
        let again = store.record(id).await.unwrap().unwrap();
        assert!(std::sync::Arc::ptr_eq(&read, &again), "{engine}: read again, the record is the one decoded first");
        assert_eq!(store.events(id).await.unwrap().unwrap(), job.events, "{engine}");
        assert_eq!(store.logs(id).await.unwrap().unwrap(), job.logs, "{engine}");
        let page = store.page(Some(&tenant), &query(None, None, 10, None)).await.unwrap();
        assert_eq!(page.len(), 1, "{engine}: one row after two archives");
        let other = JobId::random();
        let among = store.archived_among(&[id.clone(), other.clone()]).await.unwrap();
        assert_eq!(among, HashSet::from([id.clone()]), "{engine}");
        assert!(store.record(&other).await.unwrap().is_none(), "{engine}");
        assert!(store.logs(&other).await.unwrap().is_none(), "{engine}");
    }
}

#[tokio::test]
async fn one_holder_claims_a_job_until_its_lease_runs_out_and_none_once_archived() {
    for (engine, store, _dir) in engines().await {
        let job = archived(record(&tenant(), Utc::now(), "failed", serde_json::json!({})));
        let id = &job.record.id;
        let lease = Duration::from_millis(300);
        assert!(store.claim(id, "replica-a", lease).await.unwrap(), "{engine}: first claim");
        assert!(!store.claim(id, "replica-b", lease).await.unwrap(), "{engine}: a's lease runs");
        assert!(store.claim(id, "replica-a", lease).await.unwrap(), "{engine}: the holder renews");
        tokio::time::sleep(lease * 2).await;
        assert!(store.claim(id, "replica-b", lease).await.unwrap(), "{engine}: b takes over a lapsed lease");
        store.archive(&job).await.unwrap();
        assert!(!store.claim(id, "replica-a", lease).await.unwrap(), "{engine}: nothing to claim once archived");
    }
}

#[tokio::test]
async fn pages_follow_the_live_order_cursor_status_selector_and_tenancy() {
    for (engine, store, _dir) in engines().await {
        let (mine, theirs) = (tenant(), tenant());
        let start: DateTime<Utc> = "2026-11-01T00:00:00Z".parse().unwrap();
        let mut written = Vec::new();
        for i in 0..7 {
            let phase = if i % 2 == 0 { "succeeded" } else { "failed" };
            let team = if i < 4 { "a" } else { "b" };
            let job = record(&mine, start + Days::minutes(i), phase, serde_json::json!({"team": team}));
            store.archive(&archived(job.clone())).await.unwrap();
            written.push(job.id);
        }
        // Another tenant's job, newer than anything else in the (shared) database, also than the
        // one an earlier run of this test left (twice "now": later runs are later still).
        let newest = Utc::now() + Days::seconds(Utc::now().timestamp());
        store.archive(&archived(record(&theirs, newest, "succeeded", serde_json::json!({})))).await.unwrap();
        // Newest first: jobs 6, 5, ..., 0 (created one minute apart).
        let ids = |page: &[std::sync::Arc<JobRecord>]| page.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        // Job 5 read alone first: the first page mixes a record kept decoded with records read
        // for it, and the second page (from job 3, which the first read) does too.
        store.record(&written[5]).await.unwrap().expect("archived");
        let first = store.page(Some(&mine), &query(None, None, 3, None)).await.unwrap();
        assert_eq!(ids(&first), [&written[6], &written[5], &written[4], &written[3]].map(Clone::clone), "{engine}");
        let after = oats::jobs::PageToken::decode(&page_token_after(&first[2])).unwrap();
        let second = store
            .page(Some(&mine), &ListQuery { page_token: Some(after), ..query(None, None, 3, None) })
            .await
            .unwrap();
        assert_eq!(ids(&second), [&written[3], &written[2], &written[1], &written[0]].map(Clone::clone), "{engine}");
        let failed = store.page(Some(&mine), &query(Some(JobPhase::Failed), None, 10, None)).await.unwrap();
        assert_eq!(ids(&failed), [&written[5], &written[3], &written[1]].map(Clone::clone), "{engine}");
        let team_b = store.page(Some(&mine), &query(None, Some("team=b"), 10, None)).await.unwrap();
        assert_eq!(ids(&team_b), [&written[6], &written[5], &written[4]].map(Clone::clone), "{engine}");
        let everyone = store.page(None, &query(None, None, 5, None)).await.unwrap();
        assert!(everyone.iter().any(|r| r.tenant == theirs), "{engine}: no tenant filter for admins");
    }
}

/// The page token the API hands out after `record` (written independently: base64 of
/// `v1:<created nanoseconds>:<id>`).
fn page_token_after(record: &JobRecord) -> String {
    use base64::Engine;
    let nanos = record.created_at.timestamp_nanos_opt().unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{nanos}:{}", record.id.as_str()))
}

#[tokio::test]
async fn retention_purges_what_finished_before_the_cutoff() {
    for (engine, store, _dir) in engines().await {
        let tenant = tenant();
        let old = record(&tenant, Utc::now() - Days::days(40), "succeeded", serde_json::json!({}));
        let recent = record(&tenant, Utc::now() - Days::days(2), "succeeded", serde_json::json!({}));
        store.archive(&archived(old.clone())).await.unwrap();
        store.archive(&archived(recent.clone())).await.unwrap();
        // Read first, so that what the store keeps decoded is purged too.
        assert!(store.record(&old.id).await.unwrap().is_some(), "{engine}");
        let page = store.page(Some(&tenant), &query(None, None, 10, None)).await.unwrap();
        assert_eq!(page.len(), 2, "{engine}");
        let purged = store.purge(Utc::now() - Days::days(30)).await.unwrap();
        assert!(purged >= 1, "{engine}");
        assert!(store.record(&old.id).await.unwrap().is_none(), "{engine}: past retention");
        assert!(store.record(&recent.id).await.unwrap().is_some(), "{engine}: within retention");
        let page = store.page(Some(&tenant), &query(None, None, 10, None)).await.unwrap();
        let ids: Vec<_> = page.iter().map(|r| &r.id).collect();
        assert_eq!(ids, [&recent.id], "{engine}");
    }
}

#[tokio::test]
async fn a_50_mb_output_is_archived_as_its_last_archive_log_bytes() {
    let limit = 1024 * 1024;
    let mut tail = OutputTail::new(limit);
    let mut last_line = String::new();
    for i in 0..(50 * 1024 * 1024 / 64) {
        last_line = format!("2026-12-01T10:00:00Z line {i:08} {}\n", "x".repeat(28));
        tail.push(last_line.as_bytes());
    }
    let (logs, logs_truncated) = tail.finish();
    assert!(logs_truncated && logs.len() <= limit && logs.len() > limit - 64);
    assert!(logs.ends_with(last_line.as_bytes()) && logs.starts_with(b"2026-12-01T10:00:00Z line "));
    for (engine, store, _dir) in engines().await {
        let mut job = archived(record(&tenant(), Utc::now(), "succeeded", serde_json::json!({})));
        job.logs = logs.clone();
        job.logs_truncated = true;
        store.archive(&job).await.unwrap();
        assert_eq!(store.logs(&job.record.id).await.unwrap().unwrap(), logs, "{engine}");
    }
}

/// An archived job's usage is kept with its record once it is final (finished two hours ago,
/// no call in flight), whether it came with the record (a GET) or was asked for after (a page):
/// a later read asks the ledger nothing, so a ledger change the gateway could no longer make is
/// not seen. Until then every read is fresh.
#[tokio::test]
async fn an_archived_jobs_usage_is_kept_once_final_and_read_afresh_until_then() {
    use oats::{
        jobs::{Budget, JobUsage, NanoUsd, TokenCounts, UsageSource},
        store::LedgerLimits,
    };
    let limits = LedgerLimits { budget: Budget::default(), max_calls: 10, max_in_flight: 10, daily_limit: None };
    let used = TokenCounts { input: 10, ..TokenCounts::default() };
    for (engine, store, _dir) in engines().await {
        let tenant = tenant();
        let finished_hours_ago =
            |hours| record(&tenant, Utc::now() - Days::hours(hours), "succeeded", serde_json::json!({}));
        let jobs = [3, 3, 0, 3, 3].map(finished_hours_ago);
        let [read_alone, listed, recent, never_called, in_flight] = &jobs;
        let call = |job: &JobRecord| {
            let (store, id, tenant, limits) = (store.clone(), job.id.clone(), tenant.clone(), limits.clone());
            async move {
                store.open_ledger(&id, &tenant, &limits).await.unwrap();
                store.reserve(&id, &tenant, &limits, ("fake", "test-model"), 10, NanoUsd(0)).await.unwrap().unwrap()
            }
        };
        for job in [read_alone, listed, recent] {
            store.settle(&call(job).await, used, NanoUsd(5)).await.unwrap();
        }
        let pending = call(in_flight).await;
        for job in &jobs {
            store.archive(&archived(job.clone())).await.unwrap();
        }
        for job in [read_alone, recent, never_called, in_flight] {
            store.record(&job.id).await.unwrap().expect("archived");
        }
        store.settle(&call(read_alone).await, used, NanoUsd(5)).await.unwrap();
        assert_eq!(store.page(Some(&tenant), &query(None, None, 10, None)).await.unwrap().len(), 5, "{engine}");
        let ids = jobs.clone().map(|job| job.id).to_vec();
        let calls = |usage: &std::collections::HashMap<JobId, JobUsage>| {
            ids.iter().map(|id| usage.get(id).map(|u| u.model_calls)).collect::<Vec<_>>()
        };
        assert_eq!(
            calls(&store.usage_of(&ids).await),
            [Some(1), Some(1), Some(1), None, Some(0)],
            "{engine}: read alone: as its record's read found it; the rest as the ledger says"
        );

        for job in [listed, recent, never_called] {
            store.settle(&call(job).await, used, NanoUsd(5)).await.unwrap();
        }
        store.settle(&pending, used, NanoUsd(5)).await.unwrap();
        assert_eq!(
            calls(&store.usage_of(&ids).await),
            [Some(1), Some(1), Some(2), None, Some(1)],
            "{engine}: final usage kept (read alone, listed, never called); the rest read afresh"
        );
    }
}
