"""Export: every user and item vector, with its raw id, as Parquet for an ANN index or vector store.

    <run_dir>/export/items.parquet   item_id (raw id, original type), vector (fixed_size_list<float32>[D])
    <run_dir>/export/users.parquet   user_id, vector
    <run_dir>/export/manifest.json   dimension, counts, normalised, score, config hash, checksums

The vectors are the towers' outputs over the full (unsharded) tables: shares computed on every
rank, gathered on rank 0, which writes the directory under a temporary name and renames it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data import Features, write_json_atomic
from recsys.evaluate import all_vectors, item_tower, user_tower
from recsys.loss import rank_and_world


def vectors_table(id_name: str, ids: pa.Array, vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({id_name: ids, "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_export(out_dir: Path, user_ids: pa.Array, user_vecs: np.ndarray, item_ids: pa.Array,
                 item_vecs: np.ndarray, normalized: bool, config_hash: str) -> Path:
    """Write the export directory atomically (temporary directory, then rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {}
        for name, id_name, ids, vecs in (("users", "user_id", user_ids, user_vecs), ("items", "item_id", item_ids, item_vecs)):
            if len(ids) != len(vecs):
                raise ValueError(f"{name}: {len(ids)} ids but {len(vecs)} vectors")
            pq.write_table(vectors_table(id_name, ids, vecs), tmp / f"{name}.parquet")
            files[f"{name}.parquet"] = {"rows": len(ids), "sha256": _sha256(tmp / f"{name}.parquet")}
        manifest = {
            "dimension": int(item_vecs.shape[1]),
            "num_users": len(user_ids),
            "num_items": len(item_ids),
            "normalized": normalized,
            "score": "cosine" if normalized else "dot",
            "config_hash": config_hash,
            "files": files,
        }
        write_json_atomic(manifest, tmp / "manifest.json")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@torch.no_grad()
def export_model(model, features: Features, user_vocab: pa.Array, item_vocab: pa.Array, out_dir: Path,
                 device: torch.device, config_hash: str, chunk: int = 4096) -> Optional[Path]:
    """Compute all vectors of a (sharded) two-tower model and write them on rank 0.

    User vectors are the user tower's outputs (with each user's history bag from `features`)."""
    dim = model.embedding_dim
    users = all_vectors(user_tower(model, features, device), len(user_vocab), dim, device, chunk, dst=0)
    items = all_vectors(item_tower(model, features, device), len(item_vocab), dim, device, chunk, dst=0)
    path = None
    if rank_and_world()[0] == 0:
        path = write_export(out_dir, user_vocab, users.cpu().numpy(), item_vocab, items.cpu().numpy(),
                            model.normalize, config_hash)
    return path


def read_vectors(path: Path) -> tuple[list, np.ndarray]:
    """Read an exported vectors file back: (raw ids, [N, D] float32 matrix)."""
    table = pq.read_table(path)
    id_col = table.column_names[0]
    vec = table["vector"].combine_chunks()
    dim = vec.type.list_size
    return table[id_col].to_pylist(), vec.values.to_numpy().reshape(-1, dim)
