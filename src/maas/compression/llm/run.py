"""``compress`` for a causal language model: one quantize step, the child measured against its parent, registered.

Everything that needs no work is checked first (name, alias, threshold, source, the recipe's step). Then the
parent's Hugging Face directory is rewritten (:mod:`.quantize`), packed as the registry will store it, loaded from
that file by the ``causal_lm`` format as serving loads it, measured beside the parent (:mod:`.measure`), held to
``max_metric_drop`` (greedy agreement: 0.05 refuses a child whose next-token picks differ from the parent's at
more than 5% of the positions), and only then registered with its lineage, recipe and report.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from maas.compression.candidate import Progress
from maas.compression.llm import measure
from maas.compression.llm.plan import LLMPlan, llm_plan
from maas.compression.llm.quantize import write_child
from maas.compression.llm.report import LLMMeasurement, LLMReport
from maas.compression.recipe import Recipe
from maas.compression.result import CompressResult, MetricDropTooLarge, register_child
from maas.errors import InvalidInput, NotFound
from maas.registry import Registry
from maas.registry.uri import validate_alias, validate_name
from maas.runtimes.causal_lm.precision import OneDnnLinear
from maas.runtimes.causal_lm.runtime import FORMAT, CausalLMRuntime

log = logging.getLogger(__name__)


def compress_llm(
    source: str,
    recipe: Recipe,
    name: str,
    *,
    alias: str | None = None,
    max_metric_drop: float | None = None,
    description: str = "",
    registry: Registry,
    progress: Progress = lambda desc, done, total: None,
    report_path: Path | None = None,
) -> CompressResult:
    """Quantize the causal_lm model ``source`` by ``recipe`` and register it as the next version of ``name``
    (see the module docstring); :class:`MetricDropTooLarge` with the report instead of registering."""
    validate_name(name)
    if alias is not None:
        validate_alias(alias)
    if max_metric_drop is not None and not 0 <= max_metric_drop <= 1:
        raise InvalidInput(
            f"--max-metric-drop must lie in [0, 1] for a language model (the greedy agreement it may lose: 0.05 = "
            f"5 points), got {max_metric_drop}"
        )
    try:
        parent = registry.resolve(source)
    except NotFound as exc:
        raise NotFound(f"source {source!r} does not resolve: {exc}") from None
    plan = llm_plan(recipe)
    step = f"quantize torchao {plan.mode}"
    with tempfile.TemporaryDirectory(prefix="maas-compress-") as scratch:
        progress("load parent", 0, 1)
        parent_path = registry.artifact_path(parent)
        parent_rt = FORMAT.load(parent_path)
        progress("load parent", 1, 1)
        progress(step, 0, 1)
        summary = write_child(parent_rt.directory, Path(scratch) / "child", plan.mode)
        child_path = FORMAT.pack(Path(scratch) / "child", Path(scratch) / "child.zip")
        progress(step, 1, 1)
        child_rt = FORMAT.load(child_path)
        try:
            report = _measure(parent_rt, child_rt, (parent_path, child_path), plan, progress)
        finally:
            parent_rt.close()
            child_rt.close()
        report.parent.uri = parent.uri
        report.steps = [f"{step}: {summary}"]
        report.notes = _notes(report)
        if report_path is not None:
            report.write_json(report_path)
        if max_metric_drop is not None and report.metric_drop > max_metric_drop:
            raise MetricDropTooLarge(
                f"refused to register: greedy agreement with the parent is {report.child.metric:.4f} (a drop of "
                f"{report.metric_drop:.4f}), more than --max-metric-drop {max_metric_drop:g}; nothing was registered",
                report,
            )
        version = register_child(
            registry,
            child_path,
            name,
            "causal_lm",
            parent,
            recipe,
            report,
            list(report.steps),
            alias=alias,
            description=description,
        )
    report.child.uri = version.uri
    return CompressResult(version=version, report=report)


def _measure(
    parent: CausalLMRuntime,
    child: CausalLMRuntime,
    paths: tuple[Path, Path],
    plan: LLMPlan,
    progress: Progress,
) -> LLMReport:
    tok = parent.tokenizer
    context = min(parent.context_length, child.context_length)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in plan.prompts]
    longest = max(len(p) for p in prompts)
    if longest + plan.new_tokens > context:
        raise InvalidInput(
            f"a prompt of {longest} tokens and {plan.new_tokens} new tokens exceed the model's context of {context} "
            "tokens; lower evaluation.new_tokens"
        )
    texts = [tok.encode(t, special=True)[:context] for t in plan.texts]
    models = (parent.model, child.model)
    progress("measure", 0, 3)
    speeds = measure.speed(models, prompts, plan.new_tokens, plan.rounds)
    progress("measure", 1, 3)
    ppl = [measure.perplexity(m, texts) for m in models]
    progress("measure", 2, 3)
    stops = parent.eos_token_ids
    answers = [[measure.stopped(t, stops) for t in s.tokens[: len(prompts)]] for s in speeds]
    agree = measure.agreement(parent.model, child.model, prompts, answers[0])
    exact, prefix = measure.free_running(answers[0], answers[1])
    progress("measure", 3, 3)

    def one(i: int, rt: CausalLMRuntime, path: Path, metric: float) -> LLMMeasurement:
        s = speeds[i]
        return LLMMeasurement(
            uri=None,
            format="causal_lm",
            runs_as=_runs_as(rt),
            size_bytes=path.stat().st_size,
            weight_bytes=measure.weight_bytes(rt.model),
            parameters=measure.parameter_count(rt.directory),
            tokens_per_s_b1=s.tokens_per_s_b1,
            tokens_per_s_b8=s.tokens_per_s_b8,
            ms_per_token_b1=s.ms_per_token_b1,
            prefill_tokens_per_s=s.prefill_tokens_per_s,
            perplexity=ppl[i],
            metric=metric,
        )

    settings = {
        "prompts": len(prompts),
        "new_tokens": plan.new_tokens,
        "texts": len(texts),
        "text_tokens": sum(len(t) for t in texts),
        "rounds": plan.rounds,
        "threads": 1,
        "batch": measure.BATCH,
    }
    return LLMReport(
        parent=one(0, parent, paths[0], 1.0),
        child=one(1, child, paths[1], agree),
        steps=[],
        exact_match=exact,
        common_prefix=prefix,
        settings=settings,
    )


def _runs_as(rt: CausalLMRuntime) -> str:
    """The dtypes of the linear layers' weights and of the activations, as loaded (``bfloat16``, or ``int8
    weights, bfloat16 activations``)."""
    model = rt.model
    linears = [getattr(b, n) for b in model.layers for n in ("qkv", "o", "gate_up", "down")] + [model.lm_head]
    held = [m.matrix if isinstance(m, OneDnnLinear) else m.weight for m in linears]
    weights = sorted({str(w.dtype).removeprefix("torch.") for w in held})
    activations = str(model.dtype).removeprefix("torch.")
    if weights == [activations]:
        return activations
    return f"{' and '.join(weights)} weights, {activations} activations"


def _notes(report: LLMReport) -> list[str]:
    p, c = report.parent, report.child
    notes = [
        f"speed: greedy decoding of {report.settings['new_tokens']} tokens on 1 thread (the serving default), "
        f"median of {report.settings['rounds']} rounds, parent and child in turns; prompts prefilled beforehand",
    ]
    if c.size_bytes > p.size_bytes:
        notes.append(
            f"the child's file is larger than the parent's ({c.size_bytes / 1e6:,.0f} MB against "
            f"{p.size_bytes / 1e6:,.0f} MB): the parent's file stores fewer bits per weight (a quantized GGUF), but "
            f"maas runs it in {p.runs_as} ({p.weight_bytes / 1e6:,.0f} MB of weights in memory, the child "
            f"{c.weight_bytes / 1e6:,.0f} MB)"
        )
    if "int8" in c.runs_as or "bfloat16" in c.runs_as:
        notes.append(
            "bfloat16 and the int8 kernel are fast on CPUs with AVX-512 BF16 or AMX; on other CPUs they can be "
            "slower than float32: measure on the serving machine"
        )
    return notes
