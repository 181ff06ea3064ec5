"""The training config: one pydantic model per component, YAML in, unknown keys rejected.

``load_config`` (through :mod:`maas.configfile`) turns every mistake into one ``InvalidInput`` that lists each
problem with its key, its line, what was wrong and the valid choices, before any process is launched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from maas import configfile
from maas.errors import InvalidInput
from maas.imports import check_import_path, resolve
from maas.registry.runs import config_hash
from maas.registry.uri import validate_alias, validate_name

ImportPath = Annotated[str, Field(description="package.module:attribute")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    factory: ImportPath  # called with **kwargs, returns a torch.nn.Module producing the loss's input
    kwargs: dict[str, Any] = {}

    _check = field_validator("factory")(check_import_path)


class DataConfig(_Strict):
    train: ImportPath  # called with **kwargs, returns a map-style Dataset of (input, target) pairs
    eval: ImportPath | None = None
    kwargs: dict[str, Any] = {}
    sharding: Literal["shard", "replicate"] = "shard"  # across data-parallel ranks

    @field_validator("train", "eval")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return None if v is None else check_import_path(v)


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd, rmsprop
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw


class RegularizationConfig(_Strict):
    l1: float = Field(0.0, ge=0)  # added to the loss as l1 * sum(|w|)
    l2: float = Field(0.0, ge=0)  # added to the loss as l2 * sum(w^2)


class ScheduleConfig(_Strict):
    name: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0 before the schedule
    step_size: PositiveInt = 100  # step: multiply by gamma every step_size steps
    gamma: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)  # cosine: the floor


class EvalConfig(_Strict):
    metric: str = "accuracy"  # accuracy, mse, or an import path fn(outputs, targets) -> float
    batch_size: PositiveInt = 512  # evaluated on the reporting rank, over the whole data.eval set
    every_steps: PositiveInt | None = None  # also evaluate during training; always at the end

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return v if v in ("accuracy", "mse") else check_import_path(v)


class CheckpointConfig(_Strict):
    every_steps: PositiveInt | None = None  # also written at the end
    keep: PositiveInt = 2


class SingleStrategy(_Strict):
    name: Literal["single"] = "single"

    def data_parallel_size(self, world_size: int) -> int:
        if world_size != 1:
            raise InvalidInput(
                f"strategy single runs on one process, but {world_size} were asked for; use strategy ddp "
                "(or another parallel strategy), or --nproc-per-node 1"
            )
        return 1


class DDPStrategy(_Strict):
    name: Literal["ddp"]
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU

    def data_parallel_size(self, world_size: int) -> int:
        return world_size


class ParameterServerStrategy(_Strict):
    name: Literal["parameter_server"]
    servers: PositiveInt = 1  # ranks 0..servers-1 hold the parameters; the rest are workers
    mode: Literal["sync", "async", "bounded"] = "sync"
    max_staleness: int = Field(2, ge=0)  # bounded: no worker more than this many steps ahead of the slowest

    def data_parallel_size(self, world_size: int) -> int:
        workers = world_size - self.servers
        if workers < 1:
            raise InvalidInput(
                f"parameter_server with {self.servers} server(s) needs more than {self.servers} processes, got "
                f"{world_size}; raise --nproc-per-node or lower strategy.servers"
            )
        return workers


class PipelineStrategy(_Strict):
    name: Literal["pipeline"]
    split_points: list[str] | None = None  # module names where a new stage starts; None: balanced by parameters
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    microbatches: PositiveInt = 4

    def data_parallel_size(self, world_size: int) -> int:
        if self.split_points is not None and len(self.split_points) != world_size - 1:
            raise InvalidInput(
                f"{len(self.split_points)} split point(s) make {len(self.split_points) + 1} stages, but the run has "
                f"{world_size} processes; give one split point fewer than the number of processes"
            )
        return 1


class HybridStrategy(_Strict):
    name: Literal["hybrid"]
    dp: PositiveInt  # pipelines, each reading its shard of the batch
    pp: PositiveInt  # stages per pipeline; ranks r // pp form pipeline r // pp, stage r % pp
    split_points: list[str] | None = None  # as for pipeline: pp - 1 names; None: balanced by parameters
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    microbatches: PositiveInt = 4  # per pipeline, per step

    def data_parallel_size(self, world_size: int) -> int:
        if self.dp * self.pp != world_size:
            raise InvalidInput(
                f"strategy hybrid with dp {self.dp} x pp {self.pp} needs {self.dp * self.pp} processes, but "
                f"{world_size} were asked for; make dp x pp equal to --nproc-per-node x --nnodes"
            )
        if world_size == 1:
            raise InvalidInput("strategy hybrid with dp 1 x pp 1 is one process; use strategy single instead")
        if self.split_points is not None and len(self.split_points) != self.pp - 1:
            raise InvalidInput(
                f"{len(self.split_points)} split point(s) make {len(self.split_points) + 1} stages, but strategy.pp "
                f"is {self.pp}; give pp - 1 = {self.pp - 1} split point(s)"
            )
        return self.dp


StrategyConfig = Annotated[
    SingleStrategy | DDPStrategy | ParameterServerStrategy | PipelineStrategy | HybridStrategy,
    Field(discriminator="name"),
]


class PublishConfig(_Strict):
    name: str
    alias: str | None = None
    formats: list[Literal["onnx", "torch_export"]] = ["onnx", "torch_export"]
    register_format: Literal["onnx", "torch_export"] = "onnx"  # which export becomes the version
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    head: Literal["none", "classifier"] = "none"  # classifier: serve (probabilities, label) from logits
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return validate_name(v)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return validate_alias(v)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None


class TrainConfig(_Strict):
    name: str | None = None
    model: ModelConfig
    data: DataConfig
    loss: str = "cross_entropy"  # cross_entropy, mse, or an import path fn(outputs, targets) -> loss
    optimizer: OptimizerConfig = OptimizerConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    steps: PositiveInt | None = None
    epochs: PositiveInt | None = None
    batch_size: PositiveInt  # global: summed over data-parallel ranks and accumulation
    grad_accum: PositiveInt = 1
    seed: int = 0
    deterministic: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    eval: EvalConfig | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    strategy: StrategyConfig = SingleStrategy()
    publish: PublishConfig | None = None
    log_every: PositiveInt = 10

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return v if v in ("cross_entropy", "mse") else check_import_path(v)

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.eval is not None and self.eval.every_steps and self.data.eval is None:
            raise ValueError(
                "eval.every_steps evaluates on data.eval, which is not set; give data.eval (an import path "
                "returning the evaluation dataset) or drop eval.every_steps"
            )
        if isinstance(self.strategy, PipelineStrategy) and self.batch_size % self.strategy.microbatches:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into strategy.microbatches "
                f"{self.strategy.microbatches}; make batch_size a multiple of it"
            )
        if isinstance(self.strategy, HybridStrategy):
            dp, n = self.strategy.dp, self.strategy.microbatches
            if self.batch_size % (dp * n):
                raise ValueError(
                    f"batch_size {self.batch_size} does not split over strategy.dp {dp} pipelines into "
                    f"strategy.microbatches {n} each; make batch_size a multiple of dp x microbatches = {dp * n}"
                )
        return self

    def check_world(self, data_parallel: int) -> None:
        """Whether the global batch splits evenly over ``data_parallel`` ranks and the accumulation steps."""
        per = self.grad_accum * data_parallel
        if self.batch_size % per:
            raise InvalidInput(
                f"batch_size {self.batch_size} does not split over {data_parallel} data-parallel rank(s) x "
                f"{self.grad_accum} accumulation step(s); make it a multiple of {per}"
            )

    def resolve_imports(self) -> None:
        """Import every user path now, so a typo fails before any process starts."""
        resolve(self.model.factory, "model.factory")
        resolve(self.data.train, "data.train")
        if self.data.eval:
            resolve(self.data.eval, "data.eval")
        if ":" in self.loss:
            resolve(self.loss, "loss")
        if self.eval and ":" in self.eval.metric:
            resolve(self.eval.metric, "eval.metric")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json")
        return data

    def config_hash(self) -> str:
        """The same hash the run record carries (sha256 of canonical JSON)."""
        return config_hash(self.to_json())


def parse_config(data: Any, source: str = "config") -> TrainConfig:
    """Validate an already loaded config (a mapping); ``source`` names it in the error."""
    return configfile.parse(data, TrainConfig, what="training config", source=source)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config file (``yaml.safe_load`` only); errors name the file and line."""
    return configfile.load(path, TrainConfig, what="training config")
