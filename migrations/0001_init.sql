-- One row per request on an inference route, written after it ends.
CREATE TABLE requests (
    id                   INTEGER PRIMARY KEY,   -- monotonic; the public id and pagination key
    request_id           TEXT NOT NULL,         -- also returned to the client as x-request-id
    started_at_ms        INTEGER NOT NULL,      -- unix epoch milliseconds
    finished_at_ms       INTEGER NOT NULL,
    client               TEXT NOT NULL,         -- peer address, or unix:uid=N
    key_name             TEXT,                  -- API key's name, never the key
    endpoint             TEXT NOT NULL,
    model                TEXT,                  -- canonical name; NULL when unknown
    status               INTEGER NOT NULL,      -- HTTP status the client got
    outcome              TEXT NOT NULL,         -- ok | cancelled | upstream_error | timeout | rejected
    error                TEXT,
    latency_ms           REAL NOT NULL,         -- request received -> last byte sent
    ttfb_ms              REAL,                  -- request received -> first body byte
    ttft_ms              REAL,                  -- request received -> first generated token
    prompt_tokens        INTEGER,
    completion_tokens    INTEGER,
    cached_tokens        INTEGER,
    prompt_ms            REAL,                  -- llama.cpp timings
    predicted_ms         REAL,
    prompt_per_second    REAL,
    predicted_per_second REAL,
    streamed             INTEGER NOT NULL,
    request_content      TEXT,                  -- per [history] content policy
    response_content     TEXT,
    content_truncated    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX requests_started ON requests (started_at_ms);
CREATE INDEX requests_model_started ON requests (model, started_at_ms);
CREATE INDEX requests_outcome_started ON requests (outcome, started_at_ms);

-- Model lifecycle: start_requested, ready, start_failed, stopped, crashed.
CREATE TABLE model_events (
    id          INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    model       TEXT NOT NULL,
    event       TEXT NOT NULL,
    reason      TEXT,                -- ttl | evicted | swap | shutdown | crash | health | admin | reload | ...
    load_ms     REAL,
    exit_status TEXT,
    pid         INTEGER,
    rss_bytes   INTEGER
);
CREATE INDEX model_events_at ON model_events (at_ms);
CREATE INDEX model_events_model_at ON model_events (model, at_ms);

-- Low-rate resource figures for dashboards; model '' is the daemon itself.
CREATE TABLE samples (
    at_ms       INTEGER NOT NULL,
    model       TEXT NOT NULL,
    rss_bytes   INTEGER,
    cpu_seconds REAL,
    inflight    INTEGER,
    PRIMARY KEY (at_ms, model)
) WITHOUT ROWID;
