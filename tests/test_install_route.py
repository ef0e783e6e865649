"""One install route: the README and the notebook install from pyproject.toml's address."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]


def test_readme_and_notebook_install_from_the_repository_in_pyproject():
  repository = re.search(
    r'^Repository = "(.+)"$', (ROOT / 'pyproject.toml').read_text(), re.MULTILINE
  ).group(1)
  command = f'"optax-path[experiments] @ git+{repository}"'
  assert command in (ROOT / 'README.md').read_text()
  notebook = json.loads((ROOT / 'notebooks' / 'path_sgd.ipynb').read_text())
  sources = [''.join(cell['source']) for cell in notebook['cells']]
  assert any(f'%pip install -q {command}' in source for source in sources)
  addresses = set(re.findall(r'git\+(\S+?)"', (ROOT / 'README.md').read_text() + ''.join(sources)))
  assert addresses == {repository}
