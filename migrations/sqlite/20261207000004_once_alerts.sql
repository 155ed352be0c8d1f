-- One-shot alerts: used up (is_active cleared) in the transaction that records their
-- notification, so a resumed or taken-over run never notifies them twice.
ALTER TABLE product_user_notification ADD COLUMN once INTEGER NOT NULL DEFAULT 0;
