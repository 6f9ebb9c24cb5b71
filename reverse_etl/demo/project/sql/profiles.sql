-- Customer profiles for Klaviyo / Dotdigital: one row per customer.
--
-- raw.customers is a CRM export: a customer re-exported after a change appears twice (same
-- customer_id, later modified_at), so keep only the newest row per customer_id. Rows without a
-- customer_id cannot be told apart, so each is kept as it is and left to the sync's validation
-- (it can still match a contact by email).
--
-- Emails, phones, consent flags and consent timestamps are passed through exactly as stored:
-- cleaning them (trim/lower-case, E.164, yes/no spellings, time zones) is the sync's job, and
-- rows it cannot fix are reported rather than silently dropped here.
--
-- modified_at drives incremental syncs, so it must move whenever anything this view outputs
-- moves: order_count and last_order_at come from raw.orders, hence a profile's modified_at is
-- the later of the customer row's and its latest order's modified_at.
WITH latest_customer AS (
    SELECT *
    FROM raw.customers
    QUALIFY customer_id IS NULL
        OR row_number() OVER (
            PARTITION BY customer_id
            ORDER BY modified_at DESC, loyalty_points DESC
        ) = 1
),

order_stats AS (
    SELECT
        customer_id,
        -- cancelled orders do not count as orders placed ...
        count(*) FILTER (WHERE status <> 'Cancelled') AS order_count,
        max(ordered_at) FILTER (WHERE status <> 'Cancelled') AS last_order_at,
        -- ... but cancelling one changes order_count, so every order's change counts here
        max(modified_at) AS orders_modified_at
    FROM raw.orders
    WHERE customer_id IS NOT NULL
    GROUP BY customer_id
)

SELECT
    c.customer_id,
    c.email,
    c.phone,
    c.first_name,
    c.last_name,
    c.city,
    c.country,
    c.postcode,
    c.loyalty_tier,
    c.loyalty_points,
    c.lifetime_value,
    c.birthday,
    c.is_vip,
    c.email_consent,
    c.sms_consent,
    c.consent_updated_at,
    c.created_at,
    -- greatest() skips NULLs: customers without orders keep their own modified_at
    greatest(c.modified_at, o.orders_modified_at) AS modified_at,
    coalesce(o.order_count, 0) AS order_count,
    o.last_order_at
FROM latest_customer AS c
LEFT JOIN order_stats AS o
    ON o.customer_id = c.customer_id
