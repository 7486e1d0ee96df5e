DROP TABLE conversations;
DROP FUNCTION convstats_conversations_guard();

-- Drop users only when this project created it: otherwise it holds another service's
-- data. Our trigger on it goes with the table; theirs, on their table, stays.
DO $$
BEGIN
    IF obj_description('users'::regclass, 'pg_class')
            = 'convstats: minimal users table' THEN
        DROP TABLE users;
    END IF;
END;
$$;

DROP FUNCTION convstats_touch_updated_at();
