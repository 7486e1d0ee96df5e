DROP TABLE conversations;
DROP FUNCTION convstats_conversations_guard();
DROP TRIGGER IF EXISTS update_users_updated_at ON users;
DROP FUNCTION update_updated_at_column();

-- Drop users only when this project created it: otherwise it holds another service's
-- data.
DO $$
BEGIN
    IF obj_description('users'::regclass, 'pg_class')
            = 'convstats: minimal users table' THEN
        DROP TABLE users;
    END IF;
END;
$$;
