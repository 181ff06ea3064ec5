"""The work of the ``distill`` recipe step: train a small student on the candidate's (the teacher's) soft predictions.

The loss is Hinton et al.'s: ``alpha * T² * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) *
cross_entropy(student, label)``. The teacher is run once over the whole training set, in batches, and its
softened log-probabilities are kept; its output may hold logits or probabilities (a served classifier's),
which :func:`maas.compression.tuning.log_probs` turns into the same soft targets. The student comes from
``step.student.factory`` and must return logits. With ``alpha: 1`` the training set needs no labels.

``seeds`` trains that many students (seeds ``train.seed``, +1, …) and reports their mean accuracy on the
recipe's evaluation dataset; ``baseline`` also trains the same student without the teacher (alpha 0) on
the same seeds, so the report shows what the teacher adds. The first seed's distilled student is kept.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maas.compression import formats
from maas.compression.candidate import Candidate, StepContext
from maas.compression.recipe import DistillStep
from maas.compression.sizes import count_parameters
from maas.compression.tuning import fit, load_dataset, log_probs, output_kind, select_output, set_training
from maas.errors import InvalidInput
from maas.imports import resolve
from maas.tensors import Signature, TensorSpec, datatype_of, numpy_dtype
from maas.training.data import gather

log = logging.getLogger(__name__)

_FLOAT = ("FP16", "BF16", "FP32", "FP64")
#: Rows per teacher call when precomputing its predictions, and per evaluation call.
BATCH = 256

#: Inputs of one batch (a tensor, or a tuple of tensors) -> the teacher's outputs, in signature order.
TeacherFn = Callable[[Any], list[torch.Tensor]]


def apply(step: DistillStep, cand: Candidate, ctx: StepContext) -> Candidate:
    """A new ``torch`` candidate: the student trained on ``cand``'s predictions (see the module docstring)."""
    if cand.kind == "hf":
        raise InvalidInput(
            "distillation needs a classifier teacher (torch or ONNX) whose output is logits or probabilities; "
            "a Hugging Face encoder returns embeddings"
        )
    index = teacher_output_index(cand.signature, step.teacher_output)
    teacher = _teacher(cand)
    train = load_dataset(step.train)
    ctx.progress("distill: teacher predictions", 0, 1)
    soft = _soft_targets(teacher, train, index, step.temperature).to(ctx.device)
    ctx.progress("distill: teacher predictions", 1, 1)

    factory = resolve(step.student.factory, "student.factory")
    seeds = [step.train.seed + i for i in range(step.seeds)]
    runs = [("distilled", step.alpha)] + ([("baseline", 0.0)] if step.baseline else [])
    students: dict[str, list[nn.Module]] = {name: [] for name, _ in runs}
    for name, alpha in runs:
        for seed in seeds:
            torch.manual_seed(seed)  # the student's initial weights differ by seed, reproducibly
            student = factory(**step.student.kwargs)
            if not isinstance(student, nn.Module):
                raise InvalidInput(
                    f"student.factory {step.student.factory!r} returned a {type(student).__name__}; it must return an "
                    "nn.Module whose forward returns logits"
                )
            spec = step.train.model_copy(update={"seed": seed})
            loss = _kd_loss(soft, step.temperature, alpha)
            description = f"distill: {name} student, seed {seed}"
            fit(student, train, spec, loss=loss, device=ctx.device, progress=ctx.progress, description=description)
            students[name].append(student.cpu().eval())

    kept = students["distilled"][0]
    served: nn.Module = formats.classifier_head(kept) if step.head == "classifier" else kept
    child = cand.evolve(kind="torch", module=served, path=None, format=cand.format)
    child.signature = _signature(served, cand.signature, ctx)
    summary = _summary(step, cand, teacher, index, students, ctx)
    child.history.append(summary)
    child.notes.append(summary)
    return child


def teacher_output_index(signature: Signature, name: str | None) -> int:
    """The position of the teacher output read as its prediction: ``name``, else the first floating output."""
    names = [s.name for s in signature.outputs]
    if name is not None:
        if name not in names:
            raise InvalidInput(f"teacher_output {name!r} is not an output of the model; it returns {', '.join(names)}")
        return names.index(name)
    for i, spec in enumerate(signature.outputs):
        if spec.datatype in _FLOAT:
            return i
    raise InvalidInput(
        f"the teacher has no floating-point output to learn from (it returns {', '.join(names)}); "
        "distillation needs logits or probabilities"
    )


def _teacher(cand: Candidate) -> TeacherFn:
    if cand.kind == "onnx":
        assert cand.path is not None
        runtime = formats.onnx_runtime(cand.path)
        specs = runtime.signature.inputs

        def run_onnx(x: Any) -> list[torch.Tensor]:
            parts = x if isinstance(x, tuple | list) else (x,)
            feed = {
                s.name: np.asarray(torch.as_tensor(p).cpu().numpy()).astype(numpy_dtype(s.datatype), copy=False)
                for s, p in zip(specs, parts, strict=True)
            }
            out = runtime.infer(feed)
            return [torch.from_numpy(np.asarray(out[s.name])) for s in runtime.signature.outputs]

        return run_onnx
    module = cand.module
    assert module is not None
    set_training(module, False)

    def run_torch(x: Any) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = module(*x) if isinstance(x, tuple | list) else module(x)
        return [t.detach().cpu() for t in (out if isinstance(out, tuple | list) else (out,))]

    return run_torch


def _inputs(dataset: Any, idx: torch.Tensor) -> tuple[Any, Any]:
    batch = gather(dataset, idx)
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _predict(fn: Callable[[Any], torch.Tensor], dataset: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fn`` over the whole dataset in batches: (outputs, labels or None)."""
    outs, labels = [], []
    for start in range(0, len(dataset), BATCH):
        x, y = _inputs(dataset, torch.arange(start, min(start + BATCH, len(dataset))))
        outs.append(fn(x))
        if y is not None:
            labels.append(torch.as_tensor(y))
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def _soft_targets(teacher: TeacherFn, dataset: Any, index: int, temperature: float) -> torch.Tensor:
    """``log softmax(teacher / T)`` for every training example, in dataset order."""
    out, _ = _predict(lambda x: teacher(x)[index].float(), dataset)
    if out.dim() < 2 or out.shape[-1] < 2:
        raise InvalidInput(
            f"the teacher output has shape {list(out.shape)}; distillation needs scores over classes [batch, classes]"
        )
    return log_probs(out, output_kind(out), temperature)


def _kd_loss(soft: torch.Tensor, temperature: float, alpha: float) -> Callable[..., torch.Tensor]:
    def loss(outputs: Any, x: Any, y: Any, idx: torch.Tensor) -> torch.Tensor:
        logits = select_output(outputs, 0).float()
        total = torch.zeros((), device=logits.device)
        if alpha > 0:
            student = F.log_softmax(logits / temperature, dim=-1)
            kl = F.kl_div(student, soft[idx.to(soft.device)], log_target=True, reduction="batchmean")
            total = total + alpha * temperature**2 * kl
        if alpha < 1:
            if y is None:
                raise InvalidInput("the training dataset has no labels; set alpha: 1 to learn from the teacher alone")
            total = total + (1 - alpha) * F.cross_entropy(logits, y.long())
        return total

    return loss


def _signature(module: nn.Module, parent: Signature, ctx: StepContext) -> Signature:
    """The child's signature from one run on the example inputs; the parent's output names when the count matches."""
    examples = tuple(torch.from_numpy(np.ascontiguousarray(ctx.example_inputs[s.name])) for s in parent.inputs)
    with torch.inference_mode():
        out = module(*examples)
    outs = list(out) if isinstance(out, tuple | list) else [out]
    if len(outs) == len(parent.outputs):
        names = [s.name for s in parent.outputs]
    elif len(outs) == 2:
        names = ["probabilities", "label"]
    else:
        names = ["logits"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    specs = tuple(
        TensorSpec(name, datatype_of(t.numpy().dtype), (-1, *t.shape[1:])) for name, t in zip(names, outs, strict=True)
    )
    return Signature(inputs=parent.inputs, outputs=specs)


def _summary(
    step: DistillStep,
    cand: Candidate,
    teacher: TeacherFn,
    index: int,
    students: dict[str, list[nn.Module]],
    ctx: StepContext,
) -> str:
    s_params = sum(p.numel() for p in students["distilled"][0].parameters())
    t_params = _teacher_params(cand)
    ratio = f" ({s_params / t_params:.1%})" if t_params else ""
    head = (
        f"distill {step.student.factory} (T={step.temperature:g}, alpha={step.alpha:g}, {step.train.steps} steps): "
        f"student {s_params:,} parameters vs teacher {t_params:,}{ratio}"
    )
    data = _evaluation(ctx)
    if data is None:
        return head + "; accuracy not compared (no labelled evaluation dataset in the recipe)"
    accuracies = {name: [_accuracy(_student_fn(m), data) for m in ms] for name, ms in students.items()}
    teacher_acc = _accuracy(lambda x: teacher(x)[index], data)
    parts = [f"accuracy {_mean_std(accuracies['distilled'])} over {step.seeds} seed(s)"]
    if "baseline" in accuracies:
        parts.append(f"without the teacher {_mean_std(accuracies['baseline'])}")
    mean = statistics.fmean(accuracies["distilled"])
    parts.append(
        f"teacher {teacher_acc:.4f} (the student reaches {mean / teacher_acc:.1%} of it)" if teacher_acc else ""
    )
    return head + "; " + ", ".join(p for p in parts if p)


def _student_fn(module: nn.Module) -> Callable[[Any], torch.Tensor]:
    def run(x: Any) -> torch.Tensor:
        with torch.inference_mode():
            return select_output(module(*x) if isinstance(x, tuple | list) else module(x), 0)

    return run


def _teacher_params(cand: Candidate) -> int:
    if cand.kind == "onnx":
        assert cand.path is not None
        return count_parameters(cand.path, "onnx")
    assert cand.module is not None
    return sum(p.numel() for p in cand.module.parameters())


def _evaluation(ctx: StepContext) -> Any:
    """The recipe's evaluation dataset when it has labels, else None."""
    spec = ctx.evaluation
    if spec is None:
        return None
    data = load_dataset(spec)
    limit = getattr(spec, "limit", None)
    if limit is not None and limit < len(data):
        data = torch.utils.data.Subset(data, range(limit))
    first = data[0]
    if not (isinstance(first, tuple | list) and len(first) >= 2):
        return None
    return data


def _accuracy(fn: Callable[[Any], torch.Tensor], data: Any) -> float:
    scores, labels = _predict(lambda x: fn(x).float(), data)
    assert labels is not None
    predicted = scores.argmax(dim=-1) if scores.dim() > labels.dim() else scores
    return float((predicted.reshape(labels.shape) == labels).float().mean())


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
