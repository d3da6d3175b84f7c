"""lora-retriever-merge (python -m lora_retriever.merge): the fusion code behind a CLI; outputs load in plain PEFT;
it never destroys an adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lora_retriever.cli.merge import main
from swift.tuners import Swift, lora_mixture_context
from tests.factories import VOCAB, make_lora_dir, tiny_causal_lm
from tests.tolerances import SAME_SHAPES_ATOL


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
                assert (
                    pool(input_ids=ids).logits - merged
                ).abs().max() <= SAME_SHAPES_ATOL  # same ids through both, tiny model


def test_merge_cli_errors(tmp_path, capsys):
    base = tiny_causal_lm("llama")
    a = make_lora_dir(base, tmp_path / "a", r=4)
    for extra, message in ((["--weights", "0.5", "0.5"], "weights"), (["--method", "ties"], "density")):
        assert main(["--adapters", str(a), *extra, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        with pytest.raises(ValueError, match=message):  # --debug: the exception itself
            main(["--adapters", str(a), *extra, "--out", str(tmp_path / "o"), "--debug"])
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == ["a"]  # no leftovers
    with pytest.raises(SystemExit):
        main(["--adapters", str(a), "--method", "mean", "--out", str(tmp_path / "o")])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_never_destroys_an_input_or_a_non_empty_out(tmp_path, capsys):
    base = tiny_causal_lm("llama")
    a = make_lora_dir(base, tmp_path / "adapters" / "a", r=4, seed=1)
    b = make_lora_dir(base, tmp_path / "adapters" / "b", r=4, seed=2)
    before = snapshot(tmp_path / "adapters")
    # An input as --out (or the folder holding the inputs) is refused, --overwrite or not.
    for out in (a, b, tmp_path / "adapters"):
        for extra in ([], ["--overwrite"]):
            assert main(["--adapters", str(a), str(b), "--out", str(out), *extra]) == 2
            assert "would destroy that adapter" in capsys.readouterr().err
    assert snapshot(tmp_path / "adapters") == before
    # A non-empty --out needs --overwrite; then it is replaced as a whole (no stale file survives).
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["--adapters", str(a), str(b), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and snapshot(out) == {"notes.txt": b"mine"}
    assert main(["--adapters", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert sorted(snapshot(out)) == ["adapter_config.json", "adapter_model.safetensors", "fusion_meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "merged"]  # no temporary folder left
    # An empty --out folder is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    assert main(["--adapters", str(a), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "adapter_model.safetensors").is_file()
