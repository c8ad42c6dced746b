"""Every user mistake ends in ScProtoInputError with a message naming the problem."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scproto.data.datamodule import ScProtoDataModule
from scproto.data.io import read_h5ad
from scproto.errors import ScProtoInputError

ROOT = Path(__file__).resolve().parents[2]


def datamodule(adata, **kwargs):
    settings = dict(batch_key="study", query_studies=["study_3"], n_neighbors=15)
    return ScProtoDataModule(adata, **{**settings, **kwargs})


@pytest.fixture
def adata(small_adata):
    return small_adata.copy()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ScProtoInputError, match=r"Data file not found: .*nowhere.h5ad"):
        read_h5ad(tmp_path / "nowhere.h5ad")


def test_missing_scib_file_says_where_to_download_it(tmp_path):
    with pytest.raises(ScProtoInputError, match=r"figshare.com/ndownloader/files/25717328"):
        read_h5ad(tmp_path / "Immune_ALL_human.h5ad")


def test_missing_obs_key_lists_the_available_ones(adata):
    with pytest.raises(
        ScProtoInputError, match=r"'tech' \(batch_key\) is not in the data.*'study'"
    ):
        datamodule(adata, batch_key="tech")
    with pytest.raises(ScProtoInputError, match=r"'celltype' \(label_key\)"):
        datamodule(adata, label_key="celltype")


def test_non_finite_values(adata):
    adata.X = adata.X.copy()
    adata.X.data[:3] = np.nan
    with pytest.raises(ScProtoInputError, match=r"X holds 3 non-finite values"):
        datamodule(adata)


def test_negative_values(adata):
    adata.X = adata.X.copy()
    adata.X.data[0] = -2.0
    with pytest.raises(ScProtoInputError, match="X holds 1 negative values"):
        datamodule(adata)


def test_counts_layer_with_non_counts(adata):
    adata.layers["counts"] = sp.csr_matrix(adata.X * 0.5)
    with pytest.raises(
        ScProtoInputError, match=r"layers\['counts'\] was given as counts but holds non-integer"
    ):
        datamodule(adata, counts_layer="counts")


def test_missing_counts_layer(adata):
    with pytest.raises(
        ScProtoInputError, match=r"layers\['raw'\] .data.counts_layer. is not in the data"
    ):
        datamodule(adata, counts_layer="raw")


def test_duplicated_gene_names(adata):
    names = adata.var_names.to_list()
    names[1] = names[0]
    adata.var_names = names
    with pytest.raises(ScProtoInputError, match="gene names occur more than once"):
        datamodule(adata)


def test_study_with_too_few_cells(adata):
    adata.obs["study"] = adata.obs["study"].astype(str)
    adata.obs.iloc[:5, adata.obs.columns.get_loc("study")] = "tiny"
    with pytest.raises(ScProtoInputError, match=r"'tiny' \(5 cells\)"):
        datamodule(adata)


def test_fewer_cells_than_k_plus_one(adata):
    few = adata[
        np.r_[
            np.flatnonzero(adata.obs["study"] == "study_0")[:6],
            np.flatnonzero(adata.obs["study"] == "study_1")[:6],
        ]
    ].copy()
    with pytest.raises(ScProtoInputError, match="fewer than n_neighbors \\+ 1 = 16"):
        datamodule(few, query_studies=[], min_cells_per_study=1)


def test_single_study(adata):
    with pytest.raises(ScProtoInputError, match="needs at least 2"):
        datamodule(adata[adata.obs["study"] == "study_0"].copy(), query_studies=[])


def test_unknown_query_study(adata):
    with pytest.raises(ScProtoInputError, match="query studies \\['Freytag'\\] are not values"):
        datamodule(adata, query_studies=["Freytag"])


def test_nb_without_counts(adata):
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    with pytest.raises(ScProtoInputError, match="NB likelihood needs raw counts"):
        datamodule(adata, likelihood="nb")


def test_query_studies_as_a_bare_string(adata):
    assert datamodule(adata, query_studies="study_3").query_studies == ["study_3"]


def test_missing_labels_only_warn(adata):
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("cell_type")] = None
    with pytest.warns(UserWarning, match="missing for 3 cells"):
        datamodule(adata, label_key="cell_type")


def test_command_line_exits_non_zero_with_a_message_not_a_traceback(tmp_path):
    missing = tmp_path / "missing.h5ad"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=h5ad",
            f"data.path={missing}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "scproto: error: Data file not found" in result.stderr
    assert "Traceback" not in result.stderr
