CREATE TABLE orders (
    order_id       UUID        PRIMARY KEY,
    correlation_id UUID        NOT NULL,
    customer_id    TEXT        NOT NULL,
    currency       TEXT        NOT NULL,
    total_cents    BIGINT      NOT NULL,
    lines          JSONB       NOT NULL,
    status         TEXT        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    cancel_reason  TEXT,
    placed_at      TIMESTAMPTZ NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at   TIMESTAMPTZ
);
CREATE INDEX orders_status_idx ON orders (status);
CREATE INDEX orders_correlation_idx ON orders (correlation_id);

-- Every status change of an order and the message that caused it.
CREATE TABLE order_history (
    id           BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id     UUID        NOT NULL REFERENCES orders (order_id),
    status       TEXT        NOT NULL,
    detail       TEXT,
    message_id   UUID        NOT NULL,
    message_type TEXT        NOT NULL,
    at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX order_history_order_idx ON order_history (order_id, id);
