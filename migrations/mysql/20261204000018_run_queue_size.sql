-- Active registrations of the product when the round started: what a run's
-- `sent_count` is measured against (a progress bar divides by it). Counted once, in the
-- transaction that starts the round; a resumed or taken-over run keeps it. 0 on runs
-- started before this column existed.
ALTER TABLE product_notification_history ADD COLUMN queue_size BIGINT NOT NULL DEFAULT 0;
