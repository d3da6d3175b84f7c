"""The multimodal task suite: image domains, image tasks, disjoint image splits, VLM pre-training captions.

    from lora_retriever.tasks.multimodal import (
        IMAGE_SIZE, MULTIMODAL_TASK_NAMES, build_image_splits, caption_examples, write_multimodal_suite,
    )

    caption_examples("train", 1000, seed=0)     # [(PIL image, question, answer)], train-partition images
    build_image_splits("shop_tap", seed=0)      # ImageTaskSplits(train, keys, test, test_alt)
    write_multimodal_suite("data/mm_tasks")     # CLI: python -m lora_retriever.tasks --suite multimodal

Domains (``DOMAIN_NAMES``; every image RGB, ``IMAGE_SIZE`` square): ``digits`` (scikit-learn's handwritten
digits), ``photo`` (crops of scikit-learn's two sample photos), and app screens drawn with PIL: ``clock``,
``calendar``, ``shop``, ``counter``, ``map``. Images are partitioned once and for all (no seed) into
``train`` / ``keys`` / ``test`` / ``heldout`` (:mod:`.partition`).

Tasks (``MULTIMODAL_TASK_NAMES``) by category (``CATEGORIES``): ``reading`` (digit_value, counter_value,
clock_hour, calendar_day), ``parity`` (digit_parity, counter_parity), ``screen_actions`` (shop_tap,
calendar_tap, map_tap: answers ``TAP(n)``, scored by :func:`action_match`), ``photos`` (photo_source,
photo_brightness). Neither the wording nor the image alone identifies a task (:mod:`.tasks`).
"""

from lora_retriever.tasks.multimodal.actions import (
    action_match,
    format_action,
    normalize_action,
    parse_action,
)
from lora_retriever.tasks.multimodal.captions import (
    CAPTION_SPLITS,
    caption_domains,
    caption_examples,
    caption_questions,
)
from lora_retriever.tasks.multimodal.domains import IMAGE_SIZE, PARTITIONS, ImageDomain, ImageItem
from lora_retriever.tasks.multimodal.partition import draw_items, partition_of
from lora_retriever.tasks.multimodal.registry import (
    CATEGORIES,
    DOMAIN_NAMES,
    DOMAINS,
    MULTIMODAL_TASK_NAMES,
    MULTIMODAL_TASKS,
    get_domain,
    get_multimodal_task,
)
from lora_retriever.tasks.multimodal.splits import (
    DEFAULT_N_KEYS,
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    SPLIT_NAMES,
    ImageRecord,
    ImageTaskSplits,
    build_image_splits,
)
from lora_retriever.tasks.multimodal.suite import write_multimodal_suite
from lora_retriever.tasks.multimodal.tasks import ImageTask

__all__ = [
    "CAPTION_SPLITS",
    "CATEGORIES",
    "DEFAULT_N_KEYS",
    "DEFAULT_N_TEST",
    "DEFAULT_N_TRAIN",
    "DOMAINS",
    "DOMAIN_NAMES",
    "IMAGE_SIZE",
    "MULTIMODAL_TASKS",
    "MULTIMODAL_TASK_NAMES",
    "PARTITIONS",
    "SPLIT_NAMES",
    "ImageDomain",
    "ImageItem",
    "ImageRecord",
    "ImageTask",
    "ImageTaskSplits",
    "action_match",
    "build_image_splits",
    "caption_domains",
    "caption_examples",
    "caption_questions",
    "draw_items",
    "format_action",
    "get_domain",
    "get_multimodal_task",
    "normalize_action",
    "parse_action",
    "partition_of",
    "write_multimodal_suite",
]
