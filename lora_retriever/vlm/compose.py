"""Compose the native ``LlavaForConditionalGeneration`` from the packaged SmolLM2 and a new vision tower.

* language model: SmolLM2-135M-Instruct from its cached fp32 HF directory (``swift.llm.model.smollm2_hf_dir``),
  every weight copied unchanged; the vocabulary grows by one row for the ``<image>`` token (zeros: LLaVA
  replaces that token's input embedding by image features, and a zero output row gives it logit 0, far below
  the logits SmolLM2 produces for real tokens, so it is never generated);
* vision tower: a CLIP or SigLIP vision transformer from its transformers config, randomly initialised but for
  its position embeddings (2-D sin-cos, see ``pretrain.init_position_embeddings``);
* projector: LLaVA's ``multi_modal_projector`` (linear, activation, linear) into the LM's width;
* processor: ``LlavaProcessor`` with a ``CLIPImageProcessor`` / ``SiglipImageProcessor`` for the recipe's image
  size, set so that every ``<image>`` expands to ``(image_size / patch_size)^2`` tokens, and SmolLM2's own chat
  template extended to list content (an image part renders as ``<image>``).

The result is an ordinary LLaVA checkpoint once saved, loaded by ``swift.llm.get_model_tokenizer("llava", dir)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_retriever.vlm.pretrain import init_position_embeddings
from lora_retriever.vlm.recipe import VlmRecipe
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["IMAGE_TOKEN", "compose_llava", "llava_chat_template"]

IMAGE_TOKEN = "<image>"
_CONTENT = "message['content']"
# Renders a message's content: a string as it is, a list of parts with each image part as the image token.
_RENDER_MACRO = (
    "{%- macro render_content(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{%- if part['type'] == 'image' -%}"
    + IMAGE_TOKEN
    + "{%- elif part['type'] == "
    "'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)


def llava_chat_template(text_template: str) -> str:
    """The LM's chat template with list content (text and image parts) rendered; string content unchanged.

    Args:
        text_template: the language model's own Jinja chat template; it must read ``message['content']``
            exactly once (SmolLM2's ChatML template does).

    Raises:
        ValueError: the template doesn't read ``message['content']`` exactly once.
    """
    count = text_template.count(_CONTENT)
    if count != 1:
        raise ValueError(
            f"the language model's chat template reads {_CONTENT} {count} times (expected once); cannot extend it "
            "to image parts. Use a ChatML-style template."
        )
    return _RENDER_MACRO + text_template.replace(_CONTENT, f"render_content({_CONTENT})")


def compose_llava(recipe: VlmRecipe, lm_dir: str | Path) -> tuple[Any, Any]:
    """Build the untrained VLM and its processor.

    Args:
        recipe: a resolved recipe (``image_size`` set).
        lm_dir: the language model's HF directory (the cached SmolLM2).

    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode (fp32, CPU) whose language model
        and output head hold the LM's weights (plus the zero ``<image>`` row) and whose vision tower and
        projector are freshly initialised from ``recipe.seed``; and a ``LlavaProcessor``.

    Raises:
        ValueError: an unresolved recipe, or an LM whose tokenizer already has an ``<image>`` token.
    """
    import transformers
    from tokenizers import AddedToken

    if recipe.image_size is None:
        raise ValueError(
            "compose_llava needs a resolved recipe (image_size set); call recipe.resolved(size)."
        )
    lm_dir = Path(lm_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(lm_dir))
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ValueError(
            f"the tokenizer in {lm_dir} already has {IMAGE_TOKEN!r}; pass a text-only LM directory."
        )
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)

    text_config = lm.config.to_dict()
    text_config["vocab_size"] = len(tokenizer)
    clip = recipe.vision_model == "clip"
    config = transformers.LlavaConfig(
        vision_config=_vision_config(recipe),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=recipe.image_tokens,
        projector_hidden_act=recipe.projector_hidden_act,
        # The tower is trained for this model, so its last layer is the one to read (LLaVA-1.5 reads -2 of a
        # contrastively trained CLIP). CLIP prepends a CLS token that "default" drops; SigLIP has none.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if clip else "full",
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(recipe.seed)
    model = transformers.LlavaForConditionalGeneration(config)
    init_position_embeddings(model.model.vision_tower)
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat(
        [embed, embed.new_zeros(len(tokenizer) - embed.shape[0], embed.shape[1])]
    )
    model.model.language_model.load_state_dict(state)
    if not config.tie_word_embeddings:
        head = lm.lm_head.weight.detach()
        model.lm_head.weight.data = torch.cat(
            [head, head.new_zeros(len(tokenizer) - head.shape[0], head.shape[1])]
        )
    model.generation_config = lm.generation_config
    model.config.text_config.pad_token_id = lm.config.pad_token_id

    processor = transformers.LlavaProcessor(
        image_processor=_image_processor(recipe),
        tokenizer=tokenizer,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if clip else 0,
        image_token=IMAGE_TOKEN,
        chat_template=llava_chat_template(tokenizer.chat_template),
    )
    logger.info(
        "composed LLaVA: %s vision tower %d params, projector %d params, %d image tokens per image",
        recipe.vision_model,
        sum(p.numel() for p in model.model.vision_tower.parameters()),
        sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        recipe.image_tokens,
    )
    return model.eval(), processor


def _vision_config(recipe: VlmRecipe) -> Any:
    import transformers

    shape = dict(
        hidden_size=recipe.vision_hidden_size,
        intermediate_size=recipe.vision_intermediate_size,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        num_channels=3,
    )
    if recipe.vision_model == "clip":
        return transformers.CLIPVisionConfig(**shape)
    # LLaVA reads the tower's hidden states; SigLIP's attention-pooling head would be dead weight.
    return transformers.SiglipVisionConfig(**shape, vision_use_head=False)


def _image_processor(recipe: VlmRecipe) -> Any:
    import transformers

    side = recipe.image_size
    if recipe.vision_model == "clip":
        return transformers.CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    return transformers.SiglipImageProcessor(size={"height": side, "width": side})
