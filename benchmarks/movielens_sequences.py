"""MovieLens (latest-small) as a behaviour-sequence multi-task set: for MoSE on real data.

Every rating becomes one row: the user, the movie, its first genre, and the user's **history**:
the (up to) 20 movies the same user rated before this one, oldest first (ratings sorted by time;
ties keep the file's order). Two tasks: ``like`` (rating >= 4, binary) and ``rating``
(regression). Built with numpy over the whole table (no Python per row).

MovieLens may not be bundled with this project (its licence: research use, no redistribution
in a package here), so this script reads the files from a local copy and writes a Parquet
file under ``runs/`` (not tracked); ``examples/mose_movielens.yaml`` reads that file.

Example::

    python benchmarks/movielens_sequences.py --data ../shared/data/movielens-latest-small
    mtlrec compare examples/mose_movielens.yaml --models single_task,mmoe,mose --seeds 3 \\
        --model-params benchmarks/movielens_params.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

HISTORY = 20


def build(data: Path, history: int = HISTORY) -> pa.Table:
    ratings = pacsv.read_csv(data / "ratings.csv")
    movies = pacsv.read_csv(data / "movies.csv")
    user = ratings.column("userId").to_numpy()
    movie = ratings.column("movieId").to_numpy()
    stamp = ratings.column("timestamp").to_numpy()
    order = np.lexsort((np.arange(len(user)), stamp, user))  # by user, then time, then file
    user, movie, rating = user[order], movie[order], ratings.column("rating").to_numpy()[order]
    n = len(user)
    idx = np.arange(n)
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]  # first row of each user
    start = np.repeat(first, np.diff(np.r_[first, n]))  # first row of this row's user
    count = np.minimum(idx - start, history)  # earlier ratings kept
    offsets = np.r_[0, np.cumsum(count)].astype(np.int32)
    # flat history: for row i the movies at rows i - count[i] .. i - 1 (oldest first)
    row = np.repeat(idx, count)
    within = np.arange(len(row)) - np.repeat(offsets[:-1], count)
    flat = movie[row - np.repeat(count, count) + within]
    genre_of = dict(
        zip(
            movies.column("movieId").to_pylist(),
            [g.split("|")[0] for g in movies.column("genres").to_pylist()],
            strict=True,
        )
    )  # one entry per movie of the catalogue (9,742), not per rating
    ids, inverse = np.unique(movie, return_inverse=True)
    genres = np.array([genre_of.get(int(m), "(unknown)") for m in ids])[inverse]
    return pa.table(
        {
            "user": pa.array(user.astype(np.int64)),
            "movie": pa.array(movie.astype(np.int64)),
            "genre": pa.array(genres),
            "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int64))),
            "like": pa.array((rating >= 4.0).astype(np.int64)),
            "rating": pa.array(rating.astype(np.float64)),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with ratings.csv, movies.csv")
    ap.add_argument("--output", type=Path, default=Path("runs/movielens/ratings.parquet"))
    ap.add_argument("--history", type=int, default=HISTORY)
    args = ap.parse_args()
    table = build(args.data, args.history)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(args.output)
    lengths = pc.list_value_length(table.column("history")).to_numpy()
    print(
        f"{table.num_rows} rows, {len(np.unique(table.column('user')))} users, "
        f"{len(np.unique(table.column('movie')))} movies; history length mean "
        f"{lengths.mean():.1f}, empty {int((lengths == 0).sum())}; like rate "
        f"{np.mean(table.column('like').to_numpy()):.3f} -> {args.output}"
    )


if __name__ == "__main__":
    main()
