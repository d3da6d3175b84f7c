"""M-BEIR-format data (UniIR's universal multimodal retrieval benchmark): typed records, a validator that
reports every problem with its line, and an offline mini M-BEIR built from the project's task suites.

    from lora_retriever.mbeir import read_queries, read_candidates, validate_dataset, build_mini_mbeir

    queries = read_queries("query/test/mbeir_screens_task0_test.jsonl")   # [MBeirQuery], or MBeirFormatError
    report = validate_dataset("data/mini_mbeir")                          # report.ok, report.problems
    build_mini_mbeir(MiniMBeirConfig(out_dir="data/mini_mbeir"))

CLI: ``python -m lora_retriever.mbeir validate DIR`` and ``python -m lora_retriever.mbeir build --out_dir DIR``.
Formats: :mod:`.formats`; problems: :mod:`.problems`; checks across files: :mod:`.validate`; task types: :mod:`.tasks`; builder: :mod:`.build`.

Universal retrievers (UniIR's CLIP-SF / CLIP-FF) and UniIR's steps: :mod:`.models`, :mod:`.train`, :mod:`.embed`,
:mod:`.index`, :mod:`.retrieve` (scores: :mod:`.score`), :mod:`.report`; CLI ``train|embed|index|retrieve|report``
(:mod:`.commands`); a checkpoint behind the ``Embedder`` protocol: ``get_embedder("universal", model_path=...)``.
"""

from lora_retriever.mbeir.build import MiniMBeirConfig, build_mini_mbeir
from lora_retriever.mbeir.formats import (
    MODALITIES,
    TASK_IDS,
    MBeirCandidate,
    MBeirInstruction,
    MBeirQuery,
    read_candidates,
    read_instructions,
    read_queries,
    scan_candidates,
    scan_instructions,
    scan_queries,
    write_candidates,
    write_instructions,
    write_queries,
)
from lora_retriever.mbeir.problems import PROBLEM_KINDS, MBeirFormatError, Problem
from lora_retriever.mbeir.tasks import MBEIR_TASK_NAMES, MBEIR_TASKS, describe
from lora_retriever.mbeir.validate import ValidationReport, validate_dataset, validate_files

__all__ = [
    "MBEIR_TASKS",
    "MBEIR_TASK_NAMES",
    "MODALITIES",
    "PROBLEM_KINDS",
    "TASK_IDS",
    "MBeirCandidate",
    "MBeirFormatError",
    "MBeirInstruction",
    "MBeirQuery",
    "MiniMBeirConfig",
    "Problem",
    "ValidationReport",
    "build_mini_mbeir",
    "describe",
    "read_candidates",
    "read_instructions",
    "read_queries",
    "scan_candidates",
    "scan_instructions",
    "scan_queries",
    "validate_dataset",
    "validate_files",
    "write_candidates",
    "write_instructions",
    "write_queries",
]
