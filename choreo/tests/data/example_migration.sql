CREATE TABLE shipments (order_id UUID PRIMARY KEY);
