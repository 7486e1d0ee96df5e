-- Messages that arrived before their user. Another service fills users, so a
-- message may legitimately come first; it waits here, durably and with its original
-- record, so the consumer can commit past it without holding up other conversations.
CREATE TABLE convstats_parked_messages (
    message_id uuid PRIMARY KEY,
    conversation_id uuid NOT NULL,
    user_id uuid NOT NULL,
    source_topic text NOT NULL,
    source_partition integer NOT NULL,
    source_offset bigint NOT NULL,
    record_key bytea,
    record_value bytea NOT NULL,
    -- Tells a redelivery of the parked message from another message reusing its id.
    fingerprint bytea NOT NULL,
    -- [[name, base64 value], ...]: Kafka header values are bytes.
    record_headers jsonb NOT NULL DEFAULT '[]',
    parked_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX convstats_parked_messages_due
    ON convstats_parked_messages (next_attempt_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON convstats_parked_messages TO convstats_worker;
