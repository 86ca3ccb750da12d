ALTER TABLE streams DROP COLUMN deleted_at;
