"""The shape of the code base: one installed package, imports that run one way, tools behind one command."""

import ast
import subprocess
import sys

import tomllib
from conftest import ROOT, run_here, run_script, tiny_train_args

# The layers, from the bottom up: a module imports only from its own layer and those below it.
LAYERS = (
    ("model", "gptcraft.model"),  # gptcraft/model.py is a link to model.py
    ("gptcraft.errors", "gptcraft.files", "gptcraft.config", "gptcraft.terminal"),
    ("gptcraft.system", "gptcraft.data"),
    ("gptcraft.prepare", "gptcraft.hf", "gptcraft.track", "gptcraft.quantize"),
    ("gptcraft.runs",),  # run folders: checkpoints, resume, the lock, how a run starts
    ("gptcraft.load", "gptcraft.evaluate", "gptcraft.generate", "gptcraft.prompt"),
    ("gptcraft.train", "gptcraft.sample", "gptcraft.export", "gptcraft.visualize"),
    ("gptcraft.bench",),
    ("gptcraft.cli", "gptcraft.__main__"),
)


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports():
    """{module: set of project modules it imports}, function-level imports included."""
    graph = {}
    for path in [ROOT / "model.py", *sorted((ROOT / "gptcraft").rglob("*.py"))]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from gptcraft.train import loop` imports the module gptcraft.train.loop
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            imported |= {n for n in names if n == "model" or n.startswith("gptcraft")}
        graph[module_name(path)] = imported
    # keep only names that are modules of the project
    return {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}


def within(name, packages):
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_model_imports_nothing_from_the_project():
    assert project_imports()["model"] == set()


def test_the_package_imports_its_model_under_its_own_name():
    # A top-level `model` would be whichever model.py comes first on sys.path: the current
    # folder's under `python -m`, e.g. nanoGPT's in a nanoGPT checkout.
    assert (ROOT / "gptcraft" / "model.py").resolve() == (ROOT / "model.py").resolve()
    importers = [m for m, deps in project_imports().items() if "model" in deps]
    assert importers == []


def test_no_import_circle():
    graph = project_imports()
    state = {}  # module -> "open" while on the path, "done" after

    def visit(m, path):
        state[m] = "open"
        for dep in graph[m]:
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def layer_of(name):
    return next(i for i, layer in enumerate(LAYERS) if within(name, layer))


def test_every_module_has_a_layer_and_no_import_runs_upward():
    graph = project_imports()
    unplaced = [m for m in graph if m != "gptcraft" and not any(within(m, layer) for layer in LAYERS)]
    assert unplaced == []
    upward = [(m, dep) for m, deps in graph.items() if m != "gptcraft" for dep in deps - {"gptcraft"}
              if layer_of(dep) > layer_of(m)]  # fmt: skip
    assert upward == []
    assert graph["gptcraft.errors"] == set()
    assert graph["gptcraft.files"] <= {"gptcraft.errors"}
    assert graph["gptcraft.config"] <= {"gptcraft.errors"}


def test_inference_reads_runs_without_the_trainer():
    """Sampling, evaluation, export and the pictures load a run through runs/ and load.py alone."""
    graph = project_imports()
    users = [m for m in graph if within(m, ("gptcraft.load", "gptcraft.sample", "gptcraft.evaluate",
                                             "gptcraft.export", "gptcraft.visualize"))]  # fmt: skip
    assert [(m, dep) for m in users for dep in graph[m] if within(dep, ("gptcraft.train",))] == []


def test_only_gptcraft_is_an_installed_name(tmp_path):
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py-modules" not in setuptools
    assert setuptools["packages"]["find"]["include"] == ["gptcraft*"]
    # From another directory, names that used to be ours resolve to nothing of this repository.
    names = ["config", "evaluate", "distributed", "tokens", "loader", "loading", "tracking", "checkpoint", "plot"]
    code = ("import importlib.util, json; print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) "
            f"for n in {names!r}}}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = {n: o for n, o in __import__("json").loads(out.stdout).items() if o and o.startswith(str(ROOT))}
    assert found == {}


def test_gptcraft_help_lists_the_subcommands(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gptcraft", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0
    for command in (
        "train",
        "sample",
        "eval",
        "export",
        "plot",
        "attention",
        "positions",
        "bench",
        "prepare NAME",
        "shakespeare_char",
    ):
        assert f"  {command} " in out.stdout
    bad = subprocess.run([sys.executable, "-m", "gptcraft", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown command 'nope'" in bad.stderr


def test_root_holds_few_scripts():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["bench.py", "model.py", "sample.py", "train.py"]


def test_a_folder_holding_another_model_py_changes_nothing(tmp_path, char_data_dir):
    # `python -m` puts the current folder first on sys.path: there a nanoGPT checkout's model.py
    # would stand in for ours if the package imported a top-level `model`.
    (tmp_path / "model.py").write_text('raise ImportError("the current folder\'s model.py was imported")\n')
    out = tmp_path / "out"
    run_script("-m", "gptcraft", "train", *tiny_train_args(char_data_dir, out, max_iters=2, eval_iters=1),
               cwd=tmp_path)  # fmt: skip
    sample = run_script("-m", "gptcraft", "sample", f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1",
                        "--device=cpu", cwd=tmp_path)  # fmt: skip
    assert sample.stdout.strip()


def test_every_usage_line_names_the_command_people_type():
    from gptcraft.cli import COMMANDS, PREPARE

    typed = {f"gptcraft {name}": ["-m", "gptcraft", name] for name in COMMANDS}
    typed |= {f"gptcraft prepare {name}": ["-m", "gptcraft", "prepare", name] for name in PREPARE}
    typed |= {f"python {script}": [script] for script in ("train.py", "sample.py", "bench.py")}
    typed |= {f"python prepare/{name}.py": [f"prepare/{name}.py"] for name in PREPARE}
    usage = [(command, run_here(*args, "--help").stdout.splitlines()[0]) for command, args in typed.items()]
    # `python -m gptcraft.<module>` runs the same code: its usage names the same command.
    root = {"train": "python train.py", "sample": "python sample.py", "bench": "python bench.py"}
    usage += [(root.get(name, f"gptcraft {name}"), run_here("-m", module, "--help").stdout.splitlines()[0])
              for name, (module, _) in COMMANDS.items()]  # fmt: skip
    assert [(c, line) for c, line in usage if not line.startswith(f"usage: {c} ")] == []
