//! Scenario 2: `GET /api/v1/jobs?limit=50`: the first page and one after 9,000 jobs vs a bare
//! poem handler answering a body of the same size; filtered pages vs the unfiltered one; and the
//! first and a deep page with 100,000 jobs vs 10,000.

use crate::{
    Bench, JOBS_100K,
    load::{Load, Target},
    procs::seeded_env,
    scenarios::reads::Reads,
    seed::preload,
};
use anyhow::Result;
use oats::jobs::JobPhase;
use oats_testkit::Process;

/// Filters on the 10k jobs (one in seven failed; ten teams), each as a query string.
const FILTERS: [(&str, &str); 4] = [
    ("status=failed (1 in 7)", "status=failed"),
    ("label team=team-3 (1 in 10)", "label=team%3Dteam-3"),
    ("label team in (team-1,team-2) (1 in 5)", "label=team%20in%20(team-1,team-2)"),
    ("status=failed and label env=prod (1 in 7)", "status=failed&label=env%3Dprod"),
];

/// Server CPU per request, in ms.
fn cpu_per_request(load: &Load) -> f64 {
    load.server_cpu / load.requests.max(1) as f64 * 1e3
}

impl Bench {
    pub(crate) async fn list_scenario(&mut self, reads: &Reads, bare: &Process) -> Result<()> {
        let Reads { oats, list_body, deep_token, deep_body, .. } = reads;
        println!("-- scenario 2: GET /api/v1/jobs?limit=50 ({} bytes) vs bare poem handler", list_body.len());
        let bare_list = self.closed(Target::new(bare, ["/api/v1/jobs?limit=50".to_owned()]), bare).await;
        self.load_note("2 bare handler, list-sized body, saturated", &bare_list);
        let first = self.closed(Target::new(oats, ["/api/v1/jobs?limit=50".to_owned()]), oats).await;
        self.load_note("2 OATS list first page, saturated", &first);
        let deep_path = format!("/api/v1/jobs?limit=50&page_token={deep_token}");
        let deep = self.closed(Target::new(oats, [deep_path]), oats).await;
        self.load_note("2 OATS list page after 9,000 jobs, saturated", &deep);
        self.row(
            "2",
            "list first page (limit=50), 10k jobs: req/s",
            format!("{:.0} (p50 {:.2} ms, p99 {:.2} ms)", first.rps(), first.pct(0.5), first.pct(0.99)),
            format!("{:.0} (bare, {} B body)", bare_list.rps(), list_body.len()),
            Some(first.rps() / bare_list.rps()),
            "≥ 0.30",
            Some(first.rps() / bare_list.rps() >= 0.30),
        );
        self.row(
            "2",
            "list deep page (after 9,000 jobs): req/s",
            format!(
                "{:.0} (p50 {:.2} ms, p99 {:.2} ms; {:.3} ms CPU per page, first page {:.3})",
                deep.rps(),
                deep.pct(0.5),
                deep.pct(0.99),
                cpu_per_request(&deep),
                cpu_per_request(&first)
            ),
            format!("{:.0} (bare, {} B body)", bare_list.rps(), deep_body.len()),
            Some(deep.rps() / bare_list.rps()),
            "≥ 0.30; CPU per page ≤ 1.1x the first page's",
            Some(deep.rps() / bare_list.rps() >= 0.30 && cpu_per_request(&deep) <= cpu_per_request(&first) * 1.1),
        );
        self.row(
            "2",
            "list first page: server CPU per request",
            format!("{:.3} ms", cpu_per_request(&first)),
            format!("{:.3} ms (bare)", cpu_per_request(&bare_list)),
            Some(cpu_per_request(&first) / cpu_per_request(&bare_list)),
            "",
            None,
        );
        self.row(
            "2",
            "list: server peak RSS while saturated",
            format!("{:.1} MiB", first.server_hwm_kib.max(deep.server_hwm_kib) as f64 / 1024.0),
            format!("{:.1} MiB (bare)", bare_list.server_hwm_kib as f64 / 1024.0),
            None,
            "",
            None,
        );
        self.filtered_pages(oats, &first).await;
        self.pages_of_100k(&first, &deep).await
    }

    /// Each filter's first page vs the unfiltered first page, CPU per page.
    async fn filtered_pages(&mut self, oats: &Process, unfiltered: &Load) {
        for (name, filter) in FILTERS {
            let load = self.closed(Target::new(oats, [format!("/api/v1/jobs?limit=50&{filter}")]), oats).await;
            self.load_note(&format!("2 OATS list first page, {name}, saturated"), &load);
            let ratio = cpu_per_request(&load) / cpu_per_request(unfiltered);
            self.row(
                "2",
                &format!("list first page filtered by {name}, 10k jobs: server CPU per page"),
                format!("{:.3} ms ({:.0} req/s)", cpu_per_request(&load), load.rps()),
                format!("{:.3} ms (unfiltered)", cpu_per_request(unfiltered)),
                Some(ratio),
                "≤ 2x",
                Some(ratio <= 2.0),
            );
        }
    }

    /// The first page and the page after 90,000 jobs with 100,000 jobs, vs 10,000 jobs.
    async fn pages_of_100k(&mut self, first_10k: &Load, deep_10k: &Load) -> Result<()> {
        let dir = self.work.join("state-100k-list");
        let took = preload(&dir, JOBS_100K, JobPhase::Succeeded).await?.took;
        println!("preloaded {JOBS_100K} job records in {:.1}s", took.as_secs_f64());
        let oats = self.start_oats("oats-100k-list", &seeded_env(&dir), self.pin).await?;
        let first = self.closed(Target::new(&oats, ["/api/v1/jobs?limit=50".to_owned()]), &oats).await;
        self.load_note("2 OATS list first page, 100k jobs, saturated", &first);
        let token = self.deep_page_token(&oats, 90_000).await?;
        let deep_path = format!("/api/v1/jobs?limit=50&page_token={token}");
        let deep = self.closed(Target::new(&oats, [deep_path]), &oats).await;
        self.load_note("2 OATS list page after 90,000 jobs, 100k jobs, saturated", &deep);
        drop(oats);
        let _ = std::fs::remove_dir_all(&dir);
        for (name, at_100k, at_10k) in [("first page", &first, first_10k), ("deep page", &deep, deep_10k)] {
            let ratio = cpu_per_request(at_100k) / cpu_per_request(at_10k);
            self.row(
                "2",
                &format!("list {name}, 100k jobs vs 10k: server CPU per page"),
                format!("{:.3} ms ({:.0} req/s)", cpu_per_request(at_100k), at_100k.rps()),
                format!("{:.3} ms (10k jobs)", cpu_per_request(at_10k)),
                Some(ratio),
                "≤ 1.5x",
                Some(ratio <= 1.5),
            );
        }
        Ok(())
    }
}
