-- Transactional outbox: events a handler emits, written in the handler's own transaction.
CREATE TABLE outbox (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       UUID        NOT NULL UNIQUE,
    message_type     TEXT        NOT NULL,
    schema_version   INTEGER     NOT NULL,
    correlation_id   UUID        NOT NULL,
    causation_id     UUID,
    producer         TEXT        NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    traceparent      TEXT,
    body             BYTEA       NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A failed publish is retried no earlier than this.
    available_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    publish_attempts INTEGER     NOT NULL DEFAULT 0,
    last_error       TEXT,
    published_at     TIMESTAMPTZ
);
-- Claiming scans only unpublished rows, in id order, however many published rows are kept.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
-- Retention deletes published rows by age.
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX outbox_correlation_idx ON outbox (correlation_id);

-- Idempotent consumer: one row per message a consumer has processed, written in the handler's transaction.
CREATE TABLE inbox (
    consumer       TEXT        NOT NULL,
    message_id     UUID        NOT NULL,
    message_type   TEXT        NOT NULL,
    correlation_id UUID        NOT NULL,
    causation_id   UUID,
    received_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_received_at_idx ON inbox (received_at);
CREATE INDEX inbox_correlation_idx ON inbox (correlation_id);
