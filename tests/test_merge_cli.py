"""python -m lora_retriever.merge: the fusion code behind a CLI; outputs load in plain PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from lora_retriever.merge import main
from swift.tuners import Swift, lora_mixture_context
from tests.factories import VOCAB, make_lora_dir, tiny_causal_lm


@pytest.mark.parametrize(
    "method,extra",
    [
        ("cat", []),
        ("svd", []),
        ("linear", []),
        ("ties", ["--density", "0.5"]),
        ("dare_ties", ["--density", "0.7", "--seed", "3"]),
    ],
)
def test_merge_cli_outputs_load_in_peft(tmp_path, capsys, method, extra):
    base = tiny_causal_lm("llama")
    a = make_lora_dir(base, tmp_path / "a", r=4, seed=1, target_modules=["q_proj", "v_proj"])
    b = make_lora_dir(base, tmp_path / "b", r=8, seed=2, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    assert (
        main(
            [
                "--adapters",
                str(a),
                str(b),
                "--weights",
                "0.3",
                "0.7",
                "--method",
                method,
                "--out",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == method and summary["weights"] == [0.3, 0.7]
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        merged = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()(input_ids=ids).logits
        assert not torch.allclose(merged, base(input_ids=ids).logits)
        if method in ("cat", "svd"):  # exact: equals the weighted mixture of the sources
            pool = Swift.from_pretrained(copy.deepcopy(base), a, adapter_name="a")
            pool = Swift.from_pretrained(pool, b, adapter_name="b")
            with lora_mixture_context(torch.tensor([[0.3, 0.7]]), ["a", "b"]):
                assert (pool(input_ids=ids).logits - merged).abs().max() <= 1e-5


def test_merge_cli_errors(tmp_path):
    base = tiny_causal_lm("llama")
    a = make_lora_dir(base, tmp_path / "a", r=4)
    with pytest.raises(ValueError, match="weights"):
        main(["--adapters", str(a), "--weights", "0.5", "0.5", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="density"):
        main(["--adapters", str(a), "--method", "ties", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        main(["--adapters", str(a), "--method", "mean", "--out", str(tmp_path / "o")])
