-- Fencing that outlives the cache (G3, G8): as in the MySQL migration of the same name.
ALTER TABLE product ADD COLUMN stock_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE product_notification_history ADD COLUMN claim_epoch INTEGER NOT NULL DEFAULT 0;
