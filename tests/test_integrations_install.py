"""The install lines README gives each kind of user are consistent with the package's metadata and
with what CI builds: the RecBole stack satisfies the recbole extra and its caps, the CPU lines ask
for torch's CPU index, triton is only the GPU extra, and .ci/run builds the RecBole venv the tests
use. (The lines themselves were resolved with pip; see README's Install table.)"""

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _requirements(path):
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _install_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using fastpe in your codebase"):readme.index("## Backends")]
    rows = re.findall(r"^\| (CPU-only researcher|GPU researcher|RecBole user) \| `([^`]+)` \|", section, re.M)
    return dict(rows)


def test_readme_gives_one_install_line_per_kind_of_user():
    lines = _install_table()
    assert set(lines) == {"CPU-only researcher", "GPU researcher", "RecBole user"}, lines
    for who, line in lines.items():
        words = shlex.split(line)
        assert words[:4] == ["python3", "-m", "pip", "install"] and "-e" in words, line
        assert ("requirements.txt" not in words) and ("-r" not in words or who == "RecBole user"), line
    assert CPU_INDEX in lines["CPU-only researcher"] and "triton" not in lines["CPU-only researcher"]
    assert "[triton]" in lines["GPU researcher"] and CPU_INDEX not in lines["GPU researcher"]
    assert "-r requirements-recbole.txt" in lines["RecBole user"] and CPU_INDEX in lines["RecBole user"]


def test_triton_is_only_the_gpu_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(Requirement(r).name == "triton" for r in project["dependencies"])
    assert [Requirement(r).name for r in project["optional-dependencies"]["triton"]] == ["triton"]


def test_recbole_stack_satisfies_the_extra_and_does_not_mix_with_the_main_stack():
    stack = {r.name.lower(): r for r in _requirements(ROOT / "requirements-recbole.txt")}
    pinned = {name: next(iter(r.specifier)).version for name, r in stack.items()}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in stack.values()), stack
    extra = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
             ["optional-dependencies"]["recbole"]]
    for requirement in extra:  # recbole==1.2.1, numpy<2, pandas<3, setuptools<81
        assert requirement.name in pinned and requirement.specifier.contains(pinned[requirement.name]), requirement
    main = {r.name.lower(): r for r in _requirements(ROOT / "requirements.txt")}
    assert main["torch"].specifier == stack["torch"].specifier  # the same torch as CI's main stack
    # The clash that made `-r requirements.txt -e '.[recbole]'` unresolvable: RecBole needs numpy<2.
    assert not Requirement("numpy<2").specifier.contains(next(iter(main["numpy"].specifier)).version)


def test_ci_builds_the_recbole_venv_the_tests_use():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "requirements-recbole.txt" in ci and "FASTPE_RECBOLE_PYTHON" in ci
    assert ci.index("FASTPE_RECBOLE_PYTHON") < ci.index('eval "$test_command"')
    assert ".venv-recbole/" in (ROOT / ".gitignore").read_text()
