//! The LLM ledger: budgets enforced by reservation, exact across replicas.
//!
//! Before a call is forwarded, its worst case (input bound plus the output it may produce) is
//! reserved against the job and the tenant's day in one transaction, by conditional updates
//! that only succeed while the limits still hold. Row locks serialise concurrent reservations,
//! so the sum reserved and spent never passes a limit, however many replicas charge it. After
//! the answer, the call is settled to what the upstream reported.

use super::{Store, StoreError, db_int, from_db, now_millis, record_cache::FinalUsage};
use crate::jobs::{Budget, DailySpend, JobId, JobUsage, NanoUsd, Refusal, TokenCounts};
use sqlx::{Any, Row, Transaction, any::AnyRow};
use std::collections::{HashMap, HashSet};

/// The columns of a job's ledger row that [`usage_of_row`] reads.
pub(super) const USAGE_COLUMNS: &str = "max_tokens, max_cost, calls, reserved_tokens, reserved_cost, input_tokens, \
    output_tokens, cached_tokens, reasoning_tokens, cost, refused, in_flight";

/// What a job's ledger row says it has spent and has left.
fn usage_of_row(row: &AnyRow) -> Result<JobUsage, StoreError> {
    let tokens = TokenCounts {
        input: from_db(row.try_get("input_tokens")?),
        output: from_db(row.try_get("output_tokens")?),
        cached_input: from_db(row.try_get("cached_tokens")?),
        reasoning: from_db(row.try_get("reasoning_tokens")?),
    };
    let cost = NanoUsd(from_db(row.try_get("cost")?));
    let calls = from_db(row.try_get("calls")?);
    let in_flight = from_db(row.try_get("in_flight")?);
    let reserved_tokens = from_db(row.try_get("reserved_tokens")?);
    let reserved_cost = NanoUsd(from_db(row.try_get("reserved_cost")?));
    let max_tokens: Option<i64> = row.try_get("max_tokens")?;
    let max_cost: Option<i64> = row.try_get("max_cost")?;
    let refused: Option<String> = row.try_get("refused")?;
    Ok(JobUsage {
        model_calls: calls.saturating_sub(in_flight),
        tokens,
        cost,
        tokens_left: max_tokens.map(|m| from_db(m).saturating_sub(tokens.total() + reserved_tokens)),
        cost_left: max_cost.map(|m| NanoUsd(from_db(m)).saturating_sub(NanoUsd(cost.0 + reserved_cost.0))),
        refused: refused.as_deref().and_then(Refusal::parse),
    })
}

/// A job's limits, written to its ledger row on its first call.
#[derive(Debug, Clone)]
pub struct LedgerLimits {
    pub budget: Budget,
    /// The job's `max_turns`: a hard cap on its model calls.
    pub max_calls: u32,
    /// Calls of one job in flight at once.
    pub max_in_flight: u32,
    /// The tenant's spend limit per UTC day.
    pub daily_limit: Option<NanoUsd>,
}

/// A reservation held for one call until it is settled.
#[derive(Debug, Clone)]
pub struct CallTicket {
    pub call_id: String,
    pub job_id: JobId,
    pub tenant: String,
    pub day: String,
    pub reserved_tokens: u64,
    pub reserved_cost: NanoUsd,
}

/// The UTC day a call is charged to.
pub fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

impl Store {
    /// Create the job's ledger row if this is its first call (limits are fixed from then on).
    pub async fn open_ledger(&self, job: &JobId, tenant: &str, limits: &LedgerLimits) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO llm_job_ledger (job_id, tenant, max_tokens, max_cost, max_calls, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(job.as_str())
        .bind(tenant)
        .bind(limits.budget.max_tokens.map(db_int))
        .bind(limits.budget.max_cost.map(|c| db_int(c.0)))
        .bind(i64::from(limits.max_calls))
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Reserve `tokens` and `cost` for one call of `job`, or say which limit refuses it.
    pub async fn reserve(
        &self,
        job: &JobId,
        tenant: &str,
        limits: &LedgerLimits,
        route: (&str, &str),
        tokens: u64,
        cost: NanoUsd,
    ) -> Result<Result<CallTicket, Refusal>, StoreError> {
        let day = today();
        let mut tx = self.pool.begin().await?;
        let reserved = sqlx::query(
            "UPDATE llm_job_ledger SET calls = calls + 1, in_flight = in_flight + 1, \
             reserved_tokens = reserved_tokens + $1, reserved_cost = reserved_cost + $2, updated_at = $3 \
             WHERE job_id = $4 AND calls < max_calls AND in_flight < $5 \
             AND (max_tokens IS NULL OR input_tokens + output_tokens + reserved_tokens + $1 <= max_tokens) \
             AND (max_cost IS NULL OR cost + reserved_cost + $2 <= max_cost)",
        )
        .bind(db_int(tokens))
        .bind(db_int(cost.0))
        .bind(now_millis())
        .bind(job.as_str())
        .bind(i64::from(limits.max_in_flight))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if reserved == 0 {
            let refusal = job_refusal(&mut tx, job, limits, tokens).await?;
            return self.refuse(tx, refusal).await;
        }
        sqlx::query("INSERT INTO llm_tenant_day (tenant, day) VALUES ($1, $2) ON CONFLICT (tenant, day) DO NOTHING")
            .bind(tenant)
            .bind(&day)
            .execute(&mut *tx)
            .await?;
        let within_day = sqlx::query(
            "UPDATE llm_tenant_day SET reserved_cost = reserved_cost + $1 \
             WHERE tenant = $2 AND day = $3 AND cost + reserved_cost + $1 <= $4",
        )
        .bind(db_int(cost.0))
        .bind(tenant)
        .bind(&day)
        .bind(limits.daily_limit.map_or(i64::MAX, |l| db_int(l.0)))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if within_day == 0 {
            return self.refuse(tx, Refusal::TenantDailySpend).await;
        }
        let call_id = format!("{}-{}", job, uuid_like());
        sqlx::query(
            "INSERT INTO llm_calls (call_id, job_id, tenant, provider, model, day, started_at, reserved_tokens, reserved_cost) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&call_id)
        .bind(job.as_str())
        .bind(tenant)
        .bind(route.0)
        .bind(route.1)
        .bind(&day)
        .bind(now_millis())
        .bind(db_int(tokens))
        .bind(db_int(cost.0))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(CallTicket {
            call_id,
            job_id: job.clone(),
            tenant: tenant.to_owned(),
            day,
            reserved_tokens: tokens,
            reserved_cost: cost,
        }))
    }

    /// Undo the transaction's reservation.
    async fn refuse(
        &self,
        tx: Transaction<'_, Any>,
        refusal: Refusal,
    ) -> Result<Result<CallTicket, Refusal>, StoreError> {
        tx.rollback().await?;
        Ok(Err(refusal))
    }

    /// Remember the first refusal the job got (the reason it stopped, if it did).
    pub async fn record_refusal(&self, job: &JobId, refusal: Refusal) -> Result<(), StoreError> {
        sqlx::query("UPDATE llm_job_ledger SET refused = COALESCE(refused, $1) WHERE job_id = $2")
            .bind(refusal.as_str())
            .bind(job.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Replace the call's reservation by what it really used, and answer the tenant's settled
    /// spend of the call's day. Settling twice changes nothing (and answers `None`).
    pub async fn settle(
        &self,
        ticket: &CallTicket,
        tokens: TokenCounts,
        cost: NanoUsd,
    ) -> Result<Option<NanoUsd>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let now = now_millis();
        let first = sqlx::query(
            "UPDATE llm_calls SET settled_at = $1, input_tokens = $2, output_tokens = $3, cached_tokens = $4, \
             reasoning_tokens = $5, cost = $6 WHERE call_id = $7 AND settled_at IS NULL",
        )
        .bind(now)
        .bind(db_int(tokens.input))
        .bind(db_int(tokens.output))
        .bind(db_int(tokens.cached_input))
        .bind(db_int(tokens.reasoning))
        .bind(db_int(cost.0))
        .bind(&ticket.call_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if first == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        sqlx::query(
            "UPDATE llm_job_ledger SET in_flight = in_flight - 1, reserved_tokens = reserved_tokens - $1, \
             reserved_cost = reserved_cost - $2, input_tokens = input_tokens + $3, output_tokens = output_tokens + $4, \
             cached_tokens = cached_tokens + $5, reasoning_tokens = reasoning_tokens + $6, cost = cost + $7, \
             updated_at = $8 WHERE job_id = $9",
        )
        .bind(db_int(ticket.reserved_tokens))
        .bind(db_int(ticket.reserved_cost.0))
        .bind(db_int(tokens.input))
        .bind(db_int(tokens.output))
        .bind(db_int(tokens.cached_input))
        .bind(db_int(tokens.reasoning))
        .bind(db_int(cost.0))
        .bind(now)
        .bind(ticket.job_id.as_str())
        .execute(&mut *tx)
        .await?;
        let day_cost = sqlx::query(
            "UPDATE llm_tenant_day SET reserved_cost = reserved_cost - $1, cost = cost + $2 \
             WHERE tenant = $3 AND day = $4 RETURNING cost",
        )
        .bind(db_int(ticket.reserved_cost.0))
        .bind(db_int(cost.0))
        .bind(&ticket.tenant)
        .bind(&ticket.day)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| row.try_get::<i64, _>("cost"))
        .transpose()?;
        tx.commit().await?;
        Ok(day_cost.map(|c| NanoUsd(from_db(c))))
    }

    /// Calls reserved more than `older_than_ms` ago and never settled (their replica died):
    /// settle each at its reservation, the most it could have cost.
    pub async fn settle_abandoned(&self, older_than_ms: i64) -> Result<usize, StoreError> {
        let rows = sqlx::query(
            "SELECT call_id, job_id, tenant, day, reserved_tokens, reserved_cost FROM llm_calls \
             WHERE settled_at IS NULL AND started_at < $1",
        )
        .bind(now_millis() - older_than_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut settled = 0;
        for row in rows {
            let Ok(job_id) = JobId::parse(&row.try_get::<String, _>("job_id")?) else { continue };
            let ticket = CallTicket {
                call_id: row.try_get("call_id")?,
                job_id,
                tenant: row.try_get("tenant")?,
                day: row.try_get("day")?,
                reserved_tokens: from_db(row.try_get("reserved_tokens")?),
                reserved_cost: NanoUsd(from_db(row.try_get("reserved_cost")?)),
            };
            // Charged as output: the worst case the reservation covered.
            let tokens = TokenCounts { output: ticket.reserved_tokens, ..TokenCounts::default() };
            self.settle(&ticket, tokens, ticket.reserved_cost).await?;
            settled += 1;
        }
        Ok(settled)
    }

    /// What the job has spent and has left; `None` if it never called a model.
    pub async fn job_usage(&self, job: &JobId) -> Result<Option<JobUsage>, StoreError> {
        let row = sqlx::query(&format!("SELECT {USAGE_COLUMNS} FROM llm_job_ledger WHERE job_id = $1"))
            .bind(job.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(usage_of_row).transpose()
    }

    /// The usage of each of `ids` that called a model: one query per 500 ids
    /// (a page of jobs asks about all of its jobs at once), none for an archived job whose usage
    /// is final and kept with its record.
    async fn jobs_usage(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobUsage>, StoreError> {
        let mut found = HashMap::new();
        let mut unknown = Vec::with_capacity(ids.len());
        for id in ids {
            match self.archived.final_usage(id.as_str()) {
                Some(FinalUsage::Spent(usage)) => drop(found.insert(id.clone(), usage)),
                Some(FinalUsage::None) => {}
                None => unknown.push(id),
            }
        }
        let now = now_millis();
        let select = format!("SELECT job_id, {USAGE_COLUMNS} FROM llm_job_ledger WHERE job_id IN");
        let asked: Vec<&str> = unknown.iter().map(|id| id.as_str()).collect();
        let mut never_called: HashSet<&JobId> = unknown.iter().copied().collect();
        for row in self.rows_in(&select, &asked).await? {
            let id: String = row.try_get("job_id")?;
            if let Ok(id) = JobId::parse(&id) {
                self.keep_usage_of_row(id.as_str(), &row, now)?;
                never_called.remove(&id);
                found.insert(id, usage_of_row(&row)?);
            }
        }
        for id in never_called {
            self.archived.keep_usage(id.as_str(), FinalUsage::None, now);
        }
        Ok(found)
    }

    /// Keep with the archived record of `id` the usage its ledger row (`job_id` and
    /// [`USAGE_COLUMNS`], all null when the job never called a model) says at `now_ms`, if that
    /// usage is final.
    pub(super) fn keep_usage_of_row(&self, id: &str, row: &AnyRow, now_ms: i64) -> Result<(), StoreError> {
        let usage = if row.try_get::<Option<String>, _>("job_id")?.is_none() {
            FinalUsage::None
        } else if row.try_get::<i64, _>("in_flight")? > 0 {
            return Ok(());
        } else {
            FinalUsage::Spent(usage_of_row(row)?)
        };
        self.archived.keep_usage(id, usage, now_ms);
        Ok(())
    }

    /// What the tenant has spent (settled) on the current UTC day.
    pub async fn tenant_spend_today(&self, tenant: &str) -> Result<NanoUsd, StoreError> {
        let row = sqlx::query("SELECT cost FROM llm_tenant_day WHERE tenant = $1 AND day = $2")
            .bind(tenant)
            .bind(today())
            .fetch_optional(&self.pool)
            .await?;
        Ok(NanoUsd(match row {
            Some(row) => from_db(row.try_get("cost")?),
            None => 0,
        }))
    }

    /// Settled spend grouped by tenant, model and day, for days `from..=to` (YYYY-MM-DD), of one
    /// tenant or all.
    pub async fn usage_report(
        &self,
        from: &str,
        to: &str,
        tenant: Option<&str>,
    ) -> Result<Vec<DailySpend>, StoreError> {
        let sql = format!(
            "SELECT tenant, model, day, COUNT(*) AS calls, CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, \
             CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens, \
             CAST(SUM(reasoning_tokens) AS BIGINT) AS reasoning_tokens, CAST(SUM(cost) AS BIGINT) AS cost \
             FROM llm_calls WHERE settled_at IS NOT NULL AND day >= $1 AND day <= $2 {} \
             GROUP BY tenant, model, day ORDER BY day, tenant, model",
            if tenant.is_some() { "AND tenant = $3" } else { "" }
        );
        let mut query = sqlx::query(&sql).bind(from).bind(to);
        if let Some(tenant) = tenant {
            query = query.bind(tenant);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(DailySpend {
                    tenant: row.try_get("tenant")?,
                    model: row.try_get("model")?,
                    day: row.try_get("day")?,
                    calls: from_db(row.try_get("calls")?),
                    tokens: TokenCounts {
                        input: from_db(row.try_get("input_tokens")?),
                        output: from_db(row.try_get("output_tokens")?),
                        cached_input: from_db(row.try_get("cached_tokens")?),
                        reasoning: from_db(row.try_get("reasoning_tokens")?),
                    },
                    cost: NanoUsd(from_db(row.try_get("cost")?)),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

/// Why the job's row refused a reservation.
async fn job_refusal(
    tx: &mut Transaction<'_, Any>,
    job: &JobId,
    limits: &LedgerLimits,
    tokens: u64,
) -> Result<Refusal, StoreError> {
    let row = sqlx::query(
        "SELECT calls, max_calls, in_flight, input_tokens + output_tokens + reserved_tokens AS used_tokens, \
         cost + reserved_cost AS used_cost, max_tokens FROM llm_job_ledger WHERE job_id = $1",
    )
    .bind(job.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(Refusal::CallCap) };
    let calls: i64 = row.try_get("calls")?;
    let max_calls: i64 = row.try_get("max_calls")?;
    let in_flight: i64 = row.try_get("in_flight")?;
    let used_tokens = from_db(row.try_get("used_tokens")?);
    let max_tokens: Option<i64> = row.try_get("max_tokens")?;
    Ok(if calls >= max_calls {
        Refusal::CallCap
    } else if in_flight >= i64::from(limits.max_in_flight) {
        Refusal::InFlight
    } else if max_tokens.is_some_and(|m| used_tokens + tokens > from_db(m)) {
        Refusal::JobTokens
    } else {
        Refusal::JobCost
    })
}

/// 128 random bits in hex: unique call ids without coordination.
fn uuid_like() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait::async_trait]
impl crate::jobs::UsageSource for Store {
    async fn usage_of(&self, ids: &[JobId]) -> HashMap<JobId, JobUsage> {
        self.jobs_usage(ids).await.unwrap_or_else(|error| {
            tracing::warn!(%error, "job usage is not available");
            HashMap::new()
        })
    }

    async fn daily_spend(
        &self,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        tenant: Option<&str>,
    ) -> Result<Vec<DailySpend>, String> {
        let day = |d: chrono::NaiveDate| d.format("%Y-%m-%d").to_string();
        self.usage_report(&day(from), &day(to), tenant).await.map_err(|e| e.to_string())
    }
}
