-- Demo "shop" database with (fake) personal data, for `pooler demo`, tests and benchmarks.
-- Deterministic: the same rows on every run. Re-running drops and recreates everything.
-- All personal data is invented: example.com e-mails, +1-555-01xx phones (reserved for
-- fiction), card numbers that pass the Luhn check, IBANs with valid check digits.
BEGIN;
SET client_min_messages = warning;

DROP VIEW IF EXISTS customer_contacts;
DROP TABLE IF EXISTS payments, order_items, orders, products, customers CASCADE;

CREATE TABLE customers (
    id          serial PRIMARY KEY,
    full_name   text NOT NULL,
    email       text NOT NULL UNIQUE,
    phone       text,
    card_number text,
    ssn         text,
    birth_date  date,
    city        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE customers IS 'Shop customers. Contains personal data (PII): name, e-mail, phone, card number, SSN, birth date.';
COMMENT ON COLUMN customers.card_number IS 'PII/PCI: full payment card number (Luhn-valid test numbers)';
COMMENT ON COLUMN customers.ssn IS 'PII: US social security number (fake)';

CREATE TABLE products (
    id    serial PRIMARY KEY,
    name  text NOT NULL UNIQUE,
    price numeric(10,2) NOT NULL CHECK (price >= 0),
    stock int NOT NULL DEFAULT 0
);
COMMENT ON TABLE products IS 'Product catalogue; no personal data.';

CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers(id),
    ordered_at  timestamptz NOT NULL DEFAULT now(),
    status      text NOT NULL CHECK (status IN ('pending', 'paid', 'shipped', 'delivered', 'cancelled')),
    total       numeric(12,2) NOT NULL DEFAULT 0
);
CREATE INDEX orders_customer_id_idx ON orders (customer_id);
COMMENT ON TABLE orders IS 'Customer orders; total is the sum of the order items.';

CREATE TABLE order_items (
    order_id   int NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    product_id int NOT NULL REFERENCES products(id),
    quantity   int NOT NULL CHECK (quantity > 0),
    unit_price numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
COMMENT ON TABLE order_items IS 'Lines of an order (product, quantity, price at order time).';

CREATE TABLE payments (
    id         serial PRIMARY KEY,
    order_id   int NOT NULL REFERENCES orders(id),
    amount     numeric(12,2) NOT NULL,
    card_last4 text,
    iban       text,
    paid_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE payments IS 'Payments for orders. Contains financial data: IBAN, card last 4 digits.';

CREATE VIEW customer_contacts AS
    SELECT id, full_name, email, phone FROM customers;
COMMENT ON VIEW customer_contacts IS 'Contact details of customers (PII: name, e-mail, phone).';

-- Luhn check digit of a string of digits (temporary helper, dropped below).
CREATE FUNCTION pg_temp.luhn_digit(digits text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT ((10 - sum(CASE WHEN pos % 2 = 1 THEN (d * 2) / 10 + (d * 2) % 10 ELSE d END) % 10) % 10)::text
    FROM (SELECT substr(reverse(digits), pos, 1)::int AS d, pos
          FROM generate_series(1, length(digits)) AS pos) s
$$;

-- 200 customers: unique first/last name pairs, realistic-looking contact data.
INSERT INTO customers (id, full_name, email, phone, card_number, ssn, birth_date, city, created_at)
SELECT i,
       fn || ' ' || ln,
       lower(fn) || '.' || lower(ln) || '@example.com',
       '+1-555-01' || lpad(((i - 1) % 100)::text, 2, '0'),
       partial || pg_temp.luhn_digit(partial),
       lpad((100 + (i * 37) % 500)::text, 3, '0') || '-' || lpad((10 + i % 89)::text, 2, '0')
           || '-' || lpad((1000 + (i * 7919) % 9000)::text, 4, '0'),
       date '1950-01-01' + (i * 131) % 18000,
       (ARRAY['New York', 'Chicago', 'Houston', 'Phoenix', 'Seattle', 'Denver', 'Boston',
              'Austin', 'Portland', 'Atlanta', 'Miami', 'San Diego'])[1 + i % 12],
       timestamptz '2023-01-01 00:00:00+00' + i * interval '1 day 3 hours 17 minutes'
FROM (
    SELECT i,
           (ARRAY['James', 'Mary', 'Robert', 'Patricia', 'John', 'Jennifer', 'Michael', 'Linda',
                  'David', 'Elizabeth', 'William', 'Barbara', 'Richard', 'Susan', 'Joseph',
                  'Jessica', 'Thomas', 'Sarah', 'Carlos', 'Aisha'])[1 + (i - 1) % 20] AS fn,
           (ARRAY['Smith', 'Johnson', 'Williams', 'Brown', 'Jones', 'Garcia', 'Miller', 'Davis',
                  'Rodriguez', 'Martinez', 'Hernandez', 'Lopez', 'Gonzalez', 'Wilson', 'Anderson',
                  'Thomas', 'Taylor', 'Moore', 'Jackson', 'Martin', 'Lee', 'Perez', 'Thompson',
                  'White', 'Nguyen'])[1 + (((i - 1) / 20) * 3 + (i - 1) % 20) % 25] AS ln,
           CASE i % 4   -- Visa 16, Mastercard 16, Amex 15, Discover 16 digits (without check digit)
               WHEN 0 THEN '4' || lpad(((i * 982451653::bigint) % 100000000000000)::text, 14, '0')
               WHEN 1 THEN '5' || (1 + i % 5) || lpad(((i * 674506081::bigint) % 10000000000000)::text, 13, '0')
               WHEN 2 THEN '37' || lpad(((i * 472882049::bigint) % 1000000000000)::text, 12, '0')
               ELSE '6011' || lpad(((i * 217645177::bigint) % 100000000000)::text, 11, '0')
           END AS partial
    FROM generate_series(1, 200) AS i
) c;

-- 50 products.
INSERT INTO products (id, name, price, stock)
SELECT i,
       (ARRAY['Classic', 'Deluxe', 'Eco', 'Compact', 'Pro', 'Mini', 'Ultra', 'Smart', 'Travel', 'Vintage'])[1 + (i - 1) % 10]
           || ' ' ||
       (ARRAY['Backpack', 'Kettle', 'Desk Lamp', 'Headphones', 'Water Bottle'])[1 + (i - 1) / 10],
       round((4.99 + (i * 7.37) % 245)::numeric, 2),
       (i * 53) % 400
FROM generate_series(1, 50) AS i;

-- 1000 orders over 2024.
INSERT INTO orders (id, customer_id, ordered_at, status)
SELECT i,
       1 + (i * 37) % 200,
       timestamptz '2024-01-01 08:00:00+00' + i * interval '8 hours 41 minutes',
       (ARRAY['delivered', 'delivered', 'shipped', 'paid', 'delivered', 'pending', 'cancelled', 'delivered'])[1 + i % 8]
FROM generate_series(1, 1000) AS i;

-- 1 to 4 distinct products per order.
INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id, p.id, 1 + (o.id + n) % 3, p.price
FROM orders o
CROSS JOIN LATERAL generate_series(1, 1 + o.id % 4) AS n
JOIN products p ON p.id = 1 + (o.id * 7 + n * 13) % 50;

UPDATE orders o SET total = s.total
FROM (SELECT order_id, sum(quantity * unit_price) AS total FROM order_items GROUP BY order_id) s
WHERE s.order_id = o.id;

-- A payment for every order that was paid; IBANs are German-format with valid check digits.
INSERT INTO payments (order_id, amount, card_last4, iban, paid_at)
SELECT o.id, o.total, right(c.card_number, 4),
       'DE' || lpad((98 - ((bban || '131400')::numeric % 97))::text, 2, '0') || bban,
       o.ordered_at + interval '12 minutes'
FROM orders o
JOIN customers c ON c.id = o.customer_id
CROSS JOIN LATERAL (SELECT '370400' || lpad(((c.id * 1000003::bigint) % 1000000000000)::text, 12, '0') AS bban) b
WHERE o.status IN ('paid', 'shipped', 'delivered')
ORDER BY o.id;

SELECT setval(pg_get_serial_sequence('customers', 'id'), (SELECT max(id) FROM customers));
SELECT setval(pg_get_serial_sequence('products', 'id'), (SELECT max(id) FROM products));
SELECT setval(pg_get_serial_sequence('orders', 'id'), (SELECT max(id) FROM orders));

DROP FUNCTION pg_temp.luhn_digit(text);
COMMIT;
ANALYZE;
