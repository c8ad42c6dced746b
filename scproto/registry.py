"""What a trained model knows about its data, stored in every checkpoint: one typed record
that training fills, query mapping extends and inference reads."""

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from scproto.data.preprocess import InputSpec


@dataclass
class Registry:
    """The ``scproto_registry`` of a checkpoint.

    ``studies`` grows with query mapping (the model's study-embedding rows, in order);
    ``reference_studies`` are those it was trained on. The prototype fields are filled once
    training has described its prototypes (metacells.h5ad).
    """

    input_spec: InputSpec
    batch_key: str
    studies: list[str]
    likelihood: str = "mse"
    label_key: str | None = None
    reference_studies: list[str] = field(default_factory=list)
    scproto_version: str = ""
    # Read only: models saved before prototype_points decode the prototype at this norm.
    prototype_norms: list[float] | None = None
    # where each prototype is decoded; with model.assignment=point, what cells are assigned to
    prototype_points: list[list[float]] | None = None
    # reference cells whose nearest prototype each is; query mapping uses the populated ones
    prototype_sizes: list[int] | None = None
    prototype_labels: list[str | None] | None = None  # the label label transfer uses
    prototype_label_confidence: list[float] | None = None
    label_categories: list[str] | None = None  # the training labels' categories
    label_uncertainty_threshold: float = 0.7  # label_transfer.uncertainty_threshold
    # the data settings training built its views with (n_pcs, n_neighbors, geometry_pcs,
    # ...), which query mapping reuses; None in models saved before them (data defaults)
    view_settings: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.reference_studies:  # checkpoints written before query mapping
            self.reference_studies = list(self.studies)

    @property
    def has_labels(self) -> bool:
        return self.prototype_labels is not None

    def with_studies(self, new_studies: list[str]) -> "Registry":
        """The registry of the model that also knows ``new_studies`` (query mapping)."""
        return replace(self, studies=[*self.studies, *new_studies])

    def to_dict(self) -> dict[str, Any]:
        """Plain data, which checkpoints load with ``weights_only``."""
        return {**asdict(self), "input_spec": self.input_spec.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Registry":
        """A stored registry; keys this version does not know are left out."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["input_spec"] = InputSpec.from_dict(data["input_spec"])
        return cls(**values)
