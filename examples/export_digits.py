"""Train the digits MLP for a few seconds and export it as ONNX and as a torch.export program.

    python examples/export_digits.py --out build/

writes build/digits.onnx and build/digits.pt2, ready for `maas models register`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from maas.demo.digits import accuracy, load_digits_split, train
from maas.runtimes.export import export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build"), help="output folder (default: build/)")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    data = load_digits_split()
    model = train(data, epochs=args.epochs)
    print(f"test accuracy: {accuracy(model, data.x_test, data.y_test):.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    files = export(
        model,
        (torch.from_numpy(data.x_test[:8]),),
        args.out,
        name="digits",
        input_names=["pixels"],
        output_names=["probabilities", "label"],
    )
    for fmt, path in files.items():
        print(f"{fmt}: {path}")


if __name__ == "__main__":
    main()
