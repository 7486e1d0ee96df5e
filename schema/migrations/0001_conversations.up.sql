-- Users and conversations: the tables the chat service reads, with the row rules that
-- must hold whoever writes them (updated_at, archiving, title ownership).

-- The full users table belongs to the identity service. Where it already exists we
-- only rely on its uuid primary key, so this must not fail on an existing table; the
-- comment marks a table we created, so that rolling back never drops theirs.
DO $$
BEGIN
    IF to_regclass('users') IS NULL THEN
        CREATE TABLE users (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        COMMENT ON TABLE users IS 'convstats: minimal users table';
    END IF;
END;
$$;

CREATE TABLE conversations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title varchar(255),
    title_source varchar(10) NOT NULL DEFAULT 'auto'
        CONSTRAINT conversations_title_source_check
        CHECK (title_source IN ('auto', 'user')),
    mode varchar(20) NOT NULL DEFAULT 'analysis'
        CONSTRAINT conversations_mode_check
        CHECK (mode IN ('analysis', 'psychology', 'training', 'planning')),
    status varchar(20) NOT NULL DEFAULT 'active'
        CONSTRAINT conversations_status_check
        CHECK (status IN ('active', 'archived', 'deleted')),
    context_data jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT conversations_context_data_object_check
        CHECK (jsonb_typeof(context_data) = 'object'),
    last_message_at timestamptz,
    message_count integer NOT NULL DEFAULT 0
        CONSTRAINT conversations_message_count_check CHECK (message_count >= 0),
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    archived_at timestamptz NULL
);

-- The list indexes end with id so that keyset paging has a total order: two rows
-- with the same updated_at would otherwise be skipped or repeated across pages.
CREATE INDEX idx_conversations_user_id ON conversations (user_id);
CREATE INDEX idx_conversations_user_active
    ON conversations (user_id, updated_at DESC, id DESC) WHERE status = 'active';
CREATE INDEX idx_conversations_user_mode
    ON conversations (user_id, mode, updated_at DESC, id DESC);
CREATE INDEX idx_conversations_last_message ON conversations (last_message_at DESC);
CREATE INDEX idx_conversations_created_at ON conversations (created_at DESC);
CREATE INDEX idx_conversations_context ON conversations USING gin (context_data);

-- An UPDATE that changes nothing (a replay) must not look like activity, so the
-- timestamp moves only when the row really differs. The function carries our prefix
-- because the identity service's users table commonly comes with its own
-- update_updated_at_column(): replacing or dropping that one would change their table.
CREATE FUNCTION convstats_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;

-- Archiving keeps archived_at in step with status for every writer; 'deleted' is a
-- soft delete that nothing may undo, because subscribers have already dropped it.
CREATE FUNCTION convstats_conversations_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = 'deleted' AND NEW.status <> 'deleted' THEN
        RAISE EXCEPTION 'conversation % is deleted; deletion is final', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;

    IF NEW.status = 'archived' AND (TG_OP = 'INSERT' OR OLD.status <> 'archived') THEN
        NEW.archived_at := coalesce(NEW.archived_at, now());
    ELSIF NEW.status = 'active' THEN
        NEW.archived_at := NULL;
    END IF;

    -- A conversation created with a title was named by a person: the worker only
    -- ever creates conversations without one. A bulk tool that writes automatic
    -- titles says so with SET LOCAL convstats.auto_title = 'on'.
    IF TG_OP = 'INSERT' AND NEW.title IS NOT NULL AND NEW.title_source = 'auto'
            AND current_setting('convstats.auto_title', true) IS DISTINCT FROM 'on' THEN
        NEW.title_source := 'user';
    END IF;

    -- A plain UPDATE of the title by another service is a person naming the
    -- conversation. The stats trigger writes titles one trigger level deeper, and
    -- clearing the title hands it back to the automatic rule.
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() = 1
            AND NEW.title IS DISTINCT FROM OLD.title
            AND NEW.title_source = OLD.title_source
            AND current_setting('convstats.auto_title', true) IS DISTINCT FROM 'on' THEN
        NEW.title_source := CASE WHEN NEW.title IS NULL THEN 'auto' ELSE 'user' END;
    END IF;
    RETURN NEW;
END;
$$;

-- Triggers on one event fire in name order: the guard settles status, archived_at
-- and title_source before the version trigger looks at what changed.
CREATE TRIGGER convstats_conversations_10_guard
    BEFORE INSERT OR UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION convstats_conversations_guard();

CREATE TRIGGER update_conversations_updated_at
    BEFORE UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION convstats_touch_updated_at();

DO $$
BEGIN
    IF obj_description('users'::regclass, 'pg_class')
            = 'convstats: minimal users table' THEN
        CREATE TRIGGER update_users_updated_at
            BEFORE UPDATE ON users
            FOR EACH ROW EXECUTE FUNCTION convstats_touch_updated_at();
    END IF;
END;
$$;
