-- The local backend's jobs: one row per job, its record and events as JSON (a local job has a
-- handful of events, written with their record in one statement on every change), loaded at
-- start. The agent's output and workspace stay files in the state directory. `owner` is the id
-- of the state directory the row belongs to, so servers with state directories of their own may
-- share one database. Portable SQL: the same text runs on SQLite and PostgreSQL.

CREATE TABLE local_jobs (
    owner       TEXT NOT NULL,
    id          TEXT NOT NULL,
    created_ns  BIGINT NOT NULL,     -- created_at, nanoseconds since the epoch: load order
    phase       TEXT NOT NULL,       -- for whoever reads the table by hand
    record      TEXT NOT NULL,       -- the job record, JSON
    events      TEXT NOT NULL,       -- its events, JSON, oldest first
    updated_ms  BIGINT NOT NULL,
    PRIMARY KEY (owner, id)
);
