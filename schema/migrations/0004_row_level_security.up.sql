-- Row-level security. Services reach conversations through two group roles:
--   convstats_app    acts for one user at a time, named per transaction by
--                    SET LOCAL convstats.user_id = '<uuid>', and sees only that
--                    user's conversations;
--   convstats_worker applies messages for every user and publishes the outbox.
-- Login roles are granted one of these. Roles belong to the whole cluster, so they are
-- created once and kept on rollback (other databases of the cluster may use them).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'convstats_app') THEN
        CREATE ROLE convstats_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'convstats_worker') THEN
        CREATE ROLE convstats_worker NOLOGIN;
    END IF;
END;
$$;

-- NULL (so no row matches) when the setting is missing or empty, rather than an error
-- that a pooled connection might hit before it sets the user.
CREATE FUNCTION convstats_current_user_id() RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('convstats.user_id', true), '')::uuid
$$;

ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;

CREATE POLICY convstats_app_own_conversations ON conversations
    FOR ALL TO convstats_app
    USING (user_id = convstats_current_user_id())
    WITH CHECK (user_id = convstats_current_user_id());

CREATE POLICY convstats_worker_all_conversations ON conversations
    FOR ALL TO convstats_worker
    USING (true)
    WITH CHECK (true);

GRANT SELECT, INSERT, UPDATE, DELETE ON conversations TO convstats_app;

-- The worker never deletes conversations and never writes users.
GRANT SELECT, INSERT, UPDATE ON conversations TO convstats_worker;
GRANT SELECT ON users TO convstats_worker;
GRANT SELECT, INSERT ON convstats_applied_messages TO convstats_worker;
GRANT SELECT, UPDATE, DELETE ON convstats_outbox TO convstats_worker;
