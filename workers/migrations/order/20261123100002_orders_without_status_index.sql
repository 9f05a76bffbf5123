-- The settle statement (order.rs, SETTLE_ORDERS_SQL) finds a batch's orders by primary key and checks that
-- they are still PENDING. With an index on status, a planner whose statistics say PENDING is rare (they lag
-- behind a burst) read every PENDING order through that index for each batch: 1.7 ms per statement with
-- 6,000 orders waiting, against 0.4 ms by primary key. Nothing else reads orders by status through an index
-- (`choreoctl orders` counts all rows), and without it a status change can be a HOT update.
DROP INDEX IF EXISTS orders_status_idx;
