-- ListAlerts: a product's alerts in registration order, the inactive ones included
-- (ix_pun_queue serves the active ones alone), and a user's alerts, the newest first.
CREATE INDEX ix_pun_product_position ON product_user_notification (product_id, position);
CREATE INDEX ix_pun_user ON product_user_notification (user_id, id);
