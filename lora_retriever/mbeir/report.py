"""Several ``retrieve`` results side by side, in UniIR's layout: a Markdown table (rows = tasks, columns =
runs x local / global pool), a JSON with every number, and a PNG plot.

    python -m lora_retriever.mbeir report --results zero-shot=runs/zs.json sf=runs/sf.json ff=runs/ff.json \\
        --out docs/results/mbeir

writes ``docs/results/mbeir.json``, ``mbeir.png`` and the tables of ``mbeir.md``: inside an existing file only the
part between ``<!-- mbeir-tables:begin -->`` and ``<!-- mbeir-tables:end -->`` is replaced (the prose around it
stays); a new file gets the markers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swift.utils.files import atomic_write

__all__ = ["ReportConfig", "format_result", "tables_markdown", "write_report"]

BEGIN, END = "<!-- mbeir-tables:begin -->", "<!-- mbeir-tables:end -->"
_ARROW = {"text": "q_t", "image": "q_i", "image,text": "(q_i,q_t)"}
_CAND = {"text": "c_t", "image": "c_i", "image,text": "(c_i,c_t)"}


@dataclass
class ReportConfig:
    """What :func:`write_report` writes (each field is a flag of ``python -m lora_retriever.mbeir report``)."""

    results: list[str] = field(
        metadata={"help": "runs as NAME=RESULTS_JSON (from 'retrieve'), in column order"}
    )
    out: str = field(metadata={"help": "output path without suffix (.md, .json, .png are written)"})
    metric: str = field(
        default="recall@5", metadata={"help": "the main table's metric (UniIR reports Recall@5)"}
    )

    def __post_init__(self) -> None:
        bad = [r for r in self.results if "=" not in r or not r.split("=", 1)[0]]
        if bad:
            raise ValueError(f"results must be NAME=PATH, got {bad}; e.g. sf=runs/sf/test.json")
        names = [r.split("=", 1)[0] for r in self.results]
        if len(set(names)) != len(names):
            raise ValueError(f"run names repeat in {names}; give each run its own name")

    def runs(self) -> dict[str, Path]:
        runs = {}
        for item in self.results:
            name, path = item.split("=", 1)
            path = Path(path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"results file {str(path)!r} of run {name!r} does not exist; run 'retrieve'"
                )
            runs[name] = path
        return runs


def _task_label(name: str, task: dict[str, Any]) -> str:
    return f"{name}: {_ARROW[task['query_modality']]} → {_CAND[task['cand_modality']]}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def format_result(result: dict[str, Any]) -> str:
    """One run's results as a plain-text table (what ``retrieve`` prints)."""
    metrics = [m for m in result["mean"]["global"]]
    lines = [f"{'task':<40} {'pool':<7} " + " ".join(f"{m:>22}" for m in metrics)]
    for name, task in [*result["tasks"].items(), ("mean", {"query_modality": None, **result["mean"]})]:
        label = name if task.get("query_modality") is None else _task_label(name, task)
        for pool in ("local", "global"):
            cells = " ".join(f"{_pct(task[pool][m]) if m in task[pool] else '':>22}" for m in metrics)
            lines.append(f"{label:<40} {pool:<7} {cells}")
    return "\n".join(lines)


def tables_markdown(results: dict[str, dict[str, Any]], metric: str) -> str:
    """The main table (``metric`` per task, runs x local/global) and the detail table (Recall@1/5/10 and
    modality violation per run, global pool)."""
    names = list(results)
    first = results[names[0]]
    tasks = list(first["tasks"])
    header = "| task | " + " | ".join(f"{n} local | {n} global" for n in names) + " |"
    lines = [
        f"**{metric.capitalize()} (%)**, local pool (the task's own) and global pool (all tasks' candidates):",
        "",
        header,
    ]
    lines.append("|---|" + "---:|" * (2 * len(names)))
    for task in tasks:
        cells = [_pct(results[n]["tasks"][task][pool][metric]) for n in names for pool in ("local", "global")]
        lines.append(f"| {_task_label(task, first['tasks'][task])} | " + " | ".join(cells) + " |")
    cells = [_pct(results[n]["mean"][pool][metric]) for n in names for pool in ("local", "global")]
    lines.append("| **mean** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    violation = next(m for m in first["mean"]["global"] if m.startswith("modality_violation"))
    recalls = [m for m in first["mean"]["global"] if m.startswith("recall@")]
    lines += ["", f"Global pool per run: {', '.join(recalls)} and {violation} (all %):", ""]
    lines.append("| run | " + " | ".join(f"{t}" for t in tasks) + " | mean |")
    lines.append("|---|" + "---:|" * (len(tasks) + 1))
    for n in names:
        for m in [*recalls, violation]:
            cells = [_pct(results[n]["tasks"][t]["global"][m]) for t in tasks] + [
                _pct(results[n]["mean"]["global"][m])
            ]
            lines.append(f"| {n} {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | checkpoint steps | instruct | train s (CPU s) | embed s (CPU s) | retrieve s | encoder |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for n in names:
        run = results[n].get("run", {})
        training, embedding = run.get("training", {}), run.get("embed", {})
        lines.append(
            f"| {n} | {training.get('steps', '?')} | {run.get('instruct', '?')} | {_times(training)} | "
            f"{_times(embedding)} | {results[n]['retrieve_seconds']} | `{results[n]['encoder']['model_id']}` |"
        )
    cpus = sorted({r.get("run", {}).get("training", {}).get("cpu", "?") for r in results.values()})
    lines += ["", "Measured on: " + "; ".join(cpus)]
    return "\n".join(lines)


def _times(record: dict[str, Any]) -> str:
    """``"wall (cpu)"`` seconds of a run record; wall time alone when the CPU time was not recorded."""
    wall, cpu = record.get("seconds", "?"), record.get("cpu_seconds")
    return f"{wall} ({cpu})" if cpu is not None else f"{wall}"


def _plot(results: dict[str, dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    tasks = list(results[names[0]]["tasks"])
    violation = next(m for m in results[names[0]]["mean"]["global"] if m.startswith("modality_violation"))
    panels = [("local", metric), ("global", metric), ("global", violation)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    x = np.arange(len(tasks) + 1)
    width = 0.8 / len(names)
    for ax, (pool, m) in zip(axes, panels):
        for i, n in enumerate(names):
            values = [results[n]["tasks"][t][pool][m] for t in tasks] + [results[n]["mean"][pool][m]]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, np.array(values) * 100, width, label=n)
        ax.set_xticks(x, [*tasks, "mean"], rotation=40, ha="right")
        ax.set_title(f"{m} ({pool} pool)")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(config: ReportConfig) -> list[Path]:
    """Write ``<out>.json``, ``<out>.png`` and the tables of ``<out>.md``; returns the three paths.

    Raises:
        FileNotFoundError: a results file is missing.
        ValueError: ``metric`` absent from a result, or runs over different tasks.
    """
    results = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in config.runs().items()}
    tasks = {name: list(r["tasks"]) for name, r in results.items()}
    if len({tuple(t) for t in tasks.values()}) != 1:
        raise ValueError(f"the runs cover different tasks: {tasks}; compare runs of one data split")
    if any(config.metric not in r["mean"]["local"] for r in results.values()):
        raise ValueError(
            f"metric {config.metric!r} is not in every result; choose one of {list(next(iter(results.values()))['mean']['local'])}"
        )
    out = Path(config.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js, png = out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".png")
    atomic_write(js, json.dumps(results, indent=2) + "\n")
    _plot(results, config.metric, png)
    tables = f"{BEGIN}\n{tables_markdown(results, config.metric)}\n\n![{config.metric} per task]({png.name})\n{END}"
    if md.is_file() and BEGIN in (text := md.read_text(encoding="utf-8")) and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + tables + rest.split(END, 1)[1]
    else:
        text = f"# Universal multimodal retrieval on the mini M-BEIR\n\n{tables}\n"
    atomic_write(md, text)
    return [md, js, png]
