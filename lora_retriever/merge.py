"""Merge LoRA adapters into one PEFT adapter: ``python -m lora_retriever.merge``.

    python -m lora_retriever.merge --adapters adapters/a adapters/b --weights 0.5 0.5 --method cat --out merged

Methods (``lora_retriever.fusion``): ``cat`` (exact, rank = sum of ranks), ``linear`` (LoraRetriever's fusion:
A and B averaged separately), ``svd`` (exact weighted sum re-factored, truncated to ``--svd_rank``), ``ties``,
``dare_linear``, ``dare_ties`` (``--density``). The output loads with plain ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", nargs="+", required=True, help="PEFT adapter directories")
    parser.add_argument(
        "--weights", nargs="+", type=float, default=None, help="one per adapter (default 1/k)"
    )
    parser.add_argument(
        "--method", default="cat", choices=["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"]
    )
    parser.add_argument("--out", required=True, help="output adapter directory")
    parser.add_argument("--svd_rank", type=int, default=None, help="svd: rank to keep (default: exact)")
    parser.add_argument("--density", type=float, default=None, help="ties/dare: fraction of entries kept")
    parser.add_argument("--seed", type=int, default=None, help="dare: seed of the random drop")
    parser.add_argument("--base_model_name_or_path", default=None, help="recorded in adapter_config.json")
    args = parser.parse_args(argv)

    from lora_retriever.fusion import fuse

    options = {k: getattr(args, k) for k in ("svd_rank", "density", "seed") if getattr(args, k) is not None}
    fused = fuse([Path(a) for a in args.adapters], args.weights, args.method, **options)
    out = fused.save(args.out, base_model_name_or_path=args.base_model_name_or_path)
    summary = {
        "out": str(out),
        "method": args.method,
        "sources": fused.sources,
        "weights": fused.weights,
        "max_rank": max(fused.ranks.values()),
    }
    if fused.truncation_error:
        summary["max_truncation_error"] = max(fused.truncation_error.values())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
