-- ListRestockRuns pages through runs newest first, by id (handed out in creation
-- order), with an optional status and product filter. Each filter has an index whose
-- rows, for one value of the filter, are in id order: the listing reads exactly one
-- page of it backwards from the page token, with no sort. No filter uses the primary
-- key. InnoDB would append `id` to these keys anyway; it is spelt out because the
-- order is what they are for.
ALTER TABLE product_notification_history
    ADD KEY ix_pnh_list_status (status, id),
    ADD KEY ix_pnh_list_product (product_id, id),
    ADD KEY ix_pnh_list_product_status (product_id, status, id);
