"""Typed access to params.yaml.

One pydantic model per section; unknown keys are rejected, every value is checked before a
stage writes anything. ``load_params("train")`` returns the validated ``train`` section, or
raises :class:`ParamsError` whose message names the bad key and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")

Optimizer = Literal["adam", "adamw", "sgd"]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class ParamsError(ValueError):
    """A params.yaml value that the pipeline cannot use."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Source = Literal["digits", "mnist", "fashion-mnist", "cifar10", "image_folder", "csv"]
# Sources with a known public download; the others read only what data.path points at.
DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10")
EXTERNAL_DIR = Path("data/external")


class DataParams(_Section):
    source: Source = "digits"
    path: str | None = None
    download: bool = False
    image_size: Annotated[int, Field(ge=1, le=1024)] = 32
    color: Literal["grey", "rgb"] = "grey"
    label_column: Annotated[str, Field(min_length=1)] = "label"
    classes: list[str | int] | None = Field(default=None, min_length=2)
    features: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _path_given(self) -> DataParams:
        if self.source in ("image_folder", "csv") and not self.path:
            raise ValueError(f"path: source {self.source!r} reads a file or folder; set data.path")
        if self.download and self.source not in DOWNLOADABLE:
            raise ValueError(
                f"download: source {self.source!r} has nothing to download "
                f"(only {', '.join(DOWNLOADABLE)})"
            )
        if self.classes is not None and len(set(map(str, self.classes))) != len(self.classes):
            raise ValueError("classes: names must be unique")
        return self

    def location(self) -> Path:
        """Where the source's files are: data.path, or data/external/<source>/."""
        return Path(self.path) if self.path else EXTERNAL_DIR / self.source


class SplitParams(_Section):
    train: Annotated[float, Field(gt=0, lt=1)] = 0.7
    val: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test: Annotated[float, Field(gt=0, lt=1)] = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class ValidateParams(_Section):
    split: SplitParams = SplitParams()
    min_per_class: Annotated[int, Field(ge=1)] = 20
    max_quarantine_frac: Fraction = 0.05


ModelName = Literal["cnn", "resnet18", "mlp"]
Augmentation = Literal["crop", "flip"]


class ModelParams(_Section):
    name: ModelName = "cnn"
    channels: Annotated[int, Field(ge=1)] = 32
    dropout: Fraction = 0.2
    weights_path: str | None = None
    freeze_backbone: bool = False

    @model_validator(mode="after")
    def _transfer_options(self) -> ModelParams:
        if self.freeze_backbone and not self.weights_path:
            raise ValueError(
                "freeze_backbone: needs model.weights_path (a frozen random backbone is useless)"
            )
        return self


Monitor = Literal["val/acc", "val/loss"]


def direction(metric: str) -> Literal["maximize", "minimize"]:
    """Whether a monitored metric improves upwards (accuracy) or downwards (loss)."""
    return "minimize" if metric.endswith("loss") else "maximize"


# Searched as a [low, high] range by the tpe and random samplers; with the grid sampler, every
# listed value is a grid point.
RANGES = ("lr", "dropout", "weight_decay")


class SearchSpace(_Section):
    lr: list[PositiveFloat] = Field(default=[5e-4, 2e-2], min_length=1)
    batch_size: list[Annotated[int, Field(ge=1)]] = Field(default=[32, 64, 128], min_length=1)
    channels: list[Annotated[int, Field(ge=1)]] = Field(default=[16, 32, 48], min_length=1)
    dropout: list[Fraction] = Field(default=[0.0, 0.4], min_length=1)
    weight_decay: list[PositiveFloat] = Field(default=[1e-6, 1e-3], min_length=1)
    optimizer: list[Optimizer] = Field(default=["adam", "adamw", "sgd"], min_length=1)
    model: list[ModelName] | None = Field(default=None, min_length=1)

    def grid(self) -> dict[str, list]:
        """Every searched key with its listed values (the grid sampler's search space)."""
        return {k: list(v) for k, v in self.model_dump().items() if v is not None}


class TuneParams(_Section):
    n_trials: Annotated[int, Field(ge=0)] = 12
    metric: Monitor = "val/loss"
    epochs: Annotated[int, Field(ge=1)] = 15
    seed: int = 42
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    search_space: SearchSpace = SearchSpace()

    @model_validator(mode="after")
    def _ranges(self) -> TuneParams:
        if self.sampler == "grid":
            return self
        for name in RANGES:
            values = getattr(self.search_space, name)
            if len(values) != 2:
                raise ValueError(
                    f"search_space: {name}: the {self.sampler} sampler searches a range "
                    f"[low, high], got {len(values)} value(s); list several values only with "
                    "tune.sampler: grid"
                )
            low, high = values
            if low > high:
                raise ValueError(f"search_space: {name}: low {low:g} is above high {high:g}")
        return self


class TrainParams(_Section):
    seed: int = 42
    max_epochs: Annotated[int, Field(ge=1)] = 40
    patience: Annotated[int, Field(ge=1)] = 8
    monitor: Monitor = "val/loss"
    batch_size: Annotated[int, Field(ge=1)] = 64
    lr: PositiveFloat = 3e-3
    optimizer: Optimizer = "adamw"
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    augment: list[Augmentation] = []
    gradient_clip_val: Annotated[float, Field(gt=0)] | None = None
    accumulate_grad_batches: Annotated[int, Field(ge=1)] = 1
    resume: Literal["auto", "must", "never"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    # true: bit-identical runs, an error where an op has no deterministic kernel (some CUDA
    # backward passes); warn: deterministic kernels where they exist, a warning where not
    # (bit-identical on the CPU); false: the fastest kernels.
    deterministic: bool | Literal["warn"] = "warn"


class EvaluateParams(_Section):
    batch_size: Annotated[int, Field(ge=1)] = 512


class RegisterParams(_Section):
    model_name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][\w.-]*$")] = "digits-cnn"
    metric: Literal["accuracy", "f1_macro"] = "accuracy"
    min_delta: Annotated[float, Field(ge=0, le=1)] = 0.0


class MlflowParams(_Section):
    experiment: Annotated[str, Field(min_length=1)] = "runway-digits"


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    validate_: ValidateParams = Field(default=ValidateParams(), alias="validate")
    tune: TuneParams = TuneParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register_: RegisterParams = Field(default=RegisterParams(), alias="register")
    mlflow: MlflowParams = MlflowParams()

    @model_validator(mode="after")
    def _weights_for_resnet(self) -> Params:
        names = self.tune.search_space.model or [self.model.name]
        if self.model.weights_path and "resnet18" not in names:
            raise ValueError(
                f"model.weights_path: only resnet18 loads pretrained weights, not {names[0]}"
            )
        return self


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part).rstrip("_") for part in error["loc"]) or "<top level>"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "literal_error":
        return f"{key}: {error['input']!r} is not allowed; {error['msg'].lower()}"
    if kind == "value_error":  # from a model validator: "field: what is wrong"
        message = error["msg"].removeprefix("Value error, ")
        if key == "<top level>":
            return message
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            return f"{key}.{field}: {rest}"
        return f"{key}: {message}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: dict[str, Any] | None, source: str = str(PARAMS_FILE)) -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"{source}: {problems}") from None


def load_params(section: str | None = None, path: Path | str = PARAMS_FILE) -> Any:
    """Read and validate params.yaml; return one section's model, or all of it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    params = parse_params(raw, str(path))
    if section is None:
        return params
    if section not in Params.model_fields and f"{section}_" not in Params.model_fields:
        raise ParamsError(f"{path}: no section {section!r}")
    return getattr(params, section if section in Params.model_fields else f"{section}_")


# Where each tuned value (a key of reports/tune/best_params.json) goes: (section, field).
TUNED_FIELDS: dict[str, tuple[str, str]] = {
    "lr": ("train", "lr"),
    "batch_size": ("train", "batch_size"),
    "weight_decay": ("train", "weight_decay"),
    "optimizer": ("train", "optimizer"),
    "channels": ("model", "channels"),
    "dropout": ("model", "dropout"),
    "model": ("model", "name"),
}


def with_tuned(
    train: TrainParams, model: ModelParams, tuned: dict[str, Any], source: str = "tuned values"
) -> tuple[TrainParams, ModelParams]:
    """The train and model sections with tuned values on top, validated the same way."""
    unknown = sorted(set(tuned) - set(TUNED_FIELDS))
    if unknown:
        raise ParamsError(f"{source}: keys that cannot be tuned: {unknown}")
    sections = {"train": train.model_dump(), "model": model.model_dump()}
    for key, value in tuned.items():
        section, field = TUNED_FIELDS[key]
        sections[section][field] = value
    validated = []
    for name, section in (("train", TrainParams), ("model", ModelParams)):
        try:
            validated.append(section.model_validate(sections[name]))
        except ValidationError as exc:
            problems = "; ".join(_describe({**e, "loc": (name, *e["loc"])}) for e in exc.errors())
            raise ParamsError(f"{source}: {problems}") from None
    return validated[0], validated[1]
