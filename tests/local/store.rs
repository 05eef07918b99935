//! The store's ledger on both engines, with the same cases: SQLite in process, and a real
//! PostgreSQL server (`OATS_TEST_DATABASE_URL`, started by scripts/test.sh).

use crate::common::{
    self,
    stores::{engines, tenant},
};
use oats::{
    jobs::{Budget, JobId, NanoUsd, Refusal, TokenCounts},
    store::{LedgerLimits, Store},
};
use std::sync::Arc;

fn limits(max_tokens: Option<u64>, max_cost: Option<u64>, max_calls: u32) -> LedgerLimits {
    LedgerLimits {
        budget: Budget { max_tokens, max_cost: max_cost.map(NanoUsd) },
        max_calls,
        max_in_flight: 100,
        daily_limit: None,
    }
}

const ROUTE: (&str, &str) = ("fake", "test-model");

#[tokio::test]
async fn reservations_settle_to_what_was_used_and_refusals_name_the_limit() {
    for (engine, store, _dir) in engines().await {
        let (job, tenant) = (JobId::random(), tenant());
        let limits = limits(Some(1000), None, 3);
        store.open_ledger(&job, &tenant, &limits).await.unwrap();
        let ticket = store.reserve(&job, &tenant, &limits, ROUTE, 600, NanoUsd(50)).await.unwrap().unwrap();
        assert_eq!(
            store.reserve(&job, &tenant, &limits, ROUTE, 401, NanoUsd(0)).await.unwrap().unwrap_err(),
            Refusal::JobTokens,
            "{engine}: 600 reserved + 401 > 1000"
        );
        let used = TokenCounts { input: 100, output: 50, cached_input: 20, reasoning: 7 };
        store.settle(&ticket, used, NanoUsd(30)).await.unwrap();
        store.settle(&ticket, used, NanoUsd(30)).await.unwrap();
        let usage = store.job_usage(&job).await.unwrap().unwrap();
        assert_eq!((usage.model_calls, usage.tokens, usage.cost), (1, used, NanoUsd(30)), "{engine}: settled once");
        assert_eq!(usage.tokens_left, Some(850), "{engine}");
        for _ in 0..2 {
            let ticket = store.reserve(&job, &tenant, &limits, ROUTE, 10, NanoUsd(0)).await.unwrap().unwrap();
            store.settle(&ticket, TokenCounts::default(), NanoUsd(0)).await.unwrap();
        }
        assert_eq!(
            store.reserve(&job, &tenant, &limits, ROUTE, 1, NanoUsd(0)).await.unwrap().unwrap_err(),
            Refusal::CallCap,
            "{engine}: three calls made"
        );
        store.record_refusal(&job, Refusal::CallCap).await.unwrap();
        store.record_refusal(&job, Refusal::JobTokens).await.unwrap();
        assert_eq!(
            store.job_usage(&job).await.unwrap().unwrap().refused,
            Some(Refusal::CallCap),
            "{engine}: the first refusal stays"
        );

        let costly = JobId::random();
        let limits = limits_with_cost(1000);
        store.open_ledger(&costly, &tenant, &limits).await.unwrap();
        assert_eq!(
            store.reserve(&costly, &tenant, &limits, ROUTE, 1, NanoUsd(1001)).await.unwrap().unwrap_err(),
            Refusal::JobCost,
            "{engine}"
        );
    }
}

fn limits_with_cost(nano_usd: u64) -> LedgerLimits {
    limits(None, Some(nano_usd), 10)
}

#[tokio::test]
async fn a_tenants_daily_limit_holds_across_its_jobs() {
    for (engine, store, _dir) in engines().await {
        let tenant = tenant();
        let limits = LedgerLimits { daily_limit: Some(NanoUsd(1000)), ..limits(None, None, 10) };
        let (a, b) = (JobId::random(), JobId::random());
        for job in [&a, &b] {
            store.open_ledger(job, &tenant, &limits).await.unwrap();
        }
        let ticket = store.reserve(&a, &tenant, &limits, ROUTE, 1, NanoUsd(700)).await.unwrap().unwrap();
        assert_eq!(
            store.reserve(&b, &tenant, &limits, ROUTE, 1, NanoUsd(301)).await.unwrap().unwrap_err(),
            Refusal::TenantDailySpend,
            "{engine}"
        );
        // The refused reservation left nothing behind on the job either.
        assert_eq!(store.job_usage(&b).await.unwrap().unwrap().model_calls, 0);
        store.settle(&ticket, TokenCounts::default(), NanoUsd(200)).await.unwrap();
        assert_eq!(store.tenant_spend_today(&tenant).await.unwrap(), NanoUsd(200), "{engine}");
        assert!(store.reserve(&b, &tenant, &limits, ROUTE, 1, NanoUsd(800)).await.unwrap().is_ok(), "{engine}");
    }
}

/// Replicas are separate pools on one database: 50 concurrent reservations of 100 tokens against
/// a budget of 1,000 admit exactly 10, however they interleave.
#[tokio::test]
async fn concurrent_reservations_from_two_replicas_never_pass_the_budget() {
    let url = common::stores::postgres_url();
    let replicas = [Arc::new(Store::open(&url).await.unwrap()), Arc::new(Store::open(&url).await.unwrap())];
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(Store::open_in(dir.path()).await.unwrap());
    for (engine, stores) in [("postgres", replicas.to_vec()), ("sqlite", vec![sqlite])] {
        let (job, tenant) = (JobId::random(), tenant());
        let limits = limits(Some(1000), None, 1000);
        stores[0].open_ledger(&job, &tenant, &limits).await.unwrap();
        let attempts = (0..50).map(|i| {
            let (store, job, tenant, limits) =
                (stores[i % stores.len()].clone(), job.clone(), tenant.clone(), limits.clone());
            tokio::spawn(async move { store.reserve(&job, &tenant, &limits, ROUTE, 100, NanoUsd(0)).await.unwrap() })
        });
        let results = futures::future::join_all(attempts).await;
        let admitted: Vec<_> = results.into_iter().map(Result::unwrap).filter_map(Result::ok).collect();
        assert_eq!(admitted.len(), 10, "{engine}");
        for ticket in &admitted {
            stores[0]
                .settle(ticket, TokenCounts { input: 40, output: 60, ..Default::default() }, NanoUsd(1))
                .await
                .unwrap();
        }
        let usage = stores[0].job_usage(&job).await.unwrap().unwrap();
        assert_eq!((usage.model_calls, usage.tokens.total(), usage.tokens_left), (10, 1000, Some(0)), "{engine}");
    }
}

#[tokio::test]
async fn migrations_run_once_when_replicas_start_together() {
    let url = common::stores::postgres_url();
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { Store::open(&url).await.map(|_| ()) })
    });
    for opened in futures::future::join_all(opens).await {
        opened.unwrap().expect("every replica starts");
    }
}

#[tokio::test]
async fn usage_is_reported_by_tenant_model_and_day_and_abandoned_calls_are_settled() {
    // Settling abandoned calls touches every call in flight: this test has a database to itself.
    let url = common::stores::second_postgres_url();
    let dir = tempfile::tempdir().unwrap();
    let stores =
        [("sqlite", Store::open_in(dir.path()).await.unwrap()), ("postgres", Store::open(&url).await.unwrap())];
    for (engine, store) in stores {
        let (job, tenant) = (JobId::random(), tenant());
        let limits = limits(None, None, 10);
        store.open_ledger(&job, &tenant, &limits).await.unwrap();
        for (model, input) in [("m1", 10), ("m1", 20), ("m2", 5)] {
            let ticket =
                store.reserve(&job, &tenant, &limits, ("fake", model), 100, NanoUsd(9)).await.unwrap().unwrap();
            store
                .settle(&ticket, TokenCounts { input, output: 1, ..Default::default() }, NanoUsd(input))
                .await
                .unwrap();
        }
        let abandoned = store.reserve(&job, &tenant, &limits, ("fake", "m2"), 100, NanoUsd(9)).await.unwrap().unwrap();
        let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let rows = store.usage_report(&today, &today, Some(&tenant)).await.unwrap();
        let summary: Vec<_> = rows.iter().map(|r| (r.model.as_str(), r.calls, r.tokens.input, r.cost.0)).collect();
        assert_eq!(summary, [("m1", 2, 30, 30), ("m2", 1, 5, 5)], "{engine}: settled calls only");
        assert!(store.usage_report("2000-01-01", "2000-01-02", Some(&tenant)).await.unwrap().is_empty());

        assert_eq!(store.settle_abandoned(3_600_000).await.unwrap(), 0, "{engine}: nothing is an hour old");
        let settled = store.settle_abandoned(-1000).await.unwrap();
        assert!(settled >= 1, "{engine}");
        let usage = store.job_usage(&job).await.unwrap().unwrap();
        assert_eq!((usage.model_calls, usage.cost), (4, NanoUsd(30 + 5 + 9)), "{engine}: charged at its reservation");
        drop(abandoned);
    }
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let error = Store::open("postgres://oats:hunter2secret@127.0.0.1:1/oats").await.err().expect("no server on port 1");
    let text = error.to_string();
    assert!(text.contains("unavailable"), "{text}");
    assert!(!text.contains("hunter2secret"), "{text}");
}
