//! Scenarios 1, 2 and 5 read the same 10,000 jobs from one server: the setup they share.

use crate::{Bench, JOBS_10K, load::Target, procs::seeded_env};
use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use oats_testkit::Process;
use std::path::{Path, PathBuf};

/// A server with the preloaded jobs, and what it answers.
pub(crate) struct Reads {
    pub(crate) dir: PathBuf,
    pub(crate) ids: Vec<String>,
    /// `oats serve` with telemetry off, as deployed by default.
    pub(crate) oats: Process,
    pub(crate) job_body: Bytes,
    pub(crate) list_body: Bytes,
    /// The page token of the page after 9,000 jobs, and that page.
    pub(crate) deep_token: String,
    pub(crate) deep_body: Bytes,
}

impl Reads {
    /// Load on `server`: GET every job in turn.
    pub(crate) fn job_paths(&self, server: &Process) -> Target {
        Target::new(server, self.ids.iter().map(|id| format!("/api/v1/jobs/{id}")))
    }
}

impl Bench {
    pub(crate) async fn read_scenarios(
        &mut self,
        dir: &Path,
        ids: &[String],
        s1: bool,
        s2: bool,
        s5: bool,
    ) -> Result<()> {
        println!("== scenarios 1/2/5: GET with {JOBS_10K} jobs");
        let oats = self.start_oats("oats-off", &seeded_env(dir), self.pin).await?;
        // Bodies of the same size for the bare reference: the very bytes OATS answers.
        let job_body = self.http.get(oats.url(&format!("/api/v1/jobs/{}", ids[0]))).send().await?.bytes().await?;
        let list_body = self.http.get(oats.url("/api/v1/jobs?limit=50")).send().await?.bytes().await?;
        let deep_token = self.deep_page_token(&oats, 9_000).await?;
        let deep_body = self
            .http
            .get(oats.url(&format!("/api/v1/jobs?limit=50&page_token={deep_token}")))
            .send()
            .await?
            .bytes()
            .await?;
        let job_file = self.work.join("job-body.json");
        let list_file = self.work.join("list-body.json");
        std::fs::write(&job_file, &job_body)?;
        std::fs::write(&list_file, &list_body)?;
        let bare = self.start_bare(&job_file, &list_file).await?;

        let reads = Reads { dir: dir.to_owned(), ids: ids.to_vec(), oats, job_body, list_body, deep_token, deep_body };
        if s1 {
            self.get_job_scenario(&reads, &bare).await?;
        }
        if s2 {
            self.list_scenario(&reads, &bare).await?;
        }
        drop(bare);
        if s5 {
            self.telemetry_scenario(&reads).await?;
        }
        Ok(())
    }

    pub(crate) async fn deep_page_token(&self, oats: &Process, depth: usize) -> Result<String> {
        let mut token: Option<String> = None;
        let mut seen = 0;
        while seen < depth {
            let mut url = oats.url("/api/v1/jobs?limit=500");
            if let Some(t) = &token {
                url.push_str(&format!("&page_token={t}"));
            }
            let page: serde_json::Value = self.http.get(url).send().await?.json().await?;
            seen += page["items"].as_array().map_or(0, Vec::len);
            token = page["next_page_token"].as_str().map(String::from);
            if token.is_none() {
                bail!("the listing ended after {seen} jobs");
            }
        }
        token.ok_or_else(|| anyhow!("no page token"))
    }
}
