-- turbosched run history, schema version 5. Every instant is microseconds since the
-- Unix epoch, UTC. Run at every open (everything is IF NOT EXISTS), after the migrations
-- in mod.rs have brought an older database's tables up to this shape.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    id              INTEGER PRIMARY KEY,
    task            TEXT    NOT NULL,
    trigger         TEXT    NOT NULL,
    scheduled_for   INTEGER NOT NULL,   -- the nominal tick; the request time for manual runs
    queued_at       INTEGER NOT NULL,
    started_at      INTEGER,            -- first attempt's start
    finished_at     INTEGER,
    state           TEXT    NOT NULL,
    attempt         INTEGER NOT NULL DEFAULT 0,   -- attempts started so far
    max_attempts    INTEGER NOT NULL,
    next_attempt_at INTEGER,            -- set while retry_wait
    exit_code       INTEGER,
    error           TEXT,
    reason          TEXT,               -- why skipped, aborted, orphaned
    progress        REAL,
    phase           TEXT,
    checkpoint      TEXT,
    result          TEXT,
    owner           TEXT,               -- instance id running it
    pid             INTEGER,            -- child pid = its process group id
    heartbeat_at    INTEGER,
    abort_requested INTEGER NOT NULL DEFAULT 0,
    force           INTEGER NOT NULL DEFAULT 0,
    downstream      INTEGER NOT NULL DEFAULT 0,
    cascade         INTEGER,            -- root run of a --downstream cascade
    -- The last run_progress event of the current attempt (NULL before its first): what
    -- the next report is compared with, so progress is news only when it says something.
    progress_event_at    INTEGER,
    progress_event_pct   REAL,
    progress_event_phase TEXT,
    params          TEXT                -- the run's own params (a JSON object), if given
);
-- The claim: one scheduled, catch-up or backfill run per task and tick, whatever
-- restarts happen (a backfill never runs a tick again).
-- The partial indexes' conditions are ORs of equalities, never `IN (…)`: SQLite
-- evaluates a list of more than two constants through a temporary b-tree it builds and
-- drops each time, and these conditions are evaluated at every insert and every state
-- change of a run (v4 spent 9 such b-trees per run, ~15 % of the service's
-- instructions). A query uses one of these indexes only when its WHERE holds the same
-- condition, written the same way (`UNFINISHED` and `CLAIMED` in sqlite.rs).
CREATE UNIQUE INDEX IF NOT EXISTS runs_claim ON runs(task, scheduled_for)
    WHERE (trigger = 'schedule' OR trigger = 'catchup' OR trigger = 'backfill');
CREATE INDEX IF NOT EXISTS runs_state ON runs(state)
    WHERE (state = 'queued' OR state = 'running' OR state = 'retry_wait' OR state = 'orphaned');
CREATE INDEX IF NOT EXISTS runs_task ON runs(task, id);
-- One attempt per task at a time: a start looks for a running run of its task here.
CREATE INDEX IF NOT EXISTS runs_running_task ON runs(task) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS runs_cascade ON runs(cascade) WHERE cascade IS NOT NULL;

CREATE TABLE IF NOT EXISTS attempts (
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT,                   -- a run state name, or 'interrupted'
    exit_code   INTEGER,
    error       TEXT,
    owner       TEXT,
    pid         INTEGER,
    spawned_at  INTEGER,                -- when the child process was started
    PRIMARY KEY (run_id, attempt)
);

CREATE TABLE IF NOT EXISTS task_state (
    task         TEXT PRIMARY KEY,
    paused       INTEGER NOT NULL DEFAULT 0,
    last_fire_at INTEGER,
    next_fire_at INTEGER,               -- the earliest tick not yet claimed
    schedule     TEXT                   -- the expression next_fire_at was computed from
);

CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: a stream position
    at      INTEGER NOT NULL,
    kind    TEXT    NOT NULL,
    task    TEXT,
    run_id  INTEGER,
    attempt INTEGER,
    message TEXT    NOT NULL DEFAULT '',
    instance TEXT                                -- the instance that wrote it, if one did
);
-- /health: recent events of a few kinds (count_events); also the benchmark's first start.
CREATE INDEX IF NOT EXISTS events_kind_at ON events(kind, at);
-- prune: events before the cutoff. (SSE reads by seq, the primary key.)
CREATE INDEX IF NOT EXISTS events_at ON events(at);

CREATE TABLE IF NOT EXISTS instances (
    id           TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    host         TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    stopped_at   INTEGER,
    serving      INTEGER NOT NULL DEFAULT 1,  -- 0: a foreground `turbosched run`
    api          TEXT,                        -- the HTTP API's address, if serving one
    config_hash  TEXT                         -- the hash of the config it serves
);

-- Alerts (`[[alerts]]`): per alert, the last event seq turned into deliveries (or
-- found not to match). Deliveries are derived from the event log, so none is lost
-- across a restart: the cursor moves in the transaction that inserts them.
CREATE TABLE IF NOT EXISTS alerts (
    name   TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL
);
-- One delivery of one event to one alert's endpoint: the durable outbox.
CREATE TABLE IF NOT EXISTS alert_deliveries (
    alert           TEXT    NOT NULL,
    event_seq       INTEGER NOT NULL,
    kind            TEXT    NOT NULL,
    task            TEXT,
    run_id          INTEGER,
    created_at      INTEGER NOT NULL,
    payload         TEXT    NOT NULL,     -- the JSON body, fixed when derived
    state           TEXT    NOT NULL,     -- pending, delivered, failed (gave up)
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    claimed_by      TEXT,                 -- the instance sending it now
    claimed_until   INTEGER,              -- its claim lapses then
    last_status     INTEGER,              -- the last HTTP status, if one came back
    last_error      TEXT,
    finished_at     INTEGER,
    PRIMARY KEY (alert, event_seq)
);
CREATE INDEX IF NOT EXISTS alert_deliveries_pending ON alert_deliveries(next_attempt_at)
    WHERE state = 'pending';
