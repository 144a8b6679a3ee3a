"""Small prepared-style splits written by hand for the evaluation tests."""

from __future__ import annotations

import pandas as pd
import pytest

from esci_reranker.data.text import product_texts
from esci_reranker.labels import ESCI_GAINS

# query_id -> (query, source); then the judged products, (query_id, product_id, label, title,
# brand, color) in split order: one obvious match each.
QUERIES = {
    101: ("red running shoes", "other"),
    102: ("stainless steel water bottle", "parse_pattern"),
    103: ("usb c charging cable", "parse_pattern"),
}
PRODUCTS = [
    (101, "B001", "E", "Red Running Shoes for Men", "Nike", "red"),
    (101, "B002", "I", "Stainless Steel Water Bottle 1L", "Hydro", "silver"),
    (101, "B003", "C", "Shoe Laces, 5 pairs", "Generic", "white"),
    (101, "B004", "S", "Trail Sneakers", "Adidas", "blue"),
    (102, "B010", "I", "Wireless Mouse", "Logi", "black"),
    (102, "B011", "E", "Insulated Stainless Steel Water Bottle", "Hydro", "silver"),
    (102, "B012", "S", "Plastic Sports Bottle", "Nalgene", ""),
    (103, "B020", "E", "USB C Charging Cable 2m", "Anker", "black"),
    (103, "B021", "I", "Garden Hose 15m", "Gardena", "green"),
    (103, "B022", "C", "USB Wall Charger", "Anker", "white"),
]


def make_split() -> pd.DataFrame:
    """A prepared split: the columns `esci-reranker prepare` writes, 3 queries, 10 pairs."""
    rows = [
        {
            "query_id": qid,
            "query": QUERIES[qid][0],
            "product_id": pid,
            "product_locale": "us",
            "esci_label": label,
            "product_title": title,
            "product_brand": brand,
            "product_color": color,
            "product_description": "",
            "product_bullet_point": "",
            "esci_query_source": QUERIES[qid][1],
        }
        for qid, pid, label, title, brand, color in PRODUCTS
    ]
    frame = pd.DataFrame(rows)
    frame["query_id"] = frame["query_id"].astype("int64")
    frame["gain"] = frame["esci_label"].map(ESCI_GAINS)
    frame["product_text"] = product_texts(frame)
    return frame


@pytest.fixture
def split() -> pd.DataFrame:
    return make_split()


@pytest.fixture
def split_path(tmp_path, split: pd.DataFrame):
    path = tmp_path / "test.parquet"
    split.to_parquet(path, index=False)
    return path
