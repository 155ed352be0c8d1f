-- Users waiting for a product: its active alerts, kept in the transaction that changes
-- an alert, so the demand report never counts rows per call. Backfilled from the
-- alerts an existing database holds. ix_product_waiting serves the report (most users
-- waiting first, the product id as the tie-break of its keyset pages).
ALTER TABLE product ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0;

UPDATE product
   SET waiting = (SELECT COUNT(*) FROM product_user_notification n
                   WHERE n.product_id = product.id AND n.is_active = 1);

CREATE INDEX ix_product_waiting ON product (waiting, id);
