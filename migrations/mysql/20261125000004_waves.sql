-- Restock waves (TriggerRestock.wave). The settings and the state of the current wave
-- live with the run, so that waves survive a restart, a hand-over to another instance
-- and ManualRestock.
ALTER TABLE product_notification_history
    -- Notifications per unit in stock, per wave; NULL: not a wave run.
    ADD COLUMN wave_per_unit      BIGINT       NULL,
    ADD COLUMN wave_interval_ms   BIGINT       NULL,
    -- How many the current wave may send (per_unit x the stock at its start); NULL
    -- before the first wave starts.
    ADD COLUMN wave_quota         BIGINT       NULL,
    -- sent_count when the current wave started.
    ADD COLUMN wave_started_count BIGINT       NULL,
    -- While the run waits between waves: when the next one starts. lease_until is the
    -- same instant, so the instance that takes the run over then starts it.
    ADD COLUMN next_wave_at       DATETIME(6)  NULL;
