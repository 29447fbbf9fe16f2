-- The search indexes keep no copy of the text they index. FTS5 stores
-- every indexed document in a content table of its own unless told not
-- to; both tables of 0004 did, so each record's text was written three
-- times (the record and two copies), in every commit that recorded an
-- attempt. Searches read only the index (`MATCH`, `bm25`, `rowid`); the
-- text is in `interactions`. Contentless tables with `contentless_delete`
-- (SQLite 3.43) still delete by rowid, as the delete trigger does.
--
-- Existing records are indexed again from `interactions`, with the same
-- expressions as the insert trigger (`interactions_ai`). The triggers of
-- 0004 name the tables and stay as they are: they write to the new
-- tables from now on.
DROP TABLE interactions_fts;
DROP TABLE interactions_trigram;

CREATE VIRTUAL TABLE interactions_fts USING fts5(
    name, description, command, tags, project, dependencies, parameters, results,
    tokenize = 'porter unicode61 remove_diacritics 2',
    content = '', contentless_delete = 1
);

CREATE VIRTUAL TABLE interactions_trigram USING fts5(
    name, command, tags,
    tokenize = 'trigram',
    content = '', contentless_delete = 1
);

INSERT INTO interactions_fts (rowid, name, description, command, tags, project,
                              dependencies, parameters, results)
SELECT
    i.id,
    replace(replace(replace(i.name, '-', ' '), '_', ' '), '.', ' '),
    coalesce(i.description, ''),
    coalesce(i.command, ''),
    (SELECT coalesce(group_concat(value, ' '), '') FROM json_each(i.tags)),
    coalesce(i.project, ''),
    (SELECT coalesce(group_concat(value, ' '), '') FROM json_each(i.dependencies)),
    coalesce(i.parameters, ''),
    concat_ws(' ', i.error, i.output,
              (SELECT group_concat(value ->> 'path', ' ') FROM json_each(i.artifacts)),
              substr(i.stdout_tail, -2000), substr(i.stderr_tail, -2000))
FROM interactions i ORDER BY i.id;

INSERT INTO interactions_trigram (rowid, name, command, tags)
SELECT
    i.id,
    i.name,
    coalesce(i.command, ''),
    (SELECT coalesce(group_concat(value, ' '), '') FROM json_each(i.tags))
FROM interactions i ORDER BY i.id;
