"""Image-aware retrieval: the vision-tower embedder, image keys, score-level fusion, accuracy by modality.

References are independent of the code under test: image features are captured at the input of the LLaVA
projector while transformers' own ``get_image_features`` runs; fused scores are computed pair by pair from
the rule ``a * cos(text) + (1 - a) * cos(image)`` (or the one shared modality); keys are recomputed from the
sample ids their metadata records.

Tolerances: vectors are float32 unit vectors; two float32 computations of one cosine (numpy matmul vs a
Python dot product, or a batched vs an unbatched forward of the same tiny model) agree to ~1e-6, so 1e-5
absolute is ~100 ulps at magnitude 1 on any CPU.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lora_retriever.data import load_image
from lora_retriever.embed_pool import embed_pool, read_key_samples
from lora_retriever.embedders import (
    EmbedderConfig,
    ImageRetrievalConfig,
    UnsupportedInputError,
    get_embedder,
)
from lora_retriever.index import QueryVectors, fused_similarities
from lora_retriever.pool import AdapterPool, PoolValidationError, key_meta_path
from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig, accuracy_by_modality
from lora_retriever.selection import select_adapters
from lora_retriever.training.registry import register_trained_adapter
from tests.test_pool_and_index import write_adapter_dir
from tests.tiny_vlms import save_tiny_llama, save_tiny_llava

ATOL = 1e-5


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_images(n: int, seed: int, size: tuple[int, int] = (20, 24)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava", seed=0)


@pytest.fixture(scope="module")
def vision(llava_dir):
    return get_embedder("vision-tower", model_path=str(llava_dir))


@pytest.fixture(scope="module")
def minilm():
    return get_embedder("sentence-transformers")


# ------------------------------------------------------------------------------------------ the embedder


def test_vision_tower_embeds_what_llava_feeds_its_projector(llava_dir, vision):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    images = make_images(3, seed=1)
    vlm = LlavaForConditionalGeneration.from_pretrained(str(llava_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(llava_dir))
    pixels = processor(text=["<image>"] * 3, images=images, return_tensors="pt")["pixel_values"]
    captured = []
    hook = vlm.model.multi_modal_projector.register_forward_hook(
        lambda m, args, out: captured.append(args[0])
    )
    with torch.no_grad():
        vlm.model.get_image_features(pixel_values=pixels)
    hook.remove()
    features = captured[0]  # [3, tokens, hidden]: the patches LLaVA projects (class token dropped)
    assert features.shape == (3, 16, 32)
    expected = unit(features.mean(dim=1).numpy())

    got = vision.encode_images(images)
    assert got.shape == (3, 32) and vision.dim == 32
    np.testing.assert_allclose(got, expected, atol=ATOL)
    np.testing.assert_allclose(vision.encode_images(images, batch_size=2), got, atol=ATOL)
    meta = vision.meta()
    assert (meta.model_id, meta.dim, meta.backend) == ("tiny-llava", 32, "vision-tower")
    assert vision.supports_images and not vision.supports_texts
    with pytest.raises(UnsupportedInputError, match="images only"):
        vision.encode_queries(["what digit is this?"])


def test_vision_tower_on_a_plain_clip_vision_model(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    model = CLIPVisionModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    model.save_pretrained(tmp_path / "clip-vision")
    processor.save_pretrained(tmp_path / "clip-vision")
    embedder = get_embedder("vision-tower", model_path=str(tmp_path / "clip-vision"))
    images = make_images(2, seed=2)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        expected = unit(model(pixel_values=pixels).last_hidden_state.mean(dim=1).numpy())
    assert embedder.dim == 24
    np.testing.assert_allclose(embedder.encode_images(images), expected, atol=ATOL)


def test_image_embedder_asked_for_but_absent(tmp_path, llava_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*LLaVA directory"):
        EmbedderConfig(backend="vision-tower", model_path=str(missing))
    with pytest.raises(ValueError, match="needs model_path"):
        EmbedderConfig(backend="vision-tower")
    text_model = save_tiny_llama(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"holds a 'llama' model, not a vision model"):
        get_embedder("vision-tower", model_path=str(text_model))
    no_processor = tmp_path / "bare-llava"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llava_dir / name, no_processor / name)
    with pytest.raises(ValueError, match=f"{no_processor}.*has no image processor"):
        ImageRetrievalConfig(image_embedder_path=str(no_processor))
    with pytest.raises(ValueError, match="needs --image_embedder_path"):
        ImageRetrievalConfig(image_embedder="vision-tower")
    assert (
        ImageRetrievalConfig(image_embedder_path=str(llava_dir)).embedder_config().backend == "vision-tower"
    )
    with pytest.raises(ValueError, match=r"text_weight must be a number in \[0, 1\]"):
        ImageRetrievalConfig(fusion_text_weight=1.5)
    pool = AdapterPool([])
    retriever = LoraRetriever(
        LoraRetrieverConfig(embedder=EmbedderConfig("vision-tower", str(llava_dir))), pool=pool
    )
    with pytest.raises(ValueError, match="embeds images only; give it as image_embedder"):
        _ = retriever.embedder


def test_unreadable_image_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=f"sample 3: image file {bad} is unreadable"):
        load_image(bad, where="sample 3")
    truncated = tmp_path / "truncated.png"
    make_images(1, seed=0, size=(64, 64))[0].save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(ValueError, match=f"image file {truncated} is unreadable"):
        load_image(truncated)


# ------------------------------------------------------------------------------------------ image keys


def write_samples(root, name, n, images_per_sample, seed):
    """A JSONL of ``n`` chat samples, each with ``images_per_sample`` PNGs under ``root/img``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    all_images = make_images(n * images_per_sample, seed=seed)
    for i in range(n):
        files = []
        for j in range(images_per_sample):
            file = f"img/{name}-{i}-{j}.png"
            all_images[i * images_per_sample + j].save(root / file)
            files.append(file)
        tags = "<image>" * images_per_sample
        content = f"{tags}what does sample {i} of {name} show?"
        record = {"id": f"{name}-{i}", "messages": [{"role": "user", "content": content}], "images": files}
        if not images_per_sample:
            record.pop("images")
        lines.append(json.dumps(record))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def image_pool(tmp_path, minilm, vision):
    """A pool of three adapters (one image per sample, two per sample, text only) with every key built."""
    entries = []
    for name, per_sample, seed in (("digits", 1, 10), ("pairs", 2, 11), ("textual", 0, 12)):
        write_adapter_dir(tmp_path / "adapters" / name)
        write_samples(tmp_path, name, 6, per_sample, seed)
        entries.append({"lora_name": name, "lora_path": f"adapters/{name}", "samples_path": f"{name}.jsonl"})
    config = tmp_path / "pool.json"
    config.write_text(json.dumps(entries))
    pool = embed_pool(config, minilm, image_embedder=vision, num_samples=4, seed=3, progress=False)
    return config, pool


def test_embed_pool_writes_image_keys_for_adapters_with_images(image_pool, vision, minilm):
    config, pool = image_pool
    stored = {e["lora_name"]: e for e in json.loads(config.read_text())}
    assert stored["digits"]["image_embedding_path"] == "keys/digits.image.npy"
    assert stored["pairs"]["image_embedding_path"] == "keys/pairs.image.npy"
    assert "image_embedding_path" not in stored["textual"]
    assert pool.image_key_mask().tolist() == [True, True, False]
    for name in ("digits", "pairs"):
        key_path = config.parent / "keys" / f"{name}.image.npy"
        meta = json.loads(key_meta_path(key_path).read_text())
        assert key_meta_path(key_path).name == f"{name}.image.meta.json"
        assert (meta["model_id"], meta["dim"], meta["backend"], meta["text_weight"]) == (
            "tiny-llava",
            32,
            "vision-tower",
            0.7,
        )
        assert meta["num_samples"] == 4 and meta["date"] and meta["modality"] == "image"
        text_meta = json.loads(key_meta_path(config.parent / "keys" / f"{name}.npy").read_text())
        assert text_meta["sample_ids"] == meta["sample_ids"]  # one choice rule for both keys
        # independent reference: per sample, the mean of its normalised image vectors, renormalised; then
        # the mean over the recorded samples, normalised
        samples = {s.id: s for s in read_key_samples(config.parent / f"{name}.jsonl")}
        per_sample = [
            unit(vision.encode_images([load_image(f) for f in samples[i].images]).mean(axis=0))
            for i in meta["sample_ids"]
        ]
        np.testing.assert_allclose(np.load(key_path), unit(np.mean(per_sample, axis=0)), atol=ATOL)
        # the text key was built from the same samples' texts, image tags removed
        texts = [samples[i].text for i in meta["sample_ids"]]
        assert all("<image>" not in t for t in texts)
        expected_text = unit(minilm.encode_queries(texts).mean(axis=0))
        np.testing.assert_allclose(np.load(config.parent / "keys" / f"{name}.npy"), expected_text, atol=ATOL)
    image_keys = pool.image_keys()
    assert image_keys.shape == (3, 32) and not image_keys[2].any()
    np.testing.assert_allclose(np.linalg.norm(image_keys[:2], axis=1), 1.0, atol=ATOL)
    assert pool.image_key_meta().text_weight == 0.7 and pool.image_key_meta().model_id == "tiny-llava"


def test_image_keys_are_validated_up_front(image_pool):
    config, _ = image_pool
    keys = config.parent / "keys"
    meta_path = key_meta_path(keys / "pairs.image.npy")
    good_meta = meta_path.read_text()
    meta_path.write_text(json.dumps({**json.loads(good_meta), "text_weight": 0.5}))
    with pytest.raises(PoolValidationError, match=r"different fusion weights \(text_weight 0.7 vs 0.5\)"):
        AdapterPool.from_configs(config)
    meta_path.write_text(json.dumps({**json.loads(good_meta), "model_id": "other-vlm"}))
    with pytest.raises(PoolValidationError, match=r"image keys of 'digits' vs 'pairs'.*model_id"):
        AdapterPool.from_configs(config)
    meta_path.write_text(good_meta)
    np.save(keys / "pairs.image.npy", np.ones(16, dtype=np.float32))
    with pytest.raises(PoolValidationError, match="holds a 16-d vector but .* says dim 32"):
        AdapterPool.from_configs(config)
    (keys / "pairs.image.npy").unlink()
    with pytest.raises(PoolValidationError, match="'pairs'.*image key file .*pairs.image.npy does not exist"):
        AdapterPool.from_configs(config)


def test_read_key_samples_names_a_missing_image(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"query": "<image> which tile?", "images": ["gone.png"]}) + "\n")
    with pytest.raises(
        FileNotFoundError, match=f"record line1: image file {tmp_path / 'gone.png'} does not exist"
    ):
        read_key_samples(path)
    make_images(1, seed=0)[0].save(tmp_path / "here.png")
    parts = [{"type": "image"}, {"type": "text", "text": "which tile?"}]
    path.write_text(
        json.dumps({"query": "<image>", "images": ["here.png"]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": parts}], "images": ["here.png"]})
        + "\n"
    )
    first, second = read_key_samples(path)
    assert (first.text, first.images) == (None, (tmp_path / "here.png",))  # image-only sample
    assert second.text == "which tile?"


def test_register_trained_adapter_builds_the_image_key(tmp_path, minilm, vision):
    write_adapter_dir(tmp_path / "adapters" / "clock")
    samples_path = write_samples(tmp_path, "clock", 3, 1, seed=4)
    samples = read_key_samples(samples_path)
    entry = register_trained_adapter(
        tmp_path / "pool" / "pool.json",
        lora_name="clock",
        lora_path=tmp_path / "adapters" / "clock",
        samples=[(s.id, s.text) for s in samples],
        samples_path=samples_path,
        embedder=minilm,
        image_embedder=vision,
        image_samples=[(s.id, s.images) for s in samples],
        text_weight=0.6,
    )
    assert entry["image_embedding_path"] == "keys/clock.image.npy"
    pool = AdapterPool.from_configs(tmp_path / "pool" / "pool.json")
    assert pool.image_key_mask().tolist() == [True] and pool.image_key_meta().text_weight == 0.6
    expected = unit(vision.encode_images([load_image(s.images[0]) for s in samples]).mean(axis=0))
    np.testing.assert_allclose(pool.image_keys()[0], expected, atol=ATOL)


# ------------------------------------------------------------------------------------------ fused scoring


def write_keyed_pool(root, text_keys, image_keys, text_weight=0.7, image_model="tiny-vision"):
    """A pool config with the given text keys (``{name: vector}``) and image keys (a subset of names)."""
    (root / "keys").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, text_key in text_keys.items():
        write_adapter_dir(root / "adapters" / name)
        np.save(root / "keys" / f"{name}.npy", np.asarray(text_key, np.float32))
        key_meta_path(root / "keys" / f"{name}.npy").write_text(
            json.dumps({"model_id": "text-emb", "dim": len(text_key)})
        )
        entry = {"lora_name": name, "lora_path": f"adapters/{name}", "embedding_path": f"keys/{name}.npy"}
        if name in image_keys:
            path = root / "keys" / f"{name}.image.npy"
            np.save(path, np.asarray(image_keys[name], np.float32))
            meta = {"model_id": image_model, "dim": len(image_keys[name]), "text_weight": text_weight}
            key_meta_path(path).write_text(json.dumps(meta))
            entry["image_embedding_path"] = f"keys/{name}.image.npy"
        entries.append(entry)
    config = root / "pool.json"
    config.write_text(json.dumps(entries))
    return AdapterPool.from_configs(config)


def hand_score(text_q, image_q, text_k, image_k, a):
    """The documented rule for one query and one adapter (None = that part is missing)."""
    cos = lambda u, v: float(np.dot(unit(u), unit(v)))  # noqa: E731
    shares_text = text_q is not None
    shares_image = image_q is not None and image_k is not None
    if shares_text and shares_image:
        return a * cos(text_q, text_k) + (1 - a) * cos(image_q, image_k)
    if shares_text:
        return cos(text_q, text_k)
    if shares_image:
        return cos(image_q, image_k)
    return -np.inf


@pytest.fixture
def synthetic(tmp_path):
    rng = np.random.default_rng(7)
    names = ["a", "b", "c", "d", "e"]
    text_keys = {n: unit(rng.normal(size=8)) for n in names}
    image_keys = {n: unit(rng.normal(size=6)) for n in names[:3]}  # d and e have no image key
    pool = write_keyed_pool(tmp_path, text_keys, image_keys)
    text_q = unit(rng.normal(size=(4, 8)))
    image_q = unit(rng.normal(size=(4, 6)))
    has_text = np.array([True, True, False, True])  # query 2: image only
    has_image = np.array([True, False, True, True])  # query 1: text only
    queries = QueryVectors(
        text=np.where(has_text[:, None], text_q, 0),
        image=np.where(has_image[:, None], image_q, 0),
        has_text=has_text,
        has_image=has_image,
    )
    return pool, names, text_keys, image_keys, queries


@pytest.mark.parametrize("a", [0.7, 0.25, 1.0, 0.0])
def test_fused_scores_equal_the_rule_computed_by_hand(synthetic, a):
    pool, names, text_keys, image_keys, queries = synthetic
    retriever = LoraRetriever(LoraRetrieverConfig(text_weight=a, top_k=3), pool=pool, embedder=object())
    got = retriever.similarities(queries)
    for q in range(len(queries)):
        tq = queries.text[q] if queries.has_text[q] else None
        iq = queries.image[q] if queries.has_image[q] else None
        for j, name in enumerate(names):
            expected = hand_score(tq, iq, text_keys[name], image_keys.get(name), a)
            if np.isinf(expected):
                assert got[q, j] == -np.inf
            else:
                assert got[q, j] == pytest.approx(expected, abs=ATOL)
    results = retriever.retrieve_vectors(queries)
    for q, result in enumerate(results):
        finite = [(name, got[q, j]) for j, name in enumerate(names) if np.isfinite(got[q, j])]
        ranked = sorted(finite, key=lambda item: -item[1])[:3]
        assert [r.name for r in result] == [name for name, _ in ranked]
        assert [r.similarity for r in result] == pytest.approx([s for _, s in ranked], abs=ATOL)
    # the image-only query can't reach d and e (no image key): only a, b, c are retrievable for it
    assert {r.name for r in retriever.retrieve_vectors(queries, top_k=5)[2]} == {"a", "b", "c"}


def test_text_only_vectors_keep_the_plain_index(synthetic):
    pool, names, text_keys, _, queries = synthetic
    retriever = LoraRetriever(LoraRetrieverConfig(index="faiss-flat"), pool=pool, embedder=object())
    text_rows = queries.text[[0, 1, 3]]
    via_index = retriever.retrieve_vectors(text_rows)
    via_fusion = retriever.retrieve_vectors(
        QueryVectors(text=text_rows, image=np.zeros((3, 6)), has_image=[0, 0, 0])
    )
    assert [[r.name for r in q] for q in via_index] == [[r.name for r in q] for q in via_fusion]
    np.testing.assert_allclose(retriever.similarities(text_rows), text_rows @ pool.keys().T, atol=ATOL)


def test_text_weight_travels_with_the_keys(tmp_path, caplog):
    rng = np.random.default_rng(0)
    pool = write_keyed_pool(tmp_path, {"a": rng.normal(size=4)}, {"a": rng.normal(size=3)}, text_weight=0.6)
    assert LoraRetriever(pool=pool, embedder=object()).text_weight == 0.6
    retriever = LoraRetriever(LoraRetrieverConfig(text_weight=0.9), pool=pool, embedder=object())
    with caplog.at_level(logging.WARNING):
        assert retriever.text_weight == 0.9 and retriever.text_weight == 0.9
    assert [r.message for r in caplog.records].count(
        "scoring with text_weight 0.9, but the pool's image keys were built for text_weight 0.6"
    ) == 1
    text_only = write_keyed_pool(tmp_path / "t", {"a": rng.normal(size=4)}, {})
    assert LoraRetriever(pool=text_only, embedder=object()).text_weight == 0.7  # the seed's default
    with pytest.raises(ValueError, match=r"text_weight must be a number in \[0, 1\]"):
        LoraRetrieverConfig(text_weight=-0.1)


def test_query_vectors_from_another_embedder_are_refused(synthetic):
    from lora_retriever.embedders import EmbeddingMeta

    pool, _, _, _, queries = synthetic
    retriever = LoraRetriever(pool=pool, embedder=object())
    wrong = QueryVectors(
        text=queries.text, image=queries.image, has_text=queries.has_text, has_image=queries.has_image,
        image_meta=EmbeddingMeta(model_id="other-vlm", dim=6),
    )  # fmt: skip
    with pytest.raises(ValueError, match="image keys vs query vectors.*'tiny-vision'.*'other-vlm'"):
        retriever.retrieve_vectors(wrong)
    with pytest.raises(ValueError, match="image query vectors are 5-d but the image keys are 6-d"):
        retriever.similarities(QueryVectors(text=None, image=unit(np.ones((1, 5)))))
    with pytest.raises(ValueError, match=r"queries \[0\] have neither"):
        retriever.retrieve_vectors(QueryVectors(text=np.zeros((1, 8)), has_text=[False]))


def test_selection_passes_query_vectors_through(synthetic):
    pool, names, _, _, queries = synthetic
    retriever = LoraRetriever(LoraRetrieverConfig(index="exact"), pool=pool, embedder=object())
    tasks = ["a", "b", "c", "d"]
    sims = retriever.similarities(queries)
    mixture = select_adapters("mixture", pool, tasks=tasks, retriever=retriever, vectors=queries, top_k=2)
    assert [[r.name for r in sel] for sel in mixture] == [
        [r.name for r in sel] for sel in retriever.retrieve_vectors(queries, top_k=2)
    ]
    oracle = select_adapters("oracle", pool, tasks=tasks, retriever=retriever, vectors=queries)
    assert [sel[0].similarity for sel in oracle] == pytest.approx([sims[i, i] for i in range(4)])


# ------------------------------------------------------------------------------------------ end to end


def test_retrieve_with_real_embedders_fuses_text_and_images(image_pool, minilm, vision, tmp_path, caplog):
    config, pool = image_pool
    retriever = LoraRetriever(
        LoraRetrieverConfig(top_k=2, image_embedder=EmbedderConfig("vision-tower", str(vision.model_path))),
        pool=pool,
        embedder=minilm,
    )
    retriever.check_embedder()
    images = [make_images(1, seed=20), make_images(2, seed=21), [], make_images(1, seed=22)]
    texts = ["<image> what does this show?", "compare these", "what does sample 2 of textual show?", None]
    vectors = retriever.embed_queries(texts, images)
    assert vectors.has_text.tolist() == [True, True, True, False]
    assert vectors.has_image.tolist() == [True, True, False, True]
    np.testing.assert_allclose(vectors.text[0], minilm.encode_queries(["what does this show?"])[0], atol=ATOL)
    np.testing.assert_allclose(
        vectors.image[1], unit(vision.encode_images(images[1]).mean(axis=0)), atol=ATOL
    )
    results = retriever.retrieve(texts, images=images)
    assert [[r.name for r in q] for q in results] == [
        [r.name for r in q] for q in retriever.retrieve_vectors(vectors)
    ]
    assert {r.name for r in results[3]} <= {"digits", "pairs"}  # image-only: only adapters with image keys
    # another VLM's vision tower did not make these keys
    other_dir = save_tiny_llava(tmp_path / "other-vlm", seed=1)
    other = LoraRetriever(
        LoraRetrieverConfig(image_embedder={"backend": "vision-tower", "model_path": str(other_dir)}),
        pool=pool,
        embedder=minilm,
    )
    with pytest.raises(ValueError, match="image keys vs image embedder.*'tiny-llava'.*'other-vlm'"):
        other.check_embedder()


def test_images_for_a_text_only_retriever_warn_once_and_score_text(image_pool, minilm, caplog):
    _, pool = image_pool
    retriever = LoraRetriever(LoraRetrieverConfig(top_k=2), pool=pool, embedder=minilm)
    texts = ["what does sample 1 of digits show?", "what does sample 2 of textual show?"]
    images = [make_images(1, seed=30), []]
    with caplog.at_level(logging.WARNING):
        with_images = retriever.retrieve(texts, images=images)
        retriever.retrieve(texts, images=images)
    warnings = [r.message for r in caplog.records if "images are ignored for retrieval" in r.message]
    assert len(warnings) == 1 and "all-MiniLM-L6-v2" in warnings[0] and "no image embedder" in warnings[0]
    assert with_images == retriever.retrieve(texts)
    with pytest.raises(ValueError, match=r"queries \[0\] have no text .*no image embedder is configured"):
        retriever.embed_queries([None], [make_images(1, seed=31)])


# ------------------------------------------------------------------------------------------ accuracy


def test_accuracy_by_modality_on_a_known_answer(tmp_path):
    """Adapters a/b share a text key and c/d another; a/c share an image key and b/d another; e has only a
    text key. Text alone confuses a/b and c/d, images alone a/c and b/d; fused scoring separates them all."""
    e = np.eye(8, dtype=np.float32)
    f = np.eye(6, dtype=np.float32)
    text_keys = {"a": e[0], "b": e[0], "c": e[1], "d": e[1], "e": e[2]}
    image_keys = {"a": f[0], "b": f[1], "c": f[0], "d": f[1]}
    pool = write_keyed_pool(tmp_path, text_keys, image_keys)
    retriever = LoraRetriever(pool=pool, embedder=object())
    own = ["a", "b", "c", "d", "e"]
    vectors = QueryVectors(
        text=np.stack([text_keys[n] for n in own]),
        image=np.stack([image_keys.get(n, f[0]) for n in own]),  # e's query has an image, e has no image key
    )
    report = accuracy_by_modality(retriever, vectors, own)
    # ties go to the earlier adapter: text ranks a before b and c before d, images a before c and b before d
    assert report["text"] == {"top1": 0.6, "top3": 1.0, "n": 5, "unscored": 0}
    assert report["image"] == {"top1": 0.4, "top3": 0.8, "n": 5, "unscored": 1}  # e can't be scored on images
    assert report["fused"] == {"top1": 1.0, "top3": 1.0, "n": 5, "unscored": 0}
    with pytest.raises(ValueError, match=r"own adapters \['z'\] are not in the pool"):
        accuracy_by_modality(retriever, vectors, ["a", "b", "c", "d", "z"])
    with pytest.raises(ValueError, match="needs queries embedded with text and images"):
        accuracy_by_modality(retriever, vectors.only("text"), own)


def test_fused_similarities_rejects_a_weight_outside_0_1():
    queries = QueryVectors(text=np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"text_weight must be in \[0, 1\]"):
        fused_similarities(queries, np.eye(2, dtype=np.float32), text_weight=1.2)


def test_embed_pool_cli_builds_image_keys_and_refuses_an_absent_embedder(tmp_path, llava_dir, capsys):
    from lora_retriever.cli import embed_pool as embed_pool_cli

    write_adapter_dir(tmp_path / "adapters" / "digits")
    write_samples(tmp_path, "digits", 3, 1, seed=40)
    config = tmp_path / "pool.json"
    config.write_text(
        json.dumps([{"lora_name": "digits", "lora_path": "adapters/digits", "samples_path": "digits.jsonl"}])
    )
    missing = tmp_path / "no-vlm"
    assert embed_pool_cli.main(["--pool", str(config), "--image_embedder_path", str(missing)]) == 2
    assert f"image embedder model_path '{missing}' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "keys").exists()  # refused before anything was embedded
    argv = [
        "--pool",
        str(config),
        "--image_embedder",
        "vision-tower",
        "--image_embedder_path",
        str(llava_dir),
    ]
    assert embed_pool_cli.main([*argv, "--text_weight", "0.6", "--samples", "2", "--quiet"]) == 0
    pool = AdapterPool.from_configs(config)
    assert pool.image_key_mask().tolist() == [True]
    assert (pool.image_key_meta().model_id, pool.image_key_meta().text_weight) == ("tiny-llava", 0.6)
