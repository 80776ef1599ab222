"""The commands: train.py / eval.py and the installable package's entry points x2gs-train / x2gs-eval (pyproject.toml),
their --help, the CPU-backend warning, usage errors without tracebacks, and pyproject's pins against requirements.txt."""
import importlib
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _key(line: str):
    r = Requirement(line)
    return canonicalize_name(r.name), str(r.specifier), str(r.marker) if r.marker else ""


def test_pyproject_pins_agree_with_requirements_txt():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
    project = _pyproject()["project"]
    runtime = {_key(d) for d in project["dependencies"]}
    test = {_key(d) for d in project["optional-dependencies"]["test"]}
    assert runtime | test == {_key(ln) for ln in lines}
    assert not runtime & test
    assert {k[0] for k in test} == {"pytest", "pytest-xdist", "scikit-image", "simpleitk", "tensorboard"}
    assert {"nibabel", "tensorboardx", "imageio-ffmpeg"} <= {k[0] for k in runtime}


def test_entry_points_resolve_to_callables():
    scripts = _pyproject()["project"]["scripts"]
    assert set(scripts) == {"x2gs-train", "x2gs-eval"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def _run(*args, cwd=ROOT, env=None):
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_both_commands_import_in_one_process_and_print_help():
    """Flags are defined when a command starts, so the two modules import side by side (both have --workdir)."""
    r = _run(sys.executable, "-c", "import x2gs_jax.cli.train as t, x2gs_jax.cli.eval as e; "
             "assert callable(t.run) and callable(e.run) and callable(t.main) and callable(e.main)")
    assert r.returncode == 0, r.stderr
    # (absl's --help exits with status 1 after printing the usage and the program's flags.)
    r = _run(sys.executable, "train.py", "--help")
    assert "--config: Config file" in r.stdout and "--workdir: Run directory" in r.stdout, r.stderr
    assert "python train.py --config=configs/x2_gaussian.py" in r.stdout  # the script's docstring as usage
    r = _run(sys.executable, "-m", "x2gs_jax.cli.eval", "--help")
    assert "x2gs-eval --workdir=runs/x2" in r.stdout
    assert all(f"--{f}:" in r.stdout for f in ("units", "mu_water", "workdir", "export_times")), r.stdout


def test_eval_usage_errors_name_the_flag(tmp_path):
    r = _run(sys.executable, "eval.py", f"--workdir={tmp_path}", "--units=kelvin")
    assert r.returncode != 0 and "--units" in r.stderr and "Traceback" not in r.stderr
    r = _run(sys.executable, "eval.py", f"--workdir={tmp_path}", "--mu_water=-1")
    assert r.returncode != 0 and "--mu_water: expected a positive attenuation" in r.stderr
    assert "Traceback" not in r.stderr


def test_cpu_backend_warning(monkeypatch, caplog):
    import jax

    from x2gs_jax.cli import train

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with caplog.at_level("WARNING"):
        assert train.warn_if_cpu() == "cpu"
    lines = [r.getMessage() for r in caplog.records if "JAX backend" in r.getMessage()]
    assert lines == ["JAX backend: cpu (no GPU found): training will be slow; the :demo and :tiny config variants are "
                     "sized for CPUs (a GPU needs a CUDA build of jax, README 'Install')"]
    caplog.clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level("WARNING"):
        assert train.warn_if_cpu() == "gpu"
    assert not [r for r in caplog.records if "JAX backend" in r.getMessage()]


@pytest.mark.slow
def test_pip_install_gives_working_commands(tmp_path):
    """`pip install --no-deps --target <dir>` of a copy of the source tree (the build writes into the tree it builds):
    the x2gs-train / x2gs-eval scripts print their help, and x2gs-train, run from another folder, reads a config file
    by path (its `configs.common` import) up to the config checks."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "train.py", "eval.py"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("x2gs_jax", "kernels", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    target = tmp_path / "site"
    # pip's default build isolation (the build backend, setuptools, comes from the package index), as `pip install .`
    r = _run(sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(src))
    assert r.returncode == 0, r.stderr
    assert (target / "x2gs_jax" / "cli" / "train.py").exists() and (target / "kernels" / "rasterize.py").exists()
    assert not (target / "configs").exists() and not (target / "tests").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for script, flag in (("x2gs-train", "--config"), ("x2gs-eval", "--units")):
        r = _run(str(target / "bin" / script), "--help", cwd=elsewhere, env=env)
        assert f"{flag}:" in r.stdout and f"{script} --" in r.stdout, (script, r.stdout, r.stderr)
    r = _run(str(target / "bin" / "x2gs-train"), f"--config={src / 'configs' / 'r2_static.py'}:tiny",
             f"--workdir={tmp_path / 'run'}", "--config.train.iterations=-5", cwd=elsewhere, env=env)
    assert r.returncode != 0 and "config.train.iterations=-5: must be an integer >= 1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
