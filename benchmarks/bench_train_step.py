"""One LoRA training step (forward + backward, batch 8) with the answer-only LM head vs full-vocabulary logits.

``lora_retriever.training.trainer._answer_token_loss`` passes ``logits_to_keep`` (a boolean mask of the
positions that predict an answer token) so the LM head and the cross-entropy run on a few positions instead
of every position of every row. Baseline: the same step computing logits everywhere (the trainer's path for
models without ``logits_to_keep``). Both in the same process, interleaved round-robin, one thread, CPU clock.

Models: the packaged SmolLM2-135M-Instruct on the demo's ``capital`` task, and the small VLM built here (the
default recipe's cached build, when present) on the multimodal suite's ``digit_value`` task (16 image tokens).
LoRA r=8 on the language model's linear layers (``all-linear-lm``), as the demos train.

    python benchmarks/bench_train_step.py [--repeats 5] [--no-vlm]

Writes ``benchmarks/results/train_step.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))

import torch  # noqa: E402
from bench_utils import (  # noqa: E402
    TimingConfig,
    machine_info,
    machine_line,
    measure_interleaved,
    render_table,
    setup_logging,
    write_json,
)

BATCH = 8


def _records(model_type: str) -> list[Any]:
    """``BATCH`` ``(query, answer, images)`` of a task the demo trains on this model."""
    if model_type == "llava":
        from lora_retriever.tasks.multimodal import get_domain
        from lora_retriever.tasks.multimodal.splits import build_image_splits

        train = build_image_splits("digit_value", seed=0, n_train=BATCH, n_keys=0, n_test=0).train
        return [(r.query, r.response, [get_domain(r.domain).render(r.item)]) for r in train]
    from lora_retriever.tasks import build_splits

    train = build_splits("capital", seed=0).train[:BATCH]
    return [(r.input, r.output, None) for r in train]


def _step_sampler(model_type: str, model_path: str | None, answer_only: bool):
    from peft import LoraConfig, get_peft_model

    from lora_retriever.training import trainer
    from lora_retriever.training.data import collate
    from lora_retriever.training.model import language_model_linears
    from swift.llm import get_model_tokenizer, get_template

    model, processor = get_model_tokenizer(model_type, model_path)
    targets = language_model_linears(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    model.train()
    template = get_template(model_type, processor)
    examples = [
        template.encode_example(query, answer, images) for query, answer, images in _records(model_type)
    ]
    batch = collate(examples, template.tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())

    def sample(number: int) -> float:
        import time

        original = trainer._takes_logits_to_keep
        if not answer_only:
            trainer._takes_logits_to_keep = lambda m: False  # the full-logits path, as for models without it
        try:
            start = time.process_time()
            for _ in range(number):
                total, count = trainer._answer_token_loss(model, dict(batch))
                (total / count).backward()
                model.zero_grad(set_to_none=True)
            return (time.process_time() - start) / number
        finally:
            trainer._takes_logits_to_keep = original

    return sample, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-vlm", action="store_true", help="skip the VLM (text model only)")
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    setup_logging(verbose=False, quiet=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    machine = machine_info()
    print(machine_line(machine))
    models: list[tuple[str, str | None]] = [("smollm2-135m-instruct", None)]
    if not args.no_vlm:
        from lora_retriever.vlm import vlm_dir

        folder = vlm_dir()
        if (folder / "build.json").is_file():
            models.append(("llava", str(folder)))
        else:
            print(f"VLM: no build at {folder} (python -m lora_retriever.vlm build); skipped")
    timing = TimingConfig(repeats=args.repeats, warmup=1, min_time=0.0)
    rows = []
    for model_type, path in models:
        full, tokens = _step_sampler(model_type, path, answer_only=False)
        answer, _ = _step_sampler(model_type, path, answer_only=True)
        seconds = measure_interleaved({"full logits": full, "answer only": answer}, timing)
        rows.append(
            {
                "model": model_type,
                "batch": BATCH,
                "tokens": tokens,
                "full logits s/step": round(seconds["full logits"], 3),
                "answer only s/step": round(seconds["answer only"], 3),
                "speed-up": round(seconds["full logits"] / seconds["answer only"], 2),
            }
        )
        print(render_table(rows[-1:], list(rows[-1]), markdown=False))
    table = render_table(rows, list(rows[0]))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# One LoRA training step: answer-only LM head vs full logits\n\n{machine_line(machine)}\n\n"
    (out / "train_step.md").write_text(header + table + "\n")
    write_json(out / "train_step.json", {"machine": machine, "rows": rows, "repeats": args.repeats})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
