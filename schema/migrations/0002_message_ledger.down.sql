DROP TRIGGER convstats_conversations_15_auto_title ON conversations;
DROP FUNCTION convstats_conversations_auto_title();
DROP FUNCTION convstats_apply_messages_v1(
    uuid[], uuid[], uuid[], text[], timestamptz[], bytea[], text[], text[], jsonb[]
);
DROP TABLE convstats_applied_messages;
DROP FUNCTION convstats_applied_messages_stats();
DROP FUNCTION convstats_auto_title(uuid);
