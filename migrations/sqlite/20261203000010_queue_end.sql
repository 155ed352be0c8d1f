-- Where the queue ended when the round started: the product's `alert_seq` then. A user
-- notified in a round who registers again gets a position after it (positions only
-- grow), so the registrations up to it need no check against the round's history when
-- the run reads its queue: only those after it can belong to a user notified already.
-- NULL on runs started before this column existed: their whole queue is checked.
ALTER TABLE product_notification_history ADD COLUMN queue_end_position BIGINT NULL;
