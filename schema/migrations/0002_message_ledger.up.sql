-- The ledger of applied messages and the stats rules. The stream is at-least-once, so
-- a message counts only the first time its message_id lands in the ledger; every
-- statistic is a function of the set of ledger rows, never of arrival order.

CREATE TABLE convstats_applied_messages (
    message_id uuid PRIMARY KEY,
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id uuid NOT NULL,
    type varchar(10) NOT NULL
        CONSTRAINT convstats_applied_messages_type_check
        CHECK (type IN ('user', 'assistant', 'system')),
    created_at timestamptz NOT NULL,
    -- sha256 over the message's identity fields and content: a redelivery matches
    -- it, a different message reusing the id does not. The content itself stays
    -- with the messages service.
    fingerprint bytea NOT NULL,
    -- The auto title this message would give, already normalised and cut; NULL for
    -- messages that can never title the conversation.
    title_candidate varchar(255),
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX convstats_applied_messages_conversation
    ON convstats_applied_messages (conversation_id, created_at, message_id);

-- The auto title is the earliest candidate, so this index answers it with one probe.
CREATE INDEX convstats_applied_messages_title
    ON convstats_applied_messages (conversation_id, created_at, message_id)
    INCLUDE (title_candidate)
    WHERE title_candidate IS NOT NULL;

CREATE FUNCTION convstats_auto_title(p_conversation_id uuid) RETURNS varchar
LANGUAGE sql STABLE AS $$
    SELECT title_candidate
    FROM convstats_applied_messages
    WHERE conversation_id = p_conversation_id AND title_candidate IS NOT NULL
    ORDER BY created_at, message_id
    LIMIT 1
$$;

-- One statement-level pass per INSERT: a batch of a thousand messages costs one
-- UPDATE per touched conversation, not two per message. Rows skipped by ON CONFLICT
-- DO NOTHING never reach the transition table, which is what makes redelivery free.
CREATE FUNCTION convstats_applied_messages_stats() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH added AS (
        SELECT conversation_id,
               count(*) AS n,
               min(created_at) AS first_at,
               max(created_at) AS last_at,
               bool_or(title_candidate IS NOT NULL) AS has_candidate
        FROM new_messages
        GROUP BY conversation_id
    )
    UPDATE conversations AS c
    SET message_count = c.message_count + a.n,
        last_message_at = greatest(c.last_message_at, a.last_at),
        created_at = least(c.created_at, a.first_at),
        title = CASE
            WHEN a.has_candidate AND c.title_source = 'auto'
                THEN convstats_auto_title(c.id)
            ELSE c.title
        END
    FROM added AS a
    WHERE c.id = a.conversation_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER convstats_applied_messages_stats
    AFTER INSERT ON convstats_applied_messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION convstats_applied_messages_stats();

-- When a plain UPDATE leaves the title to the automatic rule (a person clears their
-- title, or hands it back by setting title_source), the title is recomputed at once
-- from the ledger: waiting for the next message would leave a conversation without
-- the title its messages give it, possibly for ever. The stats trigger, one level
-- deeper, computes the title itself. SECURITY DEFINER because the application role
-- may not read the ledger.
CREATE FUNCTION convstats_conversations_auto_title() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF pg_trigger_depth() = 1
            AND NEW.title_source = 'auto'
            AND (OLD.title_source <> 'auto' OR NEW.title IS DISTINCT FROM OLD.title)
            AND current_setting('convstats.auto_title', true) IS DISTINCT FROM 'on' THEN
        NEW.title := convstats_auto_title(NEW.id);
    END IF;
    RETURN NEW;
END;
$$;

-- Between the guard (10), which settles title_source, and the version trigger (20),
-- which must see the final title.
CREATE TRIGGER convstats_conversations_15_auto_title
    BEFORE UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION convstats_conversations_auto_title();

-- Applies a batch of distinct messages in one call and says what became of each:
-- applied, duplicate, conflict (the id is taken by another message), unknown_user,
-- foreign_user (the conversation is someone else's) or deleted.
CREATE FUNCTION convstats_apply_messages_v1(
    p_message_ids uuid[],
    p_conversation_ids uuid[],
    p_user_ids uuid[],
    p_types text[],
    p_created_ats timestamptz[],
    p_fingerprints bytea[],
    p_title_candidates text[],
    p_modes text[],
    p_contexts jsonb[]
) RETURNS TABLE (message_id uuid, outcome text)
LANGUAGE plpgsql AS $$
DECLARE
    v_applied uuid[];
BEGIN
    -- Lock the conversations in id order before anything else: two batches sharing
    -- conversations then queue instead of deadlocking.
    PERFORM 1 FROM conversations AS c
    WHERE c.id = ANY (p_conversation_ids)
    ORDER BY c.id
    FOR UPDATE;

    -- A conversation first seen in this batch is created from its earliest message.
    -- A message whose id the ledger already holds creates nothing: it can only be a
    -- duplicate or a conflict, and neither may change anything.
    INSERT INTO conversations (id, user_id, mode, context_data, created_at)
    SELECT DISTINCT ON (m.conversation_id)
           m.conversation_id, m.user_id, coalesce(m.mode, 'analysis'),
           coalesce(m.context, '{}'), m.created_at
    FROM unnest(p_conversation_ids, p_user_ids, p_created_ats, p_message_ids,
                p_modes, p_contexts)
         AS m (conversation_id, user_id, created_at, message_id, mode, context)
    WHERE EXISTS (SELECT 1 FROM users AS u WHERE u.id = m.user_id)
      AND NOT EXISTS (
          SELECT 1 FROM convstats_applied_messages AS l
          WHERE l.message_id = m.message_id
      )
    ORDER BY m.conversation_id, m.created_at, m.message_id
    ON CONFLICT (id) DO NOTHING;

    WITH inserted AS (
        INSERT INTO convstats_applied_messages AS l
            (message_id, conversation_id, user_id, type, created_at, fingerprint,
             title_candidate)
        SELECT m.message_id, m.conversation_id, m.user_id, m.type, m.created_at,
               m.fingerprint, m.title_candidate
        FROM unnest(p_message_ids, p_conversation_ids, p_user_ids, p_types,
                    p_created_ats, p_fingerprints, p_title_candidates)
             AS m (message_id, conversation_id, user_id, type, created_at,
                   fingerprint, title_candidate)
        JOIN conversations AS c
          ON c.id = m.conversation_id
         AND c.user_id = m.user_id
         AND c.status <> 'deleted'
        ORDER BY m.message_id
        ON CONFLICT ON CONSTRAINT convstats_applied_messages_pkey DO NOTHING
        RETURNING l.message_id
    )
    SELECT coalesce(array_agg(i.message_id), '{}') INTO v_applied FROM inserted AS i;

    RETURN QUERY
    SELECT m.message_id,
           CASE
               WHEN a.message_id IS NOT NULL THEN 'applied'
               WHEN l.message_id IS NOT NULL
                    AND l.conversation_id = m.conversation_id
                    AND l.fingerprint = m.fingerprint THEN 'duplicate'
               WHEN l.message_id IS NOT NULL THEN 'conflict'
               WHEN c.id IS NULL THEN 'unknown_user'
               WHEN c.user_id <> m.user_id THEN 'foreign_user'
               ELSE 'deleted'
           END
    FROM unnest(p_message_ids, p_conversation_ids, p_user_ids, p_fingerprints)
         AS m (message_id, conversation_id, user_id, fingerprint)
    LEFT JOIN unnest(v_applied) AS a (message_id) ON a.message_id = m.message_id
    LEFT JOIN convstats_applied_messages AS l ON l.message_id = m.message_id
    LEFT JOIN conversations AS c ON c.id = m.conversation_id;
END;
$$;
