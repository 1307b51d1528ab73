"""Streaming training data: a Parquet file encoded on the fly in shuffle buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mtlrec.config import TrainingConfig
from mtlrec.data.file_encoding import encode_file, fit_file
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.split import hash_part
from mtlrec.data.stream_dataset import StreamingDataset, sharded
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.testing import tiny_schema, tiny_table
from mtlrec.train.trainer import Trainer

ROWS = 700


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Preprocessor]:
    d = tmp_path_factory.mktemp("stream")
    path = d / "rows.parquet"
    table = tiny_table(ROWS, seed=4)
    # a row id to trace rows through the shuffle: the dense 'price' is not unique enough
    pq.write_table(table, path, row_group_size=64)
    return path, fit_file(tiny_schema(), path)


def _ids(ds_batches: list) -> list[np.ndarray]:
    """Rows identified by all their encoded sparse ids and dense values."""
    return [
        np.concatenate([b.features.sparse.numpy(), b.features.dense.numpy()], axis=1)
        for b in ds_batches
    ]


def _keys(arr: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in arr]


def test_without_shuffle_equals_the_in_memory_batches(data: tuple[Path, Preprocessor]) -> None:
    path, pre = data
    stream = StreamingDataset(pre, path, shuffle_buffer=100, read_rows=50)
    mem = encode_file(pre, path)[0]
    a, b = list(stream.batches(48)), list(mem.batches(48))
    assert len(a) == len(b) == stream.num_batches(48) == mem.num_batches(48)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.features.sparse, y.features.sparse)
        torch.testing.assert_close(x.features.dense, y.features.dense)
        for t in x.labels:
            torch.testing.assert_close(x.masks[t], y.masks[t])
            torch.testing.assert_close(x.weights[t], y.weights[t])
            m = x.masks[t]
            torch.testing.assert_close(x.labels[t][m], y.labels[t][m])


def test_shuffled_epoch_is_a_permutation_and_epochs_differ(
    data: tuple[Path, Preprocessor],
) -> None:
    path, pre = data
    stream = StreamingDataset(pre, path, shuffle_buffer=150)
    mem = encode_file(pre, path)[0]
    ref = sorted(_keys(_ids(list(mem.batches(ROWS)))[0]))
    e0 = np.concatenate(_ids(list(stream.batches(40, shuffle=True, seed=1, epoch=0))))
    e1 = np.concatenate(_ids(list(stream.batches(40, shuffle=True, seed=1, epoch=1))))
    assert sorted(_keys(e0)) == ref == sorted(_keys(e1))
    assert _keys(e0) != _keys(e1)
    plain = np.concatenate(_ids(list(stream.batches(40))))
    assert _keys(e0) != _keys(plain)
    again = np.concatenate(_ids(list(stream.batches(40, shuffle=True, seed=1, epoch=0))))
    assert _keys(again) == _keys(e0)  # deterministic in (seed, epoch)


@pytest.mark.parametrize("start", [0, 1, 3, 7, 17])
def test_resuming_at_any_batch_gives_the_rest_of_the_epoch(
    data: tuple[Path, Preprocessor], start: int
) -> None:
    path, pre = data
    stream = StreamingDataset(pre, path, shuffle_buffer=150)
    full = _ids(list(stream.batches(40, shuffle=True, seed=2, epoch=3)))
    rest = _ids(list(stream.batches(40, shuffle=True, seed=2, epoch=3, start=start)))
    assert len(rest) == len(full) - start
    for x, y in zip(rest, full[start:], strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_make_up_the_global_batches(
    data: tuple[Path, Preprocessor], world: int
) -> None:
    path, pre = data
    stream = StreamingDataset(pre, path, shuffle_buffer=100)
    full = _ids(list(stream.batches(50, shuffle=True, seed=0, epoch=1, start=2)))
    shards = [
        _ids(list(sharded(stream, r, world).batches(50, shuffle=True, seed=0, epoch=1, start=2)))
        for r in range(world)
    ]
    for b, whole in enumerate(full):
        np.testing.assert_array_equal(np.concatenate([s[b] for s in shards]), whole)


def test_hash_split_part_streams_exactly_the_training_rows(
    data: tuple[Path, Preprocessor],
) -> None:
    path, pre = data
    spec = ((0.6, 0.2, 0.2), 5)
    stream = StreamingDataset(pre, path, split=spec, shuffle_buffer=128)
    parts = encode_file(pre, path, split=spec)
    n_train = int((hash_part(np.arange(ROWS, dtype=np.uint64), *spec) == 0).sum())
    assert len(stream) == len(parts[0]) == n_train
    a = np.concatenate(_ids(list(stream.batches(32, shuffle=True, seed=0))))
    b = _ids(list(parts[0].batches(len(parts[0]))))[0]
    assert sorted(_keys(a)) == sorted(_keys(b))


def test_trainer_fits_from_a_stream_and_resumes_exactly(
    data: tuple[Path, Preprocessor], tmp_path: Path
) -> None:
    path, pre = data
    stream = StreamingDataset(pre, path, shuffle_buffer=200)
    cfg = TrainingConfig(epochs=2, batch_size=128, progress=False, seed=0)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("mmoe", pre.schema, pre.table_sizes(), {"expert_hidden": [8]})

    m1 = model()
    Trainer(m1, pre.schema, config=cfg, run_dir=tmp_path / "a").fit(stream)
    # the same run, stopped after 2 steps of the second epoch and resumed
    m2 = model()
    stop_cfg = cfg.model_copy(update={"checkpoint_every_steps": 1})
    t2 = Trainer(m2, pre.schema, config=stop_cfg, run_dir=tmp_path / "b")

    class Stop(Exception):
        pass

    from mtlrec.train.callbacks import Callback

    class StopAt(Callback):
        def on_step_end(self, trainer, state) -> None:  # type: ignore[no-untyped-def]
            if state.step == stream.num_batches(128) + 2:
                raise Stop

    t2.callbacks.append(StopAt())
    with pytest.raises(Stop):
        t2.fit(stream)
    m3 = model()
    Trainer(m3, pre.schema, config=stop_cfg, run_dir=tmp_path / "b").fit(stream, resume=True)
    for (k, v1), v3 in zip(m1.state_dict().items(), m3.state_dict().values(), strict=True):
        torch.testing.assert_close(v1, v3, atol=0, rtol=0, msg=k)


def test_csv_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    import pyarrow.csv as pacsv

    p = tmp_path / "rows.csv"
    pacsv.write_csv(tiny_table(20), p)
    pre = Preprocessor.fit(tiny_schema(), tiny_table(20))
    with pytest.raises(ConfigError, match="Parquet"):
        StreamingDataset(pre, p)


@pytest.mark.parametrize("read_rows", [7, 50])
def test_prefetching_worker_gives_the_same_batches(
    data: tuple[Path, Preprocessor], read_rows: int
) -> None:
    path, pre = data
    kw = {"shuffle_buffer": 130, "read_rows": read_rows}
    on = StreamingDataset(pre, path, prefetch=True, **kw)
    off = StreamingDataset(pre, path, prefetch=False, **kw)
    for start in (0, 5):
        a = list(on.batches(37, shuffle=True, seed=3, epoch=1, start=start))
        b = list(off.batches(37, shuffle=True, seed=3, epoch=1, start=start))
        assert len(a) == len(b) == on.num_batches(37) - start
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x.features.sparse, y.features.sparse)
            torch.testing.assert_close(x.features.dense, y.features.dense)
            for k in x.features.sequences:
                torch.testing.assert_close(x.features.sequences[k], y.features.sequences[k])
            for t in x.labels:
                torch.testing.assert_close(x.labels[t], y.labels[t])
                torch.testing.assert_close(x.masks[t], y.masks[t])
    assert on.unknown_counts == off.unknown_counts


def test_an_error_in_the_prefetching_worker_reaches_the_caller(
    data: tuple[Path, Preprocessor], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtlrec.errors import DataError

    path, pre = data
    stream = StreamingDataset(pre, path, shuffle_buffer=100, prefetch=True)
    calls = {"n": 0}
    real = StreamingDataset._encode_buffer

    def failing(self, buf, *a, **k):  # the third buffer cannot be read
        calls["n"] += 1
        if buf.index == 2:
            raise DataError("cannot read: broken row group", file=str(path))
        return real(self, buf, *a, **k)

    monkeypatch.setattr(StreamingDataset, "_encode_buffer", failing)
    got = 0
    with pytest.raises(DataError, match="broken row group"):
        for _ in stream.batches(50, shuffle=True):
            got += 1
    assert got >= 1  # the batches before the broken buffer were trained on
    # leaving an epoch early stops the worker (no hang, no thread left behind)
    it = stream.batches(50)
    next(it)
    it.close()
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("mtlrec-stream")]
