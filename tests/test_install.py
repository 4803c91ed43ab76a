"""pyproject.toml (`pip install -e .`, issue 24 item 9): the packages it installs, one command per
tool (realmix_tf/commands.py runs each as `python -m` does) and paths relative to the caller's
folder. `pip install -e .` itself is not run here (it takes 20 s); .ci/run does it."""
import glob
import os
import re
import sys
import tomllib

import pytest

from realmix_tf import commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_TOOLS = re.compile(r"^runs\.(bench_.*|profile_step|peer_step)$|^realmix_tf\.registry$")


def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def tool_modules():
    """Every module with a `__main__` block of the installed packages, less the benchmarks."""
    found = []
    for package in commands.PACKAGES:
        for path in sorted(glob.glob(os.path.join(REPO, package, "*.py"))):
            with open(path) as f:
                if 'if __name__ == "__main__":' in f.read():
                    module = f"{package}.{os.path.splitext(os.path.basename(path))[0]}"
                    if not DEV_TOOLS.match(module):
                        found.append(module)
    return found


def test_every_tool_has_a_command_that_runs_its_module():
    scripts = pyproject()["project"]["scripts"]
    assert set(scripts.values()) == {"realmix_tf.commands:main"} and callable(commands.main)
    modules = {name: commands.module_of(name) for name in scripts}
    assert modules["realmix"] == "realmix_tf.realmix"
    assert modules["realmix-create-split"] == "data_prep.create_split"
    assert modules["realmix-quickstart"] == "runs.quickstart"
    assert modules["realmix-mean-teacher"] == "realmix_tf.mean_teacher"
    assert sorted(modules.values()) == sorted(tool_modules())        # one each, none missing
    for name in scripts:            # the rule the README states: realmix-<module>, - for _
        assert name == "realmix" or modules[name].split(".")[1] == name[len("realmix-"):].replace("-", "_")


def test_module_of_refuses_other_names():
    assert commands.module_of("/venv/bin/realmix-plot") == "runs.plot"
    assert commands.module_of(r"realmix-plot.exe") == "runs.plot"
    for bad in ("plot", "realmix-", "realmix-nosuchtool"):
        with pytest.raises(ValueError):
            commands.module_of(bad)


def test_packages_cover_every_package_folder():
    from setuptools import find_packages
    config = pyproject()["tool"]["setuptools"]["packages"]["find"]
    installed = set(find_packages(REPO, include=config["include"]))
    folders = {os.path.relpath(os.path.dirname(p), REPO).replace(os.sep, ".")
               for p in glob.glob(os.path.join(REPO, "*", "**", "__init__.py"), recursive=True)}
    assert installed == folders - {"tests"}
    assert {"libml", "libml.base", "libml.train", "realmix_tf", "data_prep", "runs"} <= installed


@pytest.mark.filterwarnings("ignore:'runs.plot' found in sys.modules:RuntimeWarning")  # tests imported it
def test_a_command_runs_its_tool_from_another_folder_with_relative_paths(tmp_path, monkeypatch, capsys):
    """The entry point as pip's wrapper calls it (argv[0] = the command), from a folder outside
    the repository: the usage line names the command, relative paths are the caller's."""
    from tests.test_plot import fake_run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/realmix-plot", "--help"])
    with pytest.raises(SystemExit) as stop:
        commands.main()
    assert stop.value.code == 0
    assert capsys.readouterr().out.splitlines()[0] == "usage: realmix-plot [flags]"
    fake_run(tmp_path / "exp", "mnist5k.1@100-1", "RealMix_a", [50.0, 80.0, 97.5])
    monkeypatch.setattr(sys, "argv", ["/venv/bin/realmix-plot", "exp", "--output=c.png"])
    with pytest.raises(SystemExit) as stop:
        commands.main()
    assert stop.value.code == 0 and os.path.isfile(tmp_path / "c.png")
    assert capsys.readouterr().out.strip() == "drew 1 curve of 1 run -> c.png"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/realmix-nosuch"])
    with pytest.raises(SystemExit) as stop:
        commands.main()
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("error: realmix-nosuch: no module")


def test_ci_and_readme_install_the_project():
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read()
    assert re.search(r"pip install .*-e \.", ci)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    install = [line for line in readme.splitlines() if "pip install -r requirements.txt" in line
               and line.startswith("python3 -m venv")]
    assert len(install) == 2 and all("install -e ." in line or "-r requirements.txt -e ." in line
                                     for line in install)
