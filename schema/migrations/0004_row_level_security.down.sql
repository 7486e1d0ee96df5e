REVOKE SELECT, UPDATE, DELETE ON convstats_outbox FROM convstats_worker;
REVOKE SELECT, INSERT ON convstats_applied_messages FROM convstats_worker;
REVOKE SELECT ON users FROM convstats_worker;
REVOKE SELECT, INSERT, UPDATE ON conversations FROM convstats_worker;
REVOKE SELECT, INSERT, UPDATE, DELETE ON conversations FROM convstats_app;
DROP POLICY convstats_worker_all_conversations ON conversations;
DROP POLICY convstats_app_own_conversations ON conversations;
ALTER TABLE conversations DISABLE ROW LEVEL SECURITY;
DROP FUNCTION convstats_current_user_id();
