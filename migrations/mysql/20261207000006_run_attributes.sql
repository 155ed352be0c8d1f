-- What the caller of TriggerRestock said of the restock (name, link, price): a JSON
-- object of strings, at most 4 KiB, carried by every notification of the run. NULL:
-- none.
ALTER TABLE product_notification_history ADD COLUMN attributes TEXT NULL;
