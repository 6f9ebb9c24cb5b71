-- Orders for Klaviyo "Placed Order" events / Dotdigital order insights: one row per order,
-- with its lines nested as a list in line order.
--
-- status, currency and the customer's email are passed through as stored (unknown statuses
-- such as 'OnHold' and badly typed emails are the sync's to map or report). Guest checkouts
-- have no customer_id; they are kept and can be matched by email.
WITH lines AS (
    SELECT
        order_id,
        CAST(sum(quantity * unit_price) AS DECIMAL(12, 2)) AS subtotal,
        CAST(sum(quantity) AS INTEGER) AS item_count,
        list(
            {
                'sku': sku,
                'product_id': product_id,
                'name': product_name,
                'quantity': quantity,
                'unit_price': unit_price
            }
            ORDER BY line_no
        ) AS items
    FROM raw.order_items
    GROUP BY order_id
)

SELECT
    o.order_id,
    o.customer_id,
    o.email,
    o.status,
    o.currency,
    o.ordered_at,
    -- order lines are written with the order and never edited on their own, so the order's
    -- modified_at covers them
    o.modified_at,
    coalesce(l.subtotal, 0) AS subtotal,
    o.shipping,
    o.discount,
    CAST(coalesce(l.subtotal, 0) + o.shipping - o.discount AS DECIMAL(12, 2)) AS order_total,
    coalesce(l.item_count, 0) AS item_count,
    l.items
FROM raw.orders AS o
LEFT JOIN lines AS l
    ON l.order_id = o.order_id
