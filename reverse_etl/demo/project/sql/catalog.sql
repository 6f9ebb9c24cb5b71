-- Product catalogue for Klaviyo catalog items / Dotdigital product catalogs: one row per
-- product.
--
-- The shop export sometimes lists a product twice; the row changed last wins. Products with a
-- missing title or a missing or negative price are kept: the sync validates and reports them
-- rather than this view hiding them. Unpublished products are kept too, with published =
-- false, so a product taken off sale is updated in the destination instead of lingering.
SELECT
    product_id,
    sku,
    title,
    description,
    url,
    image_url,
    price,
    special_price,
    currency,
    category,
    stock,
    published,
    modified_at
FROM raw.products
QUALIFY row_number() OVER (
    PARTITION BY product_id
    ORDER BY modified_at DESC, stock
) = 1
