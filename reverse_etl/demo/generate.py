"""Generate the demo warehouse: a DuckDB file whose ``raw`` schema looks like a real shop's.

Everything is deterministic for a given seed and anchored to :data:`ANCHOR` (no wall clock), so
tests and benchmarks see the same rows on every machine. The data is deliberately dirty in the
ways real customer tables are: malformed and mixed-case emails, phone numbers in national and
international spellings, consent flags spelled a dozen ways, timestamps stored as text in mixed
forms, NULL and duplicated ids, and large groups of rows that share one ``modified_at`` (bulk
loads), which is what makes incremental cursors hard.

Emails use the reserved ``example.com/.org/.net`` domains, so a demo sync that reaches a real
account cannot email a real person. Phone numbers are valid for their country (``phonenumbers``
agrees) apart from the planted junk; US numbers use the 555 exchange, GB and AU numbers the
regulators' drama ranges and FR landlines the ranges set aside for fiction, while DE and NL
numbers and FR mobiles are random.

``generate_demo_warehouse`` builds the demo (customers, products, orders, order items) in Python
with ``random.Random(seed)`` and loads it through Arrow; ``generate_profile_rows`` makes a large
customer-shaped table (the 1,000,000-row benchmark) in a single vectorised DuckDB statement.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa

from reverse_etl.sql import literal
from reverse_etl.util.scratch import registered

ANCHOR = datetime(2026, 11, 1, tzinfo=UTC)
"""The demo's "now": every generated time lies before it."""

_US = 1_000_000
_SEC = _US
_MIN = 60 * _US
_HOUR = 3600 * _US
_DAY = 86_400 * _US
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ANCHOR_US = (ANCHOR - _EPOCH) // timedelta(microseconds=1)
_LATEST_US = _ANCHOR_US - 2 * _HOUR  # nothing is modified in the last two hours before ANCHOR
_WINDOW_US = 400 * _DAY  # customers' modified_at spread over the 400 days before ANCHOR
_ANCHOR_DAYS = (ANCHOR.date() - date(1970, 1, 1)).days

DEFAULT_PRODUCTS = 500

# --------------------------------------------------------------------------------------------
# Reference data
# --------------------------------------------------------------------------------------------

_COUNTRY_WEIGHTS = {"US": 40, "GB": 22, "DE": 12, "NL": 8, "FR": 8, "AU": 10}
_CURRENCY = {"US": "USD", "GB": "GBP", "DE": "EUR", "NL": "EUR", "FR": "EUR", "AU": "AUD"}
_FX_PER_USD = {"USD": 1.0, "GBP": 0.79, "EUR": 0.92, "AUD": 1.52}

_FIRST = {
    "US": "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William "
    "Barbara Richard Susan Joseph Jessica Thomas Sarah Christopher Karen Daniel Emily Matthew "
    "Ashley Anthony Olivia Mark Emma José Sofía Wei Priya Aaliyah Mohammed Hannah Tyler",
    "GB": "Oliver Amelia George Isla Harry Ava Jack Mia Charlie Sophie Thomas Grace William "
    "Chloe James Lily Aisha Mohammed Siobhan Rhys Freya Alfie Poppy Callum Niamh Ewan",
    "DE": "Lukas Anna Leon Lena Finn Emma Jonas Mia Paul Hannah Felix Sophie Maximilian Laura "
    "Elias Marie Jürgen Özlem Björn Jörg Katrin Stefan Ümit Lea",
    "NL": "Daan Emma Sem Julia Lucas Tess Levi Sophie Finn Anna Milan Zoë Bram Fleur Jan Sanne "
    "Thijs Noor Joris Femke",
    "FR": "Gabriel Louise Léo Jade Raphaël Ambre Arthur Alice Louis Emma Jules Chloé Hugo Léa "
    "Nathan Manon Théo Inès Maël Océane",
    "AU": "Jack Charlotte William Olivia Noah Amelia Oliver Isla Thomas Mia Lachlan Chloe "
    "Cooper Ruby Harrison Matilda Riley Zara",
}
_LAST = {
    "US": "Smith|Johnson|Williams|Brown|Jones|Garcia|Miller|Davis|Rodriguez|Martinez|Hernandez|"
    "Lopez|Gonzalez|Wilson|Anderson|Thomas|Taylor|Moore|Jackson|Martin|Lee|Nguyen|Patel|Kim|"
    "O'Brien|Washington|Cohen|Rivera",
    "GB": "Smith|Jones|Taylor|Brown|Williams|Wilson|Johnson|Davies|Robinson|Wright|Thompson|"
    "Evans|Walker|White|Roberts|Green|Hall|Wood|Khan|Patel|MacDonald|O'Neill|Hughes|Clarke",
    "DE": "Müller|Schmidt|Schneider|Fischer|Weber|Meyer|Wagner|Becker|Schulz|Hoffmann|Koch|"
    "Richter|Klein|Wolf|Schröder|Neumann|Yılmaz|Krüger|Hartmann|Lange",
    "NL": "de Jong|Jansen|de Vries|van den Berg|van Dijk|Bakker|Janssen|Visser|Smit|Meijer|"
    "de Boer|Mulder|de Groot|Bos|Vos|Peters|Hendriks|van Leeuwen",
    "FR": "Martin|Bernard|Dubois|Thomas|Robert|Richard|Petit|Durand|Leroy|Moreau|Simon|Laurent|"
    "Lefebvre|Michel|Garcia|Fournier|Girard|Bonnet|Dupont|Lambert",
    "AU": "Smith|Jones|Williams|Brown|Wilson|Taylor|Nguyen|Johnson|Martin|White|Anderson|"
    "Walker|Thompson|Kelly|Ryan|Campbell|Murphy|Chen",
}
_FIRST_NAMES = {c: s.split() for c, s in _FIRST.items()}
_LAST_NAMES = {c: s.split("|") for c, s in _LAST.items()}

# (city, postcode spec, phone spec) per country; see _postcode and _phone for the spec shapes.
_CITIES: dict[str, list[tuple[str, tuple, tuple]]] = {
    "US": [
        ("San Francisco", ("941", 2, 34), ("415",)),
        ("New York", ("100", 1, 40), ("212",)),
        ("Brooklyn", ("112", 1, 39), ("718",)),
        ("Chicago", ("606", 1, 61), ("312",)),
        ("Boston", ("021", 8, 36), ("617",)),
        ("Seattle", ("981", 1, 99), ("206",)),
        ("Austin", ("787", 1, 59), ("512",)),
        ("Denver", ("802", 1, 39), ("303",)),
        ("Atlanta", ("303", 1, 50), ("404",)),
        ("Miami", ("331", 1, 99), ("305",)),
        ("Portland", ("972", 1, 39), ("503",)),
        ("Los Angeles", ("900", 1, 89), ("213",)),
    ],
    "GB": [
        (
            "London",
            (("E1", "E14", "N1", "N7", "NW3", "SE1", "SE15", "SW4", "SW11", "W2"),),
            ("20", "7946 0"),
        ),
        ("Manchester", (("M1", "M4", "M14", "M20"),), ("161", "496 0")),
        ("Birmingham", (("B1", "B5", "B13", "B29"),), ("121", "496 0")),
        ("Leeds", (("LS1", "LS6", "LS8", "LS17"),), ("113", "496 0")),
        ("Glasgow", (("G1", "G3", "G12", "G41"),), ("141", "496 0")),
        ("Bristol", (("BS1", "BS6", "BS8", "BS16"),), ("117", "496 0")),
        ("Edinburgh", (("EH1", "EH3", "EH9", "EH10"),), ("131", "496 0")),
    ],
    "DE": [
        ("Berlin", (10115, 14199), ("30",)),
        ("Hamburg", (20095, 22769), ("40",)),
        ("München", (80331, 81929), ("89",)),
        ("Köln", (50667, 51149), ("221",)),
        ("Frankfurt am Main", (60306, 60599), ("69",)),
        ("Stuttgart", (70173, 70619), ("711",)),
    ],
    "NL": [
        ("Amsterdam", (1011, 1109), ("20",)),
        ("Rotterdam", (3011, 3089), ("10",)),
        ("Utrecht", (3511, 3585), ("30",)),
        ("Den Haag", (2491, 2597), ("70",)),
        ("Eindhoven", (5611, 5658), ("40",)),
        ("Groningen", (9711, 9747), ("50",)),
    ],
    "FR": [
        ("Paris", (tuple(range(75001, 75021)),), ("1", "99 00")),
        ("Lyon", (tuple(range(69001, 69010)),), ("4", "65 71")),
        ("Marseille", (tuple(range(13001, 13017)),), ("4", "65 71")),
        ("Toulouse", ((31000, 31100, 31200, 31300, 31400, 31500),), ("5", "36 49")),
        ("Bordeaux", ((33000, 33100, 33200, 33300, 33800),), ("5", "36 49")),
        ("Lille", ((59000, 59160, 59260, 59800),), ("3", "53 01")),
    ],
    "AU": [
        ("Sydney", (2000, 2234), ("2", "5550")),
        ("Melbourne", (3000, 3207), ("3", "7010")),
        ("Brisbane", (4000, 4179), ("7", "5550")),
        ("Perth", (6000, 6199), ("8", "7010")),
        ("Adelaide", (5000, 5199), ("8", "7010")),
    ],
}

_EMAIL_DOMAINS = (
    ["example.com"] * 4
    + ["example.org"] * 2
    + ["example.net"] * 2
    + ["mail.example.com", "inbox.example.org", "post.example.net", "shop.example.com"]
)

_CONSENT_TRUE = ["yes", "Y", "true", "1", "subscribed", "opt-in", " Yes ", "TRUE", "Yes"]
_CONSENT_FALSE = ["no", "N", "FALSE", "0", "Unsubscribed", "opted_out", "false", "No"]
_CONSENT_INVALID = ["maybe", "2", "unknown?"]
_TS_UNPARSEABLE = ["yesterday", "31/02/2025", "", "N/A", "2025-13-45T25:61:00Z"]
_TS_TOO_OLD = ["1970-01-01T00:00:00Z", "1900-01-01", "1989-12-31 23:59:59"]
_TS_FUTURE = ["2031-01-01T00:00:00Z", "2099-12-31", "2030-06-15T08:00:00+02:00"]
_TS_OFFSETS = ["+01:00", "+02:00", "-05:00", "-08:00", "+10:00", "+05:30", "+00:00"]
_PHONE_INVALID = ["12345", "call me", "n/a", "0000000", "+44", "123", "ask in store"]

_STATUS_UNKNOWN = ["OnHold", "on_hold", "Backorder"]

_CATEGORIES = {
    "Apparel": (
        "APP",
        ["T-Shirt", "Hoodie", "Jacket", "Jeans", "Sweater", "Dress", "Shorts"],
        (19, 149),
    ),
    "Footwear": ("FTW", ["Sneakers", "Boots", "Sandals", "Loafers", "Trail Runners"], (49, 219)),
    "Accessories": (
        "ACC",
        ["Backpack", "Wallet", "Belt", "Cap", "Scarf", "Sunglasses", "Tote"],
        (9, 129),
    ),
    "Home": ("HOM", ["Mug", "Candle", "Throw Blanket", "Cushion", "Vase", "Table Lamp"], (9, 189)),
    "Beauty": ("BEA", ["Face Serum", "Lip Balm", "Shampoo", "Body Lotion", "Hand Cream"], (6, 79)),
    "Outdoor": (
        "OUT",
        ["Water Bottle", "Tent", "Headlamp", "Camping Chair", "Rain Shell"],
        (14, 399),
    ),
}
_ADJECTIVES = [
    "Classic", "Organic Cotton", "Recycled", "Everyday", "Heritage", "Lightweight", "Merino",
    "Vintage", "Essential", "Premium", "Waterproof", "Relaxed", "Slim", "Handmade", "Travel",
]  # fmt: skip
_COLOURS = {
    "Black": "BLK", "Navy": "NVY", "Olive": "OLV", "Sand": "SND", "Rust": "RST", "Grey": "GRY",
    "White": "WHT", "Forest Green": "FGR", "Burgundy": "BRG", "Sky Blue": "SKY",
}  # fmt: skip

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

_NON_LOCAL = re.compile(r"[^a-z0-9]")
_GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "ı": "i"})


def _ascii(name: str) -> str:
    """'Müller' -> 'mueller', "O'Brien" -> 'obrien', 'van den Berg' -> 'vandenberg'."""
    folded = unicodedata.normalize("NFKD", name.lower().translate(_GERMAN))
    return _NON_LOCAL.sub("", folded.encode("ascii", "ignore").decode())


def _utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _cents(value: float) -> int:
    return int(round(value * 100))


def _dec(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def _weighted(rng: random.Random, table: dict[str, int]) -> Callable[[], str]:
    keys, weights = list(table), list(table.values())
    cum = [sum(weights[: i + 1]) for i in range(len(weights))]
    return lambda: rng.choices(keys, cum_weights=cum)[0]


def _postcode(rng: random.Random, country: str, spec: tuple) -> str:
    if country == "US":
        prefix, lo, hi = spec
        return f"{prefix}{rng.randint(lo, hi):02d}"
    if country == "GB":
        letters = "ABDEFGHJLNPQRSTUWXYZ"
        return (
            f"{rng.choice(spec[0])} {rng.randint(1, 9)}{rng.choice(letters)}{rng.choice(letters)}"
        )
    if country == "FR":
        return str(rng.choice(spec[0]))
    lo, hi = spec
    if country == "NL":
        letters = "ABCEGHJKLMNPRTVWXZ"
        return f"{rng.randint(lo, hi)} {rng.choice(letters)}{rng.choice(letters)}"
    if country == "DE":
        return f"{rng.randint(lo, hi):05d}"
    return str(rng.randint(lo, hi))  # AU


def _digits(rng: random.Random, n: int, first: str = "23456789") -> str:
    return rng.choice(first) + "".join(rng.choice("0123456789") for _ in range(n - 1))


def _phone(rng: random.Random, country: str, spec: tuple) -> tuple[str, str]:
    """A valid number for ``country`` in one of its usual spellings: (key digits, text)."""
    if country == "US":
        area, sub = spec[0], f"{rng.randint(0, 9999):04d}"
        text = rng.choice(
            [
                f"+1{area}555{sub}",
                f"({area}) 555-{sub}",
                f"{area}-555-{sub}",
                f"{area}.555.{sub}",
                f"+1 {area}-555-{sub}",
            ]
        )
        return f"1{area}555{sub}", text
    if country == "GB":
        area, local = spec
        last = f"{rng.randint(0, 999):03d}"
        national = f"{local}{last}"
        text = rng.choice(
            [
                f"+44 {area} {national}",
                f"0{area} {national}",
                f"+44{area}{national.replace(' ', '')}",
                f"(0{area}) {national}",
            ]
        )
        return f"44{area}{national.replace(' ', '')}", text
    if country == "DE":
        if rng.random() < 0.3:
            area, sub = (
                rng.choice(["151", "152", "160", "170", "171", "176", "179"]),
                _digits(rng, 8, "123456789"),
            )
        else:
            area, sub = spec[0], _digits(rng, 7 if len(spec[0]) == 2 else 6)
        text = rng.choice(
            [
                f"0049 {area} {sub}",
                f"+49 {area} {sub}",
                f"0{area} {sub}",
                f"0{area}/{sub}",
                f"+49{area}{sub}",
            ]
        )
        return f"49{area}{sub}", text
    if country == "NL":
        if rng.random() < 0.4:
            area, sub = "6", _digits(rng, 8, "12345")
        else:
            area, sub = spec[0], _digits(rng, 7)
        text = rng.choice(
            [
                f"+31 {area} {sub[:3]} {sub[3:]}",
                f"0{area}-{sub}",
                f"0{area} {sub}",
                f"+31{area}{sub}",
            ]
        )
        return f"31{area}{sub}", text
    if country == "FR":
        if rng.random() < 0.4:
            area, body = (
                "6",
                f"{rng.randint(10, 89)} {rng.randint(0, 99):02d} {rng.randint(0, 99):02d} {rng.randint(0, 99):02d}",
            )
        else:
            area, body = spec[0], f"{spec[1]} {rng.randint(0, 99):02d} {rng.randint(0, 99):02d}"
        text = rng.choice(
            [
                f"0{area} {body}",
                f"+33 {area} {body}",
                f"+33{area}{body.replace(' ', '')}",
                f"0{area}.{body.replace(' ', '.')}",
            ]
        )
        return f"33{area}{body.replace(' ', '')}", text
    area, block = spec  # AU
    sub = f"{rng.randint(0, 9999):04d}"
    text = rng.choice(
        [
            f"+61 {area} {block} {sub}",
            f"(0{area}) {block} {sub}",
            f"0{area} {block} {sub}",
            f"+61{area}{block}{sub}",
        ]
    )
    return f"61{area}{block}{sub}", text


def _recase(email: str, rng: random.Random) -> str:
    """The same address as a person types it on another day: cased and/or padded differently."""
    local, domain = email.split("@", 1)
    style = rng.randrange(5)
    if style == 0:
        out = email.upper()
    elif style == 1:
        out = ".".join(p.capitalize() for p in local.split(".")) + "@" + domain.capitalize()
    elif style == 2:
        out = local.capitalize() + "@" + domain
    elif style == 3:
        out = " " + email + " "
    else:
        out = ".".join(p.capitalize() for p in local.split(".")) + "@" + domain + "  "
    if out == email:  # cannot happen for the styles above, but keep the invariant explicit
        out = " " + email
    return out


def _malformed(local: str, domain: str, rng: random.Random) -> str:
    return rng.choice(
        [
            f"{local}@",  # 'john.doe@'
            f"{local}{domain}",  # no at-sign: 'john.doeexample.com'
            f"{local}-no-at-sign.com",
            f"{local[:1] or 'a'}@{domain.split('.')[0][:1]}",  # 'a@b'
            f"{local}@@{domain}",  # 'x@@y.com'
            f"{local}@{domain.split('.')[0]}..com",  # 'name@domain..com'
            f"{local} @{domain}",  # space inside
        ]
    )


def _consent(rng: random.Random, p_null: float, p_true: float) -> str | None:
    r = rng.random()
    if r < 0.01:
        return rng.choice(_CONSENT_INVALID)
    if r < 0.01 + p_null:
        return None
    return rng.choice(_CONSENT_TRUE if rng.random() < p_true else _CONSENT_FALSE)


def _consent_text(rng: random.Random, us: int) -> str:
    """``us`` as text in one of the forms found in real exports, or (~1%) dirt."""
    r = rng.random()
    if r < 0.005:
        return rng.choice(_TS_UNPARSEABLE)
    if r < 0.0075:
        return rng.choice(_TS_TOO_OLD)
    if r < 0.01:
        return rng.choice(_TS_FUTURE)
    ts = _utc(us - us % _SEC)
    form = rng.random()
    if form < 0.45:
        return ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    if form < 0.65:
        offset = rng.choice(_TS_OFFSETS)
        sign = 1 if offset[0] == "+" else -1
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * sign
        return (ts + delta).strftime("%Y-%m-%dT%H:%M:%S") + offset
    if form < 0.85:
        return ts.strftime("%Y-%m-%d %H:%M:%S")
    return ts.strftime("%Y-%m-%d")


def _bulk_groups(rng: random.Random, n: int, share: float = 0.2) -> list[int]:
    """Sizes (300..1,500 each) of bulk-load groups covering about ``share`` of ``n`` rows."""
    remaining, sizes = int(n * share), []
    while remaining >= 300:
        size = rng.randint(300, min(1500, remaining))
        if 0 < remaining - size < 300:  # never leave a remainder too small for a group
            size = remaining if remaining <= 1500 else remaining - 300
        sizes.append(size)
        remaining -= size
    return sizes


def _tier(points: int) -> str:
    if points >= 15_000:
        return "platinum"
    if points >= 5_000:
        return "gold"
    if points >= 1_000:
        return "silver"
    return "bronze"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

_TSTZ = pa.timestamp("us", tz="UTC")
_TS = pa.timestamp("us")

_DDL = {
    "customers": """
        customer_id VARCHAR, email VARCHAR, phone VARCHAR, first_name VARCHAR, last_name VARCHAR,
        city VARCHAR, country VARCHAR, postcode VARCHAR, loyalty_tier VARCHAR,
        loyalty_points INTEGER, lifetime_value DECIMAL(12,2), birthday DATE, is_vip BOOLEAN,
        email_consent VARCHAR, sms_consent VARCHAR, consent_updated_at VARCHAR,
        created_at TIMESTAMP, modified_at TIMESTAMP WITH TIME ZONE""",
    "products": """
        product_id VARCHAR, sku VARCHAR, title VARCHAR, description VARCHAR, url VARCHAR,
        image_url VARCHAR, price DECIMAL(10,2), special_price DECIMAL(10,2), currency VARCHAR,
        category VARCHAR, stock INTEGER, published BOOLEAN, modified_at TIMESTAMP WITH TIME ZONE""",
    "orders": """
        order_id VARCHAR, customer_id VARCHAR, email VARCHAR, status VARCHAR, currency VARCHAR,
        ordered_at TIMESTAMP WITH TIME ZONE, modified_at TIMESTAMP WITH TIME ZONE,
        shipping DECIMAL(10,2), discount DECIMAL(10,2)""",
    "order_items": """
        order_id VARCHAR, line_no INTEGER, product_id VARCHAR, sku VARCHAR, product_name VARCHAR,
        quantity INTEGER, unit_price DECIMAL(10,2)""",
}

_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "DECIMAL(12,2)": pa.decimal128(12, 2),
    "DECIMAL(10,2)": pa.decimal128(10, 2),
    "DATE": pa.date32(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": _TS,
    "TIMESTAMP WITH TIME ZONE": _TSTZ,
}


def _columns(table: str) -> list[tuple[str, str]]:
    out = []
    for part in re.split(r",\s*(?![^()]*\))", _DDL[table].strip()):
        name, sql_type = part.strip().split(" ", 1)
        out.append((name, sql_type.strip()))
    return out


def _arrow(table: str, cols: dict[str, list]) -> pa.Table:
    spec = _columns(table)
    assert set(cols) == {name for name, _ in spec}, (table, set(cols) ^ {n for n, _ in spec})
    return pa.table(
        {name: pa.array(cols[name], type=_ARROW_TYPES[sql_type]) for name, sql_type in spec}
    )


def _products(rng: random.Random, n: int) -> tuple[dict[str, list], list[int]]:
    """Products and the indexes of the sellable ones (title and a positive price)."""
    cols: dict[str, list] = {name: [] for name, _ in _columns("products")}
    # dirt: 3 NULL titles, 3 NULL prices, 2 negative prices (disjoint products)
    dirty = rng.sample(range(n), 8)
    null_title, null_price, negative = set(dirty[:3]), set(dirty[3:6]), set(dirty[6:])
    catalog_import = rng.randint(30, 330) * _DAY  # one catalog import: ~1/4 of rows share it
    import_us = _LATEST_US - catalog_import - (_LATEST_US - catalog_import) % _DAY + 4 * _HOUR
    categories = list(_CATEGORIES)
    colours = list(_COLOURS)
    for k in range(n):
        category = rng.choices(categories, weights=[30, 15, 20, 15, 10, 10])[0]
        code, nouns, (lo, hi) = _CATEGORIES[category]
        noun, adjective, colour = rng.choice(nouns), rng.choice(_ADJECTIVES), rng.choice(colours)
        title = f"{adjective} {noun} - {colour}"
        sku = f"{code}-{k + 1:04d}-{_COLOURS[colour]}"
        slug = re.sub(r"[^a-z0-9]+", "-", f"{adjective} {noun} {colour}".lower()).strip("-")
        price = _cents(rng.randint(lo, hi) - rng.choice([0.01, 0.05, 0.0, 0.01]))
        special = (
            _cents(price * rng.choice([0.7, 0.8, 0.85]) / 100) if rng.random() < 0.25 else None
        )
        if k in negative:
            price = -price
            special = None
        currency = rng.choices(["USD", "GBP", "EUR"], weights=[80, 12, 8])[0]
        stock = 0 if rng.random() < 0.1 else rng.randint(1, 500)
        modified = (
            import_us
            if rng.random() < 0.25
            else _LATEST_US - rng.randrange(_WINDOW_US) // _SEC * _SEC
        )
        cols["product_id"].append(f"P{k + 1:04d}")
        cols["sku"].append(sku)
        cols["title"].append(None if k in null_title else title)
        cols["description"].append(
            f"The {adjective.lower()} {noun.lower()} in {colour.lower()}. {category} you will "
            f"reach for every day; ships in {rng.randint(1, 5)} working days."
        )
        cols["url"].append(f"https://shop.example.com/products/{slug}-{k + 1}")
        cols["image_url"].append(f"https://cdn.example.com/images/{sku.lower()}.jpg")
        cols["price"].append(None if k in null_price else _dec(price))
        cols["special_price"].append(None if special is None else _dec(special))
        cols["currency"].append(currency)
        cols["category"].append(category)
        cols["stock"].append(stock)
        cols["published"].append(rng.random() < 0.92)
        cols["modified_at"].append(modified)
    # dirt: one product exported twice, the second copy later with new stock and price
    dup = rng.choice([k for k in range(n) if k not in null_title | null_price | negative])
    for name in cols:
        cols[name].append(cols[name][dup])
    cols["stock"][-1] = max(0, cols["stock"][dup] - rng.randint(1, 20))
    cols["price"][-1] = _dec(_cents(float(cols["price"][dup]) * 1.1))
    cols["modified_at"][-1] = min(_LATEST_US, cols["modified_at"][dup] + rng.randint(1, 72) * _HOUR)
    sellable = [k for k in range(n) if k not in null_title | null_price | negative]
    return cols, sellable


def generate_demo_warehouse(
    path: str | Path, *, profiles: int = 12_000, seed: int = 42
) -> dict[str, int]:
    """Create (overwrite) the demo DuckDB file at ``path``; return row counts per table.

    ``raw.customers`` gets ``profiles`` customers (plus ~0.5% duplicate rows), ``raw.products``
    500 products (plus one duplicate), ``raw.orders`` ~2.5 orders per customer and
    ``raw.order_items`` 1-5 lines per order. Same ``seed`` -> identical contents.
    """
    if profiles < 1:
        raise ValueError("profiles must be at least 1")
    rng = random.Random(seed)
    country_of = _weighted(rng, _COUNTRY_WEIGHTS)

    # ---- customers: the people ---------------------------------------------------------------
    n = profiles
    c: dict[str, list] = {name: [] for name, _ in _columns("customers")}
    clean_email: list[str] = []
    used_emails: set[str] = set()
    used_phones: set[str] = set()
    for _ in range(n):
        country = country_of()
        first = rng.choice(_FIRST_NAMES[country])
        last = rng.choice(_LAST_NAMES[country])
        city, post_spec, phone_spec = rng.choice(_CITIES[country])
        f, la = _ascii(first), _ascii(last)
        domain = rng.choice(_EMAIL_DOMAINS)
        local = rng.choice([f"{f}.{la}", f"{f[0]}{la}", f"{f}{la}", f"{f}_{la}", f"{la}.{f}"])
        email = f"{local}@{domain}"
        while email in used_emails:
            email = f"{local}{rng.randint(1, 999)}@{domain}"
        used_emails.add(email)
        clean_email.append(email)

        phone = None
        r = rng.random()
        if r < 0.02:
            phone = rng.choice(_PHONE_INVALID)
        elif r < 0.60:
            for _attempt in range(20):
                key, text = _phone(rng, country, phone_spec)
                if key not in used_phones:
                    used_phones.add(key)
                    phone = text
                    break

        c["first_name"].append(first)
        c["last_name"].append(last)
        c["city"].append(city)
        c["country"].append(country)
        c["postcode"].append(_postcode(rng, country, post_spec))
        c["phone"].append(phone)

    # modified_at: ~20% in bulk-load groups of 300..1,500 rows sharing one value, the rest spread
    # over the 400 days before ANCHOR (never in the last two hours)
    modified = [_LATEST_US - rng.randrange(_WINDOW_US - 2 * _HOUR) for _ in range(n)]
    sizes = _bulk_groups(rng, n)
    bulk_rows = rng.sample(range(n), sum(sizes))
    load_days = [2 + k % 397 for k in rng.sample(range(max(397, len(sizes))), len(sizes))]
    start = 0
    for size, days_ago in zip(sizes, load_days, strict=True):
        # a nightly import at a round hour; at least 26 hours before ANCHOR
        load_us = _ANCHOR_US - days_ago * _DAY + rng.choice([1, 2, 3, 22]) * _HOUR
        for k in bulk_rows[start : start + size]:
            modified[k] = load_us
        start += size
    created = [m - rng.randrange(5 * 365 * _DAY) for m in modified]

    # the same person signed up twice (~0.3%): another customer_id, same name, email cased
    # differently
    twins = rng.sample(range(1, n), max(1, n * 3 // 1000)) if n > 1 else []
    twin_of = {b: rng.randrange(b) for b in sorted(twins)}
    twin_sources = set(twin_of.values())
    for b, a in twin_of.items():  # ascending b, so a chain a <- b <- c shares one address
        for name in ("first_name", "last_name", "city", "country", "postcode"):
            c[name][b] = c[name][a]
        c["phone"][b] = None  # signed up again without giving the number
        clean_email[b] = clean_email[a]

    emails: list[str | None] = []
    for k in range(n):
        email = clean_email[k]
        local, domain = email.split("@", 1)
        r = rng.random()
        if k in twin_of:
            emails.append(_recase(email, rng))
        elif k in twin_sources:
            emails.append(email)
        elif r < 0.01:
            emails.append(None)
        elif r < 0.02:
            emails.append(_malformed(local, domain, rng))
        elif r < 0.05:
            emails.append(_recase(email, rng))
        else:
            emails.append(email)
    c["email"] = emails

    ids: list[str | None] = [f"C{k + 1:06d}" for k in range(n)]
    for k in rng.sample(range(n), max(1, n // 200)):  # ~0.5% NULL customer_id
        if k not in twin_of and k not in twin_sources:
            ids[k] = None
    c["customer_id"] = ids

    # ---- products ------------------------------------------------------------------------------
    p, sellable = _products(rng, DEFAULT_PRODUCTS)

    # ---- orders and their lines ----------------------------------------------------------------
    o: dict[str, list] = {name: [] for name, _ in _columns("orders")}
    it: dict[str, list] = {name: [] for name, _ in _columns("order_items")}
    spend = [0] * n  # cents of non-cancelled orders, in the customer's currency
    order_no = 0
    for k in range(n):
        if rng.random() < 0.2:
            continue
        count = 1
        while rng.random() > 0.32:  # 1 + geometric: 2.5 orders per customer overall
            count += 1
        currency = _CURRENCY[c["country"][k]]
        fx = _FX_PER_USD[currency]
        lo = max(created[k], _LATEST_US - 3 * 365 * _DAY)
        for _ in range(count):
            order_no += 1
            order_id = f"O{order_no:07d}"
            ordered = rng.randint(lo, _LATEST_US - _MIN) // _SEC * _SEC
            age = _ANCHOR_US - ordered
            r = rng.random()
            if r < 0.08:
                status = "Cancelled"
                changed = ordered + rng.randint(1 * _HOUR, 3 * _DAY) // _SEC * _SEC
            elif r < 0.085:
                status = rng.choice(_STATUS_UNKNOWN)
                changed = ordered + rng.randint(1, 48) * _HOUR
            elif age < 2 * _DAY and rng.random() < 0.5:
                status, changed = "Open", ordered  # never touched since: ties with ordered_at
            else:
                # fulfilment runs nightly at 03:00 UTC: every order completed that night shares
                # one modified_at
                done = ordered + rng.randint(2, 8) * _DAY
                nightly = done - done % _DAY + 3 * _HOUR
                if nightly <= _LATEST_US and age >= 2 * _DAY:
                    status, changed = "Complete", nightly
                else:
                    status = "Confirmed"
                    changed = ordered + rng.randint(5 * _MIN, 6 * _HOUR) // _SEC * _SEC
            changed = max(ordered, min(changed, _LATEST_US))

            lines = rng.choices([1, 2, 3, 4, 5], weights=[45, 25, 15, 10, 5])[0]
            subtotal = 0
            for line_no, pk in enumerate(rng.sample(sellable, lines), start=1):
                price = p["special_price"][pk] or p["price"][pk]
                unit = _cents(float(price) / _FX_PER_USD[p["currency"][pk]] * fx)
                qty = rng.choices([1, 2, 3, 4, 5], weights=[70, 18, 7, 3, 2])[0]
                subtotal += unit * qty
                it["order_id"].append(order_id)
                it["line_no"].append(line_no)
                it["product_id"].append(p["product_id"][pk])
                it["sku"].append(p["sku"][pk])
                it["product_name"].append(p["title"][pk])
                it["quantity"].append(qty)
                it["unit_price"].append(_dec(unit))
            shipping = 0 if subtotal >= 7500 else rng.choice([495, 595, 750])
            discount = 0
            if rng.random() < 0.18 and subtotal > 2000:
                discount = rng.choice([subtotal // 10, subtotal * 15 // 100, 500, 1000])
            if status != "Cancelled":
                spend[k] += subtotal + shipping - discount

            o["order_id"].append(order_id)
            o["customer_id"].append(ids[k])  # NULL-id customers: guest checkouts
            o["email"].append(emails[k])
            o["status"].append(status)
            o["currency"].append(currency)
            o["ordered_at"].append(ordered)
            o["modified_at"].append(changed)
            o["shipping"].append(_dec(shipping))
            o["discount"].append(_dec(discount))

    # ---- loyalty, value, birthdays, consent ----------------------------------------------------
    for k in range(n):
        legacy = 0 if rng.random() < 0.6 else _cents(rng.lognormvariate(4.5, 1.0))
        value = spend[k] + legacy
        points = value // 10 + rng.choice([0, 0, 50, 100, 250])
        c["lifetime_value"].append(_dec(value))
        c["loyalty_points"].append(points)
        tier = _tier(points)
        c["loyalty_tier"].append(tier)
        c["is_vip"].append(tier == "platinum" or rng.random() < 0.02)
        c["birthday"].append(
            None if rng.random() < 0.2 else _ANCHOR_DAYS - rng.randint(18 * 365, 85 * 365)
        )
        c["email_consent"].append(_consent(rng, p_null=0.06, p_true=0.65))
        sms_null = 0.2 if c["phone"][k] else 0.7
        c["sms_consent"].append(_consent(rng, p_null=sms_null, p_true=0.4))
        if c["email_consent"][k] is None and c["sms_consent"][k] is None and rng.random() < 0.9:
            c["consent_updated_at"].append(None)
        else:
            when = created[k] + rng.randrange(max(1, modified[k] - created[k]))
            c["consent_updated_at"].append(_consent_text(rng, when))
        c["created_at"].append(created[k])
        c["modified_at"].append(modified[k])

    # dirt: ~0.5% of customers exported twice, the second row later with more loyalty points
    for k in sorted(rng.sample(range(n), max(1, n // 200))):
        if ids[k] is None:
            continue
        for name in c:
            c[name].append(c[name][k])
        c["loyalty_points"][-1] = c["loyalty_points"][k] + rng.randint(10, 500)
        c["loyalty_tier"][-1] = _tier(c["loyalty_points"][-1])
        later = c["modified_at"][k] + rng.randint(1 * _SEC, 30 * _DAY)
        c["modified_at"][-1] = min(later, _LATEST_US)
        if c["modified_at"][-1] <= c["modified_at"][k]:  # already at the latest instant
            c["modified_at"][k] -= _SEC

    tables = {
        "customers": _arrow("customers", c),
        "products": _arrow("products", p),
        "orders": _arrow("orders", o),
        "order_items": _arrow("order_items", it),
    }
    return _write(Path(path), tables)


def _write(path: Path, tables: dict[str, pa.Table]) -> dict[str, int]:
    for stale in (path, path.with_name(path.name + ".wal")):
        stale.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    con = duckdb.connect(str(path))
    try:
        # duckdb 2.0 refuses TimeZone in connect(config=...) ("icu ... could not be autoloaded")
        # although ICU is statically linked; SET works
        con.execute("SET TimeZone = 'UTC'")
        con.execute("CREATE SCHEMA raw")
        for name, table in tables.items():
            con.execute(f"CREATE TABLE raw.{name} ({_DDL[name]})")
            with registered(con, "_demo_rows", table):
                con.execute(f"INSERT INTO raw.{name} BY NAME SELECT * FROM _demo_rows")
            counts[f"raw.{name}"] = table.num_rows
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return counts


# --------------------------------------------------------------------------------------------
# The 1,000,000-row benchmark table
# --------------------------------------------------------------------------------------------


def _sql_list(values: list) -> str:
    return "[" + ", ".join(literal(str(v)) for v in values) + "]"


_BENCH_COUNTRIES = list(_COUNTRY_WEIGHTS)


def _blocks(per_country: dict[str, list[str]]) -> tuple[list[str], int]:
    """One flat list with an equal-sized block per country (short lists repeat), and the block
    size: ``flat[(ci - 1) * size + h % size]`` picks from country ``ci`` with plain arithmetic,
    which DuckDB evaluates far faster than indexing a nested list literal per row."""
    size = max(len(v) for v in per_country.values())
    flat = [per_country[c][j % len(per_country[c])] for c in _BENCH_COUNTRIES for j in range(size)]
    return flat, size


def generate_profile_rows(
    con: duckdb.DuckDBPyConnection, table: str, rows: int, seed: int = 7
) -> None:
    """Create (replace) ``table`` with ``rows`` customer rows shaped like ``raw.customers``.

    One vectorised statement over ``range(rows)``: every field is a hash of the row number and
    ``seed`` (deterministic per DuckDB version), so 1,000,000 rows take a couple of seconds.
    Ids are unique and non-NULL; about 1% of emails, consents, phones and consent timestamps
    are dirty; 20% of rows share one of 40 bulk-load ``modified_at`` values. ``table`` may be
    schema-qualified; the schema is created if missing.
    """
    rows, seed = int(rows), int(seed)
    if rows < 0:
        raise ValueError("rows must be >= 0")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", table):
        raise ValueError(f"table must be a plain [schema.]name, got {table!r}")
    if "." in table:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {table.split('.')[0]}")

    countries = _BENCH_COUNTRIES
    first, n_first = _blocks(_FIRST_NAMES)
    last, n_last = _blocks(_LAST_NAMES)
    cities, n_city = _blocks({c: [city for city, _, _ in _CITIES[c]] for c in countries})
    first_ascii = _sql_list([_ascii(v) for v in first])
    last_ascii = _sql_list([_ascii(v) for v in last])
    first_sql, last_sql, cities_sql = _sql_list(first), _sql_list(last), _sql_list(cities)
    consents = _CONSENT_TRUE + _CONSENT_FALSE
    bad_ts = _TS_UNPARSEABLE + _TS_TOO_OLD + _TS_FUTURE
    domains = sorted(set(_EMAIL_DOMAINS))
    us_areas = [spec[0] for _, _, spec in _CITIES["US"]]
    anchor = "TIMESTAMPTZ '2026-11-01 00:00:00+00'"
    anchor_naive = "TIMESTAMP '2026-11-01 00:00:00'"

    def h(field: str) -> str:
        return f"hash(i, {seed}, '{field}')"

    sql = f"""
    CREATE OR REPLACE TABLE {table} AS
    WITH base AS (
        SELECT
            i,
            CAST(1 + {h("country")} % {len(countries)} AS INTEGER) AS ci,
            {h("first")} AS h_first, {h("last")} AS h_last, {h("city")} AS h_city,
            {h("email")} % 1000 AS h_email, {h("domain")} AS h_domain,
            {h("phone")} % 1000 AS h_phone, {h("digits")} AS h_digits,
            {h("points")} AS h_points, {h("value")} AS h_value, {h("birthday")} AS h_bday,
            {h("ec")} % 1000 AS h_ec, {h("sc")} % 1000 AS h_sc, {h("cts")} AS h_cts,
            {h("modified")} AS h_mod, {h("created")} AS h_created, {h("post")} AS h_post
        FROM range({rows}) AS t(i)
    ),
    people AS (
        SELECT
            *,
            CAST(1 + (ci - 1) * {n_first} + h_first % {n_first} AS INTEGER) AS fi,
            CAST(1 + (ci - 1) * {n_last} + h_last % {n_last} AS INTEGER) AS li,
            ({cities_sql})[CAST(1 + (ci - 1) * {n_city} + h_city % {n_city} AS INTEGER)] AS city,
            ({_sql_list(countries)})[ci] AS country,
            -- seconds before the anchor; 20% of rows in one of 40 nightly bulk loads
            CASE WHEN h_mod % 5 = 0
                 THEN CAST((2 + (h_mod // 5) % 40 * 9) * 86400 - 7200 AS BIGINT) * 1000000
                 ELSE 7200000000 + CAST(h_mod % 34560000000000 AS BIGINT)
            END AS mod_before_us,
            CAST(h_created % 157680000000000 AS BIGINT) AS created_gap_us,
            -- cubed so that most customers sit in the lower tiers
            CAST(pow((h_points % 1000) / 1000.0, 3) * 30000 AS INTEGER) AS points
        FROM base
    ),
    shaped AS (
        SELECT
            *,
            ({first_sql})[fi] AS first_name,
            ({last_sql})[li] AS last_name,
            ({first_ascii})[fi] || '.' || ({last_ascii})[li] || CAST(i AS VARCHAR) AS local_part,
            ({_sql_list(domains)})[CAST(1 + h_domain % {len(domains)} AS INTEGER)] AS domain,
            lpad(CAST(h_digits % 10000 AS VARCHAR), 4, '0') AS d4,
            lpad(CAST(h_digits % 10000000 AS VARCHAR), 7, '0') AS d7,
            {anchor_naive} - to_microseconds(mod_before_us + created_gap_us) AS created_at,
            {anchor} - to_microseconds(mod_before_us) AS modified_at,
            {anchor_naive} - to_microseconds(mod_before_us + created_gap_us // 2) AS consent_ts
        FROM people
    )
    SELECT
        printf('C%06d', i + 1) AS customer_id,
        CASE
            WHEN h_email < 4 THEN NULL
            WHEN h_email < 5 THEN local_part || '@'
            WHEN h_email < 6 THEN local_part || domain
            WHEN h_email < 7 THEN local_part || '@@' || domain
            WHEN h_email < 8 THEN local_part || '@' || split_part(domain, '.', 1) || '..com'
            WHEN h_email < 12 THEN ' ' || upper(local_part) || '@' || domain || ' '
            ELSE local_part || '@' || domain
        END AS email,
        CASE
            WHEN h_phone < 400 THEN NULL
            WHEN h_phone < 410 THEN ({_sql_list(_PHONE_INVALID)})[CAST(1 + h_digits % {len(_PHONE_INVALID)} AS INTEGER)]
            WHEN country = 'US' THEN CASE WHEN h_phone % 2 = 0
                THEN '+1' || ({_sql_list(us_areas)})[CAST(1 + h_digits % {len(us_areas)} AS INTEGER)] || '555' || d4
                ELSE '(' || ({_sql_list(us_areas)})[CAST(1 + h_digits % {len(us_areas)} AS INTEGER)] || ') 555-' || d4 END
            WHEN country = 'GB' THEN CASE WHEN h_phone % 2 = 0
                THEN '+44 20 7946 0' || substr(d4, 2) ELSE '020 7946 0' || substr(d4, 2) END
            WHEN country = 'DE' THEN CASE WHEN h_phone % 2 = 0
                THEN '0049 30 ' || d7 ELSE '+49 30 ' || d7 END
            WHEN country = 'NL' THEN '+31 20 ' || d7
            WHEN country = 'FR' THEN '01 99 00 ' || substr(d4, 1, 2) || ' ' || substr(d4, 3, 2)
            ELSE '+61 2 5550 ' || d4
        END AS phone,
        first_name, last_name, city, country,
        CASE country
            WHEN 'US' THEN lpad(CAST(10001 + h_post % 89000 AS VARCHAR), 5, '0')
            WHEN 'GB' THEN 'SW' || CAST(1 + h_post % 20 AS VARCHAR) || ' ' || CAST(h_post % 10 AS VARCHAR) || 'AB'
            WHEN 'NL' THEN CAST(1011 + h_post % 8000 AS VARCHAR) || ' AB'
            WHEN 'AU' THEN CAST(2000 + h_post % 4000 AS VARCHAR)
            ELSE lpad(CAST(10115 + h_post % 80000 AS VARCHAR), 5, '0')
        END AS postcode,
        CASE WHEN points >= 15000 THEN 'platinum' WHEN points >= 5000 THEN 'gold'
             WHEN points >= 1000 THEN 'silver' ELSE 'bronze' END AS loyalty_tier,
        points AS loyalty_points,
        CAST(points / 10 + CAST(h_value % 10000 AS BIGINT) / 100 AS DECIMAL(12,2)) AS lifetime_value,
        CASE WHEN h_bday % 5 = 0 THEN NULL
             ELSE DATE '2026-11-01' - CAST(6570 + h_bday % 24455 AS INTEGER) END AS birthday,
        points >= 15000 OR h_value % 50 = 0 AS is_vip,
        CASE WHEN h_ec < 10 THEN ({_sql_list(_CONSENT_INVALID)})[CAST(1 + h_ec % 3 AS INTEGER)]
             WHEN h_ec < 70 THEN NULL
             ELSE ({_sql_list(consents)})[CAST(1 + h_ec % {len(consents)} AS INTEGER)] END
            AS email_consent,
        CASE WHEN h_sc < 10 THEN ({_sql_list(_CONSENT_INVALID)})[CAST(1 + h_sc % 3 AS INTEGER)]
             WHEN h_sc < 400 THEN NULL
             ELSE ({_sql_list(consents)})[CAST(1 + h_sc % {len(consents)} AS INTEGER)] END
            AS sms_consent,
        CASE WHEN h_cts % 100 = 0
                  THEN ({_sql_list(bad_ts)})[CAST(1 + h_cts // 100 % {len(bad_ts)} AS INTEGER)]
             WHEN h_cts % 4 = 0 THEN strftime(consent_ts, '%Y-%m-%dT%H:%M:%SZ')
             WHEN h_cts % 4 = 1 THEN strftime(consent_ts + INTERVAL 2 HOUR, '%Y-%m-%dT%H:%M:%S') || '+02:00'
             WHEN h_cts % 4 = 2 THEN strftime(consent_ts, '%Y-%m-%d %H:%M:%S')
             ELSE strftime(consent_ts, '%Y-%m-%d')
        END AS consent_updated_at,
        created_at,
        modified_at
    FROM shaped
    """
    con.execute(sql)
