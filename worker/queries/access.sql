-- Named queries of worker.access: conversations as seen by one user. Every query
-- runs after access_act_as in the same transaction, so row-level security limits it
-- to that user's rows whatever its WHERE clause says.
--
-- The list queries page by keyset on (updated_at DESC, id DESC), the order of the
-- list indexes: ($2, $3) is the key of the last row of the previous page, and the
-- first page passes a key above every row, so that first and deep pages share one
-- statement and one plan. The key must be plain parameters: under row-level
-- security only leakproof conditions may become index conditions, and an
-- expression such as coalesce($2, 'infinity') is not one, so in a generic plan the
-- keyset would turn into a filter that reads every row before the page.

-- name: access_act_as
-- set_config(..., true) is SET LOCAL: both end with the transaction, so a pooled
-- connection never carries one user's identity into the next borrower's work. One
-- statement instead of SET LOCAL ROLE plus set_config saves a round trip per call.
SELECT set_config('role', 'convstats_app', true),
       set_config('convstats.user_id', $1::text, true)

-- name: access_create
INSERT INTO conversations AS c (user_id, mode, title, title_source, context_data)
VALUES (
    $1::uuid, $2::text, $3::text,
    CASE WHEN $3::text IS NULL THEN 'auto' ELSE 'user' END,
    $4::jsonb
)
RETURNING c.id, c.user_id, c.title, c.title_source, c.mode, c.status,
          c.context_data, c.last_message_at, c.message_count, c.version,
          c.created_at, c.updated_at, c.archived_at

-- name: access_get
SELECT c.id, c.user_id, c.title, c.title_source, c.mode, c.status,
       c.context_data, c.last_message_at, c.message_count, c.version,
       c.created_at, c.updated_at, c.archived_at
FROM conversations AS c
WHERE c.id = $1::uuid

-- name: access_list_active
-- status = 'active' is spelled out, not a parameter: only then can a generic plan
-- use the partial index idx_conversations_user_active.
SELECT c.id, c.user_id, c.title, c.title_source, c.mode, c.status,
       c.context_data, c.last_message_at, c.message_count, c.version,
       c.created_at, c.updated_at, c.archived_at
FROM conversations AS c
WHERE c.user_id = $1::uuid
  AND c.status = 'active'
  AND (c.updated_at, c.id) < ($2::timestamptz, $3::uuid)
ORDER BY c.updated_at DESC, c.id DESC
LIMIT $4::integer

-- name: access_list_by_mode
-- idx_conversations_user_mode; the statuses are a filter on the rows it yields.
SELECT c.id, c.user_id, c.title, c.title_source, c.mode, c.status,
       c.context_data, c.last_message_at, c.message_count, c.version,
       c.created_at, c.updated_at, c.archived_at
FROM conversations AS c
WHERE c.user_id = $1::uuid
  AND c.mode = $5::text
  AND c.status = ANY ($6::text[])
  AND (c.updated_at, c.id) < ($2::timestamptz, $3::uuid)
ORDER BY c.updated_at DESC, c.id DESC
LIMIT $4::integer

-- name: access_list_all_modes
-- Statuses other than 'active' have no index of their own. One ordered scan of
-- idx_conversations_user_mode per mode, merged (Merge Append), reads at most a page
-- per mode instead of sorting all of the user's rows. The branches must list every
-- mode allowed by conversations_mode_check.
SELECT p.id, p.user_id, p.title, p.title_source, p.mode, p.status,
       p.context_data, p.last_message_at, p.message_count, p.version,
       p.created_at, p.updated_at, p.archived_at
FROM (
    (SELECT c.* FROM conversations AS c
     WHERE c.user_id = $1::uuid AND c.mode = 'analysis'
       AND c.status = ANY ($5::text[])
       AND (c.updated_at, c.id) < ($2::timestamptz, $3::uuid)
     ORDER BY c.updated_at DESC, c.id DESC
     LIMIT $4::integer)
    UNION ALL
    (SELECT c.* FROM conversations AS c
     WHERE c.user_id = $1::uuid AND c.mode = 'psychology'
       AND c.status = ANY ($5::text[])
       AND (c.updated_at, c.id) < ($2::timestamptz, $3::uuid)
     ORDER BY c.updated_at DESC, c.id DESC
     LIMIT $4::integer)
    UNION ALL
    (SELECT c.* FROM conversations AS c
     WHERE c.user_id = $1::uuid AND c.mode = 'training'
       AND c.status = ANY ($5::text[])
       AND (c.updated_at, c.id) < ($2::timestamptz, $3::uuid)
     ORDER BY c.updated_at DESC, c.id DESC
     LIMIT $4::integer)
    UNION ALL
    (SELECT c.* FROM conversations AS c
     WHERE c.user_id = $1::uuid AND c.mode = 'planning'
       AND c.status = ANY ($5::text[])
       AND (c.updated_at, c.id) < ($2::timestamptz, $3::uuid)
     ORDER BY c.updated_at DESC, c.id DESC
     LIMIT $4::integer)
) AS p
ORDER BY p.updated_at DESC, p.id DESC
LIMIT $4::integer

-- name: access_rename
-- title_source is set explicitly: the guard trigger would infer 'user' from a plain
-- title change too, but saying it keeps the rule visible where the rename happens.
UPDATE conversations AS c
SET title = $2::text, title_source = 'user'
WHERE c.id = $1::uuid AND c.status <> 'deleted'
RETURNING c.id, c.user_id, c.title, c.title_source, c.mode, c.status,
          c.context_data, c.last_message_at, c.message_count, c.version,
          c.created_at, c.updated_at, c.archived_at

-- name: access_switch_mode
-- Switching to the mode it already has is no switch: no row, no new version.
UPDATE conversations AS c
SET mode = $2::text,
    context_data = c.context_data
        || jsonb_build_object('last_mode_switch', convstats_rfc3339(now()))
WHERE c.id = $1::uuid AND c.status <> 'deleted' AND c.mode <> $2::text
RETURNING c.id, c.user_id, c.title, c.title_source, c.mode, c.status,
          c.context_data, c.last_message_at, c.message_count, c.version,
          c.created_at, c.updated_at, c.archived_at

-- name: access_set_status
-- Leaving 'deleted' is refused by convstats_conversations_guard, which also keeps
-- archived_at in step with the status.
UPDATE conversations AS c
SET status = $2::text
WHERE c.id = $1::uuid
RETURNING c.id, c.user_id, c.title, c.title_source, c.mode, c.status,
          c.context_data, c.last_message_at, c.message_count, c.version,
          c.created_at, c.updated_at, c.archived_at
