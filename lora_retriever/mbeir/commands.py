"""UniIR's steps as subcommands of ``python -m lora_retriever.mbeir``: train, embed, index, retrieve, report.

    python -m lora_retriever.mbeir train    --data_root D --out_dir runs/sf --fusion sf [--steps 0] [--no_instruct]
    python -m lora_retriever.mbeir embed    --data_root D --checkpoint runs/sf --out_dir runs/sf/embeddings
    python -m lora_retriever.mbeir index    --embeddings runs/sf/embeddings/test --kind flat|ivf|hnsw [--shard_size N]
    python -m lora_retriever.mbeir retrieve --data_root D --embeddings runs/sf/embeddings/test --out runs/sf/test.json
    python -m lora_retriever.mbeir report   --results zero-shot=runs/zs/test.json sf=... ff=... --out docs/results/mbeir

Each command is thin: flags -> a config dataclass (the flags' help lives on its fields) -> one library call.
Torch runs on one CPU thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from lora_retriever.cli.args import add_config_arguments, config_from_args
from lora_retriever.cli.errors import add_common_flags

__all__ = ["COMMANDS", "add_commands"]


def _parser(
    commands: argparse._SubParsersAction, name: str, help: str, *configs: type, threads: int | None = None
) -> None:
    """A subcommand's parser: one flag per field of each config (a later config skips ``seed``, which the
    first one owns), then the common flags."""
    parser = commands.add_parser(name, help=help)
    for i, config in enumerate(configs):
        add_config_arguments(parser, config, exclude=("seed",) if i else ())
    add_common_flags(parser, threads=threads)


def _train(args: argparse.Namespace) -> int:
    from lora_retriever.mbeir.config import RetrieverConfig, TrainConfig
    from lora_retriever.mbeir.train import train_retriever

    config = config_from_args(TrainConfig, args, progress=not args.quiet)
    record = train_retriever(config, config_from_args(RetrieverConfig, args))
    print(
        json.dumps({k: record[k] for k in ("steps", "loss_first", "loss_last10", "seconds", "cpu")}, indent=2)
    )
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    from lora_retriever.mbeir.config import RetrieverConfig, TrainConfig

    help = "train a universal retriever (CLIP-SF / CLIP-FF) with InfoNCE"
    _parser(commands, "train", help, TrainConfig, RetrieverConfig, threads=1)


def _embed(args: argparse.Namespace) -> int:
    from lora_retriever.mbeir.embed import EmbedConfig, embed_split

    stats = embed_split(config_from_args(EmbedConfig, args, progress=not args.quiet))
    print(json.dumps({k: v for k, v in stats.items() if k != "folders"}))
    return 0


def _add_embed(commands: argparse._SubParsersAction) -> None:
    from lora_retriever.mbeir.embed import EmbedConfig

    _parser(
        commands, "embed", "embed a split's queries and pools (batched, resumable)", EmbedConfig, threads=1
    )


def _index(args: argparse.Namespace) -> int:
    from lora_retriever.mbeir.index import IndexConfig, index_embeddings

    for folder in index_embeddings(config_from_args(IndexConfig, args)):
        print(folder)
    return 0


def _add_index(commands: argparse._SubParsersAction) -> None:
    from lora_retriever.mbeir.index import IndexConfig

    _parser(commands, "index", "FAISS flat / IVF / HNSW indexes over embedded pools (sharded)", IndexConfig)


def _retrieve(args: argparse.Namespace) -> int:
    from lora_retriever.mbeir.report import format_result
    from lora_retriever.mbeir.retrieve import RetrieveConfig, retrieve_split

    print(format_result(retrieve_split(config_from_args(RetrieveConfig, args))))
    return 0


def _add_retrieve(commands: argparse._SubParsersAction) -> None:
    from lora_retriever.mbeir.retrieve import RetrieveConfig

    help = "retrieve from local and global pools; Recall@k, modality violation"
    _parser(commands, "retrieve", help, RetrieveConfig)


def _report(args: argparse.Namespace) -> int:
    from lora_retriever.mbeir.report import ReportConfig, write_report

    for path in write_report(config_from_args(ReportConfig, args)):
        print(path)
    return 0


def _add_report(commands: argparse._SubParsersAction) -> None:
    from lora_retriever.mbeir.report import ReportConfig

    _parser(commands, "report", "UniIR-layout table (md), JSON and plot of several runs", ReportConfig)


COMMANDS: dict[
    str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]
] = {
    "train": (_add_train, _train),
    "embed": (_add_embed, _embed),
    "index": (_add_index, _index),
    "retrieve": (_add_retrieve, _retrieve),
    "report": (_add_report, _report),
}
"""Subcommand -> (add its parser, run it)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add every subcommand of :data:`COMMANDS` to ``commands``."""
    for add, _ in COMMANDS.values():
        add(commands)
