"""Small raw ESCI tables written to tmp_path: two locales, train and test queries, HTML to clean."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

LABELS = ("E", "S", "C", "I")
#: (locale, train queries, test queries); each query has one candidate per label.
LAYOUT = (("us", 10, 3), ("es", 2, 1))
N_PRODUCTS = 6


@dataclass
class RawFiles:
    examples: Path
    products: Path


def examples_frame() -> pd.DataFrame:
    """Amazon's examples columns; query q of a locale has products P{(q+k) % 6} labelled E,S,C,I."""
    rows = []
    query_id = 100
    for locale, n_train, n_test in LAYOUT:
        for q in range(n_train + n_test):
            for k, label in enumerate(LABELS):
                rows.append(
                    {
                        "example_id": len(rows),
                        "query": f"{locale} query {q}",
                        "query_id": query_id,
                        "product_id": f"P{(q + k) % N_PRODUCTS}",
                        "product_locale": locale,
                        "esci_label": label,
                        "small_version": int(k < 2),
                        "large_version": 1,
                        "split": "train" if q < n_train else "test",
                    }
                )
            query_id += 1
    return pd.DataFrame(rows)


def products_frame() -> pd.DataFrame:
    """Amazon's products columns. The same ASINs exist in both locales with different text.

    us/P0 has HTML and a long description; us/P4 has only a description (its default text is
    empty, so its rows are dropped unless the description is a text field).
    """
    rows = []
    for locale, _, _ in LAYOUT:
        for i in range(N_PRODUCTS):
            rows.append(
                {
                    "product_id": f"P{i}",
                    "product_locale": locale,
                    "product_title": f"{locale} {'título' if locale == 'es' else 'title'} {i}",
                    "product_description": None,
                    "product_bullet_point": f"bullet {i}",
                    "product_brand": f"brand{i}",
                    "product_color": "red" if i % 2 else None,
                }
            )
    products = pd.DataFrame(rows)
    p0 = (products["product_id"] == "P0") & (products["product_locale"] == "us")
    products.loc[p0, "product_title"] = "<b>Red</b> &amp; blue\n\n shoe"
    products.loc[p0, "product_description"] = "word " * 200
    p4 = (products["product_id"] == "P4") & (products["product_locale"] == "us")
    products.loc[p4, ["product_title", "product_brand", "product_color"]] = ["", "nan", None]
    products.loc[p4, "product_description"] = "<p>Only a description</p>"
    return products


def write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path, index=False)
    return path


@pytest.fixture
def raw(tmp_path: Path) -> RawFiles:
    """The two raw files, named as Amazon names them."""
    return RawFiles(
        examples=write(examples_frame(), tmp_path / "shopping_queries_dataset_examples.parquet"),
        products=write(products_frame(), tmp_path / "shopping_queries_dataset_products.parquet"),
    )


@pytest.fixture
def joined(tmp_path: Path) -> Path:
    """A joined file in the sample's shape: train/dev/holdout splits, no example_id or versions."""
    frame = examples_frame().merge(products_frame(), on=["product_id", "product_locale"])
    frame = frame.drop(columns=["example_id", "small_version", "large_version"])
    frame["split"] = frame["split"].map({"train": "train", "test": "holdout"})
    frame.loc[frame["query"].isin(["us query 0", "us query 1"]), "split"] = "dev"
    frame["esci_query_source"] = "other"
    return write(frame, tmp_path / "joined.parquet")
