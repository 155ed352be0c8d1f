-- ListRestockRuns pages through runs newest first, by id, filtered by status and/or
-- product (see migrations/mysql): one index per filter, in id order within each value
-- of the filter, so a page is read backwards from its token with no sort.
CREATE INDEX ix_pnh_list_status ON product_notification_history (status, id);
CREATE INDEX ix_pnh_list_product ON product_notification_history (product_id, id);
CREATE INDEX ix_pnh_list_product_status
    ON product_notification_history (product_id, status, id);
