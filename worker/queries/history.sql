-- Named queries of the history tools: backfill, rebuild. Each query starts with
-- "-- name: NAME" and runs until the next one.

-- name: backfill_staging
-- Per session and emptied at every commit, so each chunk starts from nothing and an
-- abandoned chunk leaves no rows behind. Context stays text until the merge: the
-- COPY then needs no jsonb codec.
CREATE TEMP TABLE IF NOT EXISTS convstats_backfill_staging (
    line bigint NOT NULL,
    message_id uuid NOT NULL,
    conversation_id uuid NOT NULL,
    user_id uuid NOT NULL,
    type text NOT NULL,
    created_at timestamptz NOT NULL,
    fingerprint bytea NOT NULL,
    title_candidate text,
    mode text,
    context_data text
) ON COMMIT DELETE ROWS

-- name: backfill_check_context
-- Fails the chunk (and so, split by split, isolates the line) when a context cannot
-- be stored as jsonb, e.g. a \u0000 inside a string, whether or not it creates a
-- conversation: the live path refuses such a message the same way.
SELECT count(*)
FROM convstats_backfill_staging
WHERE context_data IS NOT NULL AND context_data::jsonb IS NULL

-- name: backfill_lock
-- Conversations in id order before anything else, as convstats_apply_messages_v1
-- does: a chunk and a live batch sharing conversations queue instead of deadlocking.
SELECT 1
FROM conversations AS c
WHERE c.id IN (SELECT s.conversation_id FROM convstats_backfill_staging AS s)
ORDER BY c.id
FOR UPDATE OF c

-- name: backfill_create_conversations
-- A conversation first seen here is created from its earliest message whose user
-- exists; a message the ledger already holds creates nothing (it can only be a
-- duplicate or a conflict). The same rule as convstats_apply_messages_v1. Rows of
-- known conversations are dropped first, so the ledger is probed only for the rest.
INSERT INTO conversations (id, user_id, mode, context_data, created_at)
SELECT DISTINCT ON (s.conversation_id)
       s.conversation_id, s.user_id, coalesce(s.mode, 'analysis'),
       coalesce(s.context_data::jsonb, '{}'), s.created_at
FROM convstats_backfill_staging AS s
WHERE NOT EXISTS (SELECT 1 FROM conversations AS c WHERE c.id = s.conversation_id)
  AND EXISTS (SELECT 1 FROM users AS u WHERE u.id = s.user_id)
  -- OFFSET 0 keeps this a probe of the primary key per remaining row: flattened
  -- into an anti-join, the planner hashes the whole ledger for every chunk.
  AND NOT EXISTS (
      SELECT 1 FROM convstats_applied_messages AS l
      WHERE l.message_id = s.message_id
      OFFSET 0
  )
ORDER BY s.conversation_id, s.created_at, s.message_id
ON CONFLICT (id) DO NOTHING

-- name: backfill_merge
-- One INSERT for the whole chunk, so the ledger's statement trigger updates each
-- touched conversation once; says how many rows and conversations it applied.
WITH inserted AS (
    INSERT INTO convstats_applied_messages AS l
        (message_id, conversation_id, user_id, type, created_at, fingerprint,
         title_candidate)
    SELECT s.message_id, s.conversation_id, s.user_id, s.type, s.created_at,
           s.fingerprint, s.title_candidate
    FROM convstats_backfill_staging AS s
    JOIN conversations AS c
      ON c.id = s.conversation_id
     AND c.user_id = s.user_id
     AND c.status <> 'deleted'
    ORDER BY s.message_id
    ON CONFLICT ON CONSTRAINT convstats_applied_messages_pkey DO NOTHING
    RETURNING l.message_id, l.conversation_id
)
SELECT count(*)::integer AS applied,
       count(DISTINCT conversation_id)::integer AS conversations
FROM inserted

-- name: backfill_refused
-- The staged lines the ledger does not hold as they are, and why, in line order.
-- A separate statement from the INSERT so that its snapshot includes rows another
-- transaction committed while the INSERT waited on them: those are duplicates.
SELECT s.line,
       CASE
           WHEN l.message_id IS NOT NULL THEN 'conflict'
           WHEN c.id IS NULL THEN 'unknown_user'
           WHEN c.user_id <> s.user_id THEN 'foreign_user'
           ELSE 'deleted'
       END AS outcome
FROM convstats_backfill_staging AS s
LEFT JOIN convstats_applied_messages AS l ON l.message_id = s.message_id
LEFT JOIN conversations AS c ON c.id = s.conversation_id
WHERE l.message_id IS NULL
   OR l.conversation_id <> s.conversation_id
   OR l.fingerprint <> s.fingerprint
ORDER BY s.line

-- name: rebuild_count_all
SELECT count(*) FROM conversations WHERE id > $1

-- name: rebuild_count_user
SELECT count(*) FROM conversations WHERE user_id = $1 AND id > $2

-- name: rebuild_lock_all
-- The next batch by keyset, locked in id order like every other writer of stats, so
-- the ledger cannot gain rows for these conversations until the batch commits.
SELECT id FROM conversations WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE

-- name: rebuild_lock_user
SELECT id
FROM conversations
WHERE user_id = $1 AND id > $2
ORDER BY id
LIMIT $3
FOR UPDATE

-- name: rebuild_lock_conversation
SELECT id FROM conversations WHERE id = $1 FOR UPDATE

-- name: rebuild_apply
-- Recomputes the stats of locked conversations from the ledger and rewrites only
-- the rows that differ, so versions move and outbox rows appear for those alone. A
-- title a person set is kept; created_at only ever moves back to the first message.
-- Run with convstats.auto_title = 'on': the titles written here are automatic. The
-- LATERAL keeps this to one index range per conversation of the batch, however
-- large the ledger.
WITH truth AS (
    SELECT b.id, agg.message_count, agg.last_message_at, agg.first_message_at
    FROM unnest($1::uuid[]) AS b (id)
    CROSS JOIN LATERAL (
        SELECT count(*)::integer AS message_count,
               max(l.created_at) AS last_message_at,
               min(l.created_at) AS first_message_at
        FROM convstats_applied_messages AS l
        WHERE l.conversation_id = b.id
    ) AS agg
)
UPDATE conversations AS c
SET message_count = t.message_count,
    last_message_at = t.last_message_at,
    created_at = least(c.created_at, t.first_message_at),
    title = CASE WHEN c.title_source = 'auto' THEN convstats_auto_title(c.id)
                 ELSE c.title END
FROM truth AS t
WHERE c.id = t.id
  AND (c.message_count, c.last_message_at, c.created_at, c.title)
      IS DISTINCT FROM (
          t.message_count,
          t.last_message_at,
          least(c.created_at, t.first_message_at),
          CASE WHEN c.title_source = 'auto' THEN convstats_auto_title(c.id)
               ELSE c.title END
      )
RETURNING c.id

-- name: replay_outbox_mark
SELECT coalesce(max(id), 0) FROM convstats_outbox

-- name: replay_conversations_changed
-- Conversations with an outbox row since the mark: what the replay changed, plus
-- whatever other writers changed meanwhile.
SELECT count(DISTINCT conversation_id)::integer FROM convstats_outbox WHERE id > $1
