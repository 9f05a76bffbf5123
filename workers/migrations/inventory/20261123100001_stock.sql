CREATE TABLE stock (
    sku       TEXT   PRIMARY KEY,
    available BIGINT NOT NULL CHECK (available >= 0),
    reserved  BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

-- What each order holds; the sum per sku equals stock.reserved.
CREATE TABLE reservations (
    order_id    UUID        NOT NULL,
    sku         TEXT        NOT NULL REFERENCES stock (sku),
    quantity    BIGINT      NOT NULL CHECK (quantity > 0),
    reserved_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, sku)
);
