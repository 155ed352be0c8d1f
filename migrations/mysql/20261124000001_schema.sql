-- restock-notifier schema (MySQL 8.4 / MariaDB 10.11).
-- Table and column names are part of the operator contract; see SPEC §2.

-- A product's restock state. `restock_round` counts the runs started so far.
-- `alert_seq` hands out registration positions: bumping it under the row lock gives
-- every (re-)registration a position strictly behind all earlier ones.
CREATE TABLE product (
    id            BIGINT       NOT NULL PRIMARY KEY,
    restock_round BIGINT       NOT NULL DEFAULT 0,
    stock         BIGINT       NOT NULL DEFAULT 0,
    alert_seq     BIGINT       NOT NULL DEFAULT 0,
    created_at    TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at    TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB;

-- Users who asked to be told of a restock. `position` is the place in the queue:
-- registration order, and a re-registration moves the user to the back.
-- ix_pun_queue serves the engine's keyset pages; it carries user_id so that a page is
-- read from the index alone, without a primary-key lookup per row.
CREATE TABLE product_user_notification (
    id         BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    product_id BIGINT       NOT NULL,
    user_id    BIGINT       NOT NULL,
    is_active  BOOLEAN      NOT NULL DEFAULT TRUE,
    position   BIGINT       NOT NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_pun_product_user (product_id, user_id),
    KEY ix_pun_queue (product_id, is_active, position, user_id)
) ENGINE = InnoDB;

-- One row per product and round: the run. `last_sent_position` is the resume cursor
-- (a queue position, never a bare user id); it moves in the same transaction as the
-- history rows it covers. `in_progress_product_id` is non-NULL only while the run is
-- IN_PROGRESS, so its unique key lets the database itself refuse a second live run of
-- a product. `claim_token` identifies the task driving the run (every write of the
-- engine is conditional on it, so a run taken from a dead process cannot be written by
-- two tasks); `lease_until` is renewed as it records, and an expired lease marks a run
-- whose process died.
CREATE TABLE product_notification_history (
    id                     BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    product_id             BIGINT       NOT NULL,
    restock_round          BIGINT       NOT NULL,
    status                 VARCHAR(32)  NOT NULL,
    last_sent_user_id      BIGINT       NULL,
    last_sent_position     BIGINT       NULL,
    sent_count             BIGINT       NOT NULL DEFAULT 0,
    claim_token            BIGINT       NULL,
    lease_until            TIMESTAMP(6) NULL,
    started_at             TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at             TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    in_progress_product_id BIGINT AS (CASE WHEN status = 'IN_PROGRESS' THEN product_id END) STORED,
    UNIQUE KEY uq_pnh_product_round (product_id, restock_round),
    UNIQUE KEY uq_pnh_one_in_progress (in_progress_product_id),
    KEY ix_pnh_status_lease (status, lease_until),
    CONSTRAINT ck_pnh_status CHECK (status IN ('IN_PROGRESS', 'CANCELED_BY_SOLD_OUT', 'CANCELED_BY_ERROR', 'COMPLETED'))
) ENGINE = InnoDB;

-- One row per user notified in a round. The unique key is what guarantees that no
-- user is recorded twice for a round, whatever happens to the process. `id` orders
-- the recorded notifications for Subscribe's resume_after replay; the two secondary
-- indexes serve the replay filtered by product or by user (InnoDB appends `id`).
CREATE TABLE product_user_notification_history (
    id            BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    product_id    BIGINT       NOT NULL,
    user_id       BIGINT       NOT NULL,
    restock_round BIGINT       NOT NULL,
    sent_at       TIMESTAMP(6) NOT NULL,
    UNIQUE KEY uq_punh_product_round_user (product_id, restock_round, user_id),
    KEY ix_punh_product (product_id),
    KEY ix_punh_user (user_id)
) ENGINE = InnoDB;
