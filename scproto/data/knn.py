"""The k-nearest-neighbour graph on PCA coordinates (faiss), cached on disk."""

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp

from scproto.errors import ScProtoInputError

log = logging.getLogger(__name__)


def drop_self(neighbors: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from k+1 search results, leaving k neighbours.

    With duplicate cells several points sit at distance 0 and the search may return a
    twin first, or leave the cell itself out entirely; then the farthest result goes.
    """
    n_rows = neighbors.shape[0]
    is_self = neighbors == np.arange(n_rows)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    k = neighbors.shape[1] - 1
    return neighbors[keep].reshape(n_rows, k), distances[keep].reshape(n_rows, k)


def build_index(
    coordinates: np.ndarray, *, approximate: bool, seed: int, nprobe: int
) -> faiss.Index:
    """Exact L2 index, or an inverted-file index (√n·4 lists) for large data."""
    dim = coordinates.shape[1]
    if not approximate:
        index = faiss.IndexFlatL2(dim)
    else:
        n_lists = max(1, int(4 * np.sqrt(coordinates.shape[0])))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, n_lists)
        index.cp.seed = seed  # k-means initialisation, for reproducible graphs
        index.train(coordinates)
        index.nprobe = nprobe
    index.add(coordinates)
    return index


def knn_graph(
    coordinates: np.ndarray,
    n_neighbors: int,
    *,
    approximate: bool = False,
    seed: int = 0,
    nprobe: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n × k, int64) and squared Euclidean distances (n × k) of each row's neighbours."""
    coordinates = np.ascontiguousarray(coordinates, dtype=np.float32)
    index = build_index(coordinates, approximate=approximate, seed=seed, nprobe=nprobe)
    distances, neighbors = index.search(coordinates, n_neighbors + 1)
    if (neighbors < 0).any():
        raise ScProtoInputError(
            "The approximate kNN index returned fewer than k neighbours for some cells; "
            "raise `data.knn.nprobe` or use the exact index (`data.knn.approximate_above=null`)."
        )
    return drop_self(neighbors.astype(np.int64), distances)


def data_fingerprint(matrix: sp.csr_matrix, settings: dict) -> str:
    """Hash of the matrix content and the graph settings: the cache key."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.asarray(matrix.shape, dtype=np.int64).tobytes())
    for array in (matrix.indptr, matrix.indices, matrix.data):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:24]


def load_cached(cache_dir: Path | None, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"knn-{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            graph = cached["neighbors"], cached["distances"]
    except Exception as error:  # a truncated or foreign file: rebuild the graph
        log.warning("ignoring unreadable kNN cache %s (%s)", path, error)
        return None
    log.info("kNN graph loaded from cache %s", path)
    return graph


def save_cached(
    cache_dir: Path | None, key: str, neighbors: np.ndarray, distances: np.ndarray
) -> None:
    if cache_dir is None:
        return
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write to a private file, then rename: atomic, so concurrent sweep jobs can share the cache.
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as temporary:
        np.savez(temporary, neighbors=neighbors, distances=distances)
    Path(temporary.name).replace(cache_dir / f"knn-{key}.npz")
