"""Embedders: the real packaged MiniLM, PEFT adapters on it, a tiny random CLIP, jina path checks, fusion."""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_retriever.embedders import (
    DEFAULT_INSTRUCTION,
    EmbedderConfig,
    EmbeddingMeta,
    UnsupportedInputError,
    check_compatible,
    get_embedder,
    resolve_backend,
)

LOGGER = "lora_retriever.embedders"

# Tolerances: every comparison of vectors runs the same texts (or images), in the same batch, through both
# sides; vectors are unit-normalised, so 1e-5 / 1e-6 absolute bounds are a few ulps of O(1) values on any CPU.
# Assertions that an input *changes* a vector use > 1e-3, far above that.


# ---------------------------------------------------------------------------- fixtures and builders


@pytest.fixture
def embedder_logs(caplog):
    """caplog that also sees records if the package logger stops propagating."""
    logger = logging.getLogger(LOGGER)
    logger.addHandler(caplog.handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old)


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return get_embedder("sentence-transformers")


def _save_lora(module: torch.nn.Module, path: Path, *, seed: int, zero_b: bool = False, target=None) -> Path:
    """A PEFT LoRA (r=4) on a copy of ``module`` with random A and B (or all-zero B), saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(module), LoraConfig(r=4, lora_alpha=8, target_modules=target or ["query", "value"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.zero_() if zero_b else param.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def minilm_adapters(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm_adapters")
    base = minilm.model.transformers_model
    return {
        "a": _save_lora(base, root / "lora_a", seed=1),
        "b": _save_lora(base, root / "lora_b", seed=2),
        "zero": _save_lora(base, root / "lora_zero", seed=3, zero_b=True),
    }


def _tiny_clip_dir(path: Path) -> Path:
    """A random 2-layer CLIP (hidden 32, projection 24, 16x16 images) and its processor, saved to ``path``.

    The tokenizer is a character-level BPE vocabulary written here (no download)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=24,
    )
    CLIPModel(config).eval().save_pretrained(str(path))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return get_embedder("clip", model_path=str(clip_dir))


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return path


# ---------------------------------------------------------------------------- real MiniLM


def test_minilm_identity_and_normalised_output(minilm):
    assert minilm.model_id == "all-MiniLM-L6-v2"
    assert minilm.dim == 384
    assert not minilm.supports_images and not minilm.adapter_loaded
    q = minilm.encode_queries(["What is the capital of France?", "add 12 and 35"])
    d = minilm.encode_documents("Paris is the capital of France.")
    assert q.shape == (2, 384) and d.shape == (1, 384)
    assert q.dtype == np.float32 and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert minilm.encode_queries([]).shape == (0, 384)


def _margins(embedder, queries: list[str], documents: list[str]) -> np.ndarray:
    """Per query: similarity to its own document minus the best other one (asserting the own one wins)."""
    sims = embedder.encode_queries(queries) @ embedder.encode_documents(documents).T
    assert (sims.argmax(axis=1) == np.arange(len(queries))).all(), sims
    return np.diag(sims) - np.where(np.eye(len(queries), dtype=bool), -np.inf, sims).max(axis=1)


RETRIEVAL_QUERIES = [
    "What is the capital of France?",
    "Translate 'good morning' to French.",
    "What is 12 plus 35?",
]
RETRIEVAL_DOCUMENTS = [
    "What is the capital of Italy? Rome.",
    "Translate 'thank you' to French: merci.",
    "What is 40 plus 17? 57.",
]


def test_minilm_retrieves_the_matching_task(minilm):
    # With the default instruction on both sides (the shared prefix pulls all vectors together, so the
    # margins are smaller than without it: about 0.08-0.3 here vs 0.22-0.6).
    assert (_margins(minilm, RETRIEVAL_QUERIES, RETRIEVAL_DOCUMENTS) > 0.05).all()
    plain = get_embedder("sentence-transformers", query_instruction="")
    assert (_margins(plain, RETRIEVAL_QUERIES, RETRIEVAL_DOCUMENTS) > 0.2).all()


def test_instruction_prefix_on_both_sides(minilm):
    texts = ["add 12 and 35", "the capital of Spain"]
    raw = minilm.model.encode(
        [DEFAULT_INSTRUCTION + t for t in texts], convert_to_numpy=True, normalize_embeddings=True
    )
    assert minilm.instruction("query") == minilm.instruction("document") == DEFAULT_INSTRUCTION
    np.testing.assert_allclose(minilm.encode_queries(texts), raw, atol=1e-5)
    np.testing.assert_allclose(minilm.encode_documents(texts), raw, atol=1e-5)
    no_prefix = minilm.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    assert np.abs(minilm.encode_queries(texts) - no_prefix).max() > 1e-3  # the prefix does change vectors
    assert minilm.meta("query").instruction == DEFAULT_INSTRUCTION


def test_custom_and_empty_instructions(minilm):
    plain = get_embedder("sentence-transformers", query_instruction="", document_instruction="passage: ")
    texts = ["the capital of Spain"]
    np.testing.assert_allclose(
        plain.encode_queries(texts), minilm.model.encode(texts, normalize_embeddings=True), atol=1e-5
    )
    np.testing.assert_allclose(
        plain.encode_documents(texts),
        minilm.model.encode(["passage: " + texts[0]], normalize_embeddings=True),
        atol=1e-5,
    )


def test_text_only_backend_rejects_images(minilm):
    with pytest.raises(UnsupportedInputError, match="sentence-transformers"):
        minilm.encode_images(_images(1))
    with pytest.raises(UnsupportedInputError, match="text-only"):
        minilm.encode(texts=["a"], images=[_images(1)])
    # empty image lists are fine on a text-only backend
    np.testing.assert_allclose(
        minilm.encode(texts=["a"], images=[[]]), minilm.encode_queries(["a"]), atol=1e-6
    )


# ---------------------------------------------------------------------------- adapter_path validation


def test_adapter_path_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"does not exist.*save_pretrained") as err:
        EmbedderConfig(adapter_path=str(missing))
    assert str(missing) in str(err.value)


def test_adapter_path_is_a_file(tmp_path):
    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a directory") as err:
        EmbedderConfig(adapter_path=str(file))
    assert str(file) in str(err.value)


def test_adapter_path_without_adapter_config(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="has no adapter_config.json") as err:
        EmbedderConfig(adapter_path=str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_adapter_path_tilde_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = _adapter_dir(tmp_path / "adapters" / "my-domain")
    config = EmbedderConfig(adapter_path="~/adapters/my-domain")
    assert config.adapter_path == str(expected)
    assert EmbedderConfig(model_path="~/models/x").model_path == str(tmp_path / "models" / "x")


def test_adapter_path_rejected_for_jina(tmp_path):
    with pytest.raises(ValueError, match="not supported with backend='jina-v4'"):
        EmbedderConfig(
            backend="jina-v4", model_path=str(tmp_path), adapter_path=str(_adapter_dir(tmp_path / "a"))
        )


# ---------------------------------------------------------------------------- PEFT adapter on MiniLM


def test_peft_missing_warns_and_uses_base_model(minilm, minilm_adapters, monkeypatch, embedder_logs):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    embedder = get_embedder("sentence-transformers", adapter_path=str(minilm_adapters["a"]))
    warnings = [r for r in embedder_logs.records if r.levelno == logging.WARNING]
    assert any(
        str(minilm_adapters["a"]) in r.getMessage() and "pip install peft" in r.getMessage() for r in warnings
    )
    assert not embedder.adapter_loaded and embedder.adapter_path is None
    texts = ["What is 12 plus 35?"]
    np.testing.assert_allclose(embedder.encode_queries(texts), minilm.encode_queries(texts), atol=1e-6)


def test_adapter_changes_embeddings_and_loads_idempotently(minilm, minilm_adapters, embedder_logs):
    texts = ["What is the capital of France?", "add 12 and 35"]
    base = minilm.encode_queries(texts)
    embedder = get_embedder(EmbedderConfig(adapter_path=str(minilm_adapters["a"])))
    assert embedder.adapter_loaded and embedder.adapter_path == str(minilm_adapters["a"])
    assert any(
        "ms" in r.getMessage() and "loaded LoRA adapter" in r.getMessage() for r in embedder_logs.records
    )
    adapted = embedder.encode_queries(texts)
    np.testing.assert_allclose(np.linalg.norm(adapted, axis=1), 1.0, atol=1e-5)
    assert np.abs(adapted - base).max() > 1e-3
    embedder_a_digest = embedder.meta().adapter.partition("@")[2]

    n_lora = sum(".lora_B." in n for n, _ in embedder.model.named_parameters())
    assert embedder.load_adapter(minilm_adapters["a"]) is True  # the same path again: a no-op
    assert sum(".lora_B." in n for n, _ in embedder.model.named_parameters()) == n_lora
    assert any("already loaded" in r.getMessage() for r in embedder_logs.records)
    np.testing.assert_array_equal(embedder.encode_queries(texts), adapted)

    embedder.load_adapter(minilm_adapters["b"])  # another path replaces the first
    assert embedder.adapter_path == str(minilm_adapters["b"])
    assert sum(".lora_B." in n for n, _ in embedder.model.named_parameters()) == n_lora
    other = embedder.encode_queries(texts)
    assert np.abs(other - adapted).max() > 1e-3 and np.abs(other - base).max() > 1e-3
    name, _, digest = embedder.meta().adapter.partition("@")  # the folder name and its weights' digest
    assert name == "lora_b" and len(digest) == 12 and digest != embedder_a_digest

    embedder.unload_adapter()
    assert not embedder.adapter_loaded
    np.testing.assert_allclose(embedder.encode_queries(texts), base, atol=1e-6)


def test_all_zero_lora_b_is_an_error(minilm, minilm_adapters):
    texts = ["add 12 and 35"]
    embedder = get_embedder("sentence-transformers")
    with pytest.raises(ValueError, match="lora_B weights are zero"):
        embedder.load_adapter(minilm_adapters["zero"])
    assert not embedder.adapter_loaded
    assert not any("lora_" in n for n, _ in embedder.model.named_parameters())  # base layers restored
    np.testing.assert_allclose(embedder.encode_queries(texts), minilm.encode_queries(texts), atol=1e-6)
    with pytest.raises(ValueError, match="lora_B weights are zero"):
        get_embedder("sentence-transformers", adapter_path=str(minilm_adapters["zero"]))


def test_non_lora_adapter_is_an_error(tmp_path, minilm):
    path = tmp_path / "ia3"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    embedder = get_embedder("sentence-transformers")
    with pytest.raises(ValueError, match="only LoRA adapters"):
        embedder.load_adapter(path)


# ---------------------------------------------------------------------------- jina-v4 and auto


def test_jina_needs_an_existing_jina_directory(tmp_path):
    with pytest.raises(ValueError, match="needs model_path"):
        EmbedderConfig(backend="jina-v4")
    missing = tmp_path / "jina-embeddings-v4"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        get_embedder("jina-v4", model_path=str(missing), trust_remote_code=True)
    assert str(missing) in str(err.value)
    not_jina = tmp_path / "other"
    not_jina.mkdir()
    (not_jina / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="not a jina-embeddings-v4 directory") as err:
        get_embedder("jina-v4", model_path=str(not_jina), trust_remote_code=True)
    assert str(not_jina) in str(err.value)


def test_jina_directory_without_model_code_is_a_clear_error(tmp_path):
    jina_dir = tmp_path / "jina-embeddings-v4"
    jina_dir.mkdir()
    (jina_dir / "config.json").write_text(json.dumps(_JINA_CONFIG))
    with pytest.raises(
        RuntimeError, match=r"could not load jina-embeddings-v4 from .*trust_remote_code"
    ) as err:
        get_embedder("jina-v4", model_path=str(jina_dir), trust_remote_code=True)
    assert str(jina_dir) in str(err.value)


_JINA_CONFIG = {
    "architectures": ["JinaEmbeddingsV4Model"],
    "auto_map": {
        "AutoConfig": "configuration_jina_embeddings_v4.JinaEmbeddingsV4Config",
        "AutoModel": "modeling_jina_embeddings_v4.JinaEmbeddingsV4Model",
    },
    "model_type": "jina-embeddings-v4",
}

# A stand-in for jina-embeddings-v4's remote code with the documented encode_text / encode_image API: it
# checks the arguments our backend passes and embeds strings by character counts (no real model here).
_JINA_STUB_CONFIG = """
from transformers import PretrainedConfig


class JinaEmbeddingsV4Config(PretrainedConfig):
    model_type = "jina-embeddings-v4"

    def __init__(self, dim=16, **kwargs):
        self.dim = dim
        super().__init__(**kwargs)
"""
_JINA_STUB_MODEL = """
import numpy as np
import torch
from transformers import PreTrainedModel

from .configuration_jina_embeddings_v4 import JinaEmbeddingsV4Config

PROMPTS = {"query": "Query: ", "passage": "Passage: "}


class JinaEmbeddingsV4Model(PreTrainedModel):
    config_class = JinaEmbeddingsV4Config

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(27, config.dim)
        self.calls = []
        self.post_init()

    def _embed(self, feats):
        return list(torch.nn.functional.normalize(self.proj(feats), dim=-1))

    def encode_text(self, texts, task=None, max_length=32768, batch_size=8, return_multivector=False,
                    return_numpy=False, truncate_dim=None, prompt_name=None):
        assert task == "retrieval" and prompt_name in PROMPTS, (task, prompt_name)
        self.calls.append(("text", prompt_name, batch_size))
        texts = [PROMPTS[prompt_name] + t for t in texts]
        feats = torch.tensor([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz "] for t in texts])
        return self._embed(feats.float())

    def encode_image(self, images, task=None, batch_size=8, return_multivector=False, return_numpy=False,
                     truncate_dim=None, max_pixels=None):
        assert task == "retrieval", task
        self.calls.append(("image", None, batch_size))
        feats = torch.stack([torch.tensor(np.array(im.convert("RGB").resize((3, 3)))).float().flatten() for im in images])
        return self._embed(feats / 255.0)
"""


def test_jina_backend_against_a_stub_of_its_remote_code(tmp_path, monkeypatch):
    """Exercises the real loading path (AutoModel + trust_remote_code, offline) and the arguments we pass;
    the real jina-embeddings-v4 weights are not available here."""
    from safetensors.torch import save_file
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    jina_dir = tmp_path / "jina-embeddings-v4"
    jina_dir.mkdir()
    (jina_dir / "config.json").write_text(json.dumps({**_JINA_CONFIG, "dim": 16}))
    (jina_dir / "configuration_jina_embeddings_v4.py").write_text(_JINA_STUB_CONFIG)
    (jina_dir / "modeling_jina_embeddings_v4.py").write_text(_JINA_STUB_MODEL)
    torch.manual_seed(0)
    save_file(
        {"proj.weight": torch.randn(16, 27), "proj.bias": torch.zeros(16)},
        str(jina_dir / "model.safetensors"),
    )

    embedder = get_embedder("auto", model_path=str(jina_dir), trust_remote_code=True)
    assert embedder.backend == "jina-v4" and embedder.supports_images
    assert embedder.model_id == "jina-embeddings-v4" and embedder.dim == 16
    assert embedder.instruction("query") == ""  # jina has its own query/passage prompts
    q = embedder.encode_queries(["where is paris"], batch_size=4)
    d = embedder.encode_documents(["where is paris"])
    assert q.shape == d.shape == (1, 16) and np.abs(q - d).max() > 1e-3  # different prompts
    assert embedder.model.calls[-2:] == [("text", "query", 4), ("text", "passage", 32)]
    v = embedder.encode_images(_images(2))
    assert v.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    fused = embedder.encode(texts=["where is paris"], images=[_images(1)], text_weight=1.0, image_weight=3.0)
    np.testing.assert_allclose(fused[0], _unit(q[0] + 3.0 * v[0]), atol=1e-6)


def test_auto_detects_a_jina_directory(tmp_path):
    jina_dir = tmp_path / "jina-embeddings-v4"
    jina_dir.mkdir()
    (jina_dir / "config.json").write_text(
        json.dumps({"architectures": ["JinaEmbeddingsV4Model"], "model_type": "qwen2_5_vl"})
    )
    config = EmbedderConfig(backend="auto", model_path=str(jina_dir), trust_remote_code=True)
    assert resolve_backend(config).backend == "jina-v4"
    with pytest.raises(PermissionError, match="--trust_remote_code"):  # jina's model class is remote code
        resolve_backend(EmbedderConfig(backend="auto", model_path=str(jina_dir)))


def test_auto_falls_back_to_minilm_with_a_warning(tmp_path, embedder_logs):
    embedder = get_embedder("auto", model_path=str(tmp_path / "no-such-jina"))
    assert embedder.backend == "sentence-transformers" and embedder.model_id == "all-MiniLM-L6-v2"
    warnings = [r.getMessage() for r in embedder_logs.records if r.levelno == logging.WARNING]
    assert any("falling back" in m and "no-such-jina" in m for m in warnings), warnings


def test_auto_picks_clip_for_a_clip_directory(clip_dir):
    assert resolve_backend(EmbedderConfig(backend="auto", model_path=str(clip_dir))).backend == "clip"


# ---------------------------------------------------------------------------- tiny CLIP and fusion


def test_clip_encodes_images_and_texts(clip):
    assert clip.supports_images and clip.dim == 24 and clip.model_id == "tiny-clip"
    assert clip.instruction("query") == ""  # CLIP gets no instruction by default
    vecs = clip.encode_images(_images(3))
    assert vecs.shape == (3, 24) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    texts = clip.encode_queries(["a photo of 3 cats", "hello"])
    assert texts.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    # batching does not change results
    np.testing.assert_allclose(clip.encode_images(_images(3), batch_size=2), vecs, atol=1e-5)
    with pytest.raises(ValueError, match="PIL images"):
        clip.encode_images(["not an image"])


def test_fused_vector_is_the_normalised_weighted_sum(clip):
    imgs = _images(3, seed=1)
    text = "a photo of 3 cats"
    t = clip.encode_queries([text])[0]
    v = clip.encode_images(imgs)
    fused = clip.encode(
        texts=[text, text, text, None],
        images=[imgs[0], [imgs[1], imgs[2]], None, [imgs[0]]],
        text_weight=0.3,
        image_weight=0.7,
    )
    assert fused.shape == (4, 24)
    np.testing.assert_allclose(fused[0], _unit(0.3 * t + 0.7 * v[0]), atol=1e-6)  # text + one image
    multi = _unit(v[1:3].mean(axis=0))  # several images: mean of normalised vectors, renormalised
    np.testing.assert_allclose(fused[1], _unit(0.3 * t + 0.7 * multi), atol=1e-6)
    np.testing.assert_allclose(fused[2], t, atol=1e-6)  # text only
    np.testing.assert_allclose(fused[3], v[0], atol=1e-6)  # image only
    # default weights come from the config (0.5 / 0.5); image-only calls need no texts
    np.testing.assert_allclose(clip.encode(texts=[text], images=[[imgs[0]]])[0], _unit(t + v[0]), atol=1e-6)
    np.testing.assert_allclose(clip.encode(images=[[imgs[2]]])[0], v[2], atol=1e-6)
    # role picks the document prefix
    docs = get_embedder("clip", model_path=clip.model_path, document_instruction="passage: ")
    np.testing.assert_allclose(
        docs.encode(texts=["x y"], role="document"), clip.encode_queries(["passage: x y"]), atol=1e-6
    )


def test_fusion_input_errors(clip):
    img = _images(1)
    with pytest.raises(ValueError, match="2 items but images has 1"):
        clip.encode(texts=["a", "b"], images=[img])
    with pytest.raises(ValueError, match=r"inputs \[1\] have neither text nor images"):
        clip.encode(texts=["a", None], images=[None, []])
    with pytest.raises(ValueError, match="role must be one of"):
        clip.encode(texts=["a"], role="passage")
    with pytest.raises(ValueError, match="got neither"):
        clip.encode()


@pytest.mark.parametrize(
    ("text_weight", "image_weight", "match"),
    [
        (-0.1, 0.5, "text_weight must be a finite number >= 0"),
        (0.5, float("nan"), "image_weight"),
        (0, 0, "both 0"),
    ],
)
def test_fusion_weights_validated(clip, text_weight, image_weight, match):
    with pytest.raises(ValueError, match=match):
        clip.encode(texts=["a"], images=[_images(1)], text_weight=text_weight, image_weight=image_weight)
    with pytest.raises(ValueError, match=match):
        EmbedderConfig(text_weight=text_weight, image_weight=image_weight)


def test_one_zero_weight_keeps_the_other_modality(clip):
    imgs = _images(1)
    only_image = clip.encode(texts=["a cat"], images=[imgs], text_weight=0.0, image_weight=1.0)
    np.testing.assert_allclose(only_image, clip.encode_images(imgs), atol=1e-6)


def test_lora_adapter_on_clip(clip_dir, clip, tmp_path):
    path = _save_lora(clip.model, tmp_path / "clip_lora", seed=4, target=["q_proj", "v_proj"])
    adapted = get_embedder("clip", model_path=str(clip_dir), adapter_path=str(path))
    assert adapted.adapter_loaded
    imgs = _images(2)
    assert np.abs(adapted.encode_images(imgs) - clip.encode_images(imgs)).max() > 1e-3
    assert np.abs(adapted.encode_queries(["a cat"]) - clip.encode_queries(["a cat"])).max() > 1e-3


# ---------------------------------------------------------------------------- config and meta


def test_config_round_trip_and_errors(tmp_path):
    config = EmbedderConfig(backend="clip", model_path=str(tmp_path), batch_size=4, text_weight=0.2)
    assert EmbedderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown EmbedderConfig keys \['modle_path'\]"):
        EmbedderConfig.from_dict({"modle_path": "x"})
    with pytest.raises(ValueError, match="backend must be one of"):
        EmbedderConfig(backend="openai")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EmbedderConfig(dtype="fp8")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        EmbedderConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown EmbedderConfig keys"):
        get_embedder("sentence-transformers", modle_path="x")


def test_meta_compatibility(minilm, clip):
    meta = minilm.meta()
    assert meta == EmbeddingMeta("all-MiniLM-L6-v2", 384, DEFAULT_INSTRUCTION, None, "sentence-transformers")
    assert EmbeddingMeta.from_dict({**meta.to_dict(), "sample_ids": [1, 2], "date": "2026-11-24"}) == meta
    check_compatible(meta, EmbeddingMeta.from_dict(meta.to_dict()), "keys vs queries")
    with pytest.raises(ValueError, match=r"keys vs queries.*'all-MiniLM-L6-v2', 384-d vs 'tiny-clip', 24-d"):
        check_compatible(meta, clip.meta(), "keys vs queries")
    with pytest.raises(ValueError, match="instruction prefix"):
        check_compatible(meta, EmbeddingMeta("all-MiniLM-L6-v2", 384, instruction=""), "keys vs queries")
    check_compatible(meta, EmbeddingMeta("all-MiniLM-L6-v2", 384), "legacy keys")  # unknown instruction: ok
    with pytest.raises(ValueError, match="needs 'model_id' and 'dim'"):
        EmbeddingMeta.from_dict({"dim": 3})
