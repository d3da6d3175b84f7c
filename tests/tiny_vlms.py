"""Tiny random-weight models saved with a working tokenizer/processor, built offline.

Every builder writes a directory that ``swift.llm.get_model_tokenizer(<type>, path)`` loads: the model
(``save_pretrained``), a word-level tokenizer made with the ``tokenizers`` library (no download) holding
the special tokens the processor needs, a chat template, and for VLMs the image (and video) processor with
tiny image sizes. Forward passes take a few milliseconds (hidden 32, 2 layers, 4-pixel patches).

Image token counts with these processors:

* Qwen2-VL / Qwen2.5-VL: patch 4, merge 2 -> an ``H x W`` image gives ``(H/4)*(W/4)`` patch rows and a
  quarter as many ``<|image_pad|>`` tokens (sizes rounded to multiples of 8).
* InternVL: 16x16 tiles (up to 4 plus a thumbnail), 4 ``<IMG_CONTEXT>`` tokens per tile.
* LLaVA: every image resized/cropped to 16x16 -> 16 ``<image>`` tokens (CLS dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.factories import tiny_causal_lm

SPECIAL_TOKENS = [
    "<pad>",  # 0 = pad_token_id of every tiny config
    "<|im_start|>",  # 1 = bos_token_id
    "<|im_end|>",  # 2 = eos_token_id (ChatML end of turn)
    "<unk>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "<image>",
]
WORDS = (
    "system user assistant User Assistant System you are a helpful what is the capital of france paris "
    "describe this image cat dog red blue green and compare two plus one"
).split()
PUNCTUATION = [".", "?", ",", ":", "!"]
VOCAB_SIZE = 128  # = tests.factories.VOCAB, so the text-only tiny models share this tokenizer
# Filler words make every id a model can generate decode to text.
_FILLER = [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS) - len(WORDS) - len(PUNCTUATION))]
VOCAB = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS + PUNCTUATION + _FILLER)}

# ChatML, as SmolLM2 / Qwen2 ship it (string content), plus list content with image parts for VLMs.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_CHAT_TEMPLATE = _CHATML.replace("IMAGE_PLACEHOLDER", "")
QWEN_VL_CHAT_TEMPLATE = _CHATML.replace("IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>")
INTERNVL_CHAT_TEMPLATE = _CHATML.replace("IMAGE_PLACEHOLDER", "<IMG_CONTEXT>\n")
# LLaVA-1.5 style "USER: ... ASSISTANT:" with images in place.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

TINY_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build_tokenizer(chat_template: str | None, **named_tokens: str):
    """A word-level fast tokenizer over ``VOCAB`` with every entry of ``SPECIAL_TOKENS`` atomic.

    Args:
        chat_template: Jinja chat template, or None for a tokenizer without one.
        named_tokens: extra named special tokens (e.g. ``context_image_token="<IMG_CONTEXT>"``); they become
            attributes ``tokenizer.<name>`` and ``tokenizer.<name>_id`` and are saved with the tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=chat_template,
        extra_special_tokens=named_tokens or None,
    )


QWEN2_BPE_VOCAB_SIZE = 320  # 13 special tokens + 256 bytes + merges


def build_byte_level_bpe_tokenizer(chat_template: str | None):
    """A byte-level BPE tokenizer (as Qwen2 / SmolLM2 use) trained in code on a few sentences.

    transformers 5 always loads a ``qwen2`` directory's tokenizer as ``Qwen2Tokenizer``, which rebuilds the
    pipeline around the saved BPE vocab and merges (a word-level vocab would be mangled), so the tiny Qwen2
    gets a real byte-level BPE. Every byte is in the vocab: any text round-trips.
    """
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN2_BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        " ".join(WORDS),
        "what is the capital of france? paris.",
        "describe this image: a red cat and a dog",
    ]
    backend.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


def _save(model: torch.nn.Module, processor, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def save_tiny_llama(path: str | Path, *, chat_template: str | None = TEXT_CHAT_TEMPLATE) -> Path:
    """``tests.factories.tiny_causal_lm("llama")`` (2 layers, hidden 64, vocab 128), word-level ChatML tokenizer."""
    return _save(tiny_causal_lm("llama"), build_tokenizer(chat_template), path)


def save_tiny_qwen2(path: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2 (2 layers, hidden 64) with a byte-level BPE ChatML tokenizer (vocab 320)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_byte_level_bpe_tokenizer(TEXT_CHAT_TEMPLATE)
    config = Qwen2Config(
        **dict(TINY_TEXT, vocab_size=QWEN2_BPE_VOCAB_SIZE, hidden_size=64, intermediate_size=128)
    )
    torch.manual_seed(seed)
    return _save(Qwen2ForCausalLM(config).eval(), tokenizer, path)


def _qwen_image_processors():
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    sizes = dict(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 64, "longest_edge": 2304}
    )
    return Qwen2VLImageProcessor(**sizes), Qwen2VLVideoProcessor(**sizes)


def _qwen_token_ids() -> dict[str, int]:
    return dict(
        image_token_id=VOCAB["<|image_pad|>"],
        video_token_id=VOCAB["<|video_pad|>"],
        vision_start_token_id=VOCAB["<|vision_start|>"],
        vision_end_token_id=VOCAB["<|vision_end|>"],
    )


def _qwen_text_config() -> dict:
    # M-RoPE: head_dim 8 -> 4 rotary frequencies split over (t, h, w).
    return dict(
        TINY_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    )


def save_tiny_qwen2_vl(path: str | Path, seed: int = 0) -> Path:
    """Qwen2-VL: 2 vision blocks (embed 32), merger 128 -> 32, 2 text layers."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    image_processor, video_processor = _qwen_image_processors()
    tokenizer = build_tokenizer(QWEN_VL_CHAT_TEMPLATE)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
        ),
        **_qwen_token_ids(),
    )
    torch.manual_seed(seed)
    return _save(Qwen2VLForConditionalGeneration(config).eval(), processor, path)


def save_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: window attention with 2x2-merge-unit windows (``window_size=16``) in block 0, full in 1."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    image_processor, video_processor = _qwen_image_processors()
    tokenizer = build_tokenizer(QWEN_VL_CHAT_TEMPLATE)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        **_qwen_token_ids(),
    )
    torch.manual_seed(seed)
    return _save(Qwen2_5_VLForConditionalGeneration(config).eval(), processor, path)


INTERNVL_TOKENS_PER_TILE = 4  # (16 / 4)**2 patches, pixel shuffle 0.5 -> 4


def save_tiny_internvl(path: str | Path, seed: int = 0) -> Path:
    """InternVL (native transformers class): 16x16 tiles, 2-layer vision tower, Qwen2 text model."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    tokenizer = build_tokenizer(
        INTERNVL_CHAT_TEMPLATE,
        start_image_token="<img>",
        end_image_token="</img>",
        context_image_token="<IMG_CONTEXT>",
        video_token="<video>",
    )
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size={"height": 16, "width": 16}),
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    config = InternVLConfig(
        text_config=dict(TINY_TEXT, model_type="qwen2"),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=[16, 16],
            patch_size=[4, 4],
        ),
        image_token_id=VOCAB["<IMG_CONTEXT>"],
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    return _save(InternVLForConditionalGeneration(config).eval(), processor, path)


LLAVA_TOKENS_PER_IMAGE = 16  # (16 / 4)**2 patches; the CLS token is dropped ("default" strategy)


def save_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """LLaVA: CLIP vision tower (16x16 images, patch 4), Llama text model."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=build_tokenizer(LLAVA_CHAT_TEMPLATE),
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        text_config=dict(TINY_TEXT, model_type="llama"),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        ),
        image_token_id=VOCAB["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return _save(LlavaForConditionalGeneration(config).eval(), processor, path)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llama": save_tiny_llama,
    "qwen2": save_tiny_qwen2,
    "qwen2-vl": save_tiny_qwen2_vl,
    "qwen2.5-vl": save_tiny_qwen2_5_vl,
    "internvl": save_tiny_internvl,
    "llava": save_tiny_llava,
}
VLM_TYPES = ("qwen2-vl", "qwen2.5-vl", "internvl", "llava")


class TinyModelDirs:
    """Builds each tiny model directory on first use under ``root`` and reuses it afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, Path] = {}

    def __getitem__(self, model_type: str) -> Path:
        if model_type not in self._dirs:
            self._dirs[model_type] = BUILDERS[model_type](self.root / model_type.replace(".", "_"))
        return self._dirs[model_type]
