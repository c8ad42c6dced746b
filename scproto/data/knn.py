"""The k-nearest-neighbour graph on PCA coordinates (faiss), cached on disk."""

import hashlib
import itertools
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


INDEX_KINDS = ("auto", "exact", "ivf_flat", "ivf_pq")
REFINE_FACTORS = (4, 8)  # ivf_pq re-ranks 4·k (then, if recall asks for it, 8·k) candidates
RECALL_QUERIES = 500  # cells whose approximate neighbours are checked against exact search


def index_kind(kind: str, n_cells: int, approximate_above: int | None) -> str:
    """``auto``: exact search up to ``approximate_above`` cells, IVF-PQ beyond."""
    if kind not in INDEX_KINDS:
        raise ScProtoInputError(
            f"data.knn_index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}"
        )
    if kind != "auto":
        return kind
    return "exact" if approximate_above is None or n_cells <= approximate_above else "ivf_pq"


def build_index(coordinates: np.ndarray, *, kind: str, seed: int, nprobe: int) -> faiss.Index:
    """A faiss index of ``kind`` over the rows of ``coordinates``.

    - ``exact``: brute force (IndexFlatL2).
    - ``ivf_flat``: inverted lists (4·√n) with exact distances inside the probed lists.
    - ``ivf_pq``: √n inverted lists holding 4-bit fast-scan product codes (one sub-quantizer
      per dimension), the 4·k (or 8·k) best candidates re-ranked by exact distance. Scanning short
      codes is what makes it fast: on a million cells × 50 PCs (2 cores) ivf_flat needed
      2.5 minutes for recall@50 0.88 at nprobe 16 (benchmarks/scale.md).
    """
    n_cells, dim = coordinates.shape
    if kind == "exact":
        index = faiss.IndexFlatL2(dim)
    elif kind == "ivf_flat":
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, max(1, int(4 * np.sqrt(n_cells))))
    elif kind == "ivf_pq":
        n_lists = max(1, int(np.sqrt(n_cells)))
        index = faiss.index_factory(dim, f"IVF{n_lists},PQ{dim}x4fs,RFlat")
        index.k_factor = REFINE_FACTORS[0]
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if kind != "exact":
        inverted = faiss.extract_index_ivf(index)
        inverted.cp.seed = seed  # k-means initialisation, for reproducible graphs
        inverted.nprobe = nprobe
        index.train(coordinates)
    index.add(coordinates)
    return index


def knn_graph(
    coordinates: np.ndarray,
    n_neighbors: int,
    *,
    kind: str = "exact",
    seed: int = 0,
    nprobe: int = 16,
    min_recall: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Indices (n × k, int64), squared Euclidean distances (n × k) of each row's neighbours,
    and their recall@k against exact search on a sample of rows (1.0 for the exact index).

    For the inverted-file indexes ``nprobe`` is a start: it doubles (ivf_pq first re-ranks
    more candidates at each) until the sample's recall reaches ``min_recall`` or every list
    is searched; then all rows are searched so. How many lists a cell's neighbours spread
    over depends on the data, not only on its size.
    """
    coordinates = np.ascontiguousarray(coordinates, dtype=np.float32)
    index = build_index(coordinates, kind=kind, seed=seed, nprobe=nprobe)
    k = n_neighbors + 1  # each row finds itself too
    recall = 1.0
    if kind != "exact":
        rows, truth = exact_sample(coordinates, k, seed=seed)
        inverted = faiss.extract_index_ivf(index)
        refine_factors = REFINE_FACTORS if kind == "ivf_pq" else (None,)
        while True:
            for factor in refine_factors:
                if factor:
                    index.k_factor = factor
                recall = overlap(index.search(coordinates[rows], k)[1], truth)
                if recall >= min_recall:
                    break
            if recall >= min_recall or inverted.nprobe >= inverted.nlist:
                break
            inverted.nprobe = min(2 * inverted.nprobe, inverted.nlist)
        log.info(
            "%s: nprobe %d of %d lists%s",
            kind,
            inverted.nprobe,
            inverted.nlist,
            f", re-ranking {index.k_factor:g}·k candidates" if kind == "ivf_pq" else "",
        )
    distances, neighbors = search(index, coordinates, k)
    if (neighbors < 0).any():
        raise ScProtoInputError(
            "The approximate kNN index returned fewer than k neighbours for some cells; "
            "raise `data.knn_nprobe` or use the exact index (`data.knn_index=exact`)."
        )
    neighbors, distances = drop_self(neighbors.astype(np.int64), distances)
    return neighbors, distances, recall


SEARCH_BLOCK_ROWS = 65_536  # queries per faiss call: ivf_pq holds 8·k candidates per query


def search(index: faiss.Index, coordinates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` of every row, in blocks: one call for a million cells would hold
    8·k candidates of each (5 GB) at once."""
    distances = np.empty((len(coordinates), k), dtype=np.float32)
    neighbors = np.empty((len(coordinates), k), dtype=np.int64)
    for start in range(0, len(coordinates), SEARCH_BLOCK_ROWS):
        rows = slice(start, start + SEARCH_BLOCK_ROWS)
        distances[rows], neighbors[rows] = index.search(coordinates[rows], k)
    return distances, neighbors


def exact_sample(
    coordinates: np.ndarray, k: int, *, seed: int, n_queries: int = RECALL_QUERIES
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled rows and their exact k nearest rows: the yardstick of an approximate index."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(coordinates), min(n_queries, len(coordinates)), replace=False)
    exact = faiss.IndexFlatL2(coordinates.shape[1])
    exact.add(coordinates)
    return rows, exact.search(coordinates[rows], k)[1]


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true neighbours (rows of ``truth``) that ``found`` holds: recall@k."""
    hits = [np.intersect1d(a, b).size for a, b in zip(found, truth, strict=True)]
    return float(np.sum(hits) / truth.size)


def data_fingerprint(matrix: sp.csr_matrix, rows: np.ndarray, settings: dict) -> str:
    """Hash of the matrix content, the rows the graph is built on and the graph settings:
    the cache key."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.asarray(matrix.shape, dtype=np.int64).tobytes())
    for array in (np.asarray(rows, dtype=np.int64), matrix.indptr, matrix.indices, matrix.data):
        digest.update(memoryview(np.ascontiguousarray(array)))  # no bytes copy of 3 GB
    return digest.hexdigest()[:24]


def load_cached(cache_dir: Path | None, key: str) -> tuple[np.ndarray, np.ndarray, float] | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"knn-{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            graph = cached["neighbors"], cached["distances"], float(cached["recall"])
    except Exception as error:  # a truncated or foreign file: rebuild the graph
        log.warning("ignoring unreadable kNN cache %s (%s)", path, error)
        return None
    log.info("kNN graph loaded from cache %s", path)
    return graph


def save_cached(
    cache_dir: Path | None, key: str, neighbors: np.ndarray, distances: np.ndarray, recall: float
) -> None:
    if cache_dir is None:
        return
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write to a private file, then rename: atomic, so concurrent sweep jobs can share the cache.
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as temporary:
        np.savez(temporary, neighbors=neighbors, distances=distances, recall=recall)
    Path(temporary.name).replace(cache_dir / f"knn-{key}.npz")


def neighbourhood_means(
    coordinates: np.ndarray, k: int, seed: int = 0, approximate_above: int | None = 200_000
) -> np.ndarray:
    """Each row replaced by the mean of itself and its k nearest rows (exact search up to
    ``approximate_above`` rows, as for the training graph; the ivf_flat index beyond, since
    a few coordinates need no compression)."""
    coordinates = np.ascontiguousarray(coordinates, dtype=np.float32)
    kind = exact_or_ivf_flat(len(coordinates), approximate_above)
    neighbors, _, _ = knn_graph(coordinates, k, kind=kind, seed=seed)
    return (coordinates + coordinates[neighbors].sum(axis=1)) / (k + 1)


def mutual_neighbors(
    coordinates: np.ndarray,
    groups: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    approximate_above: int | None = 200_000,
) -> sp.csr_matrix:
    """Mutual nearest neighbours across groups (Haghverdi et al. 2018), as a symmetric
    boolean n × n matrix: i and j of different groups are partners when j is among i's
    ``k`` nearest rows of j's group and i among j's ``k`` nearest of i's group.

    Searched on unit-length rows (cosine), as MNN correction does: a study's cells can sit
    further out along the same directions than another study's. Pairs of the same type
    are what such a match mostly finds even where the study effect puts every cell's own
    kNN inside its study. Each group is searched exactly up to ``approximate_above`` rows,
    with the ivf_flat index beyond.
    """
    unit = np.asarray(coordinates, dtype=np.float32)
    unit = np.ascontiguousarray(
        unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    )
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    indexes = [  # each group's index, built once and searched from every other group
        build_index(
            unit[m], kind=exact_or_ivf_flat(len(m), approximate_above), seed=seed, nprobe=16
        )
        for m in members
    ]

    def nearest(source: int, target: int) -> np.ndarray:
        """Positions (within ``target``) of the k nearest rows of each ``source`` row."""
        k_within = min(k, len(members[target]))
        return search(indexes[target], unit[members[source]], k_within)[1]

    pairs = []
    for a, b in itertools.combinations(range(len(members)), 2):
        ab = nearest(a, b)
        i, m = np.nonzero(mutual_mask(ab, nearest(b, a)))
        pairs.append((members[a][i], members[b][ab[i, m]]))
    n = len(unit)
    if not pairs:
        return sp.csr_matrix((n, n), dtype=bool)
    rows = np.concatenate([p[0] for p in pairs] + [p[1] for p in pairs])
    cols = np.concatenate([p[1] for p in pairs] + [p[0] for p in pairs])
    return sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n, n))


def exact_or_ivf_flat(n_rows: int, approximate_above: int | None) -> str:
    """Exact search up to ``approximate_above`` rows, as for the training graph; ivf_flat
    beyond (a search that needs no compressed codes)."""
    return "exact" if index_kind("auto", n_rows, approximate_above) == "exact" else "ivf_flat"


def mutual_mask(ab: np.ndarray, ba: np.ndarray) -> np.ndarray:
    """(i, m) is True when row i is among the neighbours ``ba`` of its m-th neighbour
    ``ab[i, m]``; in blocks of rows, as the k × k comparison of a large study would not
    fit at once."""
    mask = np.empty(ab.shape, dtype=bool)
    for start in range(0, len(ab), SEARCH_BLOCK_ROWS):
        block = slice(start, start + SEARCH_BLOCK_ROWS)
        own = np.arange(len(ab))[block]
        mask[block] = (ba[ab[block]] == own[:, None, None]).any(axis=2)
    return mask


def with_partners(
    neighbors: np.ndarray,
    distances: np.ndarray,
    coordinates: np.ndarray,
    partners: sp.csr_matrix,
    slots: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's neighbour list widened by ``slots`` columns drawn from its ``partners``
    (with replacement when it has fewer), so a view drawn from the list is a partner
    slots/(k + slots) of the time; a row without partners draws them from its own list.
    The new columns' distances are squared Euclidean on ``coordinates``, as the graph's."""
    rng = np.random.default_rng(seed)
    extra = np.empty((len(neighbors), slots), dtype=neighbors.dtype)
    for row in range(len(neighbors)):
        own = partners.indices[partners.indptr[row] : partners.indptr[row + 1]]
        pool = own if len(own) else neighbors[row]
        extra[row] = rng.choice(pool, slots, replace=len(pool) < slots)
    gap = coordinates[extra] - coordinates[:, None, :]
    extra_distances = np.einsum("nsd,nsd->ns", gap, gap).astype(distances.dtype)
    return np.hstack([neighbors, extra]), np.hstack([distances, extra_distances])
