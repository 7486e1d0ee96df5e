-- Named queries of the worker. In every file of this folder a query starts with
-- "-- name: NAME" and runs until the next one; worker.db loads them into one dict.

-- name: apply_messages
SELECT message_id, outcome
FROM convstats_apply_messages_v1(
    $1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[],
    $6::bytea[], $7::text[], $8::text[], $9::jsonb[]
)

-- name: fetch_unpublished
SELECT id, conversation_id, event_id, payload::text AS payload
FROM convstats_outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT $1

-- name: mark_published
UPDATE convstats_outbox SET published_at = now() WHERE id = ANY ($1::bigint[])

-- name: purge_published
DELETE FROM convstats_outbox
WHERE published_at < now() - make_interval(secs => $1)

-- name: outbox_unpublished
SELECT count(*) FROM convstats_outbox WHERE published_at IS NULL

-- name: pending_work
SELECT (SELECT count(*) FROM convstats_outbox WHERE published_at IS NULL)
     + (SELECT count(*) FROM convstats_parked_messages)

-- name: outbox_backlog
SELECT count(*) AS backlog,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_s
FROM convstats_outbox
WHERE published_at IS NULL

-- name: try_relay_lock
SELECT pg_try_advisory_lock(7301224716)

-- name: ensure_users
INSERT INTO users (id)
SELECT unnest($1::uuid[])
ON CONFLICT (id) DO NOTHING

-- name: drift
-- Conversations whose stored stats differ from what the ledger says they must be.
WITH truth AS (
    SELECT conversation_id,
           count(*)::integer AS message_count,
           max(created_at) AS last_message_at,
           min(created_at) AS first_message_at
    FROM convstats_applied_messages
    GROUP BY conversation_id
)
SELECT c.id AS conversation_id,
       c.message_count, coalesce(t.message_count, 0) AS expected_message_count,
       c.last_message_at, t.last_message_at AS expected_last_message_at,
       c.title,
       CASE WHEN c.title_source = 'auto' THEN convstats_auto_title(c.id)
            ELSE c.title END AS expected_title,
       c.created_at, t.first_message_at
FROM conversations AS c
LEFT JOIN truth AS t ON t.conversation_id = c.id
WHERE c.message_count IS DISTINCT FROM coalesce(t.message_count, 0)
   OR c.last_message_at IS DISTINCT FROM t.last_message_at
   OR c.created_at > t.first_message_at
   OR (c.title_source = 'auto' AND c.title IS DISTINCT FROM convstats_auto_title(c.id))
ORDER BY c.id
LIMIT $1

-- name: park
-- The fingerprint parked under this message_id: the new one, or the one that was
-- there first.
WITH parked AS (
    INSERT INTO convstats_parked_messages
        (message_id, conversation_id, user_id, source_topic, source_partition,
         source_offset, record_key, record_value, record_headers, fingerprint)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (message_id) DO NOTHING
    RETURNING fingerprint
)
SELECT fingerprint FROM parked
UNION ALL
SELECT fingerprint FROM convstats_parked_messages WHERE message_id = $1
LIMIT 1

-- name: due_parked
SELECT message_id, parked_at, attempts, source_topic, source_partition,
       source_offset, record_key, record_value, record_headers::text AS record_headers
FROM convstats_parked_messages
WHERE next_attempt_at <= now()
ORDER BY next_attempt_at
LIMIT $1

-- name: unpark
DELETE FROM convstats_parked_messages WHERE message_id = ANY ($1::uuid[])

-- name: postpone_parked
UPDATE convstats_parked_messages
SET attempts = attempts + 1,
    next_attempt_at = now() + make_interval(secs => least(30, 2 ^ attempts))
WHERE message_id = ANY ($1::uuid[])
