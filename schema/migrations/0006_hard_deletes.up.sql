-- Hard deletes. A DELETE of a conversation (or of its user, which cascades) is
-- published as status 'deleted' with the next version. If its messages are
-- redelivered later and it comes back, its versions continue from there: a
-- subscriber holding the deleted version would otherwise drop the new ones as old,
-- and their event ids would repeat those of earlier, different changes.
CREATE TABLE convstats_deleted_conversations (
    id uuid PRIMARY KEY,
    version bigint NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION convstats_conversations_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_gone conversations := OLD;
BEGIN
    v_gone.version := OLD.version + 1;
    v_gone.status := 'deleted';
    v_gone.updated_at := now();
    PERFORM convstats_outbox_write(v_gone, ARRAY['status']);

    INSERT INTO convstats_deleted_conversations (id, version)
    VALUES (OLD.id, v_gone.version)
    ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, deleted_at = now();
    RETURN NULL;
END;
$$;

CREATE TRIGGER convstats_conversations_40_deleted
    AFTER DELETE ON conversations
    FOR EACH ROW EXECUTE FUNCTION convstats_conversations_deleted();

CREATE FUNCTION convstats_conversations_resume_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_last bigint;
BEGIN
    DELETE FROM convstats_deleted_conversations WHERE id = NEW.id
    RETURNING version INTO v_last;
    IF v_last IS NOT NULL THEN
        NEW.version := v_last + 1;
    END IF;
    RETURN NEW;
END;
$$;

-- Named to fire before the guard: only the version changes here.
CREATE TRIGGER convstats_conversations_05_resume_version
    BEFORE INSERT ON conversations
    FOR EACH ROW EXECUTE FUNCTION convstats_conversations_resume_version();
