-- Fencing that outlives the database (G3, G8): what Redis holds must be checked against
-- figures only the database can order.
ALTER TABLE product
    -- Bumped by every write of the stock: a figure cached from an older read can be told
    -- apart from a newer one, even after Redis lost the newer one (G3).
    ADD COLUMN stock_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE product_notification_history
    -- Bumped by every claim of the run (start, resume, takeover). Every delivery carries
    -- its claim's epoch, and Redis refuses one older than the newest it has seen, so a
    -- delivery held on the wire past a takeover does nothing (G8).
    ADD COLUMN claim_epoch BIGINT NOT NULL DEFAULT 0;
