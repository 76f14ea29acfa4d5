"""Console scripts (``fastclip-train``, ``fastclip-rewrite``): a missing optional dependency is one line
naming the extra to install, not a traceback."""

from __future__ import annotations

import importlib
import sys

__all__ = ["rewrite", "train"]

EXTRA_OF = {"PIL": "train", "tokenizers": "train", "webdataset": "train", "tqdm": "train",
            "matplotlib": "train", "transformers": "captions", "peft": "captions"}  # fmt: skip


def _run(prog: str, module: str, argv) -> int:
    try:
        main = importlib.import_module(module, __package__).main
    except ModuleNotFoundError as err:
        root = (err.name or "").split(".")[0]
        if root not in EXTRA_OF:
            raise
        extra = EXTRA_OF[root]
        print(f"{prog} needs the '{extra}' extra (missing module {root}): pip install 'fastclip-kernels[{extra}]'",
              file=sys.stderr)  # fmt: skip
        return 1
    return main(argv)


def train(argv=None) -> int:
    return _run("fastclip-train", ".train", argv)


def rewrite(argv=None) -> int:
    return _run("fastclip-rewrite", ".rewrite.cli", argv)
