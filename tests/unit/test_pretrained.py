"""Pretrained vectors (training.pretrained): rows of known ids take their vectors, the others
keep their initialisation; unknown ids counted; widths checked; hashed tables refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtlrec.errors import ConfigError, DataError
from mtlrec.models import build_model
from mtlrec.testing import tiny_dataset
from mtlrec.train.pretrained import load_pretrained

PARAMS = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4], "fm_tasks": ["click"]}


def _write(path: Path, ids: list, vectors: np.ndarray, *, fixed: bool = True) -> Path:
    flat = pa.array(vectors.reshape(-1).astype(np.float32))
    if fixed:
        col = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    else:
        offsets = pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32))
        col = pa.ListArray.from_arrays(offsets, flat)
    pq.write_table(pa.table({"key": ids, "vec": col}), path)
    return path


@pytest.mark.parametrize("fixed", [True, False])
def test_known_ids_take_their_vectors(tmp_path: Path, fixed: bool) -> None:
    pre, ds = tiny_dataset(80)
    torch.manual_seed(0)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), PARAMS)
    before = model.embedding.table_weight("item").detach().clone()
    fm_before = model.fm.factors.table_weight("item").detach().clone()
    vocab = pre.tables["item"].vocab.to_pylist()
    ids = [vocab[0], vocab[3], "not-an-item", vocab[0], None]
    vecs = np.arange(20, dtype=np.float32).reshape(5, 4)
    path = _write(tmp_path / "v.parquet", ids, vecs, fixed=fixed)
    rep = load_pretrained(model, pre, "item", path, id_column="key", vector_column="vec")
    assert rep["vectors"] == 5 and rep["written"] == 2
    assert (rep["not_in_vocabulary"], rep["repeated_id"], rep["missing_id"]) == (1, 1, 1)
    assert rep["rows_without_vector"] == len(vocab) - 2
    w = model.embedding.table_weight("item")
    assert torch.equal(w[2], torch.from_numpy(vecs[0]))  # id of vocab[0]: the first vector
    assert torch.equal(w[5], torch.from_numpy(vecs[1]))
    untouched = [i for i in range(len(w)) if i not in (2, 5)]
    assert torch.equal(w[untouched], before[untouched])
    assert torch.equal(model.fm.factors.table_weight("item"), fm_before)  # the FM's own table


def test_vectors_of_another_width_are_refused(tmp_path: Path) -> None:
    pre, ds = tiny_dataset(40)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), PARAMS)
    path = _write(tmp_path / "v.parquet", ["u1"], np.ones((1, 6)))
    with pytest.raises(ConfigError, match="6 values; table 'user' has embedding_dim 4"):
        load_pretrained(model, pre, "user", path, id_column="key", vector_column="vec")


def test_bad_files_and_tables(tmp_path: Path) -> None:
    pre, ds = tiny_dataset(40)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), PARAMS)
    path = _write(tmp_path / "v.parquet", ["u1"], np.ones((1, 4)))
    with pytest.raises(ConfigError, match="no embedding table 'users'"):
        load_pretrained(model, pre, "users", path, id_column="key", vector_column="vec")
    with pytest.raises(DataError, match="no column 'vector'"):
        load_pretrained(model, pre, "user", path, id_column="key")
    ragged = pa.table({"id": ["u1", "u2"], "vector": pa.array([[1.0, 2.0], [1.0]])})
    pq.write_table(ragged, tmp_path / "r.parquet")
    with pytest.raises(DataError, match="different lengths"):
        load_pretrained(model, pre, "user", tmp_path / "r.parquet")
    pre.tables["user"].hash_buckets = 5
    with pytest.raises(ConfigError, match="hashed"):
        load_pretrained(model, pre, "user", path, id_column="key", vector_column="vec")
