-- A product's threshold for alerts: a trigger is refused, and a run stops, while the
-- stock is below it (G3). 1 keeps the old rule (stock above 0).
ALTER TABLE product ADD COLUMN min_stock BIGINT NOT NULL DEFAULT 1;
