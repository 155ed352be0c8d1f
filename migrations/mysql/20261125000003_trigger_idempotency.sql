-- Idempotency keys of TriggerRestock: a retry with a key already used for the product
-- within 24 hours returns the run that key started (`restock_round`) and changes
-- nothing. A key is stored in the transaction that creates its run, under the product
-- row's lock, so concurrent calls with one key start one run; a refused call stores
-- nothing. The key is VARBINARY so it compares byte for byte (no case folding, no
-- trailing-space padding) and its 255-byte limit is the column's.
-- uq_tik_product_key serves the lookup and makes a key unique per product;
-- ix_tik_created serves the sweep that deletes keys older than 24 hours, oldest first.
CREATE TABLE trigger_idempotency_key (
    id              BIGINT         NOT NULL AUTO_INCREMENT PRIMARY KEY,
    product_id      BIGINT         NOT NULL,
    idempotency_key VARBINARY(255) NOT NULL,
    restock_round   BIGINT         NOT NULL,
    created_at      TIMESTAMP(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_tik_product_key (product_id, idempotency_key),
    KEY ix_tik_created (created_at)
) ENGINE = InnoDB;
