-- The queue position each notification was sent at. A run sends in position order, so
-- a subscriber that resumes (`resume_after`) can tell exactly which notifications of a
-- run it has not seen and read them from here by position, however long they took to
-- be recorded (G11). NULL on rows recorded before this column existed.
ALTER TABLE product_user_notification_history
    ADD COLUMN position BIGINT NULL,
    ADD KEY ix_punh_run_position (product_id, restock_round, position);
