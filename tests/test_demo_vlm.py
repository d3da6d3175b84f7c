"""make demo-vlm end to end on a tiny LLaVA (random weights, seconds per step): the multimodal suite, app and
category adapters with text and image keys, image-aware retrieval over both pools, mixture inference."""

from __future__ import annotations

import json

from lora_retriever.demo_vlm import DemoVlmConfig, run_demo_vlm
from lora_retriever.pool import AdapterPool
from lora_retriever.tasks.multimodal import CATEGORIES, MULTIMODAL_TASK_NAMES
from swift.tuners.peft_format import read_state_dict
from tests.tiny_vlms import save_tiny_llava


def test_demo_vlm_builds_pools_with_image_keys_and_reuses_them(tmp_path, capsys):
    from lora_retriever.cli.demo_vlm import main

    vlm = save_tiny_llava(tmp_path / "llava")
    argv = [
        "--work_dir",
        str(tmp_path / "work"),
        "--output_dir",
        str(tmp_path / "out"),
        "--vlm_path",
        str(vlm),
    ]
    argv += ["--steps", "1", "--workers", "1", "--n_test", "1", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "OVERALL" in printed and "app + category pools" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["overall"]["n"] == len(MULTIMODAL_TASK_NAMES) and metrics["overall"]["failed"] == 0
    assert set(metrics["tasks"]) == set(MULTIMODAL_TASK_NAMES)
    assert metrics["overall"]["retrieval_top1"] is not None

    pool_dir = tmp_path / "work" / "pool"
    app = AdapterPool.from_configs(pool_dir / "app.json")
    category = AdapterPool.from_configs(pool_dir / "category.json")
    assert sorted(app.names) == sorted(MULTIMODAL_TASK_NAMES) and sorted(category.names) == sorted(CATEGORIES)
    for pool in (app, category):  # every adapter has a text key and an image key (the VLM's vision tower)
        assert (
            pool.image_key_mask().all() and pool.image_key_meta().model_id == pool.image_key_meta().model_id
        )
    vision = {
        n
        for n in app.names
        if any("vision_tower" in key for key in read_state_dict(pool_dir / "app" / n))
        and any("multi_modal_projector" in key for key in read_state_dict(pool_dir / "app" / n))
    }
    assert vision == {"photo_source", "clock_hour"}  # the default --vision_adapters
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["selected"] for r in records) and all(len(r["selected"]) <= 3 for r in records)

    again = run_demo_vlm(
        DemoVlmConfig(
            work_dir=str(tmp_path / "work"),
            output_dir=str(tmp_path / "out2"),
            vlm_path=str(vlm),
            steps=1,
            workers=1,
            n_test=1,
            progress=False,
        )
    )
    assert again["demo"]["trained"] == []  # everything cached
    assert again["overall"]["n"] == metrics["overall"]["n"]
