-- Versions and the transactional outbox. Every effective change of a conversation,
-- by the worker or by any other writer, bumps its version and leaves an outbox row in
-- the same transaction, so a change is published if and only if it committed.

CREATE FUNCTION convstats_rfc3339(p_at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    -- Fixed to UTC so a published instant never depends on the session TimeZone.
    SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- The fields subscribers care about; updated_at and version follow from them.
CREATE FUNCTION convstats_changed_fields(p_old conversations, p_new conversations)
RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(f.name ORDER BY f.name), '{}')
    FROM (VALUES
        ('user_id', p_old.user_id IS DISTINCT FROM p_new.user_id),
        ('title', p_old.title IS DISTINCT FROM p_new.title),
        ('title_source', p_old.title_source IS DISTINCT FROM p_new.title_source),
        ('mode', p_old.mode IS DISTINCT FROM p_new.mode),
        ('status', p_old.status IS DISTINCT FROM p_new.status),
        ('context_data', p_old.context_data IS DISTINCT FROM p_new.context_data),
        ('last_message_at',
         p_old.last_message_at IS DISTINCT FROM p_new.last_message_at),
        ('message_count', p_old.message_count IS DISTINCT FROM p_new.message_count),
        ('created_at', p_old.created_at IS DISTINCT FROM p_new.created_at),
        ('archived_at', p_old.archived_at IS DISTINCT FROM p_new.archived_at)
    ) AS f (name, changed)
    WHERE f.changed
$$;

CREATE FUNCTION convstats_conversations_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(convstats_changed_fields(OLD, NEW)) > 0 THEN
        NEW.version := OLD.version + 1;
    ELSE
        -- Nobody may move the version by hand: it is what subscribers order by.
        NEW.version := OLD.version;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER convstats_conversations_20_version
    BEFORE UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION convstats_conversations_version();

CREATE TABLE convstats_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id uuid NOT NULL,
    -- Changes made by one transaction fold into one row, so a batch that creates a
    -- conversation and counts its messages publishes once.
    xact_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    version bigint NOT NULL,
    event_id uuid NOT NULL,
    changed_fields text[] NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    CONSTRAINT convstats_outbox_conversation_xact_key UNIQUE (conversation_id, xact_id)
);

-- The relay scans only what is left to publish; published rows age out.
CREATE INDEX convstats_outbox_unpublished
    ON convstats_outbox (id) WHERE published_at IS NULL;
CREATE INDEX convstats_outbox_published_at
    ON convstats_outbox (published_at) WHERE published_at IS NOT NULL;

CREATE FUNCTION convstats_union(p_a text[], p_b text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY(SELECT DISTINCT f FROM unnest(p_a || p_b) AS f ORDER BY f)
$$;

CREATE FUNCTION convstats_conversation_event(
    p_row conversations, p_changed text[]
) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        -- Derived from (conversation, version): a re-send of the same change carries
        -- the same id, whichever relay sends it.
        'event_id', md5(p_row.id::text || '/' || p_row.version::text)::uuid,
        'conversation_id', p_row.id,
        'user_id', p_row.user_id,
        'version', p_row.version,
        'title', p_row.title,
        'title_source', p_row.title_source,
        'mode', p_row.mode,
        'status', p_row.status,
        'context_data', p_row.context_data,
        'message_count', p_row.message_count,
        'last_message_at', convstats_rfc3339(p_row.last_message_at),
        'created_at', convstats_rfc3339(p_row.created_at),
        'updated_at', convstats_rfc3339(p_row.updated_at),
        'archived_at', convstats_rfc3339(p_row.archived_at),
        'changed_fields', to_jsonb(p_changed)
    )
$$;

-- Writes the outbox row of a change; changes of one conversation in one transaction
-- fold into one row carrying the newest state and every field any of them touched.
CREATE FUNCTION convstats_outbox_write(p_row conversations, p_changed text[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_event jsonb := convstats_conversation_event(p_row, p_changed);
BEGIN
    INSERT INTO convstats_outbox AS o
        (conversation_id, version, event_id, changed_fields, payload)
    VALUES (p_row.id, p_row.version, (v_event ->> 'event_id')::uuid, p_changed, v_event)
    ON CONFLICT ON CONSTRAINT convstats_outbox_conversation_xact_key DO UPDATE
    SET version = EXCLUDED.version,
        event_id = EXCLUDED.event_id,
        changed_fields = convstats_union(o.changed_fields, EXCLUDED.changed_fields),
        payload = jsonb_set(
            EXCLUDED.payload, '{changed_fields}',
            to_jsonb(convstats_union(o.changed_fields, EXCLUDED.changed_fields))
        );

    -- Identical notifications within a transaction are folded into one by
    -- PostgreSQL, so this costs one wake-up per commit, not one per row.
    PERFORM pg_notify('convstats_outbox', '');
END;
$$;

-- SECURITY DEFINER: the application role changes conversations but must not be able
-- to write (or forge) outbox rows itself.
CREATE FUNCTION convstats_conversations_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM convstats_outbox_write(NEW, convstats_changed_fields(NULL, NEW));
    ELSIF NEW.version <> OLD.version THEN
        PERFORM convstats_outbox_write(NEW, convstats_changed_fields(OLD, NEW));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER convstats_conversations_30_outbox
    AFTER INSERT OR UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION convstats_conversations_outbox();
