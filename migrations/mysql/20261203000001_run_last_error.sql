-- Why a run ended CANCELED_BY_ERROR (G4, G12): written in the same statement as the final
-- status, cleared when the run is claimed again (ManualRestock, takeover). At most 512
-- bytes, written by the engine from fixed words and ids, never from a secret or a
-- response body.
ALTER TABLE product_notification_history
    ADD COLUMN last_error VARCHAR(512) NULL;
