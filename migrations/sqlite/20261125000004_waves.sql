-- Restock waves (TriggerRestock.wave): as in the MySQL migration of the same name.
ALTER TABLE product_notification_history ADD COLUMN wave_per_unit INTEGER NULL;
ALTER TABLE product_notification_history ADD COLUMN wave_interval_ms INTEGER NULL;
ALTER TABLE product_notification_history ADD COLUMN wave_quota INTEGER NULL;
ALTER TABLE product_notification_history ADD COLUMN wave_started_count INTEGER NULL;
ALTER TABLE product_notification_history ADD COLUMN next_wave_at TEXT NULL;
