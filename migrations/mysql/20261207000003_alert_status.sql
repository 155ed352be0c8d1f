-- GetAlert: the last round that notified a user of a product, read from the index.
CREATE INDEX ix_punh_product_user ON product_user_notification_history (product_id, user_id, restock_round);
