"""The multimodal task suite: image domains, image tasks, disjoint image splits, and VLM pre-training captions.

    from lora_retriever.tasks.multimodal import IMAGE_SIZE, caption_examples

    caption_examples("train", 1000, seed=0)   # [(PIL image, question, answer)], images of the train partition

Every image is RGB, ``IMAGE_SIZE`` x ``IMAGE_SIZE``. Images are partitioned once and for all (independent of
any seed) into ``train`` / ``keys`` / ``test`` / ``heldout`` (:mod:`.partition`).
"""

from lora_retriever.tasks.multimodal.captions import CAPTION_SPLITS, caption_examples, caption_questions
from lora_retriever.tasks.multimodal.domains import IMAGE_SIZE, PARTITIONS, ImageDomain, ImageItem
from lora_retriever.tasks.multimodal.partition import draw_items, partition_of
from lora_retriever.tasks.multimodal.registry import DOMAIN_NAMES, DOMAINS, get_domain

__all__ = [
    "CAPTION_SPLITS",
    "DOMAINS",
    "DOMAIN_NAMES",
    "IMAGE_SIZE",
    "PARTITIONS",
    "ImageDomain",
    "ImageItem",
    "caption_examples",
    "caption_questions",
    "draw_items",
    "get_domain",
    "partition_of",
]
