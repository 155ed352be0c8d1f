-- Users waiting for a product: its active alerts, kept in the transaction that changes
-- an alert (registering one adds one, cancelling one takes one away, both under the
-- product's row lock), so the demand report never counts rows per call. Backfilled from
-- the alerts an existing database holds. ix_product_waiting serves the report, most
-- users waiting first (read backwards), with the product id as the tie-break of its
-- keyset pages.
ALTER TABLE product
    ADD COLUMN waiting BIGINT NOT NULL DEFAULT 0,
    ADD KEY ix_product_waiting (waiting, id);

UPDATE product p
   SET waiting = (SELECT COUNT(*) FROM product_user_notification n
                   WHERE n.product_id = p.id AND n.is_active = TRUE);
