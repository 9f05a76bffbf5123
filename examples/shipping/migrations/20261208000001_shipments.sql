-- One shipment per confirmed order.
CREATE TABLE shipments (
    order_id     UUID        PRIMARY KEY,
    carrier      TEXT        NOT NULL,
    scheduled_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
