"""Deterministic synthetic multi-study single-cell RNA-seq counts with a PBMC-like hierarchy.

Generative model
----------------
1. *Cell types.* Nine PBMC-like cell types sit in five lineages (T cell, NK, B cell, Myeloid,
   Megakaryocyte). Every gene gets a baseline log-abundance (normal minus exponential: a long
   tail of barely detected genes; softly capped so no gene dominates a cell); marker
   programs -- one per lineage, one per subtype (partly shared with its siblings), two shared
   ones (cytotoxic: CD8 T + NK; MHC-II: B + myeloid) and one for the rare megakaryocytes --
   add gamma-distributed log-fold-changes in the cell types that use them, and a small
   lineage- then type-level jitter perturbs all genes. A softmax over genes turns each type's
   log-abundances into expression proportions.
2. *Studies.* Study ``s`` draws a cell-type composition (Dirichlet around PBMC frequencies,
   some types absent), gene-wise technical log-factors ``N(0, batch_strength**2)`` plus a
   weaker study x lineage interaction, a mean library size and a dropout rate.
3. *Counts.* Cell ``c`` of type ``t`` in study ``s`` gets a log-normal library size ``l_c``
   and counts ``x_cg ~ NB(mean=l_c * p_stg, dispersion=theta_g)`` (var = mu + mu**2 / theta),
   where ``p_st`` are the batch-distorted proportions of type ``t``. Finally each non-zero
   count is zeroed with the study's dropout rate (technical zero-inflation).

All randomness comes from ``np.random.default_rng(seed)`` (split into independent streams for
genes, studies and cells), so the output is bit-for-bit reproducible.
"""

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from scproto.errors import ScProtoInputError

__all__ = ["TAXONOMIES", "make_synthetic"]


@dataclass(frozen=True)
class _CellType:
    name: str
    lineage: str
    frequency: float  # typical share of PBMCs
    rna_content: float  # relative library size (monocytes are larger than lymphocytes)


@dataclass(frozen=True)
class _Program:
    name: str
    usage: Mapping[str, float]  # cell type -> share of the program's log-fold-changes it gets
    mean_lfc: float  # mean natural-log fold change of the program's genes
    genes: tuple[str, ...]


_CELL_TYPES = (
    _CellType("CD4 T", "T cell", 0.300, 0.85),
    _CellType("CD8 T", "T cell", 0.150, 0.85),
    _CellType("NK", "NK", 0.100, 0.95),
    _CellType("naive B", "B cell", 0.080, 0.90),
    _CellType("memory B", "B cell", 0.050, 0.95),
    _CellType("CD14 Mono", "Myeloid", 0.200, 1.40),
    _CellType("CD16 Mono", "Myeloid", 0.070, 1.30),
    _CellType("cDC", "Myeloid", 0.044, 1.30),
    _CellType("Megakaryocyte", "Megakaryocyte", 0.006, 0.60),
)
_RARE_TYPE = "Megakaryocyte"
# Query studies always contain these, so label transfer has a hard, close-neighbour trio.
_QUERY_CORE = ("CD4 T", "CD8 T", "NK")

_LINEAGE_LFC = 2.5
# Subtype genes are lineage-restricted and graded between siblings: the subtype gets the full
# effect, its siblings a share of it, so the subtype contrast is only ~_SUBTYPE_LFC / 2.
_SUBTYPE_LFC = 2.0
_SIBLING_SHARE = 0.4
_RARE_LFC = 3.0

_PROGRAMS = (
    _Program(
        "T cell",
        {"CD4 T": 1.0, "CD8 T": 1.0},
        _LINEAGE_LFC,
        (
            "CD3E", "CD3D", "CD3G", "CD2", "CD5", "CD6", "CD7", "CD28", "CD247", "LCK",
            "ZAP70", "ITK", "LAT", "TRAC", "TRBC1", "TRBC2", "BCL11B", "TCF7", "IL32", "GATA3",
            "CD96", "SH2D1A", "THEMIS", "UBASH3A", "TRAT1", "SIT1", "LDHB", "NOSIP", "RCAN3",
            "CAMK4", "MAL", "TXK", "SKAP1", "PRKCQ", "LEF1", "CD27",
        ),
    ),
    _Program(
        "cytotoxic",
        {"CD8 T": 0.4, "NK": 1.0},  # only effector CD8 T cells are strongly cytotoxic
        _LINEAGE_LFC,
        (
            "NKG7", "GNLY", "GZMA", "GZMB", "GZMH", "GZMK", "PRF1", "CST7", "CCL5", "CCL4",
            "KLRD1", "KLRK1", "CTSW", "HOPX",
        ),
    ),
    _Program(
        "NK",
        {"NK": 1.0},
        _LINEAGE_LFC,
        (
            "TYROBP", "FCER1G", "KLRF1", "NCAM1", "KLRC1", "SH2D1B", "NCR1", "NCR3", "KIR2DL1",
            "KIR2DL3", "KIR2DL4", "KIR3DL1", "KIR3DL2", "FCGR3A", "SPON2", "FGFBP2", "MYOM2",
            "IL2RB", "TBX21", "EOMES", "PTGDR", "CLIC3", "AKR1C3", "LAIR2", "B3GNT7", "CD160",
            "CD244", "PRSS23", "MATK", "IGFBP7",
        ),
    ),
    _Program(
        "B cell",
        {"naive B": 1.0, "memory B": 1.0},
        _LINEAGE_LFC,
        (
            "MS4A1", "CD79A", "CD79B", "CD19", "CD22", "CD72", "BANK1", "BLK", "FCRL1", "FCRL2",
            "FCRL5", "PAX5", "VPREB3", "IGKC", "IGLC2", "IGLC3", "IGHM", "SPIB", "POU2AF1",
            "CD180", "FCRLA", "TNFRSF13C", "CR2", "CIITA", "EBF1", "MEF2C", "BLNK", "CD24",
            "LINC00926", "FAM30A", "RALGPS2", "OSBPL10", "STAP1", "SWAP70", "HVCN1",
        ),
    ),
    _Program(
        "Myeloid",
        {"CD14 Mono": 1.0, "CD16 Mono": 1.0, "cDC": 1.0},
        _LINEAGE_LFC,
        (
            "LYZ", "CST3", "TYROBP", "FCER1G", "AIF1", "LST1", "SPI1", "CSF1R", "CD68", "CTSS",
            "PSAP", "NPC2", "SERPINA1", "TYMP", "CFD", "CEBPB", "CEBPD", "MNDA", "LGALS2",
            "LGALS3", "GRN", "CPVL", "KLF4", "IFI30", "PLAUR", "CD33", "ITGAM", "TLR2", "TLR4",
            "FGL2", "MPEG1", "CYBB", "NCF2", "LILRB2", "CLEC7A", "SLC7A7",
        ),
    ),
    _Program(
        "MHC-II",
        {"naive B": 1.0, "memory B": 1.0, "CD14 Mono": 0.6, "CD16 Mono": 1.0, "cDC": 1.2},
        _LINEAGE_LFC,
        (
            "HLA-DRA", "HLA-DRB1", "HLA-DRB5", "HLA-DPA1", "HLA-DPB1", "HLA-DQA1", "HLA-DQB1",
            "HLA-DMA", "HLA-DMB", "CD74",
        ),
    ),
    _Program(
        "CD4 T",
        {"CD4 T": 1.0, "CD8 T": _SIBLING_SHARE},
        _SUBTYPE_LFC,
        ("CD4", "IL7R", "CD40LG", "CCR7", "ICOS", "CTLA4", "ANXA1", "TNFRSF4"),
    ),
    _Program(
        "CD8 T",
        {"CD8 T": 1.0, "CD4 T": _SIBLING_SHARE},
        _SUBTYPE_LFC,
        ("CD8A", "CD8B", "CRTAM", "LAG3", "ZNF683", "RUNX3", "CXCR6"),
    ),
    _Program(
        "naive B",
        {"naive B": 1.0, "memory B": _SIBLING_SHARE},
        _SUBTYPE_LFC,
        ("TCL1A", "IGHD", "FCER2", "IL4R", "YBX3", "PLPP5", "BACH2"),
    ),
    _Program(
        "memory B",
        {"memory B": 1.0, "naive B": _SIBLING_SHARE},
        _SUBTYPE_LFC,
        ("CD27", "TNFRSF13B", "AIM2", "IGHA1", "IGHG1", "SSPN", "CRIP1", "CD80"),
    ),
    _Program(
        "CD14 Mono",
        {"CD14 Mono": 1.0, "CD16 Mono": _SIBLING_SHARE, "cDC": _SIBLING_SHARE},
        _SUBTYPE_LFC,
        ("CD14", "S100A8", "S100A9", "S100A12", "VCAN", "FCN1", "CD36", "CSF3R"),
    ),
    _Program(
        "CD16 Mono",
        {"CD16 Mono": 1.0, "CD14 Mono": _SIBLING_SHARE, "cDC": _SIBLING_SHARE},
        _SUBTYPE_LFC,
        ("FCGR3A", "MS4A7", "CDKN1C", "LYPD2", "HES4", "RHOC", "IFITM2", "CX3CR1"),
    ),
    _Program(
        "cDC",
        {"cDC": 1.0, "CD14 Mono": _SIBLING_SHARE, "CD16 Mono": _SIBLING_SHARE},
        _SUBTYPE_LFC,
        ("FCER1A", "CLEC10A", "CD1C", "CD1E", "ENHO", "PKIB", "FLT3", "CLEC9A"),
    ),
    _Program(
        "Megakaryocyte",
        {"Megakaryocyte": 1.0},
        _RARE_LFC,
        (
            "PPBP", "PF4", "GP9", "ITGA2B", "TUBB1", "GNG11", "SPARC", "CLU", "NRGN", "GP1BB",
            "TREML1", "CMTM5", "PRKAR2B", "RGS18", "MPIG6B", "CAVIN2", "F13A1", "TSC22D1",
            "MYL9", "ACRBP",
        ),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class _Taxonomy:
    """The cell types, their marker programs, and which types are rare."""

    cell_types: tuple[_CellType, ...]
    programs: tuple[_Program, ...]
    rare: tuple[str, ...]  # every study keeps these at their prior share, none drops them

    @cached_property
    def type_names(self) -> list[str]:
        return [cell_type.name for cell_type in self.cell_types]

    @cached_property
    def lineages(self) -> list[str]:
        return list(dict.fromkeys(cell_type.lineage for cell_type in self.cell_types))

    @cached_property
    def lineage_index(self) -> np.ndarray:
        return np.array([self.lineages.index(cell_type.lineage) for cell_type in self.cell_types])

    @cached_property
    def marker_table(self) -> tuple[list[str], list[str]]:
        """Unique marker genes in program order and the comma-joined programs of each."""
        programs_of: dict[str, list[str]] = {}
        for program in self.programs:
            for gene in program.genes:
                programs_of.setdefault(gene, []).append(program.name)
        return list(programs_of), [",".join(names) for names in programs_of.values()]

    @property
    def markers(self) -> list[str]:
        return self.marker_table[0]

    def indices(self, names: tuple[str, ...]) -> list[int]:
        return [self.type_names.index(name) for name in names]


_PBMC = _Taxonomy(_CELL_TYPES, _PROGRAMS, rare=(_RARE_TYPE,))

# The immune atlas: the PBMC types plus two T-cell subtypes that differ from their parent in
# a handful of genes (Treg within CD4 T, MAIT between CD4 and CD8 T) and two more rare types
# (plasmablasts, pDCs), so that fine structure and three rare populations under 1 % coexist.
_ATLAS_TYPES = (
    _CellType("CD4 T", "T cell", 0.250, 0.85),
    _CellType("Treg", "T cell", 0.030, 0.85),
    _CellType("CD8 T", "T cell", 0.130, 0.85),
    _CellType("MAIT", "T cell", 0.030, 0.85),
    _CellType("NK", "NK", 0.090, 0.95),
    _CellType("naive B", "B cell", 0.070, 0.90),
    _CellType("memory B", "B cell", 0.045, 0.95),
    _CellType("Plasmablast", "B cell", 0.005, 1.60),
    _CellType("CD14 Mono", "Myeloid", 0.232, 1.40),
    _CellType("CD16 Mono", "Myeloid", 0.065, 1.30),
    _CellType("cDC", "Myeloid", 0.040, 1.30),
    _CellType("pDC", "pDC", 0.007, 1.00),
    _CellType("Megakaryocyte", "Megakaryocyte", 0.006, 0.60),
)
_ATLAS_USAGE = {  # the new types' shares of the PBMC programs
    "T cell": {"Treg": 1.0, "MAIT": 1.0},
    "cytotoxic": {"MAIT": 0.4},
    "B cell": {"Plasmablast": 0.5},
    "MHC-II": {"Plasmablast": 0.3, "pDC": 0.8},
    "CD4 T": {"Treg": 1.0},
    "CD8 T": {"MAIT": 0.5},
}
_ATLAS_PROGRAMS = (
    *(replace(p, usage={**p.usage, **_ATLAS_USAGE.get(p.name, {})}) for p in _PROGRAMS),
    _Program(
        "Treg", {"Treg": 1.0, "CD4 T": 0.2}, _SUBTYPE_LFC,
        ("FOXP3", "IL2RA", "IKZF2", "TIGIT", "RTKN2", "CCR4"),
    ),
    _Program(
        "MAIT", {"MAIT": 1.0, "CD8 T": 0.2}, _SUBTYPE_LFC,
        ("SLC4A10", "KLRB1", "ZBTB16", "RORC", "IL23R", "CCR6", "DPP4"),
    ),
    _Program(
        "Plasmablast", {"Plasmablast": 1.0}, _RARE_LFC,
        ("JCHAIN", "MZB1", "XBP1", "PRDM1", "TNFRSF17", "TXNDC5", "IGHG2", "SDC1", "DERL3"),
    ),
    _Program(
        "pDC", {"pDC": 1.0}, _RARE_LFC,
        ("LILRA4", "CLEC4C", "IL3RA", "IRF7", "TCF4", "SERPINF1", "PLD4", "PTCRA", "SMPD3"),
    ),
)  # fmt: skip
_ATLAS = _Taxonomy(_ATLAS_TYPES, _ATLAS_PROGRAMS, rare=("Plasmablast", "pDC", "Megakaryocyte"))

TAXONOMIES = {"pbmc": _PBMC, "immune_atlas": _ATLAS}

_MIN_BACKGROUND_GENES = 100
_MIN_CELLS_PER_STUDY = 50

# Background log-abundance ~ N(0, sd) - Exp(tail): left-skewed as in real tissue, with a bounded
# top of highly expressed genes and a long tail of barely detected ones.
_BASELINE_LOG_SD = 2.5
_BASELINE_LOW_TAIL = 3.5
# Markers are detectable genes: their off-state sits above the typical background gene.
_MARKER_BASELINE_MEAN = -1.5
_MARKER_BASELINE_SD = 0.75
# Soft ceiling on log-abundances: no gene takes more than ~10 % of a cell's UMIs, as in real data.
_MAX_LOG_ABUNDANCE = 5.5
_LFC_SHAPE = 6.0  # gamma shape of marker log-fold-changes (coefficient of variation 0.4)
_LINEAGE_JITTER_SD = 0.25
_TYPE_JITTER_SD = 0.1  # subtypes of one lineage stay close apart from their programs
_THETA_MEDIAN = 7.0
_THETA_LOG_SD = 0.5
_INTERACTION_SCALE = 1 / 3  # study x lineage effect relative to the global study effect
_LIBRARY_RANGE = (1500.0, 6000.0)  # study mean UMIs per cell, spread geometrically
_LIBRARY_LOG_SD = 0.4
_MAX_DROPOUT = 0.15
_COMPOSITION_CONCENTRATION = 20.0
_STUDY_SIZE_CONCENTRATION = 10.0
_COMPOSITION_FLOOR = 0.5  # weight of the PBMC prior, keeps every present type >= half its prior
_DROP_PROBABILITY = 0.5  # chance that an intermediate study lacks one droppable type
_SMALL_MEAN = 4.0  # below this NB mean, counts come from the inverse CDF (cheap, mostly zeros)
_CHUNK_ENTRIES = 1 << 22  # entries per sampled block, bounds the dense working memory


@dataclass(frozen=True)
class _StudyDesign:
    sizes: np.ndarray  # cells per study
    compositions: np.ndarray  # (n_studies, n_types) cell-type proportions
    library_means: np.ndarray  # mean UMIs per cell
    dropout: np.ndarray  # probability that a non-zero count is lost


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ScProtoInputError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ScProtoInputError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def _validate(
    n_cells: int,
    n_genes: int,
    n_studies: int,
    query_studies: int,
    batch_strength: float,
    seed: int,
    taxonomy: str,
) -> _Taxonomy:
    if taxonomy not in TAXONOMIES:
        raise ScProtoInputError(
            f"taxonomy={taxonomy!r} is unknown; choose from {', '.join(TAXONOMIES)}."
        )
    markers = TAXONOMIES[taxonomy].markers
    n_studies = _check_int("n_studies", n_studies, 2)
    query_studies = _check_int("query_studies", query_studies, 0)
    if query_studies >= n_studies:
        raise ScProtoInputError(
            f"query_studies ({query_studies}) must be smaller than n_studies ({n_studies}) "
            "so that at least one study remains as reference."
        )
    min_cells = _MIN_CELLS_PER_STUDY * n_studies
    if _check_int("n_cells", n_cells, 1) < min_cells:
        raise ScProtoInputError(
            f"n_cells={n_cells} is too small for {n_studies} studies; use n_cells >= {min_cells} "
            f"({_MIN_CELLS_PER_STUDY} cells per study)."
        )
    min_genes = len(markers) + _MIN_BACKGROUND_GENES
    if _check_int("n_genes", n_genes, 1) < min_genes:
        raise ScProtoInputError(
            f"n_genes={n_genes} is too small to hold the {len(markers)} marker-program genes plus "
            f"{_MIN_BACKGROUND_GENES} background genes; use n_genes >= {min_genes}."
        )
    if isinstance(batch_strength, bool) or not isinstance(batch_strength, numbers.Real):
        raise ScProtoInputError(f"batch_strength must be a real number, got {batch_strength!r}.")
    if not np.isfinite(batch_strength) or batch_strength < 0:
        raise ScProtoInputError(
            f"batch_strength must be finite and non-negative, got {batch_strength}."
        )
    _check_int("seed", seed, 0)
    return TAXONOMIES[taxonomy]


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest-remainder rounding)."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - counts.sum()
    counts[np.argsort(counts - exact, kind="stable")[:shortfall]] += 1
    return counts


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _soft_cap(log_abundance: np.ndarray) -> np.ndarray:
    """Smooth minimum with ``_MAX_LOG_ABUNDANCE``: identity far below it, saturating above."""
    return _MAX_LOG_ABUNDANCE - np.logaddexp(0.0, _MAX_LOG_ABUNDANCE - log_abundance)


def _type_log_abundances(rng: np.random.Generator, n_genes: int, taxa: _Taxonomy) -> np.ndarray:
    """Log-abundances ``(n_types, n_genes)``, marker genes first in ``taxa.markers`` order."""
    n_markers = len(taxa.markers)
    baseline = np.concatenate(
        [
            rng.normal(_MARKER_BASELINE_MEAN, _MARKER_BASELINE_SD, n_markers),
            rng.normal(0.0, _BASELINE_LOG_SD, n_genes - n_markers)
            - rng.exponential(_BASELINE_LOW_TAIL, n_genes - n_markers),
        ]
    )
    log_abundance = np.tile(baseline, (len(taxa.cell_types), 1))
    for program in taxa.programs:
        genes = [taxa.markers.index(gene) for gene in program.genes]
        # Largest effects go to the genes listed first, the canonical markers (CD3E, LYZ, ...).
        lfc = np.sort(rng.gamma(_LFC_SHAPE, program.mean_lfc / _LFC_SHAPE, len(genes)))[::-1]
        for name, share in program.usage.items():
            log_abundance[taxa.type_names.index(name), genes] += share * lfc
    lineage_jitter = rng.normal(0.0, _LINEAGE_JITTER_SD, (len(taxa.lineages), n_genes))
    type_jitter = rng.normal(0.0, _TYPE_JITTER_SD, log_abundance.shape)
    return _soft_cap(log_abundance + lineage_jitter[taxa.lineage_index] + type_jitter)


def _expression_profiles(
    rng: np.random.Generator, n_genes: int, n_studies: int, batch_strength: float, taxa: _Taxonomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expression proportions ``(n_studies, n_types, n_genes)``, dispersions and gene order.

    The order is the shuffle applied to the markers-first gene axis, so that markers are
    scattered among background genes as in real data.
    """
    order = rng.permutation(n_genes)
    log_abundance = _type_log_abundances(rng, n_genes, taxa)[:, order]
    theta = np.exp(rng.normal(np.log(_THETA_MEDIAN), _THETA_LOG_SD, n_genes))
    study_effect = rng.normal(0.0, batch_strength, (n_studies, 1, n_genes))
    interaction = rng.normal(
        0.0, _INTERACTION_SCALE * batch_strength, (n_studies, len(taxa.lineages), n_genes)
    )
    lineage = taxa.lineage_index
    return _softmax(log_abundance + study_effect + interaction[:, lineage]), theta, order


def _study_compositions(rng: np.random.Generator, n_studies: int, taxa: _Taxonomy) -> np.ndarray:
    """Cell-type proportions ``(n_studies, n_types)``.

    Study 0 holds every type, so the reference covers the full taxonomy. The last study and,
    with probability ``_DROP_PROBABILITY``, each intermediate one lack one non-rare type outside
    the query core, giving partial overlap between studies. Rare types keep their prior share.
    """
    prior = np.array([cell_type.frequency for cell_type in taxa.cell_types])
    rare = taxa.indices(taxa.rare)
    excluded = (*taxa.rare, *_QUERY_CORE)
    droppable = [i for i, name in enumerate(taxa.type_names) if name not in excluded]
    compositions = np.empty((n_studies, len(taxa.type_names)))
    for study in range(n_studies):
        drawn = rng.dirichlet(_COMPOSITION_CONCENTRATION * prior)
        weights = _COMPOSITION_FLOOR * prior + (1 - _COMPOSITION_FLOOR) * drawn
        drop = study == n_studies - 1 or (study > 0 and rng.random() < _DROP_PROBABILITY)
        if drop:
            weights[rng.choice(droppable)] = 0.0
        weights[rare] = 0.0
        compositions[study] = (1 - prior[rare].sum()) * weights / weights.sum()
        compositions[study, rare] = prior[rare]
    return compositions


def _study_design(
    rng: np.random.Generator, n_cells: int, n_studies: int, taxa: _Taxonomy
) -> _StudyDesign:
    """Sizes, compositions, library sizes and dropout of the studies."""
    # Uneven study sizes, none below half of the even share.
    size_weights = 1 / n_studies + rng.dirichlet(np.full(n_studies, _STUDY_SIZE_CONCENTRATION))
    return _StudyDesign(
        sizes=_allocate(n_cells, size_weights),
        compositions=_study_compositions(rng, n_studies, taxa),
        library_means=rng.permutation(np.geomspace(*_LIBRARY_RANGE, n_studies)),
        dropout=rng.uniform(0.0, _MAX_DROPOUT, n_studies),
    )


def _study_cell_types(n_cells: int, composition: np.ndarray, keep: list[int]) -> np.ndarray:
    """Type index per cell: exact allocation, so rare types never vanish by sampling noise;
    the types in ``keep`` get at least one cell."""
    counts = _allocate(n_cells, composition)
    for rare in keep:
        if counts[rare] == 0:
            counts[rare] = 1
            counts[np.argmax(counts)] -= 1
    return np.repeat(np.arange(len(composition)), counts)


def _cells(
    rng: np.random.Generator, design: _StudyDesign, taxa: _Taxonomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Study index, cell-type index and library size of every cell, ordered by study.

    Study 0 keeps at least one cell of each rare type, so the reference contains every type.
    """
    rare = taxa.indices(taxa.rare)
    studies = np.repeat(np.arange(design.sizes.size), design.sizes)
    cell_types = np.concatenate(
        [
            rng.permutation(_study_cell_types(size, composition, rare if study == 0 else []))
            for study, (size, composition) in enumerate(
                zip(design.sizes, design.compositions, strict=True)
            )
        ]
    )
    rna_content = np.array([cell_type.rna_content for cell_type in taxa.cell_types])
    library_sizes = (
        design.library_means[studies]
        * rna_content[cell_types]
        * rng.lognormal(-(_LIBRARY_LOG_SD**2) / 2, _LIBRARY_LOG_SD, studies.size)
    )
    return studies, cell_types, library_sizes


def _nb_positive_quantile(u: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """NB quantile at ``u`` for ``u >= P(X = 0)``, by accumulating the pmf recursion.

    ``P(k) = P(k - 1) * (k - 1 + theta) / k * q`` with ``q = mu / (mu + theta)``. Only entries
    still below ``u`` are carried forward, so the cost is about the sum of the counts; ``u`` is
    float32 (at most 1 - 2**-24) and the float64 CDF passes it, so the loop terminates.
    """
    q = mu / (mu + theta)
    p_zero = np.exp(theta * np.log1p(-q))
    pmf = p_zero * theta * q
    cdf = p_zero + pmf
    counts = np.ones(u.size, dtype=np.int64)
    index = np.arange(u.size)
    k = 1
    while (pending := u >= cdf).any():
        index, u, q, theta, pmf, cdf = (a[pending] for a in (index, u, q, theta, pmf, cdf))
        k += 1
        pmf = pmf * (k - 1 + theta) / k * q
        cdf = cdf + pmf
        counts[index] = k
    return counts


def _sample_block(
    rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray, dropout: np.ndarray
) -> sparse.csr_matrix:
    """Zero-inflated NB counts for a dense block of means ``(n_cells, n_genes)``.

    Most entries have small means and are zero, so they are resolved from one uniform draw
    against ``P(X = 0)`` (inverse CDF) instead of a gamma and a Poisson draw each; large means
    use the gamma-Poisson mixture directly. Both routes sample the same NB exactly. ``dropout``
    holds each cell's probability of losing a non-zero count.
    """
    n_cells, n_genes = mean.shape
    p_zero = np.exp(-theta * np.log1p(mean / theta)).ravel()
    mean = mean.ravel()  # flat indices are cheaper to find and split than (row, col) pairs
    u = rng.random(mean.size, dtype=np.float32)
    counts = np.zeros(mean.size, dtype=np.int32)
    large = np.flatnonzero(mean >= _SMALL_MEAN)
    shape = theta[large % n_genes]
    counts[large] = rng.poisson(rng.gamma(shape, mean[large] / shape))
    small = np.flatnonzero((u >= p_zero) & (mean < _SMALL_MEAN))
    counts[small] = _nb_positive_quantile(
        u[small].astype(np.float64),
        mean[small].astype(np.float64),
        theta[small % n_genes].astype(np.float64),
    )
    nonzero = np.flatnonzero(counts)
    nonzero = nonzero[rng.random(nonzero.size) >= dropout[nonzero // n_genes]]
    rows, cols = np.divmod(nonzero, n_genes)
    # Flat indices ascend, so (rows, cols) is already in CSR order.
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_cells), out=indptr[1:])
    return sparse.csr_matrix(
        (counts[nonzero].astype(np.float32), cols.astype(np.int32), indptr),
        shape=(n_cells, n_genes),
    )


def _sample_counts(
    rng: np.random.Generator,
    proportions: np.ndarray,
    studies: np.ndarray,
    cell_types: np.ndarray,
    library_sizes: np.ndarray,
    theta: np.ndarray,
    dropout: np.ndarray,
) -> sparse.csr_matrix:
    """Counts for all cells, in row blocks so memory stays far below a dense matrix.

    ``proportions`` is ``(n_studies, n_types, n_genes)``; ``dropout`` is per study.
    """
    n_genes = proportions.shape[2]
    block = max(1, _CHUNK_ENTRIES // n_genes)
    theta = theta.astype(np.float32)
    blocks = []
    for start in range(0, cell_types.size, block):
        cells = slice(start, start + block)
        mean = library_sizes[cells, None] * proportions[studies[cells], cell_types[cells]]
        blocks.append(_sample_block(rng, mean, theta, dropout[studies[cells]]))
    return _stack_rows(blocks, n_genes)


def _stack_rows(blocks: list[sparse.csr_matrix], n_genes: int) -> sparse.csr_matrix:
    """``sparse.vstack(blocks)``, releasing each block once it is copied: the peak is one
    matrix and one block, not two matrices (6 GB at a million cells)."""
    nnz = sum(b.nnz for b in blocks)
    data = np.empty(nnz, dtype=np.float32)  # untouched pages cost no memory until written
    indices = np.empty(nnz, dtype=np.int32)
    indptr = np.zeros(sum(b.shape[0] for b in blocks) + 1, dtype=np.int64)
    entry = row = 0
    while blocks:
        b = blocks.pop(0)
        data[entry : entry + b.nnz], indices[entry : entry + b.nnz] = b.data, b.indices
        indptr[row + 1 : row + 1 + b.shape[0]] = b.indptr[1:] + entry
        entry, row = entry + b.nnz, row + b.shape[0]
        del b
    return sparse.csr_matrix((data, indices, indptr), shape=(row, n_genes))


def _gene_table(n_genes: int, order: np.ndarray, taxa: _Taxonomy) -> pd.DataFrame:
    """``var`` for the markers-first gene axis shuffled by ``order``.

    Background genes are numbered ``GENE0001``, ... in their final order.
    """
    markers, marker_of = taxa.marker_table
    n_background = n_genes - len(markers)
    names = np.array(markers + [""] * n_background, dtype=object)[order]
    width = max(4, len(str(n_background)))
    names[names == ""] = [f"GENE{i:0{width}d}" for i in range(1, n_background + 1)]
    marker_of = np.array(marker_of + [""] * n_background, dtype=object)[order]
    marker_of = pd.Categorical(marker_of.astype(str))  # stored as written: no conversion on write
    return pd.DataFrame({"marker_of": marker_of}, index=pd.Index(names.astype(str)))


def _cell_table(
    studies: np.ndarray, cell_types: np.ndarray, n_studies: int, query_studies: int, taxa: _Taxonomy
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "study": pd.Categorical.from_codes(studies, [f"study_{i}" for i in range(n_studies)]),
            "cell_type": pd.Categorical.from_codes(cell_types, taxa.type_names),
            "lineage": pd.Categorical.from_codes(taxa.lineage_index[cell_types], taxa.lineages),
            "split": pd.Categorical.from_codes(
                (studies >= n_studies - query_studies).astype(np.int8), ["reference", "query"]
            ),
        },
        index=pd.Index([f"cell_{i}" for i in range(studies.size)]),
    )


def make_synthetic(
    n_cells: int = 6000,
    n_genes: int = 2000,
    n_studies: int = 4,
    query_studies: int = 1,
    batch_strength: float = 0.6,
    seed: int = 0,
    taxonomy: str = "pbmc",
    counts_layer: bool = True,
) -> ad.AnnData:
    """Simulate a multi-study PBMC-like single-cell count dataset (see the module docstring).

    Parameters
    ----------
    n_cells
        Total number of cells, split unevenly across studies.
    n_genes
        Number of genes: the marker-program genes (real symbols such as ``CD3E``, ``LYZ``)
        and background genes ``GENE0001``, ..., shuffled together.
    n_studies
        Number of studies (batches), at least 2.
    query_studies
        How many of the last studies are marked ``split == "query"``.
    batch_strength
        Standard deviation of the study-specific gene-wise log-factors.
    seed
        Seed of the only random generator used; equal seeds give identical data.
    taxonomy
        ``"pbmc"``: nine PBMC types, one rare. ``"immune_atlas"``: thirteen types, adding
        Treg and MAIT subtypes and two more rare types (plasmablasts, pDCs); see ``TAXONOMIES``.
    counts_layer
        Also keep a copy of the counts in ``layers["counts"]`` (so normalising ``X`` in
        place keeps them). ``False`` halves the memory, which matters at a million cells.

    Returns
    -------
    AnnData with raw UMI counts in ``X`` (and ``layers["counts"]``; CSR, float32), ``obs``
    columns ``study``, ``cell_type``, ``lineage`` and ``split`` (categorical), ``var["marker_of"]``
    (comma-joined programs, ``""`` for background genes), ``uns["query_studies"]`` and
    ``uns["synthetic"]`` (the generator's parameters and per-study settings).
    """
    taxa = _validate(n_cells, n_genes, n_studies, query_studies, batch_strength, seed, taxonomy)
    # Independent streams: the study design (sizes aside) depends only on the seed and
    # n_studies, and the expression profiles not on n_cells.
    gene_rng, study_rng, cell_rng = np.random.default_rng(seed).spawn(3)
    proportions, theta, gene_order = _expression_profiles(
        gene_rng, n_genes, n_studies, batch_strength, taxa
    )
    design = _study_design(study_rng, n_cells, n_studies, taxa)
    studies, cell_types, library_sizes = _cells(cell_rng, design, taxa)
    counts = _sample_counts(
        cell_rng,
        proportions.astype(np.float32),
        studies,
        cell_types,
        library_sizes.astype(np.float32),
        theta,
        design.dropout,
    )

    obs = _cell_table(studies, cell_types, n_studies, query_studies, taxa)
    adata = ad.AnnData(X=counts, obs=obs, var=_gene_table(n_genes, gene_order, taxa))
    if counts_layer:
        adata.layers["counts"] = counts.copy()  # a copy, so in-place normalisation of X keeps it
    study_names = list(obs["study"].cat.categories)
    adata.uns["query_studies"] = study_names[n_studies - query_studies :]
    adata.uns["synthetic"] = {
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "n_studies": int(n_studies),
        "query_studies": int(query_studies),
        "batch_strength": float(batch_strength),
        "seed": int(seed),
        "taxonomy": taxonomy,
        "library_size_mean": dict(zip(study_names, design.library_means.tolist(), strict=True)),
        "dropout_rate": dict(zip(study_names, design.dropout.tolist(), strict=True)),
    }
    return adata
