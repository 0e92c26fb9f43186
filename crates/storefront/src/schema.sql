-- The storefront's SQLite schema: the source of truth that keyward caches sit in front of.
-- Money is integer cents, discounts integer basis points (1/100 %): no floating-point sums.
-- Applied at every start (`IF NOT EXISTS`, `INSERT OR IGNORE`); `meta` records that the Northwind import ran.

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- This database's identity: a random id made once, by the first open of the file (a file from before it
-- gets one at its next open: the statement runs at every open and writes nothing once the row is there).
-- `/healthz` shows it and `storefront replay` compares it with the file it was given, so a replay pointed
-- at another shop's database stops before it sends anything.
CREATE TABLE IF NOT EXISTS database_identity (
    only_row   INTEGER PRIMARY KEY CHECK (only_row = 1),
    id         TEXT NOT NULL,          -- 32 lowercase hex digits (128 random bits)
    created_at TEXT NOT NULL           -- 'YYYY-MM-DD HH:MM:SS.mmm', UTC
);
INSERT OR IGNORE INTO database_identity (only_row, id, created_at)
    VALUES (1, lower(hex(randomblob(16))), strftime('%Y-%m-%d %H:%M:%f', 'now'));

CREATE TABLE IF NOT EXISTS categories (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS suppliers (
    id            INTEGER PRIMARY KEY,
    company_name  TEXT NOT NULL,
    contact_name  TEXT NOT NULL,
    contact_title TEXT NOT NULL,
    address       TEXT NOT NULL,
    city          TEXT NOT NULL,
    region        TEXT NOT NULL,
    postal_code   TEXT NOT NULL,
    country       TEXT NOT NULL,
    phone         TEXT NOT NULL,
    fax           TEXT NOT NULL,
    home_page     TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS products (
    id                INTEGER PRIMARY KEY,
    name              TEXT NOT NULL,
    supplier_id       INTEGER NOT NULL REFERENCES suppliers (id),
    category_id       INTEGER NOT NULL REFERENCES categories (id),
    quantity_per_unit TEXT NOT NULL,
    price_cents       INTEGER NOT NULL CHECK (price_cents >= 0),
    stock             INTEGER NOT NULL CHECK (stock >= 0),
    units_on_order    INTEGER NOT NULL CHECK (units_on_order >= 0),
    reorder_level     INTEGER NOT NULL CHECK (reorder_level >= 0),
    -- Northwind's flag, kept as data; what the shop shows is `published`.
    discontinued      INTEGER NOT NULL CHECK (discontinued IN (0, 1)),
    published         INTEGER NOT NULL CHECK (published IN (0, 1))
);
CREATE INDEX IF NOT EXISTS products_by_category ON products (category_id, published, id);

CREATE TABLE IF NOT EXISTS customers (
    id            TEXT PRIMARY KEY,      -- five letters, e.g. ALFKI; the login name
    company_name  TEXT NOT NULL,
    contact_name  TEXT NOT NULL,
    contact_title TEXT NOT NULL,
    address       TEXT NOT NULL,
    city          TEXT NOT NULL,
    region        TEXT NOT NULL,
    postal_code   TEXT NOT NULL,
    country       TEXT NOT NULL,
    phone         TEXT NOT NULL,
    fax           TEXT NOT NULL,
    -- An Argon2id PHC string, set by the seed step (`import::seed_passwords`); NULL: cannot log in.
    password_hash TEXT
);

CREATE TABLE IF NOT EXISTS shippers (
    id           INTEGER PRIMARY KEY,
    company_name TEXT NOT NULL,
    phone        TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS orders (
    id               INTEGER PRIMARY KEY,
    customer_id      TEXT NOT NULL REFERENCES customers (id),
    employee_id      INTEGER,
    order_date       TEXT NOT NULL,      -- 'YYYY-MM-DD HH:MM:SS.mmm', as in Northwind
    required_date    TEXT,
    shipped_date     TEXT,
    ship_via         INTEGER REFERENCES shippers (id),
    freight_cents    INTEGER NOT NULL CHECK (freight_cents >= 0),
    ship_name        TEXT NOT NULL,
    ship_address     TEXT NOT NULL,
    ship_city        TEXT NOT NULL,
    ship_region      TEXT NOT NULL,
    ship_postal_code TEXT NOT NULL,
    ship_country     TEXT NOT NULL,
    -- 'northwind' (imported history) or 'web' (placed through POST /orders).
    origin           TEXT NOT NULL CHECK (origin IN ('northwind', 'web'))
);
CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, order_date);

CREATE TABLE IF NOT EXISTS order_lines (
    order_id         INTEGER NOT NULL REFERENCES orders (id),
    product_id       INTEGER NOT NULL REFERENCES products (id),
    unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0),
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    discount_bp      INTEGER NOT NULL CHECK (discount_bp BETWEEN 0 AND 10000),
    PRIMARY KEY (order_id, product_id)
);

-- The worker's "emails": one row per (order, kind), so a redelivered event writes nothing twice.
CREATE TABLE IF NOT EXISTS notifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    order_id    INTEGER REFERENCES orders (id),
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (order_id, kind)
);

-- The nightly restock report, one row per night, written under the `nightly_restock` lock's fencing token.
CREATE TABLE IF NOT EXISTS restock_reports (
    night         TEXT PRIMARY KEY,      -- 'YYYY-MM-DD'
    fencing_token INTEGER NOT NULL,
    body          TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

-- The worker's popularity counter: orders and units per product, counted once per order (in the same
-- transaction as the order's notification, which is unique per order).
CREATE TABLE IF NOT EXISTS product_popularity (
    product_id INTEGER PRIMARY KEY REFERENCES products (id),
    orders     INTEGER NOT NULL CHECK (orders >= 0),
    units      INTEGER NOT NULL CHECK (units >= 0)
);

-- Order events not yet known to be in the `order_events` stream: written in the order's transaction,
-- deleted once published. The worker's relay publishes what is left (a crash or a Redis outage between
-- the commit and the publish), so no committed order loses its event.
CREATE TABLE IF NOT EXISTS order_outbox (
    order_id   INTEGER PRIMARY KEY REFERENCES orders (id),
    event      TEXT NOT NULL,          -- the OrderEvent as JSON
    created_at TEXT NOT NULL           -- 'YYYY-MM-DD HH:MM:SS.mmm', UTC
);
