-- restock-notifier schema for the embedded SQLite database. Same tables, columns and
-- meaning as migrations/mysql (SPEC §2); the differences are SQLite's:
--  * timestamps are RFC 3339 text in UTC (the service writes them; the defaults are
--    for rows inserted by hand);
--  * lease_until is an integer (Unix microseconds), so it compares as a number;
--  * "one run in progress per product" is a partial unique index.

CREATE TABLE product (
    id            INTEGER NOT NULL PRIMARY KEY,
    restock_round INTEGER NOT NULL DEFAULT 0,
    stock         INTEGER NOT NULL DEFAULT 0,
    -- Hands out registration positions: the back of the queue.
    alert_seq     INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE product_user_notification (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    product_id INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    is_active  BOOLEAN NOT NULL DEFAULT TRUE,
    -- Place in the queue; a re-registration moves the user to the back.
    position   INTEGER NOT NULL,
    created_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (product_id, user_id)
);
-- The engine's keyset pages, read from the index alone.
CREATE INDEX ix_pun_queue ON product_user_notification (product_id, is_active, position, user_id);

CREATE TABLE product_notification_history (
    id                 INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    product_id         INTEGER NOT NULL,
    restock_round      INTEGER NOT NULL,
    status             TEXT    NOT NULL CHECK (status IN
                           ('IN_PROGRESS', 'CANCELED_BY_SOLD_OUT', 'CANCELED_BY_ERROR', 'COMPLETED')),
    last_sent_user_id  INTEGER NULL,
    -- The resume cursor: the queue position of the last recorded user.
    last_sent_position INTEGER NULL,
    sent_count         INTEGER NOT NULL DEFAULT 0,
    -- The task driving the run; every engine write is conditional on it.
    claim_token        INTEGER NULL,
    lease_until        INTEGER NULL,
    started_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (product_id, restock_round)
);
-- At most one run in progress per product, enforced by the database.
CREATE UNIQUE INDEX uq_pnh_one_in_progress
    ON product_notification_history (product_id) WHERE status = 'IN_PROGRESS';
CREATE INDEX ix_pnh_status_lease ON product_notification_history (status, lease_until);

CREATE TABLE product_user_notification_history (
    id            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    product_id    INTEGER NOT NULL,
    user_id       INTEGER NOT NULL,
    restock_round INTEGER NOT NULL,
    sent_at       TEXT    NOT NULL,
    UNIQUE (product_id, restock_round, user_id)
);
CREATE INDEX ix_punh_product ON product_user_notification_history (product_id, id);
CREATE INDEX ix_punh_user ON product_user_notification_history (user_id, id);
