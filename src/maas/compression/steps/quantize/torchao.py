"""torchao int8 for the ``quantize`` step: ``weight_only`` (Int8WeightOnlyConfig) and ``dynamic``
(Int8DynamicActivationInt8WeightConfig: int8 weights, activations quantized per row at run time).

torchao swaps each ``nn.Linear`` weight for a tensor subclass. Saved as it is, such a program pickles the
subclass, which the ``torch_export`` runtime refuses to load (unpickling runs code). So the quantized module
is flattened before it leaves this step: :func:`torchao.utils.unwrap_tensor_subclass` turns each subclass
into plain tensors (int8 data, float scales) behind a parametrization, ``torch.export`` traces it, and
``run_decompositions`` lowers torchao's own ops (``choose_qparams_affine``, ``quantize_affine``) to aten
ops, so serving needs neither pickle nor ``import torchao``. The child is that program as a plain
``fx.GraphModule``; it is saved as ``torch_export``. ``weight_only`` children can also be exported to ONNX;
``dynamic`` ones cannot (the ONNX exporter has no ``aten._int_mm``).

Models whose linear layers are graph calls (programs loaded from ``.pt2`` files, imported ONNX models) get
real ``nn.Linear`` modules for those calls first, since torchao quantizes modules.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import fx, nn

from maas.compression.candidate import Candidate, StepContext, example_tensors, to_torch
from maas.compression.graph_module import as_graph_module
from maas.compression.recipe import QuantizeStep
from maas.compression.steps.quantize.backend import Runner
from maas.errors import InvalidInput

log = logging.getLogger(__name__)

_LINEAR_TARGETS = (torch.ops.aten.linear.default, torch.nn.functional.linear)


def modes(step: QuantizeStep) -> list[str]:
    return ["weight_only", "dynamic"]


def describe(step: QuantizeStep, mode: str) -> str:
    what = "int8 weight-only" if mode == "weight_only" else "int8 dynamic activations, int8 weights"
    return f"quantize torchao {what} (per-channel)"


def prepare(cand: Candidate, ctx: StepContext) -> Candidate:
    """A torch candidate whose linear layers are ``nn.Linear`` modules (a copy: the parent never changes)."""
    base = to_torch(cand, ctx, why="quantize (torchao)")
    module = base.module
    assert module is not None
    if isinstance(module, fx.GraphModule):
        module = _linear_modules(as_graph_module(module, example_tensors(ctx, base.signature)))
    else:
        module = copy.deepcopy(module)
    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        raise InvalidInput(
            "torchao quantizes nn.Linear layers and this model has none; use backend onnxruntime, which also "
            "quantizes MatMul, Gather and Conv"
        )
    module.eval()
    return base.evolve(kind="torch", module=module, path=None)


def quantize(step: QuantizeStep, mode: str, cand: Candidate, ctx: StepContext) -> Candidate:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    from torchao.utils import unwrap_tensor_subclass

    configs: dict[str, Any] = {"weight_only": Int8WeightOnlyConfig, "dynamic": Int8DynamicActivationInt8WeightConfig}
    if mode not in configs:
        raise InvalidInput(f"torchao has no quantization mode {mode!r}; use weight_only or dynamic")
    assert cand.module is not None
    module = copy.deepcopy(cand.module).eval()
    quantize_(module, configs[mode]())
    module = unwrap_tensor_subclass(module)
    examples = _batched(example_tensors(ctx, cand.signature))
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            program = torch.export.export(module, examples, dynamic_shapes=tuple({0: batch} for _ in examples))
            program = program.run_decompositions()
    except Exception as exc:
        raise InvalidInput(
            f"torch.export cannot trace the torchao {mode} model ({type(exc).__name__}: {exc}), so it cannot be "
            "saved without pickled tensor subclasses, which maas refuses to load; use backend onnxruntime instead"
        ) from exc
    leftover = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("torchao.")})
    if leftover:
        raise InvalidInput(
            f"the torchao {mode} program still calls {', '.join(leftover)} after decomposition; serving it would need "
            "torchao's custom ops. Use backend onnxruntime instead"
        )
    child = as_graph_module(program.module(), examples)
    child.eval()
    out = cand.evolve(kind="torch", module=child, path=None, format="torch_export")
    if mode == "dynamic":
        out.notes.append(
            "torchao dynamic int8 runs as aten._int_mm, which the ONNX exporter cannot convert: keep this model as "
            "torch_export, or quantize with backend onnxruntime for an int8 ONNX model"
        )
    return out


def runner(cand: Candidate, ctx: StepContext, rows: int) -> Runner:
    idx = torch.arange(rows)
    args = tuple(t[idx % len(t)] for t in example_tensors(ctx, cand.signature))
    module = cand.module
    assert module is not None

    def run() -> list[Any]:
        with torch.inference_mode():
            out = module(*args)
        return [t.numpy() for t in (out if isinstance(out, tuple | list) else (out,))]

    return run


def _batched(examples: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # torch.export specializes a dimension of size 1, which would freeze the batch size.
    return tuple(torch.cat([t, t]) if len(t) == 1 else t for t in examples)


def _linear_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn ``linear(x, weight, bias)`` calls on the module's own 2-D weights into ``nn.Linear`` submodules,
    dropping the attributes they replace (in place; returns ``gm``)."""
    replaced: set[str] = set()
    for i, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS or node.kwargs:
            continue
        x, w, b = [*node.args, None, None][:3]
        if not _is_attr(w) or not (b is None or _is_attr(b)):
            continue
        weight = _tensor(gm, w.target)
        if weight.dim() != 2 or not weight.is_floating_point():
            continue
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if b is not None:
                layer.bias.copy_(_tensor(gm, b.target))
        name = f"linear_{i}"
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced.update(a.target for a in (w, b) if a is not None)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    still_used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in replaced - still_used:
        owner_name, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        delattr(owner, attr)
    gm.recompile()
    return gm


def _is_attr(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    value = getattr(owner, attr)
    assert isinstance(value, torch.Tensor)
    return value
