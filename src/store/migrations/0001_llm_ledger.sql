-- The LLM ledger: what each job may spend and has spent, each tenant's spend per day, and every
-- model call. Amounts of money are nano-dollars (BIGINT), tokens are counts. Portable SQL: the
-- same text runs on SQLite and PostgreSQL.

CREATE TABLE llm_job_ledger (
    job_id            TEXT PRIMARY KEY,
    tenant            TEXT NOT NULL,
    max_tokens        BIGINT,           -- NULL: no token limit
    max_cost          BIGINT,           -- NULL: no cost limit
    max_calls         BIGINT NOT NULL,
    calls             BIGINT NOT NULL DEFAULT 0,
    in_flight         BIGINT NOT NULL DEFAULT 0,
    reserved_tokens   BIGINT NOT NULL DEFAULT 0,
    reserved_cost     BIGINT NOT NULL DEFAULT 0,
    input_tokens      BIGINT NOT NULL DEFAULT 0,
    output_tokens     BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens  BIGINT NOT NULL DEFAULT 0,
    cost              BIGINT NOT NULL DEFAULT 0,
    refused           TEXT,             -- the first refusal the job got
    updated_at        BIGINT NOT NULL
);

CREATE TABLE llm_tenant_day (
    tenant         TEXT NOT NULL,
    day            TEXT NOT NULL,       -- YYYY-MM-DD, UTC
    reserved_cost  BIGINT NOT NULL DEFAULT 0,
    cost           BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day)
);

CREATE TABLE llm_calls (
    call_id           TEXT PRIMARY KEY,
    job_id            TEXT NOT NULL,
    tenant            TEXT NOT NULL,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    day               TEXT NOT NULL,
    started_at        BIGINT NOT NULL,  -- Unix milliseconds
    settled_at        BIGINT,           -- NULL while the call is in flight
    reserved_tokens   BIGINT NOT NULL,
    reserved_cost     BIGINT NOT NULL,
    input_tokens      BIGINT NOT NULL DEFAULT 0,
    output_tokens     BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens  BIGINT NOT NULL DEFAULT 0,
    cost              BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX llm_calls_by_day ON llm_calls (day, tenant);
CREATE INDEX llm_calls_by_job ON llm_calls (job_id);
CREATE INDEX llm_calls_in_flight ON llm_calls (settled_at, started_at);
