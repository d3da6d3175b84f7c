"""Build (or reuse) the small VLM: ``python -m lora_retriever.vlm build [recipe flags] [--rebuild]``.

Composes LLaVA from the packaged SmolLM2-135M-Instruct and a small vision transformer, pre-trains the vision
tower, trains tower and projector through the frozen LM on questions about the multimodal suite's images,
reports the held-out accuracy per image domain and caches the model in $LORA_RETRIEVER_CACHE/vlm/<recipe
hash>/. The same recipe reuses that folder; prints the folder and its build.json summary.

``python -m lora_retriever.vlm path [recipe flags]`` prints the folder a recipe builds into (built or not).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lora_retriever.cli.args import add_config_arguments, config_from_args
from lora_retriever.cli.errors import add_common_flags, run_cli
from lora_retriever.vlm.recipe import VlmRecipe

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_retriever.vlm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("build", "build the VLM, or reuse the cached build of this recipe"),
        ("path", "print the recipe's cache folder"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        add_config_arguments(sub, VlmRecipe)
        sub.add_argument(
            "--cache_root", default=None, help="folder of the builds (default: $LORA_RETRIEVER_CACHE/vlm)"
        )
        if name == "build":
            sub.add_argument(
                "--rebuild", action="store_true", help="build again even if this recipe is cached"
            )
        add_common_flags(sub, threads=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from lora_retriever.vlm.build import build_vlm, read_build_info, vlm_dir

    recipe = config_from_args(VlmRecipe, args)
    if args.command == "path":
        print(vlm_dir(recipe, cache_root=args.cache_root))
        return 0
    folder = build_vlm(recipe, cache_root=args.cache_root, rebuild=args.rebuild, progress=not args.quiet)
    info = read_build_info(folder)
    print(f"VLM:       {folder}")
    print(f"recipe:    {info['recipe_hash']} ({info['image_tokens']} image tokens per image)")
    heldout = info["heldout"]
    if heldout["per_domain"]:
        print(f"held-out accuracy: {heldout['accuracy']:.3f} overall")
        for domain, accuracy in heldout["per_domain"].items():
            print(f"  {domain:<10} {accuracy:.3f} ({heldout['counts'][domain]} questions)")
    print(f"build time: {info['seconds']['total']:.0f} s on {info['cpu']}")
    print(f"load it:   swift.llm.get_model_tokenizer('llava', '{folder}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
