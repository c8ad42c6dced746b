"""Turn the CELLxGENE HLCA core file into the input of `experiment=hlca`.

    python scripts/prepare_hlca.py hlca_core_cellxgene.h5ad data/hlca_core.h5ad

CELLxGENE stores normalised values in X and the raw counts in raw.X, with Ensembl IDs as
var_names. This writes a new file (the input is left as it is) whose X and
layers['counts'] hold the counts and whose var_names are the gene symbols
(var['feature_name']), so seurat_v3 HVGs and the marker tasks find what they need.
"""

import argparse
from pathlib import Path

import anndata as ad


def prepare(source: Path, target: Path) -> ad.AnnData:
    if target.exists():
        raise SystemExit(f"{target} exists; remove it or choose another path.")
    adata = ad.read_h5ad(source)
    if adata.raw is None:
        raise SystemExit(f"{source} has no raw.X: these are not CELLxGENE counts.")
    if list(adata.raw.var_names) != list(adata.var_names):
        raise SystemExit(f"{source}: raw.var and var list different genes; align them first.")
    counts = adata.raw.X
    adata = ad.AnnData(X=counts, obs=adata.obs, var=adata.var, uns=adata.uns)
    adata.layers["counts"] = counts
    if "feature_name" in adata.var:
        adata.var_names = adata.var["feature_name"].astype(str)
        adata.var_names_make_unique()
    target.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(target)
    return adata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the CELLxGENE .h5ad file")
    parser.add_argument("target", type=Path, help="where to write the prepared file")
    args = parser.parse_args()
    adata = prepare(args.source, args.target)
    print(f"wrote {args.target}: {adata.n_obs:,} cells × {adata.n_vars:,} genes")


if __name__ == "__main__":
    main()
