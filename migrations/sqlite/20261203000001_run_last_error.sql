-- Why a run ended CANCELED_BY_ERROR (G4, G12): as in the MySQL migration of the same name.
ALTER TABLE product_notification_history ADD COLUMN last_error TEXT NULL;
