"""Typed access to params.yaml.

One pydantic model per section; unknown keys are rejected, every value is checked before a
stage writes anything. ``load_params("train")`` returns the validated ``train`` section, or
raises :class:`ParamsError` whose message names the bad key and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

PARAMS_FILE = Path("params.yaml")
# Set to a directory, every stage writes there which params keys it read (<stage>.json); the
# tests compare that with the keys dvc.yaml lists for the stage.
READS_ENV = "RUNWAY_PARAMS_READS"

Optimizer = Literal["adam", "adamw", "sgd"]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class ParamsError(ValueError):
    """A params.yaml value that the pipeline cannot use."""


# The params keys read since load_params() started recording (None: not recording).
_reads: set[str] | None = None


def params_read() -> set[str]:
    """The dotted params keys read so far (empty unless RUNWAY_PARAMS_READS is set)."""
    return set(_reads or ())


class _Section(BaseModel):
    """A params.yaml section. Sections returned by load_params() know their dotted key, so
    that reading a value can be recorded (see READS_ENV); values put in by tuning or by
    ``model_copy(update=...)`` are not params.yaml values and are not recorded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _key: str | None = PrivateAttr(default=None)
    _replaced: frozenset[str] = PrivateAttr(default=frozenset())

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _reads is not None and name in type(self).model_fields:
            if isinstance(value, _Section):
                return value
            key = self._key
            if key is not None and name not in self._replaced:
                _reads.add(f"{key}.{name.rstrip('_')}")
        return value

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        if _reads is not None and self._key is not None:
            exclude = kwargs.get("exclude") or ()
            for name in type(self).model_fields:
                if name not in exclude:
                    value = getattr(self, name)
                    if isinstance(value, _Section):
                        value.model_dump()
        return super().model_dump(**kwargs)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False):
        copy = super().model_copy(update=update, deep=deep)
        copy._replaced = self._replaced | frozenset(update or ())
        return copy

    def _bind(self, key: str, replaced: frozenset[str] = frozenset()) -> None:
        """Name this section (and its sub-sections) by its dotted key in params.yaml."""
        self._key, self._replaced = key, replaced
        for name in type(self).model_fields:
            value = BaseModel.__getattribute__(self, name)
            if isinstance(value, _Section):
                value._bind(f"{key}.{name.rstrip('_')}")


Source = Literal["digits", "mnist", "fashion-mnist", "cifar10", "image_folder", "csv"]
# Sources with a known public download; the others read only what data.path points at.
DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10")
EXTERNAL_DIR = Path("data/external")
# Local weights files for transfer learning (model.weights_path): hashed by DVC as a dependency.
PRETRAINED_DIR = Path("pretrained")


class DataParams(_Section):
    source: Source = "digits"
    path: str | None = None
    download: bool = False
    image_size: Annotated[int, Field(ge=1, le=1024)] = 32
    color: Literal["grey", "rgb"] = "grey"
    label_column: Annotated[str, Field(min_length=1)] = "label"
    classes: list[str | int] | None = Field(default=None, min_length=2)
    features: list[str] | None = Field(default=None, min_length=1)
    delimiter: str = "auto"

    @model_validator(mode="after")
    def _path_given(self) -> DataParams:
        if self.delimiter != "auto" and len(self.delimiter) != 1:
            raise ValueError(
                f"delimiter: {self.delimiter!r} is neither 'auto' nor one character "
                "(e.g. ',', ';', '|' or a tab, written \"\\t\")"
            )
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
    epochs: Annotated[int, Field(ge=1)] = 10
    seed: int = 42
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    # A trial validates every val_check_interval of an epoch (named as Lightning's option, a
    # fraction: 1 over a whole number k up to 100, so that each epoch ends on a check) and
    # reports k checks an epoch to the pruner: 0.25 lets it stop a bad trial inside its first
    # epoch, for four validations an epoch. The pruners count checks.
    val_check_interval: Annotated[float, Field(ge=0.01, le=1)] = 1.0

    @field_validator("val_check_interval")
    @classmethod
    def _whole_checks(cls, value: float) -> float:
        checks = round(1 / value)
        if abs(value * checks - 1) > 0.005:  # 0.333 is 1/3; 0.3 is not 1/k
            raise ValueError(
                f"{value:g}: expected 1 over a whole number of checks an epoch (1, 0.5, 0.25, "
                f"0.2, 0.1, ...; the nearest is 1/{checks}), so that every epoch ends on a check"
            )
        return value

    @property
    def checks_per_epoch(self) -> int:
        return round(1 / self.val_check_interval)

    # Trials train on at most train_samples of the training split and are judged on at most
    # val_samples of the val split (the same random ones, drawn with tune.seed, for every
    # trial and worker); the train stage uses every sample. null: the whole split. Below
    # them (the digits) nothing changes.
    train_samples: Annotated[int, Field(ge=1)] | None = 5_000
    val_samples: Annotated[int, Field(ge=1)] | None = 2_500
    # local: mlruns/optuna.db; else the name of an environment variable that holds the study
    # database's URL (a password never goes in params.yaml)
    storage: str = "local"
    workers: Annotated[int, Field(ge=1)] = 1  # local worker processes on one study
    search_space: SearchSpace = SearchSpace()

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if value == "local" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            return value
        raise ValueError(
            f"{value.split('://')[0] + '://...' if '://' in value else repr(value)}: expected "
            "local or the name of an environment variable holding the study database's URL "
            "(e.g. OPTUNA_STORAGE), so that no password is written in params.yaml"
        )

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
    max_epochs: Annotated[int, Field(ge=1)] = 10
    patience: Annotated[int, Field(ge=1)] = 5
    monitor: Monitor = "val/loss"
    batch_size: Annotated[int, Field(ge=1)] = 64
    # The learning rate at a global batch of lr_batch_size samples. Training at another global
    # batch B scales it (lr_scaling): linear, lr x B / lr_batch_size (Goyal et al. 2017, for
    # SGD); sqrt, lr x sqrt(B / lr_batch_size) (Malladi et al. 2022, for Adam); auto, linear
    # for sgd and sqrt for adam and adamw; none, lr as is. So a tuned lr carries over to
    # larger batches and more devices.
    lr: PositiveFloat = 3e-3
    lr_batch_size: Annotated[int, Field(ge=1)] = 64
    lr_scaling: Literal["auto", "linear", "sqrt", "none"] = "auto"
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
    # Data-parallel training (the train stage only; tuning trials use one device): devices per
    # machine (a number or "auto": every GPU, or 1 CPU), Lightning's strategy and machines.
    # train.batch_size is per device: the global batch is batch_size x devices x num_nodes x
    # accumulate_grad_batches.
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    strategy: Literal["auto", "ddp"] = "auto"
    num_nodes: Annotated[int, Field(ge=1)] = 1
    # Lightning's precision: 32-true (float32), bf16-mixed (bfloat16 autocast: GPUs from Ampere
    # on, and CPUs), 16-mixed (float16 autocast with loss scaling: CUDA GPUs only). The logged
    # model is float32 whatever trained it.
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    # Where the train and val splits live while training: device (moved once; batches are
    # gathered there), host (batches gathered in pinned host memory and copied as they are
    # needed: data larger than the GPU), disk (memory-mapped from a copy of their pixels under
    # .runway/prepared/, batches gathered from it: data larger than host memory), or auto:
    # device when they take at most half of the GPU's free memory (on a CPU: when they are
    # in memory), else disk when they would take more than half of the host's available
    # memory (a copy per process loading them), else host.
    data_placement: Literal["auto", "device", "host", "disk"] = "auto"
    # torch.compile the network for training and validation (a one-time compile of tens of
    # seconds, then faster steps on a GPU); the logged model is the plain network.
    compile: bool = False


class EvaluateParams(_Section):
    batch_size: Annotated[int, Field(ge=1)] = 512


class RegisterParams(_Section):
    model_name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][\w.-]*$")] = "digits-cnn"
    metric: Literal["accuracy", "f1_macro"] = "accuracy"
    min_delta: Annotated[float, Field(ge=0, le=1)] = 0.0


class RetrainParams(_Section):
    """``runway retrain``'s drift flags (the report's drift section, nothing is stopped)."""

    drift_class_share: Annotated[float, Field(gt=0, le=1)] = 0.05
    drift_mean: Annotated[float, Field(gt=0)] = 0.25
    drift_std: Annotated[float, Field(gt=0)] = 0.25


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
    retrain: RetrainParams = RetrainParams()
    mlflow: MlflowParams = MlflowParams()

    @model_validator(mode="after")
    def _checks_between_steps(self) -> Params:
        accumulate = self.train.accumulate_grad_batches
        if self.tune.n_trials and self.tune.val_check_interval < 1 and accumulate > 1:
            raise ValueError(
                f"tune.val_check_interval: {self.tune.val_check_interval:g} validates trials "
                f"inside an epoch, and train.accumulate_grad_batches: {accumulate} steps the "
                "optimiser once every few batches, so a check could fall between its steps; "
                "set one of them to 1"
            )
        return self

    @model_validator(mode="after")
    def _weights_for_resnet(self) -> Params:
        names = self.tune.search_space.model or [self.model.name]
        if self.model.weights_path and "resnet18" not in names:
            raise ValueError(
                f"model.weights_path: only resnet18 loads pretrained weights, not {names[0]}"
            )
        return self


# How an error message shows an offending value: nested lists and mappings cut after a few items
# and levels, the whole at most SHOWN_CHARS characters, however big the value is.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 6, 6
_SHORT.maxstring, _SHORT.maxother = 60, 60
SHOWN_CHARS = 120


def _shown(value: Any) -> str:
    text = _SHORT.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part).rstrip("_") for part in error["loc"]) or "<top level>"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "literal_error":
        return f"{key}: {_shown(error['input'])} is not allowed; {error['msg'].lower()}"
    if kind == "value_error":  # from a model validator: "field: what is wrong"
        message = error["msg"].removeprefix("Value error, ")
        if key == "<top level>":
            return message
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            return f"{key}.{field}: {rest}"
        return f"{key}: {message}"
    return f"{key}: {error['msg']} (got {_shown(error.get('input'))})"


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


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, refusing anchors and aliases (see :func:`refuse_aliases`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root)") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        refuse_aliases(text, path)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def refuse_aliases(text: str, path: Path) -> None:
    """Raise ParamsError at the first YAML alias (``*name``) in ``text``, else at the first
    anchor (``&name``). Nested aliases let a few lines stand for gigabytes (the "billion
    laughs"), which validating, printing or hashing the values would expand; the check reads
    only the parser's events, so it takes as long as the text is long."""
    anchor = None
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ParamsError(_alias_refused(path, event, f"alias *{event.anchor}"))
        if anchor is None and isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            anchor = event
    if anchor is not None:
        raise ParamsError(_alias_refused(path, anchor, f"anchor &{anchor.anchor}"))


def _alias_refused(path: Path, event: yaml.NodeEvent, what: str) -> str:
    return (
        f"{path}: line {event.start_mark.line + 1}: YAML {what} is not allowed; write the value "
        "out (anchors and aliases are refused: nested ones can expand to gigabytes)"
    )


def load_params(section: str | None = None, path: Path | str = PARAMS_FILE) -> Any:
    """Read and validate params.yaml; return one section's model, or all of it."""
    path = Path(path)
    params = parse_params(read_yaml(path), str(path))
    global _reads
    if os.environ.get(READS_ENV) and _reads is None:
        _reads = set()
    for name in Params.model_fields:
        getattr(params, name)._bind(name.rstrip("_"))
    if section is None:
        return params
    if section not in Params.model_fields and f"{section}_" not in Params.model_fields:
        raise ParamsError(f"{path}: no section {section!r}")
    return getattr(params, section if section in Params.model_fields else f"{section}_")


# Where each searched key (a key of tune.search_space) goes: (section, field). A tuned value
# is named everywhere by its params.yaml path, "section.field" (see tuned_name): in the
# study's trials, reports/tune/best_params.json, MLflow params and the train stage's lines.
TUNED_FIELDS: dict[str, tuple[str, str]] = {
    "lr": ("train", "lr"),
    "batch_size": ("train", "batch_size"),
    "weight_decay": ("train", "weight_decay"),
    "optimizer": ("train", "optimizer"),
    "channels": ("model", "channels"),
    "dropout": ("model", "dropout"),
    "model": ("model", "name"),
}


def tuned_name(search_key: str) -> str:
    """The params.yaml path of a searched key: ``lr`` → ``train.lr``, ``model`` →
    ``model.name``."""
    section, field = TUNED_FIELDS[search_key]
    return f"{section}.{field}"


TUNABLE = {tuned_name(key): key for key in TUNED_FIELDS}  # "train.lr" → "lr"


def provenance(
    section: str,
    requested: _Section,
    effective: _Section,
    tuned: Collection[str] = (),
    fields: Collection[str] | None = None,
    sources: Mapping[str, str] | None = None,
    read_tuned: bool = True,
) -> list[dict[str, Any]]:
    """For each field of a params section (all, or ``fields``): its params.yaml path, the
    value params.yaml asks for (None where it leaves the key to the default), the value used,
    and where that came from: ``tuned`` (a key in ``tuned``), ``params``, ``default``, or what
    ``sources`` says for that key. ``read_tuned=False``: a tuned key's params.yaml value is
    not read (a stage whose result it cannot change does not depend on it)."""
    sources = sources or {}
    rows = []
    for field in fields if fields is not None else type(effective).model_fields:
        key = f"{section}.{field}"
        given = field in requested.model_fields_set
        asked = getattr(requested, field) if given and (read_tuned or key not in tuned) else None
        source = "tuned" if key in tuned else sources.get(key, "params" if given else "default")
        rows.append(
            {
                "key": key,
                "requested": asked,
                "effective": getattr(effective, field),
                "source": source,
            }
        )
    return rows


def with_tuned(
    train: TrainParams, model: ModelParams, tuned: dict[str, Any], source: str = "tuned values"
) -> tuple[TrainParams, ModelParams]:
    """The train and model sections with tuned values (keyed by params.yaml path, e.g.
    ``train.lr``) on top, validated the same way."""
    unknown = sorted(set(tuned) - set(TUNABLE))
    if unknown:
        raise ParamsError(
            f"{source}: keys that cannot be tuned: {unknown} (tunable: {sorted(TUNABLE)}); "
            "run the tune stage again"
        )
    originals = {"train": train, "model": model}
    updates: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for key, value in tuned.items():
        section, field = key.split(".")
        updates[section][field] = value
    validated = []
    for name, section in (("train", TrainParams), ("model", ModelParams)):
        original = originals[name]
        # BaseModel's own dump: the values that tuning replaces are not read from params.yaml.
        values = BaseModel.model_dump(original) | updates[name]
        try:
            result = section.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(_describe({**e, "loc": (name, *e["loc"])}) for e in exc.errors())
            raise ParamsError(f"{source}: {problems}") from None
        if original._key is not None:
            result._bind(original._key, original._replaced | frozenset(updates[name]))
        validated.append(result)
    return validated[0], validated[1]
