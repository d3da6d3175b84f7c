"""The entry points (issue 8, points 5 and 10): flags built from the configs' fields and the registries, one
``error:`` line and exit 2 for a user's mistake, inputs checked before a model loads, nothing destroyed, and
no library module reaching back into the repository."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

from lora_retriever.cli import demo as demo_cli
from lora_retriever.cli import embed_pool as embed_pool_cli
from lora_retriever.cli import eval as eval_cli
from lora_retriever.cli import infer as infer_cli
from lora_retriever.cli import merge as merge_cli
from lora_retriever.cli import train as train_cli
from lora_retriever.cli.args import add_config_arguments
from lora_retriever.embedders.config import BACKENDS, EmbedderConfig
from lora_retriever.fusion import FUSION_METHODS, available_methods
from lora_retriever.fusion.cat import CatFusion
from lora_retriever.merge import MergeConfig
from lora_retriever.pipeline import MERGE_METHODS, InferenceConfig
from lora_retriever.retriever import WEIGHT_MODES
from lora_retriever.selection import SELECTION_METHODS
from lora_retriever.training import TrainConfig
from swift.llm.model import MODEL_TYPE_CHOICES, MODEL_TYPES
from swift.utils.files import atomic_write_together
from tests.factories import make_lora_dir
from tests.tiny_vlms import save_tiny_llama

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("lora_retriever", "swift", "spectral_edit")
CONFIG_PARSERS = [
    (infer_cli.build_parser, InferenceConfig),
    (train_cli.build_parser, TrainConfig),
    (merge_cli.build_parser, MergeConfig),
    (demo_cli.build_parser, demo_cli.DemoConfig),
    (eval_cli.build_parser, eval_cli.PaperEvalConfig),
    (embed_pool_cli.build_parser, embed_pool_cli.EmbedPoolConfig),
]


def actions(parser) -> dict:
    return {a.dest: a for a in parser._actions}


# ------------------------------------------------------------------------------------ flags from one source


@pytest.mark.parametrize(
    "build_parser, config_cls", CONFIG_PARSERS, ids=lambda x: getattr(x, "__module__", "")
)
def test_each_flag_takes_its_help_default_and_choices_from_the_config_field(build_parser, config_cls):
    by_dest = actions(build_parser())
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True):
            assert f.name not in by_dest
            continue
        action = by_dest[f.name]
        assert action.help.startswith(f.metadata["help"].replace("%", "%%")), f.name
        if f.default is not dataclasses.MISSING:
            assert action.default == f.default, f.name
            shown = action.help.endswith(f"(default: {f.default})")
            assert shown == (f.default is not None and f.default is not False), (f.name, action.help)
        elif f.default_factory is dataclasses.MISSING:
            assert action.required, f.name
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            assert action.choices == list(choices() if callable(choices) else choices), f.name


def test_choices_are_the_registries():
    infer, train, merge = (
        actions(infer_cli.build_parser()),
        actions(train_cli.build_parser()),
        actions(merge_cli.build_parser()),
    )
    for parser in (infer, train):
        assert parser["model_type"].choices == [*MODEL_TYPES, "auto"] == list(MODEL_TYPE_CHOICES)
    assert infer["combination_type"].choices == merge["method"].choices == available_methods()
    assert infer["merge_method"].choices == list(MERGE_METHODS) == list(SELECTION_METHODS)
    assert infer["composition_weight_mode"].choices == list(WEIGHT_MODES)
    assert infer["embedder"].choices == list(BACKENDS)
    assert actions(embed_pool_cli.build_parser())["backend"].choices == list(BACKENDS)
    assert infer["embedder"].help == actions(embed_pool_cli.build_parser())["backend"].help  # one help text


def test_a_newly_registered_fusion_method_becomes_a_choice_everywhere():
    class Doubled(CatFusion):
        name = "doubled_cat"

    FUSION_METHODS[Doubled.name] = Doubled
    try:
        assert "doubled_cat" in actions(infer_cli.build_parser())["combination_type"].choices
        assert "doubled_cat" in actions(merge_cli.build_parser())["method"].choices
        InferenceConfig(
            test_data="t.jsonl", pools=["p.json"], merge_method="fusion", combination_type="doubled_cat"
        )
    finally:
        del FUSION_METHODS[Doubled.name]
    with pytest.raises(ValueError, match="combination_type must be one of"):
        InferenceConfig(
            test_data="t.jsonl", pools=["p.json"], merge_method="fusion", combination_type="doubled_cat"
        )


def test_renamed_and_repeatable_flags():
    parser = infer_cli.build_parser()
    args = parser.parse_args(["--test_data", "t.jsonl", "--pool", "a.json", "--pool", "b.json", "--ood"])
    assert args.pools == ["a.json", "b.json"] and args.ood is True and args.app_configs == []
    parser = embed_pool_cli.build_parser()
    args = parser.parse_args(["--pool", "p.json", "--embedder", "clip", "--embedder_path", "/m"])
    assert (args.pools, args.backend, args.model_path) == (["p.json"], "clip", "/m")
    with pytest.raises(TypeError, match="no command-line type"):

        @dataclasses.dataclass
        class Odd:
            mapping: dict = dataclasses.field(default_factory=dict, metadata={"help": "x"})

        add_config_arguments(infer_cli.build_parser(), Odd)


def _literals(path: Path):
    """String constants (docstrings excluded) and tuples/lists/sets of string constants, with their line."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            yield (
                node.lineno,
                [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)],
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_each_list_of_names_is_typed_once():
    """A tuple or a help text naming three or more model types / fusion methods / merge methods / weight modes /
    embedder backends outside the module that owns the list is a second copy waiting to drift."""
    lists = {
        "model types": (list(MODEL_TYPES), ("swift/llm/model.py",)),
        "fusion methods": (available_methods(), ("lora_retriever/fusion/",)),
        "merge methods": (list(SELECTION_METHODS), ("lora_retriever/selection.py",)),
        "weight modes": (list(WEIGHT_MODES), ("lora_retriever/retriever.py",)),
        "embedder backends": (list(BACKENDS), ("lora_retriever/embedders/",)),
    }
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")] + sorted(REPO.glob("*.py"))
    copies = []
    for path in files:
        where = path.relative_to(REPO).as_posix()
        for lineno, value in _literals(path):
            for kind, (names, owners) in lists.items():
                if where.startswith(owners):
                    continue
                if isinstance(value, list):
                    hits = [v for v in value if v in names]
                else:
                    hits = [n for n in names if re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w-])", value)]
                if len(hits) >= 3:
                    copies.append(f"{where}:{lineno}: {kind} {hits}")
    assert not copies, copies


def test_every_console_script_resolves_and_answers_help(capsys):
    # [project.scripts] of pyproject.toml (read by hand: tomllib needs Python 3.11, the project supports 3.10)
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, flags=re.M))
    assert set(scripts) >= {
        "lora-retriever-infer",
        "lora-retriever-train",
        "lora-retriever-merge",
        "lora-retriever-eval",
        "lora-retriever-demo",
        "lora-retriever-embed-pool",
        "spectral-edit",
    }
    for name, target in scripts.items():
        module, function = target.split(":")
        with pytest.raises(SystemExit) as exit_info:
            getattr(import_module(module), function)(["--help"])
        assert exit_info.value.code == 0, name
        assert capsys.readouterr().out.startswith("usage:"), name


# ------------------------------------------------------------------------------- library and entry points apart


def test_no_library_module_reaches_into_the_repository():
    """The library runs from an installed package: no path built from ``__file__`` up into the checkout, no path
    to a top-level script (``REPO / "train.py"`` is what the demo used to run)."""
    scripts = {p.name for p in REPO.glob("*.py")}
    found = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            source = path.read_text()
            where = path.relative_to(REPO).as_posix()
            if re.search(
                r"__file__\)?[\w.()]*\.parent\.parent|dirname\(\s*os\.path\.dirname\(\s*__file__", source
            ):
                found.append(f"{where}: climbs from __file__")
            for lineno, value in _literals(path):
                for text in value if isinstance(value, list) else [value]:
                    if (
                        text.strip().rsplit("/", 1)[-1] in scripts
                    ):  # a path to a script, not a mention in a sentence
                        found.append(f"{where}:{lineno}: a path to a top-level script: {text!r}")
    assert not found, found


def test_the_top_level_scripts_are_shims_of_the_cli_package():
    for script, module in (("infer_lora_retriever.py", infer_cli), ("train.py", train_cli)):
        namespace = {}
        exec(compile((REPO / script).read_text(), script, "exec"), namespace)  # as `python script` would
        assert namespace["main"] is module.main and namespace["build_parser"] is module.build_parser
        assert len((REPO / script).read_text().splitlines()) < 15


# ----------------------------------------------------------------------------------- speak plainly: exit 2


def run_entry(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["infer_lora_retriever.py", "--test_data", "no/such.jsonl", "--merge_method", "base"],
            "no/such.jsonl",
        ),
        (["train.py", "--dataset_path", "no/such.jsonl", "--output_dir", "{tmp}/out"], "no/such.jsonl"),
        (
            ["-m", "lora_retriever.merge", "--adapters", "no/such_adapter", "--out", "{tmp}/merged"],
            "no/such_adapter",
        ),
    ],
    ids=["infer", "train", "merge"],
)
def test_a_user_error_is_one_line_and_exit_2_not_a_traceback(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = run_entry(*argv)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]] and message in lines[-1]
    debug = run_entry(*argv, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and message in debug.stderr


# ---------------------------------------------------------------------------------- validate before working


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    """A tiny Llama, two adapters on it with MiniLM keys, a pool config, and a short test set."""
    from lora_retriever.embed_pool import embed_pool
    from lora_retriever.embedders import get_embedder
    from swift.llm import get_model_tokenizer

    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_llama(root / "model")
    model, _ = get_model_tokenizer("llama", model_dir)
    entries = []
    for i, name in enumerate(("cat", "dog")):
        make_lora_dir(model, root / name, r=4, target_modules=["q_proj", "v_proj"], seed=i)
        (root / f"{name}.jsonl").write_text(
            json.dumps({"input": f"what is the {name} ?", "output": name}) + "\n"
        )
        entries.append({"lora_name": name, "lora_path": name, "samples_path": f"{name}.jsonl"})
    pool = root / "pool.json"
    pool.write_text(json.dumps(entries))
    embed_pool(pool, get_embedder(EmbedderConfig()), num_samples=1, progress=False)
    test = root / "test.jsonl"
    long_query = " ".join(["what is the red cat ?"] * 110)  # ~660 tokens: beyond the model's 256 positions
    rows = [
        {"id": "short", "query": "what is the cat ?", "response": "cat", "task": "cat"},
        {"id": "long-one", "query": long_query, "response": "dog", "task": "dog"},
    ]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model_dir, "pool": pool, "test": test}


@pytest.fixture
def warnings_logged():
    """The project's warnings (its loggers don't propagate to the root, so caplog can't see them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    package_logger = logging.getLogger("lora_retriever")
    package_logger.addHandler(handler)
    yield records
    package_logger.removeHandler(handler)


def test_a_bad_output_dir_fails_before_the_model_loads(tiny_pool, tmp_path, capsys):
    """--model_path does not exist: had the model (or the embedder) been loaded first, the error would name it."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["--test_data", str(tiny_pool["test"]), "--pool", str(tiny_pool["pool"])]
    argv += ["--model_type", "llama", "--model_path", str(tmp_path / "no_model")]
    assert infer_cli.main([*argv, "--output_dir", str(blocker / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output_dir") and "a parent of it is a file" in err and "no_model" not in err
    assert infer_cli.main([*argv, "--output_dir", str(blocker), "--quiet"]) == 2
    assert "is a file; pass a directory" in capsys.readouterr().err
    # With a good output dir, the run does reach the model: the error is now the missing model directory.
    assert infer_cli.main([*argv, "--output_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert "no_model" in capsys.readouterr().err


def test_pool_problems_fail_before_the_model_loads(tiny_pool, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    entries = json.loads(tiny_pool["pool"].read_text())
    (tmp_path / "cat").mkdir()  # an adapter folder without weights (a training that never finished)
    (tmp_path / "cat" / "adapter_config.json").write_text(
        (tiny_pool["root"] / "cat" / "adapter_config.json").read_text()
    )
    entries[0] = {**entries[0], "lora_path": str(tmp_path / "cat")}
    entries[1] = {**entries[1], "lora_path": str(tiny_pool["root"] / "dog")}
    for entry in entries:
        entry["embedding_path"] = str(tiny_pool["root"] / entry["embedding_path"])
        entry["samples_path"] = str(tiny_pool["root"] / entry["samples_path"])
    broken.write_text(json.dumps(entries))
    argv = [
        "--test_data",
        str(tiny_pool["test"]),
        "--pool",
        str(broken),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert infer_cli.main([*argv, "--model_type", "llama", "--model_path", str(tmp_path / "no_model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no weights file" in err and "no_model" not in err


def test_a_task_that_is_not_a_string_fails_before_any_work(tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text(
        json.dumps({"query": "q", "task": "t"}) + "\n" + json.dumps({"query": "q", "task": 3}) + "\n"
    )
    argv = ["--test_data", str(data), "--merge_method", "base", "--model_type", "llama", "--model_path", "x"]
    assert infer_cli.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {data}:2: field 'task' must be a string or null, got int 3\n"


def test_jina_runs_remote_code_only_with_trust_remote_code(tmp_path, capsys):
    jina = tmp_path / "jina-embeddings-v4"
    jina.mkdir()
    (jina / "config.json").write_text(json.dumps({"architectures": ["JinaEmbeddingsV4Model"]}))
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"query": "q"}) + "\n")
    for backend in ("jina-v4", "auto"):
        argv = [
            "--test_data",
            str(data),
            "--pool",
            "p.json",
            "--embedder",
            backend,
            "--embedder_path",
            str(jina),
        ]
        if backend == "jina-v4":  # refused when the config is built, before any file is read
            assert infer_cli.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
            assert "Pass --trust_remote_code" in capsys.readouterr().err
        else:  # auto finds a jina folder: refused when the backend is resolved
            with pytest.raises(PermissionError, match="--trust_remote_code"):
                from lora_retriever.embedders import get_embedder

                get_embedder(backend, model_path=str(jina))
    assert (
        InferenceConfig(
            test_data=str(data),
            pools=["p.json"],
            embedder="jina-v4",
            embedder_path=str(jina),
            trust_remote_code=True,
        )
        .embedder_config()
        .trust_remote_code
    )
    assert (
        embed_pool_cli.main(["--pool", "p.json", "--embedder", "jina-v4", "--embedder_path", str(jina)]) == 2
    )
    assert "Pass --trust_remote_code" in capsys.readouterr().err


def test_silent_limits_become_warnings_and_outputs_land_together(tiny_pool, tmp_path, warnings_logged):
    out = tmp_path / "out"
    argv = ["--test_data", str(tiny_pool["test"]), "--pool", str(tiny_pool["pool"]), "--top_k", "5"]
    argv += ["--model_type", "llama", "--model_path", str(tiny_pool["model"]), "--max_new_tokens", "2"]
    assert infer_cli.main([*argv, "--output_dir", str(out), "--quiet"]) == 0
    messages = [r.getMessage() for r in warnings_logged]
    assert any("top_k=5 but only 2 adapter(s) can be retrieved" in m for m in messages), messages
    long = [m for m in messages if re.search(r"exceed the model's context of \d+ tokens", m)]
    assert len(long) == 1 and "long-one" in long[0] and "short" not in long[0], messages
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
    ]  # no temp files left
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["short", "long-one"] and all(
        len(r["selected"]) == 2 for r in records
    )
    assert json.loads((out / "metrics.json").read_text())["run"]["num_samples"] == 2


def test_files_written_together_change_nothing_when_one_fails(tmp_path):
    first, second = tmp_path / "predictions.jsonl", tmp_path / "metrics.json"
    first.write_text("old predictions")
    second.write_text("old metrics")

    def fail(_file):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_together({first: "new predictions", second: fail})
    assert first.read_text() == "old predictions" and second.read_text() == "old metrics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.jsonl"]
    atomic_write_together({first: "new predictions", second: b"new metrics"})
    assert first.read_text() == "new predictions" and second.read_text() == "new metrics"
