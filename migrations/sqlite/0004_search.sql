-- History: one interaction record per finished attempt, written in the
-- same transaction that records the attempt, with the full-text indexes
-- search ranks over, stored embeddings and the Vectorizer outbox.

CREATE TABLE interactions (
    id           INTEGER PRIMARY KEY,
    task_id      TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    name         TEXT    NOT NULL,
    project      TEXT,
    workflow_id  TEXT,
    kind         TEXT    NOT NULL,
    -- JSON array of strings.
    tags         TEXT    NOT NULL DEFAULT '[]',
    -- How the attempt ended: succeeded, failed, timed_out, cancelled, lost.
    outcome      TEXT    NOT NULL,
    -- The task's status once this attempt was recorded (retrying or terminal).
    task_status  TEXT    NOT NULL,
    exit_code    INTEGER,
    duration_ms  INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    description  TEXT,
    -- The shell command, the argv joined by spaces, or the HTTP method and URL.
    command      TEXT,
    -- JSON, as submitted.
    parameters   TEXT,
    -- JSON array of the names of the tasks it depended on.
    dependencies TEXT    NOT NULL DEFAULT '[]',
    error        TEXT,
    -- JSON result output.
    output       TEXT,
    -- JSON array of recorded artifacts.
    artifacts    TEXT    NOT NULL DEFAULT '[]',
    stdout_tail  TEXT    NOT NULL DEFAULT '',
    stderr_tail  TEXT    NOT NULL DEFAULT '',
    UNIQUE (task_id, attempt)
);
CREATE INDEX interactions_finished ON interactions (finished_at);
CREATE INDEX interactions_name ON interactions (name, project);

-- Words: porter-stemmed, weighted per column at query time with bm25().
CREATE VIRTUAL TABLE interactions_fts USING fts5(
    name, description, command, tags, project, dependencies, parameters, results,
    tokenize = 'porter unicode61 remove_diacritics 2'
);

-- Pieces of words: `ploy` finds `deploy-api`.
CREATE VIRTUAL TABLE interactions_trigram USING fts5(
    name, command, tags,
    tokenize = 'trigram'
);

CREATE TRIGGER interactions_ai AFTER INSERT ON interactions BEGIN
    INSERT INTO interactions_fts (rowid, name, description, command, tags, project,
                                  dependencies, parameters, results)
    VALUES (
        new.id,
        replace(replace(replace(new.name, '-', ' '), '_', ' '), '.', ' '),
        coalesce(new.description, ''),
        coalesce(new.command, ''),
        (SELECT coalesce(group_concat(value, ' '), '') FROM json_each(new.tags)),
        coalesce(new.project, ''),
        (SELECT coalesce(group_concat(value, ' '), '') FROM json_each(new.dependencies)),
        coalesce(new.parameters, ''),
        concat_ws(' ', new.error, new.output,
                  (SELECT group_concat(value ->> 'path', ' ') FROM json_each(new.artifacts)),
                  substr(new.stdout_tail, -2000), substr(new.stderr_tail, -2000))
    );
    INSERT INTO interactions_trigram (rowid, name, command, tags)
    VALUES (
        new.id,
        new.name,
        coalesce(new.command, ''),
        (SELECT coalesce(group_concat(value, ' '), '') FROM json_each(new.tags))
    );
    INSERT INTO vectorizer_outbox (interaction_id, attempts, next_at) VALUES (new.id, 0, 0);
END;

CREATE TRIGGER interactions_ad AFTER DELETE ON interactions BEGIN
    DELETE FROM interactions_fts WHERE rowid = old.id;
    DELETE FROM interactions_trigram WHERE rowid = old.id;
    DELETE FROM interaction_vectors WHERE interaction_id = old.id;
    DELETE FROM vectorizer_outbox WHERE interaction_id = old.id;
END;

-- Embeddings of interaction records, per model (normalised little-endian f32).
CREATE TABLE interaction_vectors (
    interaction_id INTEGER NOT NULL,
    model          TEXT    NOT NULL,
    dim            INTEGER NOT NULL,
    vector         BLOB    NOT NULL,
    PRIMARY KEY (model, interaction_id)
) WITHOUT ROWID;
CREATE INDEX interaction_vectors_id ON interaction_vectors (interaction_id);

-- Records not yet delivered to the Vectorizer. Every record enters it;
-- delivery runs only when `vectorizer.endpoint` is set, so configuring one
-- later sends the history that is still retained.
CREATE TABLE vectorizer_outbox (
    interaction_id INTEGER PRIMARY KEY,
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_at        INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT
);
CREATE INDEX vectorizer_outbox_due ON vectorizer_outbox (next_at);
