-- Idempotency keys of TriggerRestock (see migrations/mysql): the run each key started,
-- unique per product, and swept after 24 hours. `created_at` is Unix microseconds, like
-- lease_until, so the sweep's range compares numbers. TEXT compares byte for byte
-- (SQLite's BINARY collation).
CREATE TABLE trigger_idempotency_key (
    id              INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    product_id      INTEGER NOT NULL,
    idempotency_key TEXT    NOT NULL,
    restock_round   INTEGER NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE UNIQUE INDEX uq_tik_product_key ON trigger_idempotency_key (product_id, idempotency_key);
CREATE INDEX ix_tik_created ON trigger_idempotency_key (created_at);
