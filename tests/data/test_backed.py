"""X left on disk (data.backed=true): the same model input as in memory, read in blocks."""

import gc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scproto import ScProtoInputError
from scproto.data import backed
from scproto.data.datamodule import ScProtoDataModule
from scproto.data.io import read_h5ad
from scproto.train import train

SETTINGS = dict(batch_key="study", label_key="cell_type", query_studies=["study_3"], seed=0)


@pytest.fixture
def atlas_file(small_adata, tmp_path):
    """small_adata with an all-zero cell, and its counts in a layer too."""
    adata = small_adata.copy()
    adata.X[11] = 0
    adata.X.eliminate_zeros()
    adata.layers["counts"] = adata.X.copy()
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    return path


def both(path, **settings):
    """The data module of the file read whole, and of the file left on disk."""
    in_memory = ScProtoDataModule(read_h5ad(path, layers=["counts"]), **SETTINGS, **settings)
    on_disk = ScProtoDataModule(
        read_h5ad(path, layers=["counts"], backed=True),
        cache_dir=path.parent / "cache",
        **SETTINGS,
        **settings,
    )
    for module in (in_memory, on_disk):
        module.setup()
    return in_memory, on_disk


@pytest.mark.parametrize(
    "settings",
    [
        dict(n_top_genes=200, n_neighbors=15),
        dict(
            n_top_genes=200,
            n_neighbors=15,
            hvg_flavor="seurat_v3",
            counts_layer="counts",
            likelihood="nb",
            hvg_max_cells=600,  # a subsample, drawn alike by both
        ),
    ],
    ids=["log-hvg", "counts-hvg-nb-subsample"],
)
def test_on_disk_preparation_equals_the_in_memory_one(atlas_file, settings, monkeypatch):
    # blocks of 256 rows: six of them, the first less its empty cell
    monkeypatch.setattr(backed.row_blocks, "__defaults__", (256,))
    in_memory, on_disk = both(atlas_file, **settings)
    assert on_disk.source is not None and in_memory.source is None
    assert not on_disk.x.data.flags.owndata  # a view of the memory-mapped file
    assert on_disk.spec == in_memory.spec
    assert on_disk.adata.n_obs == in_memory.adata.n_obs == 1499  # the empty cell dropped
    assert list(on_disk.adata.obs_names) == list(in_memory.adata.obs_names)
    assert (on_disk.x != in_memory.x).nnz == 0
    if settings.get("likelihood") == "nb":
        assert (on_disk.counts != in_memory.counts).nnz == 0
    np.testing.assert_array_equal(on_disk.neighbors, in_memory.neighbors)
    np.testing.assert_array_equal(on_disk.pca, in_memory.pca)


def test_read_rows_equals_indexing_in_memory(small_adata, tmp_path):
    path = tmp_path / "a.h5ad"
    small_adata.write_h5ad(path)
    on_disk = read_h5ad(path, backed=True)
    rows = np.array([0, 3, 255, 256, 900, 1499])
    got = backed.read_rows(on_disk.X, rows, block_rows=256)
    assert (got != small_adata.X[rows]).nnz == 0
    assert backed.read_rows(on_disk.X, np.array([], dtype=int)).shape == (0, 500)


def test_a_bad_value_in_a_late_block_is_named(small_adata, tmp_path, monkeypatch):
    adata = small_adata.copy()
    adata.X.data[-1] = -2.0  # in the last block
    adata.layers["counts"] = small_adata.X.copy()
    adata.layers["counts"].data[-1] = 0.5
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setattr(backed.row_blocks, "__defaults__", (256,))
    with pytest.raises(ScProtoInputError, match="X holds 1 negative"):
        ScProtoDataModule(read_h5ad(path, backed=True), **SETTINGS)
    adata.X.data[-1] = 1.0
    adata.write_h5ad(path)
    with pytest.raises(ScProtoInputError, match=r"layers\['counts'\] was given as counts"):
        ScProtoDataModule(
            read_h5ad(path, layers=["counts"], backed=True), counts_layer="counts", **SETTINGS
        )


def test_a_column_stored_file_is_refused_with_the_fix(small_adata, tmp_path):
    adata = small_adata.copy()
    adata.X = sp.csc_matrix(adata.X)
    path = tmp_path / "csc.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(ScProtoInputError, match=r"tocsr\(\)"):
        ScProtoDataModule(read_h5ad(path, backed=True), **SETTINGS)


def test_a_missing_counts_layer_is_named_before_any_pass(small_adata, tmp_path):
    path = tmp_path / "a.h5ad"
    small_adata.write_h5ad(path)
    on_disk = read_h5ad(path, backed=True)
    with pytest.raises(ScProtoInputError, match=r"data\.counts_layer"):
        ScProtoDataModule(on_disk, counts_layer="spliced", **SETTINGS)


def test_the_mapped_files_go_with_the_matrix(tmp_path):
    out = backed.MappedCSR(tmp_path, n_cols=4, index_dtype=np.int32)
    block = sp.random(6, 4, density=0.5, format="csr", dtype=np.float32, random_state=0)
    out.append(block)
    out.append(block)
    matrix = out.finish()
    assert (matrix != sp.vstack([block, block])).nnz == 0
    directory = out.directory
    assert directory.is_dir()
    del out, matrix
    gc.collect()
    assert not directory.exists()


def test_train_py_on_a_file_left_on_disk(make_config, atlas_file, tmp_path):
    cfg = make_config(
        "data=h5ad",
        f"data.path={atlas_file}",
        "data.backed=true",
        "data.label_key=cell_type",
        "data.query_studies=[study_3]",
        "data.n_top_genes=300",
        "data.n_neighbors=15",
        "query.epochs=1",
    )
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    embedding = ad.read_h5ad(tmp_path / "run" / "embedding.h5ad")
    assert embedding.n_obs == 1499
    assert set(embedding.obs["split"]) == {"reference", "query"}
    assert objects["datamodule"].source is not None


def test_backed_needs_a_file(make_config):
    with pytest.raises(ScProtoInputError, match=r"data\.backed=true"):
        train(make_config("data.backed=true"))
