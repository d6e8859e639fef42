"""Generating the embedded data sets: a small fictional world, three fine-tuning tasks, a shop database.

Everything here is seeded Python code: `python -m lora_lab.datagen` rewrites every file under `data/`
byte for byte (`generate_all`). Readers load those files with `lora_lab.data`; this module is how
they were made. Nothing is downloaded.

What is generated (all JSONL, one JSON object per line):

- `corpus_{train,validation,test}.jsonl`: the pretraining corpus of the tiny base model. A small
  fictional world (people, towns, rivers, jobs) told as plain facts, town descriptions and short
  stories; records whose summaries repeat the names and values they contain (so the model learns to
  copy from its context); SQL queries with `--` comments over OTHER schemas (books, students, ships,
  ...); and general chats in the chat template whose answers restate the question's entities. This is
  the structure real pretraining data has (copying, code with comments, dialogue) and it is what a
  LoRA fine-tune builds on.
- `probes_{validation,test}.jsonl`: cloze questions on facts stated in the corpus
  (`{"prompt": "Mira Vell lives in", "answer": "Ostrin"}`), to measure forgetting.
- `support_*.jsonl`: customer-service chats for one fictional shop, Lumen Lane (prices, returns,
  shipping, opening hours). Scored by whether the answer states the right fact.
- `sql_*.jsonl`: natural-language requests turned into SQL over the shop database `data/shop.sql`
  (users, products, orders). Scored by execution accuracy in sqlite3.
- `shift_*.jsonl`: translation into Kelvish, a made-up language that appears nowhere in the corpus:
  far from the pretraining domain, it needs many new facts (a lexicon) rather than a new habit.

Test items are new combinations (new customer, product and phrasing combinations, new queries, new
sentences) of things seen in training, never copies of training items.

Left out: any real-world text. The world is small on purpose: a 4 M-parameter model must be able to
learn it in minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
from pathlib import Path

from lora_lab.data import SPLITS, render_chat, shop_database, sql_shape, write_jsonl
from lora_lab.paths import data_dir

__all__ = [
    "WORLD",
    "KELVISH",
    "CATALOG",
    "CORPUS_SIZES",
    "TASK_SIZES",
    "generate_all",
    "main",
]


# ---------------------------------------------------------------------------------------------------
# The fictional world
# ---------------------------------------------------------------------------------------------------
FIRST = [
    "Mira", "Tomas", "Elin", "Joren", "Halda", "Ivo", "Sela", "Bram", "Nadia", "Oskar",
    "Perrin", "Lina", "Dario", "Fenna", "Gideon", "Ilse", "Kasper", "Runa", "Milo", "Tess",
]  # fmt: skip
LAST = ["Vell", "Arlo", "Brandt", "Corwin", "Dunmore", "Esk", "Farrow", "Galt", "Hollis", "Ives", "Kell"]
TOWNS = [
    "Ostrin", "Kavos", "Belmar", "Tirren", "Pellow", "Varna",
    "Dunhallow", "Ebbridge", "Morrow", "Skelling", "Aldenmere", "Quillby",
]  # fmt: skip
RIVERS = ["Sable", "Wend", "Corra", "Lisk", "Amber", "Tollow"]
REGIONS = ["the North Reach", "the Low Fields", "the Salt Coast", "the Green Hills"]
JOBS = ["baker", "smith", "weaver", "sailor", "miller", "teacher", "potter", "healer", "carpenter", "fisher"]
FRUITS = ["plum", "pear", "apple", "fig", "cherry", "quince", "apricot", "grape"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "grey", "brown"]
OBJECTS = ["lantern", "basket", "map", "kettle", "letter", "coat", "drum", "rope", "book", "bell"]
ANIMALS = ["fox", "heron", "goat", "owl", "otter", "horse", "crow", "hare"]
# Household goods: everyday words a real base model knows (the shop task sells some of them).
GOODS = [
    "copper kettle", "oak cutting board", "tea towel set", "wool blanket", "linen pillow", "brass lamp",
    "paper lantern", "desk lamp", "garden trowel", "watering can", "seed tray", "clay pot", "notebook",
    "fountain pen", "ink bottle", "glass jar", "bread knife", "candle holder", "picnic basket", "letter box",
    "wooden spoon", "tin cup", "rope ladder", "iron pan", "silk scarf", "leather bag",
]  # fmt: skip
# Shops of the world have their own rules; none uses the values of the task shop (Lumen Lane).
WORLD_RETURN_DAYS = [7, 10, 14, 21, 60]
WORLD_HOURS = ["8am to 5pm", "10am to 7pm", "7am to 3pm", "11am to 8pm"]
WORLD_SHIPPING = ["2 to 4 days", "4 to 6 days", "6 to 9 days", "one week"]
WORLD_BUSINESS_DAYS = ["2 to 4", "4 to 6", "5 to 8", "6 to 9", "2 to 3", "3 to 4"]
WORLD_WEEKS = ["Monday to Friday", "Tuesday to Sunday", "Tuesday to Saturday", "Wednesday to Sunday"]
# Product categories and order statuses: the shop task's values, and everyday words the corpus uses too.
CATEGORIES = ["kitchen", "garden", "lighting", "textiles", "stationery"]
STATUSES = ["pending", "shipped", "delivered", "returned"]


def _build_world(seed: int = 1234) -> dict:
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    people = {}
    for name in names[:40]:
        people[name] = {"town": rng.choice(TOWNS), "job": rng.choice(JOBS), "fruit": rng.choice(FRUITS)}
    towns = {t: {"river": rng.choice(RIVERS), "region": rng.choice(REGIONS)} for t in TOWNS}
    return {"people": people, "towns": towns, "strangers": names[40:]}


WORLD = _build_world()


def _facts() -> list[tuple[str, str, str]]:
    """(probe prompt, answer, full sentence) for every fact of the world."""
    out = []
    for p, a in WORLD["people"].items():
        out.append((f"{p} lives in", a["town"], f"{p} lives in {a['town']}."))
        out.append((f"{p} works as a", a["job"], f"{p} works as a {a['job']}."))
        out.append(
            (
                f"The favorite fruit of {p} is the",
                a["fruit"],
                f"The favorite fruit of {p} is the {a['fruit']}.",
            )
        )
    for t, a in WORLD["towns"].items():
        out.append((f"{t} lies on the river", a["river"], f"{t} lies on the river {a['river']}."))
        out.append((f"{t} is a town in", a["region"], f"{t} is a town in {a['region']}."))
    return out


def _person_sentences(p: str) -> list[str]:
    a = WORLD["people"][p]
    return [
        f"{p} lives in {a['town']}.",
        f"{p} works as a {a['job']}.",
        f"The favorite fruit of {p} is the {a['fruit']}.",
    ]


def _doc_facts(rng: random.Random) -> str:
    if rng.random() < 0.3:
        t = rng.choice(TOWNS)
        a = WORLD["towns"][t]
        residents = [p for p, q in WORLD["people"].items() if q["town"] == t]
        s = [f"{t} is a town in {a['region']}.", f"{t} lies on the river {a['river']}."]
        rng.shuffle(s)
        if residents:
            s.append(f"People who live in {t} include {', '.join(residents)}.")
            for p in rng.sample(residents, min(2, len(residents))):
                s.append(f"{p} lives in {t}.")
        return " ".join(s)
    people = rng.sample(list(WORLD["people"]), rng.randint(1, 3))
    s = []
    for p in people:
        ps = _person_sentences(p)
        rng.shuffle(ps)
        s.extend(ps)
    return " ".join(s)


def _doc_story(rng: random.Random) -> str:
    a, b = rng.sample(list(WORLD["people"]), 2)
    pa, pb = WORLD["people"][a], WORLD["people"][b]
    color, obj, animal = rng.choice(COLORS), rng.choice(OBJECTS), rng.choice(ANIMALS)
    dest = rng.choice(TOWNS)
    day = rng.choice(["One morning", "On a cold evening", "Last spring", "One rainy day", "At dawn"])
    river = WORLD["towns"][pa["town"]]["river"]
    s = [
        f"{day}, {a} left {pa['town']} with a {color} {obj}.",
        f"{a} works as a {pa['job']} and lives in {pa['town']}, on the river {river}.",
        f"On the road to {dest}, {a} met {b}, who works as a {pb['job']}.",
        f'"Where are you going with that {color} {obj}?" asked {b}.',
        f'"To {dest}," said {a}. "The {color} {obj} is a gift."',
        f"A {animal} watched them from the trees.",
        f"{b} walked with {a} as far as the river, and then went home to {pb['town']}.",
        f"In the end, {a} reached {dest} and gave the {color} {obj} away.",
    ]
    if rng.random() < 0.5:
        s.insert(
            3, f"{b} had a {pb['fruit']} in one hand, because the favorite fruit of {b} is the {pb['fruit']}."
        )
    return " ".join(s)


def _doc_record(rng: random.Random) -> str:
    """Records whose summary repeats names and numbers from the record: teaches copying from context."""
    kind = rng.randrange(4)
    who = rng.choice(list(WORLD["people"]) + WORLD["strangers"])
    t1, t2 = rng.sample(TOWNS, 2)
    n, price = rng.randint(1, 60), rng.randint(2, 99)
    color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
    if kind == 0:
        return (
            f"Ticket {rng.randint(100, 9999)}: passenger {who}, from {t1} to {t2}, seat {n}, price ${price}.\n"
            f"Summary: {who} travels from {t1} to {t2} in seat {n} and paid ${price}."
        )
    if kind == 1:
        return (
            f"Market note. Item: {color} {obj}. Seller: {who}. Price: ${price}. Count: {n}.\n"
            f"At the market in {t1}, {who} sells the {color} {obj} for ${price}. There are {n} of them."
        )
    if kind == 2:
        words = rng.sample(OBJECTS + ANIMALS + COLORS + FRUITS, 4)
        return (
            f"List: {', '.join(words)}.\nThe list again: {', '.join(words)}.\nThe first word is {words[0]}."
        )
    days = rng.randint(1, 40)
    return (
        f"Letter from {who} in {t1} to a friend in {t2}. It took {days} days to arrive.\n"
        f"{who} wrote: I will visit {t2} in {n} days and bring a {color} {obj}.\n"
        f"Note: the letter from {who} took {days} days to go from {t1} to {t2}."
    )


# --- SQL over schemas that are NOT the shop's: the corpus teaches SQL and comment -> SQL, not the task.
GENRES = ["fantasy", "history", "poetry", "travel", "science", "cooking"]
WARDS = ["north", "south", "east", "west"]
PORTS = TOWNS[:6]
GARDENS = ["rose", "herb", "stone", "water"]
SHIP_NAMES = ["Gull", "Tern", "Swift", "Marlin", "Drake", "Petrel", "Osprey", "Kestrel", "Albatross", "Wren"]
TITLES = [
    "The Silver Road", "Winter Tides", "A Map of Salt", "Songs of the Wend", "The Last Lantern",
    "Bread and Stone", "The Quiet Mill", "Letters from Kavos", "The Heron King", "Under the Bell",
    "The Amber Shore", "Small Fires", "The Potter's Year", "Rope and Sail", "Seven Pears",
]  # fmt: skip
POST_TOPICS = ["news", "trade", "travel", "weather"]
PLANTS = ["sage", "thyme", "mint", "fern", "ivy", "lily", "tulip", "moss", "daisy", "rush"]


# Each schema: the table (also the plural noun of a request), the column that names a row (its plural,
# key + "s", is a request's noun too), the columns, category filters (column, phrase with {v}, values;
# "people": a person of the world) and numeric filters (column, "more" phrase, "less" phrase, range).
def _schema(table: str, key: str, cols: str, cats: list[tuple], nums: list[tuple]) -> dict:
    return {"table": table, "key": key, "cols": cols, "cats": cats, "nums": nums}


def _join(
    link: str, a: tuple[str, str, str], b: tuple[str, str, str], phrases: tuple[str, str], values
) -> dict:
    """A many-to-many link table: `a` and `b` are (table, key, foreign key in link); `phrases` are
    (a of b, b of a) with {v}; `values` are (a's values, b's values)."""
    keys = (
        "a",
        "a_key",
        "a_fk",
        "b",
        "b_key",
        "b_fk",
        "phrase_a_of_b",
        "phrase_b_of_a",
        "a_values",
        "b_values",
    )
    return {"link": link, **dict(zip(keys, (*a, *b, *phrases, *values)))}


OTHER_SCHEMAS = [
    _schema("books", "title", "id, title, author, genre, year, pages, price, stock",
            [("author", "written by {v}", "people"), ("genre", "in the {v} genre", GENRES)],
            [("year", "published after {k}", "published before {k}", (1900, 2020)),
             ("pages", "with more than {k} pages", "with fewer than {k} pages", (80, 900)),
             ("price", "that cost more than {k} dollars", "that cost less than {k} dollars", (3, 60)),
             ("stock", "with more than {k} in stock", "with fewer than {k} in stock", (0, 50))]),
    _schema("students", "name", "id, name, town, grade, age",
            [("town", "from {v}", TOWNS), ("grade", "in grade {v}", ["1", "2", "3", "4", "5"])],
            [("age", "older than {k}", "younger than {k}", (6, 18))]),
    _schema("ships", "name", "id, name, port, tonnage, built, status",
            [("port", "based in {v}", PORTS), ("status", "with status {v}", ["docked", "sailing", "repair"])],
            [("tonnage", "heavier than {k} tons", "lighter than {k} tons", (50, 900)),
             ("built", "built after {k}", "built before {k}", (1850, 1990))]),
    _schema("patients", "name", "id, name, ward, age, city",
            [("ward", "in the {v} ward", WARDS), ("city", "who live in {v}", TOWNS)],
            [("age", "older than {k}", "younger than {k}", (1, 95))]),
    _schema("plants", "name", "id, name, color, height, garden, category",
            [("color", "with {v} flowers", COLORS), ("garden", "in the {v} garden", GARDENS),
             ("category", "in the {v} category", ["herb", "flower", "grass"])],
            [("height", "taller than {k} cm", "shorter than {k} cm", (5, 200))]),
    _schema("loans", "id", "id, student_id, book_id, days, quantity, status",
            [("status", "with status {v}", ["open", "closed", "late"])],
            [("quantity", "with a quantity above {k}", "with a quantity below {k}", (1, 5)),
             ("days", "longer than {k} days", "shorter than {k} days", (1, 30))]),
    _schema("stalls", "keeper", "id, keeper, ware, category, town, rent",
            [("category", "that sell {v} goods", CATEGORIES), ("ware", "that sell the {v}", GOODS),
             ("town", "at the market of {v}", TOWNS)],
            [("rent", "with a rent above {k} dollars", "with a rent below {k} dollars", (1, 100))]),
    _schema("parcels", "item", "id, item, town, weight, status",
            [("status", "with status {v}", ["pending", "shipped", "delivered", "returned", "lost"]),
             ("town", "sent to {v}", TOWNS)],
            [("weight", "heavier than {k} kg", "lighter than {k} kg", (0, 100))]),
    _schema("posts", "id", "id, user_id, product_id, topic, likes",
            [("topic", "about {v}", POST_TOPICS)],
            [("likes", "with more than {k} likes", "with fewer than {k} likes", (0, 100))]),
]  # fmt: skip
# Join over other tables: loans(student_id, book_id, days) ~ a many-to-many link.
OTHER_JOIN = _join("loans", ("students", "name", "student_id"), ("books", "title", "book_id"),
                   ("who borrowed {v}", "borrowed by {v}"), ("people", TITLES))  # fmt: skip

# --- The shop schema: used ONLY by the sql task, never in the corpus.
CITIES = TOWNS
# The catalog (name, category, price in dollars): the support task and the shop database share it.
CATALOG = [
    ("copper kettle", "kitchen", 34), ("oak cutting board", "kitchen", 22), ("tea towel set", "textiles", 12),
    ("wool blanket", "textiles", 58), ("linen pillow", "textiles", 27), ("brass lamp", "lighting", 64),
    ("paper lantern", "lighting", 9), ("desk lamp", "lighting", 41), ("garden trowel", "garden", 15),
    ("watering can", "garden", 19), ("seed tray", "garden", 7), ("clay pot", "garden", 11),
    ("notebook", "stationery", 6), ("fountain pen", "stationery", 45), ("ink bottle", "stationery", 8),
    ("glass jar", "kitchen", 5), ("bread knife", "kitchen", 29), ("candle holder", "lighting", 17),
    ("picnic basket", "garden", 38), ("letter box", "stationery", 52),
]  # fmt: skip
SHOP_SCHEMAS = [
    _schema("users", "name", "id, name, city, age",
            [("city", "who live in {v}", CITIES)], [("age", "older than {k}", "younger than {k}", (18, 80))]),
    _schema("products", "name", "id, name, category, price, stock",
            [("category", "in the {v} category", CATEGORIES)],
            [("price", "that cost more than {k} dollars", "that cost less than {k} dollars", (5, 65)),
             ("stock", "with more than {k} in stock", "with fewer than {k} in stock", (0, 100))]),
    _schema("orders", "id", "id, user_id, product_id, quantity, status",
            [("status", "with status {v}", STATUSES)],
            [("quantity", "with a quantity above {k}", "with a quantity below {k}", (1, 5))]),
]  # fmt: skip
SHOP_JOIN = _join("orders", ("users", "name", "user_id"), ("products", "name", "product_id"),
                  ("who ordered the {v}", "ordered by {v}"), ("customers", [c[0] for c in CATALOG]))  # fmt: skip

# Request phrasings, shared by corpus comments (lower case, as a `--` comment) and task requests.
LIST_VERBS = ["List the", "Show the", "Give me the", "What are the", "Find the"]
COUNT_VERBS = ["How many", "Count the number of", "Tell me how many"]


def _values(spec_values, rng: random.Random, customers: list[str]) -> str:
    if spec_values == "people":
        return rng.choice(list(WORLD["people"]))
    if spec_values == "customers":
        return rng.choice(customers)
    return rng.choice(spec_values)


def _sql_query(schemas: list[dict], join: dict, rng: random.Random, customers: list[str]) -> tuple[str, str]:
    """One (natural-language request, SQL) pair over the given schemas, shape chosen at random."""
    shape = rng.choice(["select", "select", "count", "num", "num", "agg", "top", "and", "join", "group"])
    s = rng.choice(schemas)
    if s["key"] == "id" and shape in ("select", "num", "and", "top"):
        shape = "count"
    t, key = s["table"], s["key"]
    noun, kn = t, f"{key}s"  # "books", "titles"
    verb = rng.choice(LIST_VERBS)
    if shape == "join":
        j = join
        if rng.random() < 0.5:
            v = _values(j["b_values"], rng, customers)
            req = f"{verb} {j['a_key']}s of the {j['a']} {j['phrase_a_of_b'].format(v=v)}."
            sql = (
                f"SELECT a.{j['a_key']} FROM {j['link']} l JOIN {j['a']} a ON l.{j['a_fk']} = a.id "
                f"JOIN {j['b']} b ON l.{j['b_fk']} = b.id WHERE b.{j['b_key']} = '{v}';"
            )
        else:
            v = _values(j["a_values"], rng, customers)
            req = f"{verb} {j['b_key']}s of the {j['b']} {j['phrase_b_of_a'].format(v=v)}."
            sql = (
                f"SELECT b.{j['b_key']} FROM {j['link']} l JOIN {j['a']} a ON l.{j['a_fk']} = a.id "
                f"JOIN {j['b']} b ON l.{j['b_fk']} = b.id WHERE a.{j['a_key']} = '{v}';"
            )
        return req, sql
    col, phrase, vals = rng.choice(s["cats"])
    v = rng.choice(list(WORLD["people"])) if vals == "people" else rng.choice(vals)
    ncol, more, less, (lo, hi) = rng.choice(s["nums"])
    k = rng.randint(lo, hi)
    op, nphrase = (">", more) if rng.random() < 0.5 else ("<", less)
    nphrase = nphrase.format(k=k)
    if shape == "select":
        return (
            f"{verb} {kn} of the {noun} {phrase.format(v=v)}.",
            f"SELECT {key} FROM {t} WHERE {col} = '{v}';",
        )
    if shape == "count":
        cv = rng.choice(COUNT_VERBS)
        return f"{cv} {noun} are {phrase.format(v=v)}?" if cv == "How many" else (
            f"{cv} {noun} {phrase.format(v=v)}."
        ), f"SELECT COUNT(*) FROM {t} WHERE {col} = '{v}';"
    if shape == "num":
        return f"{verb} {kn} of the {noun} {nphrase}.", f"SELECT {key} FROM {t} WHERE {ncol} {op} {k};"
    if shape == "and":
        return (
            f"{verb} {kn} of the {noun} {phrase.format(v=v)} and {nphrase}.",
            f"SELECT {key} FROM {t} WHERE {col} = '{v}' AND {ncol} {op} {k};",
        )
    if shape == "agg":
        fn, word = rng.choice([("AVG", "average"), ("MAX", "largest"), ("MIN", "smallest"), ("SUM", "total")])
        return (
            f"What is the {word} {ncol} of the {noun} {phrase.format(v=v)}?",
            f"SELECT {fn}({ncol}) FROM {t} WHERE {col} = '{v}';",
        )
    if shape == "top":
        n = rng.randint(1, 5)
        desc = rng.random() < 0.5
        word = {True: "highest", False: "lowest"}[desc]
        return (
            f"{verb} {kn} of the {n} {noun} with the {word} {ncol}.",
            f"SELECT {key} FROM {t} ORDER BY {ncol} {'DESC' if desc else 'ASC'} LIMIT {n};",
        )
    # group
    return f"How many {noun} are there for each {col}?", f"SELECT {col}, COUNT(*) FROM {t} GROUP BY {col};"


def _doc_shop(rng: random.Random) -> str:
    """Shops of the fictional world: prices, opening hours, returns and delivery, stated and restated."""
    owner = rng.choice(list(WORLD["people"]))
    town = WORLD["people"][owner]["town"]
    items = rng.sample(GOODS, 3)
    prices = [rng.randint(3, 90) for _ in items]
    days, hours, ship = rng.choice(WORLD_RETURN_DAYS), rng.choice(WORLD_HOURS), rng.choice(WORLD_SHIPPING)
    buyer = rng.choice(list(WORLD["people"]) + WORLD["strangers"])
    s = [
        f"The shop of {owner} in {town} sells many products.",
        " ".join(f"The {i} costs ${p}." for i, p in zip(items, prices)),
        f"The shop is open from {hours}. Customers can return an item within {days} days of delivery.",
        f"Orders from the shop of {owner} take {ship} to arrive.",
        f"Last week {buyer} ordered the {items[0]} for ${prices[0]}, and the order was shipped to "
        f"{rng.choice(TOWNS)}. The {items[0]} cost ${prices[0]}, and {buyer} paid ${prices[0]}.",
    ]
    if rng.random() < 0.5:
        s.append(
            f"Users of the shop say that {owner} is kind. The status of the order is {rng.choice(STATUSES)}."
        )
    return " ".join(s)


def _doc_trade(rng: random.Random) -> str:
    """Trade news of the world: the everyday words of online shops (users, orders, products, shipping,
    business days, refunds) with other shops' values, as a real base model has read them on the web."""
    owner = rng.choice(list(WORLD["people"]))
    town = WORLD["people"][owner]["town"]
    cat = rng.choice(CATEGORIES)
    item = rng.choice(GOODS)
    n_users, n_orders, n_products, stock = (rng.randint(0, 100) for _ in range(4))
    std, exp = rng.choice(WORLD_BUSINESS_DAYS), rng.choice(["1 to 3", "2 to 3", "next", "same"])
    cost, exp_cost, free = rng.randint(2, 9), rng.randint(10, 25), rng.choice([25, 40, 60, 75, 100])
    exp_phrase = f"{exp} day" if exp in ("next", "same") else f"{exp} business days"
    s = [
        f"The web shop of {owner} in {town} has {n_users} users and sells {n_products} products.",
        f"Most products are in the {cat} category; the {item} has {stock} in stock.",
        f"This week the users placed {n_orders} orders: some orders are pending, some were shipped, "
        f"{rng.randint(0, 100)} were delivered and {rng.randint(0, 20)} were returned.",
        f"Standard shipping takes {std} business days and costs ${cost}, free on orders over ${free}.",
        f"Express shipping takes {exp_phrase} and costs ${exp_cost}.",
        f"The shop is open from {rng.choice(WORLD_HOURS)}, {rng.choice(WORLD_WEEKS)}.",
        f"You can return any item within {rng.choice(WORLD_RETURN_DAYS)} days of delivery for a full refund.",
    ]
    first, rest = s[:3], s[3:]
    rng.shuffle(rest)
    rest = rest[: rng.randint(2, 4)]
    if rng.random() < 0.5:  # the owner's own words
        rest = [f'{owner} says: "Welcome! Our {r[4:]}"' if r.startswith("The shop") else r for r in rest]
    return " ".join(first + rest)


def _doc_sql(rng: random.Random) -> str:
    s = rng.choice(OTHER_SCHEMAS)
    if s["table"] == "posts" and rng.random() < 0.5:  # a forum's posts: foreign keys through an alias
        topic, k = rng.choice(POST_TOPICS), rng.randint(0, 100)
        return (
            "-- table posts(id, user_id, product_id, topic, likes)\n"
            f"-- list the names of the students who wrote posts about {topic}.\n"
            f"SELECT a.name FROM posts l JOIN students a ON l.user_id = a.id WHERE l.topic = '{topic}';\n"
            f"-- list the titles of the books reviewed in posts with more than {k} likes.\n"
            f"SELECT b.title FROM posts l JOIN books b ON l.product_id = b.id WHERE l.likes > {k};"
        )
    lines = [f"-- table {s['table']}({s['cols']})"] if rng.random() < 0.5 else []
    for _ in range(rng.randint(2, 4)):
        req, sql = _sql_query([s], OTHER_JOIN, rng, [])
        if "JOIN" in sql and rng.random() < 0.5:
            lines.append("-- table loans(id, student_id, book_id, days, quantity, status)")
        lines.append(f"-- {req[0].lower()}{req[1:]}")
        lines.append(sql)
    return "\n".join(lines)


def _doc_chat(rng: random.Random) -> str:
    """General chats: the answer restates the entities of the question (copying), often world facts."""
    kind = rng.randrange(9)
    p = rng.choice(list(WORLD["people"]))
    a = WORLD["people"][p]
    if kind == 0:
        q, ans = f"Where does {p} live?", f"{p} lives in {a['town']}."
    elif kind == 1:
        q, ans = f"What does {p} do for a living?", f"{p} works as a {a['job']}."
    elif kind == 2:
        t = rng.choice(TOWNS)
        q, ans = (
            f"Tell me about {t}.",
            (
                f"{t} is a town in {WORLD['towns'][t]['region']}. {t} lies on the river {WORLD['towns'][t]['river']}."
            ),
        )
    elif kind == 3:
        name = rng.choice(FIRST)
        color, obj, n = rng.choice(COLORS), rng.choice(OBJECTS), rng.randint(2, 40)
        q = f"Hi, I am {name}. I have {n} {color} {obj}s. How many {obj}s do I have?"
        ans = f"Hi {name}! You have {n} {color} {obj}s."
    elif kind == 4:
        t1, t2 = rng.sample(TOWNS, 2)
        days = rng.randint(2, 12)
        q = f"I want to travel from {t1} to {t2}. The trip takes {days} days. How long is the trip?"
        ans = f"The trip from {t1} to {t2} takes {days} days. Have a good journey!"
    elif kind == 5:
        name, item, std = rng.choice(FIRST), rng.choice(GOODS), rng.choice(WORLD_BUSINESS_DAYS)
        q = (
            f"Hi, I am {name}. Standard shipping at the shop of {p} takes {std} business days. "
            f"When will my {item} arrive?"
        )
        ans = f"Hi {name}! Standard shipping at the shop of {p} takes {std} business days."
    elif kind == 6:
        name, item, price = rng.choice(FIRST), rng.choice(GOODS), rng.randint(3, 90)
        q = f"Hi, I am {name}. The {item} at the shop of {p} costs ${price}. How much is the {item}?"
        ans = f"Hi {name}! The {item} at the shop of {p} costs ${price}. Is there anything else I can help you with?"
    elif kind == 7:
        name, item, days = rng.choice(FIRST), rng.choice(GOODS), rng.choice(WORLD_RETURN_DAYS)
        q = f"Hello, I am {name}. The shop of {p} takes returns within {days} days. Can I return the {item}?"
        ans = f"Hi {name}! You can return the {item} to the shop of {p} within {days} days of delivery."
    elif kind == 8:
        name, hours, ship = rng.choice(FIRST), rng.choice(WORLD_HOURS), rng.choice(WORLD_SHIPPING)
        q = f"Hey, I am {name}. The shop of {p} is open from {hours} and delivers in {ship}. When is it open?"
        ans = f"Hi {name}! The shop of {p} is open from {hours}. Delivery takes {ship}."
    else:
        name = rng.choice(FIRST)
        fruit, price = rng.choice(FRUITS), rng.randint(1, 30)
        q = f"Hello, my name is {name}. A basket of {fruit}s costs ${price} at the market. What does it cost?"
        ans = f"Hello {name}! A basket of {fruit}s costs ${price} at the market."
    return render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": ans}])


# The corpus mix: each document kind up to a cumulative share (facts 23%, stories 16%, records 9%, ...).
CORPUS_MIX = [
    (0.23, _doc_facts), (0.39, _doc_story), (0.48, _doc_record), (0.56, _doc_shop),
    (0.66, _doc_trade), (0.84, _doc_sql), (1.0, _doc_chat),
]  # fmt: skip


def _corpus_doc(rng: random.Random) -> str:
    r = rng.random()  # in [0, 1): the last kind always matches
    return next(doc for share, doc in CORPUS_MIX if r < share)(rng)


def _gen_corpus(seed: int, sizes: dict[str, int]) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for split, n in sizes.items():
        out[split] = [_corpus_doc(rng) for _ in range(n)]
    return out


def _gen_probes() -> dict[str, list[dict]]:
    facts = [{"prompt": p, "answer": a} for p, a, _ in _facts()]
    rng = random.Random(7)
    val = rng.sample(facts, 40)
    return {"validation": val, "test": facts}


# ---------------------------------------------------------------------------------------------------
# The shop database and the sql task
# ---------------------------------------------------------------------------------------------------
def _customers() -> list[str]:
    # Customers are people of the world plus strangers, so their names are tokens the base knows.
    return sorted(WORLD["people"])[:20] + WORLD["strangers"][:20]


def _shop_sql_text(seed: int = 99) -> str:
    rng = random.Random(seed)
    customers = _customers()
    lines = [
        # (The header names lora_lab.data, where the generators lived before; kept, so the file is unchanged.)
        "-- The Lumen Lane shop database (generated by lora_lab.data; do not edit by hand).",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, age INTEGER NOT NULL);",
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, "
        "price REAL NOT NULL, stock INTEGER NOT NULL);",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), "
        "product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL, status TEXT NOT NULL);",
    ]
    ages = rng.sample(range(18, 81), len(customers))
    for i, name in enumerate(customers, 1):
        lines.append(f"INSERT INTO users VALUES ({i}, '{name}', '{rng.choice(CITIES)}', {ages[i - 1]});")
    stocks = rng.sample(range(0, 101), len(CATALOG))
    for i, (name, cat, price) in enumerate(CATALOG, 1):
        lines.append(f"INSERT INTO products VALUES ({i}, '{name}', '{cat}', {price}, {stocks[i - 1]});")
    for i in range(1, 161):
        u, p = rng.randint(1, len(customers)), rng.randint(1, len(CATALOG))
        lines.append(
            f"INSERT INTO orders VALUES ({i}, {u}, {p}, {rng.randint(1, 5)}, '{rng.choice(STATUSES)}');"
        )
    return "\n".join(lines) + "\n"


# The share of each shape's distinct queries held out for the test and validation splits. Some shapes
# have few distinct queries (3 GROUP BY queries, 17 plain selects over the shop), so the held-out share
# is set per shape: train keeps most of every shape, and test still meets each shape with new values.
SQL_HOLDOUT = {"test": 0.25, "validation": 0.15}
SQL_POOL_DRAWS = 40_000


def _gen_sql_task(seed: int, sizes: dict[str, int], db: sqlite3.Connection) -> dict[str, list[dict]]:
    """The sql task's splits, with no query in two splits and every request shape in every split.

    1. Draw the generator many times and keep each distinct query whose answer is not empty (an empty
       answer tells a right query from a wrong one poorly), grouped by shape.
    2. Deal each shape's queries out: a quarter to test, 15% to validation (at least one each when the
       shape has three or more), the rest to train.
    3. Fill each split in the generator's own mix of shapes, drawing only that split's queries.
       Test and validation hold each query once; train may repeat a query with other wording (as in
       "List the names..." and "Show the names..."), up to the split's size.

    An earlier version filled test first and train from what was left: the shapes with few distinct
    queries (selects, counts, top-n, joins, GROUP BY) were used up by test and validation, the train
    split had 0 selects and 1 top-n query, and no fine-tune could learn them.
    """
    rng = random.Random(seed)
    customers = _customers()
    by_shape: dict[str, list[str]] = {}  # shape -> distinct queries, in the order first drawn
    seen: set[str] = set()
    for _ in range(SQL_POOL_DRAWS):
        _, sql = _sql_query(SHOP_SCHEMAS, SHOP_JOIN, rng, customers)
        if sql in seen:
            continue
        seen.add(sql)
        rows = db.execute(sql).fetchall()
        if rows and rows != [(0,)] and rows != [(None,)]:
            by_shape.setdefault(sql_shape(sql), []).append(sql)
    split_of: dict[str, str] = {}
    for shape in sorted(by_shape):
        queries = by_shape[shape]
        rng.shuffle(queries)
        n = len(queries)
        held = {s: max(1, round(n * f)) if n >= 3 else 0 for s, f in SQL_HOLDOUT.items()}
        cut_val = held["test"] + held["validation"]
        for i, sql in enumerate(queries):
            split_of[sql] = "test" if i < held["test"] else "validation" if i < cut_val else "train"
    out: dict[str, list[dict]] = {}
    for split in ("test", "validation", "train"):
        items: list[dict] = []
        used: set[str] = set()  # queries (test, validation) or (request, query) pairs (train) taken
        while len(items) < sizes[split]:
            req, sql = _sql_query(SHOP_SCHEMAS, SHOP_JOIN, rng, customers)
            key = req + sql if split == "train" else sql
            if split_of.get(sql) != split or key in used:
                continue
            used.add(key)
            items.append(
                {
                    "messages": [{"role": "user", "content": req}, {"role": "assistant", "content": sql}],
                    "sql": sql,
                }
            )
        out[split] = items
    return out


# ---------------------------------------------------------------------------------------------------
# The support task
# ---------------------------------------------------------------------------------------------------
POLICY = {
    "returns": "You can return any item within 30 days of delivery for a full refund.",
    "standard": "Standard shipping takes 3 to 5 business days and costs $5, free on orders over $50.",
    "express": "Express shipping takes 1 to 2 business days and costs $12.",
    "hours": "Our shop is open from 9am to 6pm, Monday to Saturday.",
}
SUPPORT_QUESTIONS = {
    "price": [
        "How much does the {product} cost?", "What is the price of the {product}?",
        "How much is the {product}?", "Could you tell me the price of the {product}?",
        "I would like to buy the {product}. What does it cost?",
    ],
    "returns": [
        "Can I return the {product} I bought?", "What is your return policy for the {product}?",
        "The {product} I got is not what I wanted. Can I send it back?", "How long do I have to return the {product}?",
    ],
    "standard": [
        "How long does standard shipping take for the {product}?", "How much is shipping for the {product}?",
        "What does normal delivery of the {product} cost?", "When will my {product} arrive with standard shipping?",
    ],
    "express": [
        "Do you have express shipping for the {product}?", "How fast is express delivery for the {product}?",
        "I need the {product} quickly. What are my options?", "What does express shipping cost for the {product}?",
    ],
    "hours": [
        "When is your shop open? I want to pick up the {product}.", "What are your opening hours?",
        "Can I visit the shop today to see the {product}?", "What time do you close?",
    ],
}  # fmt: skip
# The fact an answer must state to score as correct, per question kind.
SUPPORT_KEYS = {
    "returns": ["30 days"],
    "standard": ["3 to 5 business days"],
    "express": ["1 to 2 business days"],
    "hours": ["9am to 6pm"],
}
GREETINGS = ["Hi", "Hello", "Good morning", "Hey"]


def _support_answer(kind: str, name: str, product: str, price: int) -> str:
    if kind == "price":
        fact = f"The {product} costs ${price}."
    else:
        fact = POLICY[kind]
    return f"Hi {name}! {fact} Is there anything else I can help you with?"


def _gen_support_task(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    names = FIRST + [p.split()[0] for p in WORLD["strangers"][:10]]
    names = sorted(set(names))
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    kinds = ["price", "price", "price", "returns", "standard", "express", "hours"]
    for split in ("test", "validation", "train"):
        items: list[dict] = []
        while len(items) < sizes[split]:
            kind = rng.choice(kinds)
            product, _, price = rng.choice(CATALOG)
            name = rng.choice(names)
            q = rng.choice(SUPPORT_QUESTIONS[kind]).format(product=product)
            user = f"{rng.choice(GREETINGS)}, I am {name}. {q}"
            if user in seen:
                continue
            seen.add(user)
            keys = [f"${price}"] if kind == "price" else SUPPORT_KEYS[kind]
            items.append(
                {
                    "messages": [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": _support_answer(kind, name, product, price)},
                    ],
                    "kind": kind,
                    "product": product,
                    "customer": name,
                    "keys": keys,
                }
            )
        out[split] = items
    return out


# ---------------------------------------------------------------------------------------------------
# The shift task: translation into Kelvish, a made-up language with its own words and word order
# ---------------------------------------------------------------------------------------------------
SHIFT_ADJ = [
    "big", "small", "old", "young", "quick", "slow", "happy", "sad",
    "brave", "quiet", "loud", "tired", "hungry", "clever", "proud", "lazy",
]  # fmt: skip
SHIFT_NOUN = [
    "dog", "cat", "bird", "child", "woman", "man", "king", "farmer", "wolf", "bear",
    "fish", "queen", "boy", "girl", "mouse", "frog", "snake", "lion", "duck", "sheep",
]  # fmt: skip
SHIFT_VERB = [
    "runs", "sleeps", "sings", "eats", "jumps", "swims", "laughs", "waits",
    "cries", "dances", "falls", "hides", "climbs", "reads", "shouts", "smiles",
]  # fmt: skip


def _kelvish_lexicon(seed: int = 31) -> dict[str, str]:
    rng = random.Random(seed)
    cons, vows = "zkxqvjtrmnsgh", "aeiouy"
    words = SHIFT_ADJ + SHIFT_NOUN + SHIFT_VERB
    lex: dict[str, str] = {}
    used: set[str] = set()
    for w in words:
        while True:
            n = rng.choice([2, 2, 3])
            k = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(n))
            if rng.random() < 0.5:
                k += rng.choice("kxzq")
            if k not in used:
                break
        used.add(k)
        lex[w] = k
    return lex


KELVISH = _kelvish_lexicon()


def _gen_shift_task(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in ("test", "validation", "train"):
        items: list[dict] = []
        while len(items) < sizes[split]:
            adj, noun, verb = rng.choice(SHIFT_ADJ), rng.choice(SHIFT_NOUN), rng.choice(SHIFT_VERB)
            src = f"the {adj} {noun} {verb}"
            if src in seen:
                continue
            seen.add(src)
            # Kelvish order: verb, noun, adjective (no article).
            tgt = f"{KELVISH[verb]} {KELVISH[noun]} {KELVISH[adj]}"
            items.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Translate to Kelvish: {src}"},
                        {"role": "assistant", "content": tgt},
                    ],
                    "answer": tgt,
                }
            )
        out[split] = items
    return out


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
CORPUS_SIZES = {"train": 25000, "validation": 500, "test": 500}
TASK_SIZES = {"train": 2000, "validation": 200, "test": 200}


def generate_all(out_dir: str | Path | None = None, corpus_sizes: dict[str, int] | None = None) -> list[Path]:
    """Write every data file into `out_dir` (default `data/`); returns the paths written. Deterministic."""
    out = Path(out_dir) if out_dir is not None else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    shop = out / "shop.sql"
    shop.write_text(_shop_sql_text())
    written.append(shop)
    db = shop_database(shop)
    corpus = _gen_corpus(seed=1, sizes=corpus_sizes or CORPUS_SIZES)
    for split, docs in corpus.items():
        p = out / f"corpus_{split}.jsonl"
        write_jsonl(p, [{"text": d} for d in docs])
        written.append(p)
    for split, rows in _gen_probes().items():
        p = out / f"probes_{split}.jsonl"
        write_jsonl(p, rows)
        written.append(p)
    tasks = {
        "support": _gen_support_task(seed=2, sizes=TASK_SIZES),
        "sql": _gen_sql_task(seed=3, sizes=TASK_SIZES, db=db),
        "shift": _gen_shift_task(seed=4, sizes=TASK_SIZES),
    }
    for name, splits in tasks.items():
        for split in SPLITS:
            p = out / f"{name}_{split}.jsonl"
            write_jsonl(p, splits[split])
            written.append(p)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Regenerate LoRA Lab's data sets (deterministic).")
    ap.add_argument("--out", default=None, help="output folder (default: data/)")
    args = ap.parse_args(argv)
    for p in generate_all(args.out):
        print(f"wrote {p} ({p.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
