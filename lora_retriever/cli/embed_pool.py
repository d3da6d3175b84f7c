"""Build the adapters' retrieval keys of pool configs (``lora_retriever.embed_pool``).

    lora-retriever-embed-pool --pool data/demo/pool/pool.json --samples 20

For every entry, N of its samples (``samples_path``) are embedded and their mean is written as the entry's
key (``<name>.npy`` + ``<name>.meta.json``); entries without an ``embedding_path`` get one in the config,
written through the locked pool writer. With ``--image_embedder vision-tower --image_embedder_path DIR``,
entries whose samples carry images also get an image key (``<name>.image.npy``, ``image_embedding_path``).
Everything is checked before the embedder loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from lora_retriever.cli.args import add_config_arguments, command_parser, config_from_args
from lora_retriever.cli.errors import run_cli
from lora_retriever.embedders.config import EmbedderConfig, ImageRetrievalConfig

__all__ = ["EmbedPoolConfig", "build_parser", "main"]

# The embedder's flags, as lora-retriever-infer names them; help and defaults from EmbedderConfig's fields.
EMBEDDER_FLAGS = {"backend": "embedder", "model_path": "embedder_path", "device": "device"}


@dataclass
class EmbedPoolConfig:
    """Which pools to build keys for, and how many samples per key."""

    pools: list[str] = field(
        metadata={"help": "pool config JSON (repeatable)", "flag": "pool", "action": "append"}
    )
    samples: int = field(default=20, metadata={"help": "samples embedded per adapter"})
    seed: int = field(default=0, metadata={"help": "seed for choosing the samples"})
    only: list[str] | None = field(default=None, metadata={"help": "only these adapter names"})

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}; pass --samples N")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__, EmbedPoolConfig, ImageRetrievalConfig)
    add_config_arguments(
        parser,
        EmbedderConfig,
        only=[*EMBEDDER_FLAGS, "batch_size", "trust_remote_code"],
        rename=EMBEDDER_FLAGS,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _embed, argv)


def _embed(args: argparse.Namespace) -> int:
    from lora_retriever.embed_pool import embed_pool
    from lora_retriever.embedders import get_embedder
    from lora_retriever.pool import AdapterPool

    config = config_from_args(EmbedPoolConfig, args)
    embedder_config = config_from_args(EmbedderConfig, args)  # validated (e.g. jina-v4's --trust_remote_code)
    image = config_from_args(ImageRetrievalConfig, args)  # the image embedder's directory is checked here
    for path in config.pools:  # a broken pool config fails before the embedder loads
        AdapterPool.from_configs(path, require_keys=False)
    embedder = get_embedder(embedder_config)
    image_config = image.embedder_config(device=embedder_config.device)
    image_embedder = get_embedder(image_config) if image_config is not None else None
    for path in config.pools:
        pool = embed_pool(
            path,
            embedder,
            image_embedder=image_embedder,
            text_weight=image.fusion_text_weight,
            num_samples=config.samples,
            seed=config.seed,
            names=config.only,
            progress=not args.quiet,
        )
        print(f"{path}: {len(pool)} adapter keys ({embedder.model_id}, dim {embedder.dim})")
        if image_embedder is not None:
            n_image = int(pool.image_key_mask().sum())
            print(f"{path}: {n_image} image keys ({image_embedder.model_id}, dim {image_embedder.dim})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
