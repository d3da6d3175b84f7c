"""``python -m spectral_edit.smoke_test``: check the installation on a tiny random model in seconds (CPU).

Builds a 2-layer Llama from ``LlamaConfig`` in code and a random PEFT LoRA on ``q_proj``/``v_proj``, then
checks: the factorised SVD against a dense one and its rebuild; hook gradients ``g_σ`` against autograd
through an explicit ``σ`` reparametrisation; an identity edit reproducing the logits after save + reload in
plain PEFT; an ``abs_select`` edit whose reloaded adapter holds ``U diag(σ′) Vᵀ``. Prints PASS/FAIL per
check; the exit code is the number of failures (0 = all passed).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from spectral_edit.edit import EditConfig
from spectral_edit.hooks import IGNORE_INDEX, ModuleSpec, compute_sigma_gradients, resolve_module
from spectral_edit.io import load_lora_adapter
from spectral_edit.svd import rebuild_ba_from_uv_sigma
from swift.tuners.peft_format import write_adapter_dir

VOCAB = 64


def build_tiny_llama(seed: int = 0) -> nn.Module:
    """2 layers, hidden 32, vocab 64, random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_random_lora(
    base: nn.Module, path: Path, *, r: int = 4, lora_alpha: float = 8.0, seed: int = 0
) -> Path:
    """A PEFT LoRA on q_proj/v_proj with random nonzero A and B, saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(path))
    return path


def random_batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches with the first tokens of each row masked as 'prompt'."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for rows, length in ((2, 10), (3, 7)):
        ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[-1, length - 3 :] = 0  # padding at the end of the last row
        ids[mask == 0] = 0
        labels = ids.clone()
        labels[:, :3] = IGNORE_INDEX  # prompt
        labels[mask == 0] = IGNORE_INDEX
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def reference_sigma_gradients(
    base: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    specs: list[ModuleSpec],
    sigmas: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Autograd through ``y = W x + s · U diag(σ) Vᵀ x`` with ``σ`` a leaf tensor (forward hooks on ``base``)."""
    leaves = {s.name: sigmas[s.name].detach().float().clone().requires_grad_(True) for s in specs}
    handles = []
    for spec in specs:

        def add_delta(module, args, output, spec=spec):
            x = args[0]
            return output + spec.scaling * ((x @ spec.V.float()) * leaves[spec.name]) @ spec.U.float().T

        handles.append(resolve_module(base, spec.name).register_forward_hook(add_delta))
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    try:
        for batch in batches:
            logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                batch["labels"][:, 1:].reshape(-1),
                reduction="sum",
            )
            (loss / total).backward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: leaf.grad.double() for name, leaf in leaves.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_checks() -> list[tuple[str, bool, str]]:
    from peft import PeftModel

    from spectral_edit.pipeline import decompose_adapter, edit_adapter_state

    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            results.append((name, True, fn()))
        except Exception as err:  # report every check, then fail
            results.append((name, False, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"))

    base = build_tiny_llama()
    batches = random_batches()
    with tempfile.TemporaryDirectory(prefix="spectral-edit-smoke-") as tmp:
        lora_dir = save_random_lora(base, Path(tmp) / "lora")
        adapter = load_lora_adapter(lora_dir)
        modules = list(adapter.pairs)
        decompositions = decompose_adapter(adapter, modules)
        specs = [
            ModuleSpec(m, decompositions[m][0].U, decompositions[m][0].V, decompositions[m][1])
            for m in modules
        ]

        def svd_round_trip() -> str:
            worst = 0.0
            for module, pair in adapter.pairs.items():
                svd = decompositions[module][0]
                dense = pair.lora_B.double() @ pair.lora_A.double()
                ref = torch.linalg.svdvals(dense)[: svd.S.numel()]
                b, a = rebuild_ba_from_uv_sigma(svd.U, svd.Vh, svd.S)
                worst = max(worst, _rel(svd.S, ref), _rel(b @ a, dense))
            if worst > 1e-10:
                raise AssertionError(f"max relative error {worst:.2e} > 1e-10")
            return f"{len(modules)} modules, max rel err {worst:.1e}"

        def hook_gradients() -> str:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(lora_dir)).eval()
            got = compute_sigma_gradients(peft_model, batches, specs)
            ref = reference_sigma_gradients(
                copy.deepcopy(base), batches, specs, {m: d[0].S for m, d in decompositions.items()}
            )
            worst = max(_rel(got[m], ref[m]) for m in modules)
            if worst > 1e-4:
                raise AssertionError(f"hooks vs autograd: max relative error {worst:.2e} > 1e-4")
            return f"max rel err {worst:.1e}"

        def logits_of(adapter_dir: Path) -> torch.Tensor:
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
            with torch.no_grad():
                return model(input_ids=batches[0]["input_ids"]).logits

        def identity_edit() -> str:
            identity = EditConfig(amp_factor=1.0, sup_factor=1.0)
            g = {m: torch.ones_like(d[0].S) for m, d in decompositions.items()}
            state, _ = edit_adapter_state(adapter, decompositions, g, identity)
            out = Path(tmp) / "identity"
            write_adapter_dir(out, state, adapter.config)
            diff = float((logits_of(out) - logits_of(lora_dir)).abs().max())
            if diff > 1e-5:
                raise AssertionError(f"identity edit changed the logits by {diff:.2e}")
            return f"max |Δlogit| {diff:.1e}"

        def edit_and_reload() -> str:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(lora_dir)).eval()
            g = compute_sigma_gradients(peft_model, batches, specs)
            state, edits = edit_adapter_state(
                adapter, decompositions, g, EditConfig(amp_factor=2.0, sup_factor=0.0)
            )
            out = Path(tmp) / "edited"
            write_adapter_dir(out, state, adapter.config)
            reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
            worst = 0.0
            for module, edit in edits.items():
                svd = decompositions[module][0]
                layer = resolve_module(reloaded, module)
                delta = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
                expected = svd.U @ torch.diag(torch.tensor(edit.sigma_after, dtype=torch.float64)) @ svd.Vh
                worst = max(worst, _rel(delta, expected))
            if worst > 1e-5:
                raise AssertionError(f"reloaded B'A' differs from U diag(σ') Vᵀ by {worst:.2e}")
            changed = sum(e.sigma_after != e.sigma_before for e in edits.values())
            return f"{changed}/{len(edits)} modules changed, reloaded in PEFT, max rel err {worst:.1e}"

        check("svd round trip", svd_round_trip)
        check("hook gradients vs autograd", hook_gradients)
        check("identity edit reproduces logits", identity_edit)
        check("abs_select edit, save, reload in PEFT", edit_and_reload)
    return results


def main() -> int:
    """Run the checks, print PASS/FAIL per check; returns the number of failures."""
    torch.set_num_threads(1)
    # PEFT 0.21 calls transformers' deprecated is_gradient_checkpointing on load; not ours to fix.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    start = time.perf_counter()
    try:
        results = run_checks()
    except Exception:  # the setup itself failed (e.g. a broken install)
        print(f"FAIL setup\n{traceback.format_exc()}")
        return 1
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    failures = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failures}/{len(results)} checks passed in {time.perf_counter() - start:.1f} s")
    return failures


if __name__ == "__main__":
    sys.exit(main())
