-- One payment per order at most: the primary key is what makes a double charge impossible to record.
CREATE TABLE payments (
    order_id       UUID        PRIMARY KEY,
    payment_id     UUID        NOT NULL UNIQUE,
    correlation_id UUID        NOT NULL,
    customer_id    TEXT        NOT NULL,
    amount_cents   BIGINT      NOT NULL,
    currency       TEXT        NOT NULL,
    status         TEXT        NOT NULL CHECK (status IN ('CHARGED', 'DECLINED', 'REFUNDED')),
    decline_reason TEXT,
    charged_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    refunded_at    TIMESTAMPTZ
);
CREATE INDEX payments_status_idx ON payments (status);
