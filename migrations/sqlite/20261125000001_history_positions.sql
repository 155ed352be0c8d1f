-- The queue position each notification was sent at (see migrations/mysql): lets a
-- resuming subscriber read a run's notifications by position (G11).
ALTER TABLE product_user_notification_history ADD COLUMN position INTEGER NULL;
CREATE INDEX ix_punh_run_position
    ON product_user_notification_history (product_id, restock_round, position);
