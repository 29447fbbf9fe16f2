-- History: one interaction record per finished attempt, written in the
-- same transaction that records the attempt, as in SQLite. Words are
-- searched through a weighted tsvector (the weights stand for SQLite's
-- bm25 column weights: A name; B description and tags; C command, project
-- and dependencies; D parameters, errors, output, artifacts and logs) and
-- pieces of words through pg_trgm indexes.

-- pg_trgm is a trusted extension: the database owner may create it. When
-- it already exists (in any schema) this does nothing.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE interactions (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id      TEXT    NOT NULL,
    attempt      BIGINT  NOT NULL,
    name         TEXT    NOT NULL,
    project      TEXT,
    workflow_id  TEXT,
    kind         TEXT    NOT NULL,
    -- JSON array of strings.
    tags         JSONB   NOT NULL DEFAULT '[]',
    -- How the attempt ended: succeeded, failed, timed_out, cancelled, lost.
    outcome      TEXT    NOT NULL,
    -- The task's status once this attempt was recorded (retrying or terminal).
    task_status  TEXT    NOT NULL,
    exit_code    BIGINT,
    duration_ms  BIGINT  NOT NULL,
    started_at   BIGINT  NOT NULL,
    finished_at  BIGINT  NOT NULL,
    description  TEXT,
    -- The shell command, the argv joined by spaces, or the HTTP method and URL.
    command      TEXT,
    -- JSON, as submitted.
    parameters   TEXT,
    -- JSON array of the names of the tasks it depended on.
    dependencies JSONB   NOT NULL DEFAULT '[]',
    error        TEXT,
    -- JSON result output.
    output       TEXT,
    -- JSON array of recorded artifacts.
    artifacts    JSONB   NOT NULL DEFAULT '[]',
    stdout_tail  TEXT    NOT NULL DEFAULT '',
    stderr_tail  TEXT    NOT NULL DEFAULT '',
    words        TSVECTOR GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, translate(name, '-_.', '   ')), 'A')
        || setweight(to_tsvector('english'::regconfig, coalesce(description, '')), 'B')
        || setweight(jsonb_to_tsvector('english'::regconfig, tags, '["string"]'), 'B')
        || setweight(to_tsvector('english'::regconfig, coalesce(command, '')), 'C')
        || setweight(to_tsvector('english'::regconfig, coalesce(project, '')), 'C')
        || setweight(jsonb_to_tsvector('english'::regconfig, dependencies, '["string"]'), 'C')
        || setweight(to_tsvector('english'::regconfig,
               coalesce(parameters, '') || ' ' || coalesce(error, '') || ' ' || coalesce(output, '')
               || ' ' || jsonb_path_query_array(artifacts, '$[*].path')::text
               || ' ' || right(stdout_tail, 2000) || ' ' || right(stderr_tail, 2000)), 'D')
    ) STORED,
    UNIQUE (task_id, attempt)
);
CREATE INDEX interactions_finished ON interactions (finished_at);
CREATE INDEX interactions_name ON interactions (name, project);
CREATE INDEX interactions_words ON interactions USING gin (words);

-- Pieces of words: `ploy` finds `deploy-api`. The operator class is named
-- with the extension's schema, which need not be on the search path.
DO $$
DECLARE
    ext_schema TEXT;
BEGIN
    SELECT n.nspname INTO STRICT ext_schema
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_trgm';
    EXECUTE format('CREATE INDEX interactions_name_trgm ON interactions USING gin (lower(name) %I.gin_trgm_ops)', ext_schema);
    EXECUTE format('CREATE INDEX interactions_command_trgm ON interactions USING gin (lower(coalesce(command, %L)) %I.gin_trgm_ops)', '', ext_schema);
    EXECUTE format('CREATE INDEX interactions_tags_trgm ON interactions USING gin (lower(tags::text) %I.gin_trgm_ops)', ext_schema);
END
$$;

-- Embeddings of interaction records, per model (normalised little-endian f32).
CREATE TABLE interaction_vectors (
    interaction_id BIGINT  NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
    model          TEXT    NOT NULL,
    dim            BIGINT  NOT NULL,
    vector         BYTEA   NOT NULL,
    PRIMARY KEY (model, interaction_id)
);
CREATE INDEX interaction_vectors_id ON interaction_vectors (interaction_id);

-- Records not yet delivered to the Vectorizer. Every record enters it (the
-- writer inserts both together); delivery runs only when
-- `vectorizer.endpoint` is set, so configuring one later sends the history
-- that is still retained.
CREATE TABLE vectorizer_outbox (
    interaction_id BIGINT  PRIMARY KEY REFERENCES interactions (id) ON DELETE CASCADE,
    attempts       BIGINT  NOT NULL DEFAULT 0,
    next_at        BIGINT  NOT NULL DEFAULT 0,
    last_error     TEXT
);
CREATE INDEX vectorizer_outbox_due ON vectorizer_outbox (next_at);

-- Any of several word queries: search ORs the tsquery of each word, every
-- word passed as a bound parameter through plainto_tsquery.
CREATE AGGREGATE tsquery_any(tsquery) (SFUNC = tsquery_or, STYPE = tsquery);
