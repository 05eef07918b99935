-- Job history: finished jobs kept after their backend forgets them, and the claims that let one
-- replica archive each job. Portable SQL: the same text runs on SQLite and PostgreSQL (BYTEA is
-- a plain type name to SQLite, which keeps blobs as they are).

CREATE TABLE job_archive (
    id             TEXT PRIMARY KEY,
    tenant         TEXT NOT NULL,
    created_ns     BIGINT NOT NULL,     -- created_at, nanoseconds since the epoch: list order
    finished_ms    BIGINT NOT NULL,     -- finished_at (or archived_ms): retention
    phase          TEXT NOT NULL,       -- for the status filter
    record         TEXT NOT NULL,       -- the job record, JSON
    events         TEXT NOT NULL,       -- its events, JSON, newest first
    logs           BYTEA NOT NULL,      -- its output's tail, timestamped lines, DEFLATE-compressed
    log_bytes      BIGINT NOT NULL,     -- size of that output uncompressed
    logs_truncated BIGINT NOT NULL,     -- 1 when the head of a longer output was dropped
    archived_ms    BIGINT NOT NULL
);

CREATE INDEX job_archive_order ON job_archive (created_ns, id);
CREATE INDEX job_archive_tenant_order ON job_archive (tenant, created_ns, id);
CREATE INDEX job_archive_finished ON job_archive (finished_ms);

CREATE TABLE job_archive_claims (
    id          TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
