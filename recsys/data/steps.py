"""The preparation as relational steps, written once in SQL that DuckDB and Spark both run.

An engine (``recsys.data.engine`` for DuckDB, ``recsys.data.spark_engine`` for Spark) registers
the source as a relation ``raw`` (and ``raw_test`` for ``data.split=given``) with the columns
``user_id``, ``item_id`` (BIGINT or STRING), optional ``timestamp`` (BIGINT seconds or DOUBLE),
``weight``, ``rating`` (DOUBLE), and ``_file``, ``_row`` (where each row comes from, for
messages), then runs ``Steps.tables()`` in order (each ``CREATE``-d as a table: the engine
materialises it, spilling to disk under its memory limit) and reads the outputs of
``Steps.outputs()``. Only the few constructs whose spelling differs (hex to integer, integer
division) come from a ``Dialect``; everything else is the same text on both engines.

What the steps compute (``recsys.data.prepare`` documents the layout):

1. ``clean``: rows with both ids (null ids counted), ``rating >= data.min_rating`` (others counted).
2. ``pairs`` (and ``pairs_test``): ``data.duplicates=drop`` keeps one row per (user, item): the
   earliest timestamp (ties: the smallest weight); ``keep`` keeps all; ``error`` refuses repeats.
3. ``split``: ``is_test`` per row. ``random``: each user's rows ordered by the seeded
   ``split_key`` (``recsys.data.hashing``: integer arithmetic on the ids, identical on every
   engine and at every size), the first floor(n * test_fraction) are test. ``temporal``: the
   rows ordered by (timestamp, user, item, weight), the last n - round(n * (1 - test_fraction))
   are test. ``given``: the test relation.
4. ``train``: the training rows with ``valid`` (the same per-user rule with seed + 1 and
   ``data.valid_fraction``).
5. ``users`` / ``items``: every id of the training split with its ``row`` and training count:
   ``vocab`` numbers them by descending count then raw id (the hot rows first), ``identity``
   keeps the id, ``hash`` hashes it (``hash_row``).
6. ``test``: the test rows whose user and item have a row (the others counted as unseen).
7. Outputs: ``train_rows`` (user, item rows[, valid][, timestamp][, weight], ordered by
   ``split_key`` of the rows: a seeded shuffle, so the streaming loader reads mixed row groups),
   ``test_rows``, the vocabularies, and the per-row counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from recsys.data.hashing import P, seed_term


@dataclass(frozen=True)
class Dialect:
    """What the engines spell differently."""

    name: str

    def hex60(self, hex_text: str) -> str:
        """The integer of the first 15 hex digits of a hex string (60 bits)."""
        if self.name == "spark":
            return f"CAST(conv(substr({hex_text}, 1, 15), 16, 10) AS BIGINT)"
        return f"CAST(('0x' || substr({hex_text}, 1, 15)) AS BIGINT)"

    def idiv(self, a: str, b: str) -> str:
        return f"(({a}) div ({b}))" if self.name == "spark" else f"(({a}) // ({b}))"

    def source_columns(self, columns: Dict[str, str], kinds: Dict[str, str], keep: List[str]) -> List[str]:
        """The select list that reads a source's files as the steps' ``raw`` columns: `columns` maps
        each role to the files' column, `kinds` gives its kind (ids ``int`` / ``str``; timestamp
        ``int``, ``float`` or ``time``: dates and timestamps as whole UTC seconds, floored)."""
        spark = self.name == "spark"
        select = []
        for role in keep:
            col, kind = (f"`{columns[role]}`" if spark else f'"{columns[role]}"'), kinds[role]
            if role in ("user_id", "item_id"):
                text = "STRING" if spark else "VARCHAR"
                select.append(f"CAST({col} AS {'BIGINT' if kind == 'int' else text}) AS {role}")
            elif role == "timestamp" and kind == "time":
                seconds = (f"floor(unix_micros(CAST({col} AS TIMESTAMP)) / 1000000)" if spark
                           else f"floor(epoch({col}))")
                select.append(f"CAST({seconds} AS BIGINT) AS timestamp")
            else:
                sql_type = {"int": "BIGINT", "text": "STRING" if spark else "VARCHAR"}.get(kind, "DOUBLE")
                select.append(f"CAST({col} AS {sql_type}) AS {role}")
        return select


DUCKDB, SPARK = Dialect("duckdb"), Dialect("spark")


def _mix(x: str) -> str:
    return f"(((({x}) % {P}) * (({x}) % {P})) % {P} * 1103515245 + 12345) % {P}"


def _residue(x: str) -> str:
    return f"(((({x}) % {P}) + {P}) % {P})"


@dataclass(frozen=True)
class Options:
    """What the steps need to know of the configuration and the source."""

    string_users: bool
    string_items: bool
    timestamp: bool
    weight: bool
    split: str  # random | temporal | given
    test_fraction: float
    valid_fraction: float
    duplicates: str  # drop | keep | error
    id_mapping: str  # vocab | identity | hash
    num_users: int
    num_items: int
    seed: int
    min_rating: Optional[float] = None
    rating: bool = False
    item_features: int = 0
    """Feature columns of data.item_features (0: none); the staged relation ``item_feat_raw``."""
    item_feature_buckets: int = 0
    """0: a vocabulary of each column's values; N: values hashed into N rows."""
    user_features: int = 0
    user_feature_buckets: int = 0
    min_count: int = 1
    oov_buckets: int = 0
    """> 0: items with fewer than min_count training interactions (and no features) share this
    many hashed rows after the others; unseen test items are hashed into them too."""

    def features(self, role: str) -> int:
        return self.item_features if role == "item" else self.user_features

    def feature_buckets(self, role: str) -> int:
        return self.item_feature_buckets if role == "item" else self.user_feature_buckets


class Steps:
    """The SQL of each step for one configuration and dialect (module docstring)."""

    def __init__(self, o: Options, dialect: Dialect) -> None:
        self.o, self.d = o, dialect

    # -- expressions ---------------------------------------------------------------------------

    def code(self, column: str, string: bool) -> str:
        """The integer code of a raw id column (``recsys.data.hashing.id_codes``)."""
        return self.d.hex60(f"md5({column})") if string else column

    def split_key(self, user_code: str, item_code: str, seed: int) -> str:
        """``recsys.data.hashing.split_key`` in SQL."""
        return _mix(_mix(_mix(f"{_residue(user_code)} + {seed_term(seed, 0)}") + f" + {_residue(item_code)}"))

    def cold_key(self, code: str) -> str:
        """``recsys.data.hashing.cold_item_key`` in SQL."""
        return _mix(_mix(f"{_residue(code)} + {seed_term(self.o.seed, 3)}"))

    def hash_row(self, code: str, num_rows: int) -> str:
        """``recsys.data.hashing.rows_from_codes`` in SQL."""
        r = _residue(code)
        # floor(code / P) without code - r (which overflows at the smallest int64): truncated
        # division, one less for a negative remainder
        q = _residue(f"({self.d.idiv(code, str(P))} - CASE WHEN ({code}) % {P} < 0 THEN 1 ELSE 0 END)")
        hi = _mix(_mix(f"{r} + {seed_term(self.o.seed, 1)}") + f" + {q}")
        lo = _mix(_mix(f"{q} + {seed_term(self.o.seed, 2)}") + f" + {r}")
        return f"((({hi}) * {P} + ({lo})) % {num_rows})"

    def _raw_key(self, seed: int) -> str:
        return self.split_key(self.code("user_id", self.o.string_users), self.code("item_id", self.o.string_items), seed)

    @property
    def extras(self) -> List[str]:
        return [c for c, on in (("timestamp", self.o.timestamp), ("weight", self.o.weight)) if on]

    def _ties(self) -> str:
        """The order that settles ties between rows of one pair (deterministic on every engine: a
        missing timestamp or weight sorts last on both, whose defaults differ)."""
        return "".join(f", {c} ASC NULLS LAST" for c in self.extras)

    # -- source checks and counts ---------------------------------------------------------------

    def clean_filter(self) -> str:
        rating = f" AND rating >= CAST({self.o.min_rating!r} AS DOUBLE)" if self.o.rating and self.o.min_rating is not None else ""
        return f"user_id IS NOT NULL AND item_id IS NOT NULL{rating}"

    def raw_counts(self, relation: str = "raw") -> str:
        """(rows, rows with a null id, rows with ids but below min_rating)."""
        below = "0"
        if self.o.rating and self.o.min_rating is not None:
            below = (f"sum(CASE WHEN user_id IS NOT NULL AND item_id IS NOT NULL AND (rating IS NULL OR "
                     f"rating < CAST({self.o.min_rating!r} AS DOUBLE)) THEN 1 ELSE 0 END)")
        return (f"SELECT count(*) AS rows_, sum(CASE WHEN user_id IS NULL OR item_id IS NULL THEN 1 ELSE 0 END) "
                f"AS nulls, {below} AS below FROM {relation}")

    def first_null(self, relation: str = "raw") -> str:
        return (f"SELECT _file, _row, user_id IS NULL AS user_null FROM {relation} "
                "WHERE user_id IS NULL OR item_id IS NULL ORDER BY _file, _row LIMIT 1")

    def nulls_in_file(self, relation: str, file: str) -> str:
        return (f"SELECT count(*) FROM {relation} WHERE _file = {sql_string(file)} AND "
                "(user_id IS NULL OR item_id IS NULL)")

    def first_out_of_range(self, relation: str = "raw") -> str:
        """The first row (file order) whose identity id is out of [0, N), and the count in its file."""
        bad = (f"(user_id < 0 OR user_id >= {self.o.num_users} OR item_id < 0 OR item_id >= {self.o.num_items})")
        return (f"SELECT _file, _row, user_id, item_id, (user_id < 0 OR user_id >= {self.o.num_users}) AS user_bad "
                f"FROM {relation} WHERE {bad} ORDER BY _file, _row LIMIT 1")

    def out_of_range_in_file(self, relation: str, file: str, user: bool) -> str:
        col, n = ("user_id", self.o.num_users) if user else ("item_id", self.o.num_items)
        return f"SELECT count(*) FROM {relation} WHERE _file = {sql_string(file)} AND ({col} < 0 OR {col} >= {n})"

    # -- the steps ------------------------------------------------------------------------------

    def _dedup(self, source: str) -> str:
        cols = ", ".join(["user_id", "item_id", *self.extras])
        clean = f"(SELECT {cols} FROM {source} WHERE {self.clean_filter()})"
        if self.o.duplicates != "drop":
            return f"SELECT {cols} FROM {clean} c"
        if not self.o.weight:  # one hash aggregate: the earliest timestamp of each pair
            ts = ", min(timestamp) AS timestamp" if self.o.timestamp else ""
            return f"SELECT user_id, item_id{ts} FROM {clean} c GROUP BY user_id, item_id"
        order = "timestamp ASC NULLS LAST, weight ASC NULLS LAST" if self.o.timestamp else "weight ASC NULLS LAST"
        return (f"SELECT {cols} FROM (SELECT {cols}, row_number() OVER (PARTITION BY user_id, item_id ORDER BY "
                f"{order}) AS _n FROM {clean} c) d WHERE _n = 1")

    def repeats(self, relation: str) -> str:
        """(rows, distinct pairs) of a clean relation (the repeats: their difference)."""
        return (f"SELECT (SELECT count(*) FROM {relation} WHERE {self.clean_filter()}) AS n, "
                f"(SELECT count(*) FROM (SELECT user_id, item_id FROM {relation} WHERE {self.clean_filter()} "
                "GROUP BY user_id, item_id) g) AS pairs")

    def first_repeat(self, relation: str) -> str:
        """The first row (file order) that repeats an earlier (user, item) pair."""
        return (f"SELECT user_id, item_id FROM (SELECT user_id, item_id, _file, _row, row_number() OVER (PARTITION BY "
                f"user_id, item_id ORDER BY _file, _row) AS _n FROM {relation} WHERE {self.clean_filter()}) r "
                "WHERE _n = 2 ORDER BY _file, _row LIMIT 1")

    def _holdout(self, relation: str, fraction: float, seed: int, flag: str) -> str:
        """Per-user random holdout: `flag` is true for the floor(n * fraction) rows of each user
        that come first in split_key order (ties: item, then timestamp and weight). The key is a
        column of a subquery: one sort key computed once per row."""
        cols = ", ".join(["user_id", "item_id", *self.extras])
        return (f"SELECT {cols}, row_number() OVER (PARTITION BY user_id ORDER BY _k, item_id{self._ties()}) <= "
                f"floor(count(*) OVER (PARTITION BY user_id) * CAST({fraction!r} AS DOUBLE)) AS {flag} "
                f"FROM (SELECT {cols}, {self._raw_key(seed)} AS _k FROM {relation} h) k")

    def _temporal(self, relation: str, train_rows: int) -> str:
        """Global time cut-off: the first `train_rows` rows by (timestamp, user, item, weight) train."""
        cols = ", ".join(f"p.{c}" for c in ["user_id", "item_id", *self.extras])
        weight = ", p.weight ASC NULLS LAST" if self.o.weight else ""
        return (f"SELECT {cols}, c._before + row_number() OVER (PARTITION BY p.timestamp ORDER BY p.user_id, p.item_id"
                f"{weight}) > {train_rows} AS is_test FROM {relation} p JOIN (SELECT timestamp, sum(_c) OVER (ORDER BY "
                "timestamp ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) - _c AS _before FROM (SELECT timestamp, "
                f"count(*) AS _c FROM {relation} GROUP BY timestamp) t) c ON p.timestamp = c.timestamp")

    def _vocab(self, role: str) -> str:
        col, n = ("user_id", self.o.num_users) if role == "user" else ("item_id", self.o.num_items)
        string = self.o.string_users if role == "user" else self.o.string_items
        counts = f"SELECT {col}, count(*) AS n FROM train GROUP BY {col}"
        if self.o.features(role):  # the feature file's ids without a training interaction get rows too (n = 0)
            in_range = f" AND {col} >= 0 AND {col} < {n}" if self.o.id_mapping == "identity" else ""
            counts = (f"SELECT {col}, CAST(sum(n) AS BIGINT) AS n FROM ({counts} UNION ALL SELECT DISTINCT {col}, "
                      f"CAST(0 AS BIGINT) AS n FROM {role}_feat_raw WHERE {col} IS NOT NULL{in_range}) a GROUP BY {col}")
        if self.o.id_mapping == "vocab" and self.o.oov_buckets and role == "item":
            # own rows for the frequent ids (and those with features, or only features); the rare ones
            # hashed into the OOV rows that follow them
            featured, fjoin = "false", ""
            if self.o.features(role):
                featured = "f._fid IS NOT NULL"
                fjoin = f" LEFT JOIN (SELECT DISTINCT {col} AS _fid FROM {role}_feat_raw) f ON c.{col} = f._fid"
            own = f"(c.n >= {self.o.min_count} OR c.n = 0 OR {featured})"
            hashed = self.hash_row(self.code(f"c.{col}", string), self.o.oov_buckets)
            return (f"SELECT {col}, CAST(CASE WHEN _own THEN row_number() OVER (PARTITION BY _own ORDER BY n DESC, {col}) "
                    f"- 1 ELSE sum(CASE WHEN _own THEN 1 ELSE 0 END) OVER () + _h END AS BIGINT) AS row, n, NOT _own AS oov "
                    f"FROM (SELECT c.{col}, c.n, {own} AS _own, {hashed} AS _h FROM ({counts}) c{fjoin}) o")
        if self.o.id_mapping == "vocab":
            return f"SELECT {col}, CAST(row_number() OVER (ORDER BY n DESC, {col}) - 1 AS BIGINT) AS row, n FROM ({counts}) c"
        if self.o.id_mapping == "identity":
            return f"SELECT {col}, CAST({col} AS BIGINT) AS row, n FROM ({counts}) c"
        return f"SELECT {col}, CAST({self.hash_row(self.code(col, string), n)} AS BIGINT) AS row, n FROM ({counts}) c"

    def tables(self, train_rows: Optional[int] = None) -> List[Tuple[str, ...]]:
        """(name, SQL[, "view"]) of each table (or view: no need to materialise) to create, in order. ``split=temporal`` needs `train_rows`:
        round(len(pairs) * (1 - test_fraction)), known after ``pairs`` (``tables_before_split``)."""
        o = self.o
        out = []
        if o.split == "given":
            cols = ", ".join(["user_id", "item_id", *self.extras])
            out += [("pairs", self._dedup("raw")), ("pairs_test", self._dedup("raw_test")),
                    ("split", f"SELECT {cols}, false AS is_test FROM pairs UNION ALL SELECT {cols}, true AS is_test "
                              "FROM pairs_test")]
        elif o.split == "random":  # the holdout straight from the repeats' aggregate: one table less
            out += [("split", self._holdout(f"({self._dedup('raw')})", o.test_fraction, o.seed, "is_test"))]
        elif o.split == "cold_items":  # a seeded share of the items, with all their interactions
            cols = ", ".join(["user_id", "item_id", *self.extras])
            out += [("pairs", self._dedup("raw")),
                    ("split", f"SELECT {cols}, {self.cold_key(self.code('item_id', o.string_items))} < "
                              f"{int(o.test_fraction * P)} AS is_test FROM pairs")]
        else:
            out += [("pairs", self._dedup("raw")), ("split", self._temporal("pairs", train_rows))]
        cols = ", ".join(["user_id", "item_id", *self.extras])
        fit = f"SELECT {cols} FROM split WHERE NOT is_test"
        if o.valid_fraction > 0:
            out.append(("train", self._holdout(f"({fit})", o.valid_fraction, o.seed + 1, "valid")))
        else:
            out.append(("train", f"SELECT {cols}, false AS valid FROM split WHERE NOT is_test", "view"))
        out += [("users", self._vocab("user")), ("items", self._vocab("item")), ("test_mapped", self._test_mapped())]
        return out

    def oov_base(self, role: str) -> str:
        """SQL of the first OOV row of `role` (the number of ids with a row of their own)."""
        return f"SELECT count(*) AS b FROM {'users' if role == 'user' else 'items'} WHERE NOT oov"
    # OOV rows are the items' only: a user row is also an evaluated entity (its training items
    # masked, its test items relevant), which rows shared by users would merge.

    def _test_mapped(self) -> str:
        """The test rows with their user and item rows (NULL: no row, the row is dropped); with OOV
        rows, an id unseen in training is hashed into them (``user_new`` / ``item_new`` say which)."""
        urow, irow, bases = "u.row", "i.row", ""
        if self.o.oov_buckets:
            irow = (f"COALESCE(i.row, ib.b + {self.hash_row(self.code('t.item_id', self.o.string_items), self.o.oov_buckets)})")
            bases = f" CROSS JOIN ({self.oov_base('item')}) ib"
        # item_n: the training interactions of the item's ROW (hashed and OOV rows hold several
        # ids); 0: a row without any, whose vector comes from features alone (a cold item)
        return (f"SELECT t.user_id, t.item_id, CAST({urow} AS BIGINT) AS user_row, CAST({irow} AS BIGINT) AS item_row, "
                "u.row IS NULL AS user_new, i.row IS NULL AS item_new, rn._n AS item_n FROM split t LEFT JOIN users u ON "
                f"t.user_id = u.user_id LEFT JOIN items i ON t.item_id = i.item_id{bases} LEFT JOIN (SELECT row AS _r, "
                f"sum(n) AS _n FROM items GROUP BY row) rn ON rn._r = {irow} WHERE t.is_test")

    def num_rows(self, role: str) -> str:
        """The number of table rows of `role` (vocab): its ids, or its own ids plus the OOV rows."""
        table = "users" if role == "user" else "items"
        if self.o.oov_buckets and role == "item":
            return f"SELECT count(*) + {self.o.oov_buckets} FROM {table} WHERE NOT oov"
        return f"SELECT count(*) FROM {table}"

    def oov_counts(self, role: str) -> str:
        """(rare ids sent to the OOV rows, their training interactions, unseen test ids' rows hashed into them)."""
        table, new = ("users", "user_new") if role == "user" else ("items", "item_new")
        return (f"SELECT (SELECT count(*) FROM {table} WHERE oov), (SELECT sum(n) FROM {table} WHERE oov), "
                f"(SELECT count(*) FROM test_mapped WHERE {new})")

    # -- outputs --------------------------------------------------------------------------------

    def _rows(self, alias: str) -> str:
        """FROM clause and (user, item) row expressions of the training rows: vocab rows come from a
        join with the vocabularies; identity and hashed rows are functions of the id (no join)."""
        if self.o.id_mapping == "vocab":
            return (f"train {alias} JOIN users u ON {alias}.user_id = u.user_id JOIN items i ON {alias}.item_id = "
                    "i.item_id"), "u.row", "i.row"
        if self.o.id_mapping == "identity":
            return f"train {alias}", f"{alias}.user_id", f"{alias}.item_id"
        return (f"train {alias}", self.hash_row(self.code(f"{alias}.user_id", self.o.string_users), self.o.num_users),
                self.hash_row(self.code(f"{alias}.item_id", self.o.string_items), self.o.num_items))

    def train_rows(self) -> str:
        extras = "".join(f", t.{c}" for c in self.extras)
        valid = ", t.valid" if self.o.valid_fraction > 0 else ""
        cols = "user, item" + valid.replace("t.", "") + extras.replace("t.", "")
        source, user, item = self._rows("t")
        key = self.split_key("user", "item", self.o.seed + 2)
        return (f"SELECT {cols} FROM (SELECT *, {key} AS _k FROM (SELECT CAST({user} AS BIGINT) AS user, "
                f"CAST({item} AS BIGINT) AS item{valid}{extras} FROM {source}) r) e ORDER BY _k, "
                + ", ".join(f"{c} ASC NULLS LAST" for c in cols.split(", ")))

    def test_rows(self) -> str:
        return ("SELECT user_row AS user, item_row AS item FROM test_mapped WHERE user_row IS NOT NULL AND item_row IS "
                "NOT NULL ORDER BY user, item")

    def unseen(self) -> str:
        """(test rows, without a user row, with a user row and without an item row): the dropped ones."""
        return ("SELECT count(*) AS n, sum(CASE WHEN user_row IS NULL THEN 1 ELSE 0 END) AS users, "
                "sum(CASE WHEN user_row IS NOT NULL AND item_row IS NULL THEN 1 ELSE 0 END) AS items FROM test_mapped")

    def first_unseen(self, role: str) -> str:
        """The distinct unseen test ids of a role: how many, and the smallest."""
        col, other = ("user_id", "") if role == "user" else ("item_id", " AND t.user_id IN (SELECT user_id FROM users)")
        vocab = "users" if role == "user" else "items"
        return (f"SELECT count(DISTINCT t.{col}), min(t.{col}) FROM split t WHERE t.is_test AND t.{col} NOT IN "
                f"(SELECT {col} FROM {vocab}){other}")

    def vocab_rows(self, role: str) -> str:
        col = "user_id" if role == "user" else "item_id"
        table = "users" if role == "user" else "items"
        if self.o.id_mapping == "hash" or self.o.oov_buckets and role == "item":  # rows shared: each id with its row
            return f"SELECT {col}, row FROM {table} ORDER BY row, {col}"
        return f"SELECT {col} FROM {table} ORDER BY row"

    def collisions(self, role: str) -> str:
        """distinct ids, rows used, ids sharing a row (``collision_stats``)."""
        table = "users" if role == "user" else "items"
        return (f"SELECT sum(k) AS ids, count(*) AS rows_used, sum(CASE WHEN k > 1 THEN k ELSE 0 END) AS sharing "
                f"FROM (SELECT row, count(*) AS k FROM {table} GROUP BY row) g")

    def counts(self) -> List[Tuple[str, str, str]]:
        """(file name, role, SQL of (row, count)) of each per-row count written as ``<name>.npy``."""
        source, user, item = self._rows("t")
        out = [("user_counts", "user", "SELECT row, sum(n) FROM users GROUP BY row"),
               ("item_counts_all", "item", "SELECT row, sum(n) FROM items GROUP BY row")]
        if self.o.valid_fraction > 0:  # else: item_counts = item_counts_all, no validation rows
            out += [("item_counts", "item", f"SELECT {item} AS r, count(*) FROM {source} WHERE NOT t.valid GROUP BY r"),
                    ("valid_user_counts", "user", f"SELECT {user} AS r, count(*) FROM {source} WHERE t.valid GROUP BY r")]
        out.append(("test_user_counts", "user", "SELECT user_row, count(*) FROM test_mapped WHERE user_row IS NOT NULL "
                    "AND item_row IS NOT NULL GROUP BY user_row"))
        # test rows of known users whose item has no row (no vector): misses of the figure over all test rows
        out.append(("test_missing_user_counts", "user", "SELECT user_row, count(*) FROM test_mapped WHERE user_row IS "
                    "NOT NULL AND item_row IS NULL GROUP BY user_row"))
        if self.o.item_features:  # test rows of items without a training interaction (vectors from features)
            out.append(("test_cold_user_counts", "user", "SELECT user_row, count(*) FROM test_mapped WHERE user_row IS "
                        "NOT NULL AND item_n = 0 GROUP BY user_row"))
        return out

    def unseen_users(self) -> str:
        """(distinct test users without a row, their test rows)."""
        return "SELECT count(DISTINCT user_id), count(*) FROM test_mapped WHERE user_row IS NULL"


    # -- side features (recsys.data.side_features stages the file as {role}_feat_raw) --------------

    def feature_tables(self, role: str) -> List[Tuple[str, str]]:
        """(name, SQL) of the feature tables of `role`, created after the vocabularies:
        ``{role}_feat`` (row, feature, value) of the ids that have a row, distinct, and
        ``{role}_feat_values`` (feature, value, code, n: the rows having it): the code is the
        value's rank by n descending then value (a vocabulary per column) or its hashed row."""
        col, table = ("user_id", "users") if role == "user" else ("item_id", "items")
        kept = (f"SELECT DISTINCT v.row AS row, f.feature AS feature, f.value AS value, v.n > 0 AS trained FROM "
                f"{role}_feat_raw f JOIN {table} v ON f.{col} = v.{col}")
        buckets = self.o.feature_buckets(role)
        # a vocabulary of the values of rows with training interactions: a value only new ids have
        # would get a row no training reaches (hashed values share rows with trained ones)
        counted = (f"SELECT feature, value, count(*) AS n FROM {role}_feat{'' if buckets else ' WHERE trained'} "
                   "GROUP BY feature, value")
        if buckets:
            code = self.hash_row(self.code("value", True), buckets)
        else:
            code = "row_number() OVER (PARTITION BY feature ORDER BY n DESC, value) - 1"
        values = f"SELECT feature, value, CAST({code} AS BIGINT) AS code, n FROM ({counted}) c"
        return [(f"{role}_feat", kept), (f"{role}_feat_values", values)]

    def feature_rows(self, role: str) -> str:
        """The prepared ``{items,users}_features.parquet``: (row, feature, code), distinct, sorted."""
        return (f"SELECT DISTINCT f.row AS row, CAST(f.feature AS INT) AS feature, v.code AS code FROM {role}_feat f "
                f"JOIN {role}_feat_values v ON f.feature = v.feature AND f.value = v.value ORDER BY row, feature, code")

    def feature_values(self, role: str) -> str:
        """The prepared ``{items,users}_feature_values.parquet``: each column's values, code, rows."""
        return (f"SELECT CAST(feature AS INT) AS feature, value, code, CAST(n AS BIGINT) AS n FROM {role}_feat_values "
                "ORDER BY feature, code, value")

    def feature_sizes(self, role: str) -> str:
        """(feature, distinct values, rows of the table: values or buckets)."""
        buckets = self.o.feature_buckets(role)
        size = str(buckets) if buckets else "max(code) + 1"
        return f"SELECT feature, count(*), {size} FROM {role}_feat_values GROUP BY feature ORDER BY feature"

    def feature_counts(self, role: str) -> str:
        """(distinct ids of the file, of them with a training interaction, ids with a row in the
        file, training ids without any feature value, ids with training interactions, ids on
        several rows of the file, (row, column, value)s left out: values no trained row has)."""
        col, table = ("user_id", "users") if role == "user" else ("item_id", "items")
        ids = f"(SELECT DISTINCT {col} FROM {role}_feat_raw WHERE {col} IS NOT NULL)"
        repeated = (f"(SELECT {col} FROM {role}_feat_raw WHERE {col} IS NOT NULL GROUP BY {col} HAVING "
                    "min(_file) <> max(_file) OR min(_row) <> max(_row))")
        return (f"SELECT (SELECT count(*) FROM {ids} a), "
                f"(SELECT count(*) FROM {ids} a JOIN {table} v ON a.{col} = v.{col} WHERE v.n > 0), "
                f"(SELECT count(*) FROM {ids} a JOIN {table} v ON a.{col} = v.{col}), "
                f"(SELECT count(*) FROM {table} v WHERE v.n > 0 AND v.row NOT IN (SELECT row FROM {role}_feat)), "
                f"(SELECT count(*) FROM {table} WHERE n > 0), (SELECT count(*) FROM {repeated} r), "
                f"(SELECT count(*) FROM {role}_feat f LEFT JOIN {role}_feat_values v ON f.feature = v.feature AND "
                "f.value = v.value WHERE v.code IS NULL)")


def sql_string(text: str) -> str:
    """A SQL string literal of `text` (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"
