-- The W3C traceparent of the call that triggered a run, when traces are exported: the
-- run's spans link to it, on whichever instance drives the run.
ALTER TABLE product_notification_history ADD COLUMN trace_parent VARCHAR(64) NULL;
