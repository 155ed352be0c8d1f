-- The retention sweep (RESTOCK_HISTORY_RETENTION): a run whose per-user history was
-- deleted is marked, so the sweep finds the next one by index and a resume_after into
-- it is answered OUT_OF_RANGE. The run itself is kept.
ALTER TABLE product_notification_history ADD COLUMN history_swept INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_pnh_sweep ON product_notification_history (history_swept, updated_at);
