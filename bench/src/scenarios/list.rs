//! Scenario 2: `GET /api/v1/jobs?limit=50`, the first page and one after 9,000 jobs, vs a bare
//! poem handler answering a body of the same size.

use crate::{
    Bench,
    load::{Load, Target},
    scenarios::reads::Reads,
};
use anyhow::Result;
use oats_testkit::Process;

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
            format!("{:.0} (p50 {:.1} ms, p99 {:.1} ms)", first.rps(), first.pct(0.5), first.pct(0.99)),
            format!("{:.0} (bare, {} B body)", bare_list.rps(), list_body.len()),
            Some(first.rps() / bare_list.rps()),
            "",
            None,
        );
        self.row(
            "2",
            "list deep page (after 9,000 jobs): req/s",
            format!("{:.0} (p50 {:.1} ms, p99 {:.1} ms)", deep.rps(), deep.pct(0.5), deep.pct(0.99)),
            format!("{:.0} (bare, {} B body)", bare_list.rps(), deep_body.len()),
            Some(deep.rps() / bare_list.rps()),
            "",
            None,
        );
        let per_req = |l: &Load| l.server_cpu / l.requests.max(1) as f64 * 1e3;
        self.row(
            "2",
            "list first page: server CPU per request",
            format!("{:.2} ms", per_req(&first)),
            format!("{:.3} ms (bare)", per_req(&bare_list)),
            Some(per_req(&first) / per_req(&bare_list)),
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
        Ok(())
    }
}
