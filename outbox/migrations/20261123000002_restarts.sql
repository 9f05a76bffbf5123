-- Poison detection: how many times a consumer started handling a redelivered message. A message that keeps
-- taking its worker down is counted here (committed before each attempt), not by the broker, which also counts
-- every unstarted message that was merely waiting in the crashed worker's prefetch.
CREATE TABLE restarts (
    consumer   TEXT        NOT NULL,
    message_id UUID        NOT NULL,
    restarts   INT         NOT NULL,
    last_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX restarts_last_at_idx ON restarts (last_at);
