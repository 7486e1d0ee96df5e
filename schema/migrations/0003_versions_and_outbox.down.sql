DROP TRIGGER convstats_conversations_30_outbox ON conversations;
DROP FUNCTION convstats_conversations_outbox();
DROP FUNCTION convstats_conversation_event(conversations, text[]);
DROP TABLE convstats_outbox;
DROP FUNCTION convstats_union(text[], text[]);
DROP TRIGGER convstats_conversations_20_version ON conversations;
DROP FUNCTION convstats_conversations_version();
DROP FUNCTION convstats_changed_fields(conversations, conversations);
DROP FUNCTION convstats_rfc3339(timestamptz);
