"""The bundled sample is a verbatim copy of the shared real-data sample."""

from __future__ import annotations

import hashlib

from esci_reranker.data import sample_holdout_query_ids, sample_path

#: SHA-256 of the source files, from their README (also quoted in data/sample/README.md).
SAMPLE_SHA256 = "1e76dc67599dfac8dea7e6b7e277b7e9f9c625cbd97db26fe8a1bbdd406af5df"


def test_sample_file_is_the_published_copy() -> None:
    assert hashlib.sha256(sample_path().read_bytes()).hexdigest() == SAMPLE_SHA256
    assert (sample_path().parent / "README.md").is_file()


def test_holdout_ids() -> None:
    ids = sample_holdout_query_ids()
    assert len(ids) == 41
    assert all(isinstance(i, int) for i in ids)
