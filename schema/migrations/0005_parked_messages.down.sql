DROP TABLE convstats_parked_messages;
