"""Every ```python block of README.md runs as written, and prints what it says it prints.

The blocks are read from README.md itself, so the README cannot drift from the code. Each
block runs as a script in a fresh interpreter (a fresh namespace, no state from other tests
or blocks, nothing inherited but the environment), in a temporary directory, with a time
limit. ```bash blocks are not run.

Conventions a block may use:

- ``print(...)  # value`` or ``print(...)  # -> value`` (a print at the top level with a
  comment): the line that print writes must be ``value``.
- ``# -> text`` on a line of its own: a line the block prints (for prints inside loops),
  in order with the others.
- ``# requires: N devices``: the block runs on N devices; on the CPU they are simulated
  with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

Where a block has expectations, what it prints must be exactly those lines, in order.
Numbers are compared as numbers: one printed with the same number of decimals as the
expected one may differ by 2 in its last decimal or by 1% (float rounding across platforms
and versions), any other by 1e-6 relative; integers and all text must match exactly.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import subprocess
import sys
import tokenize
from typing import NamedTuple

import pytest

README = pathlib.Path(__file__).parents[1] / 'README.md'
TIMEOUT_S = 300
_NUMBER = re.compile(r'[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?')
_REQUIRES = re.compile(r'^#\s*requires:\s*(.*)$', re.MULTILINE)


class Block(NamedTuple):
  line: int  # README line of the first line of code
  heading: str
  code: str


def python_blocks(text: str) -> list[Block]:
  """The ```python blocks of ``text``, with the README line and section they start at."""
  blocks, heading, code, start = [], '', None, 0
  for number, line in enumerate(text.splitlines(), 1):
    if code is None:
      if line.startswith('#'):
        heading = line.lstrip('#').strip()
      elif line.strip() == '```python':
        code, start = [], number + 1
    elif line.strip() == '```':
      blocks.append(Block(start, heading, '\n'.join(code) + '\n'))
      code = None
    else:
      code.append(line)
  assert code is None, f'README.md: the ```python block at line {start - 1} is never closed'
  return blocks


def expected_output(code: str) -> list[str]:
  """The lines the block says it prints, from its comments (see the module docstring)."""
  expected = []
  for token in tokenize.generate_tokens(io.StringIO(code).readline):
    if token.type != tokenize.COMMENT:
      continue
    text = token.string[1:].strip()
    line = token.line
    if line.strip().startswith('#'):
      if text.startswith('->'):
        expected.append(text[2:].strip())
    elif line.startswith('print('):
      expected.append(text[2:].strip() if text.startswith('->') else text)
  return expected


def _decimals(token: str) -> int | None:
  if 'e' in token.lower() or '.' not in token:
    return None
  return len(token.split('.')[1])


def same_line(got: str, want: str) -> bool:
  """``got`` equals ``want``, numbers within the tolerance of the module docstring."""
  if _NUMBER.split(got) != _NUMBER.split(want):
    return False
  got_numbers, want_numbers = _NUMBER.findall(got), _NUMBER.findall(want)
  if len(got_numbers) != len(want_numbers):
    return False
  for g, w in zip(got_numbers, want_numbers):
    if '.' not in w and 'e' not in w.lower():
      if g != w:
        return False
      continue
    a, b = float(g), float(w)
    decimals = _decimals(w)
    if decimals is not None and _decimals(g) == decimals:
      tolerance = max(2 * 10.0**-decimals, 0.01 * abs(b))
    else:
      tolerance = 1e-6 * max(1.0, abs(b))
    if not abs(a - b) <= tolerance:
      return False
  return True


def environment(code: str) -> dict[str, str]:
  env = dict(os.environ)
  for requirement in _REQUIRES.findall(code):
    match = re.fullmatch(r'(\d+) devices?\b.*', requirement.strip())
    if match is None:
      raise AssertionError(f'unknown requirement {requirement!r}: only "N devices"')
    flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={match[1]}'])
  return env


BLOCKS = python_blocks(README.read_text())


def test_every_python_block_is_found():
  text = README.read_text()
  fences = [line for line in text.splitlines() if re.match(r'\s*```\s*py', line)]
  assert len(BLOCKS) == len(fences), f'a ```python fence the parser missed: {fences}'
  assert len(BLOCKS) >= 6
  headings = {block.heading for block in BLOCKS}
  assert 'Example' in headings and 'Many devices' in headings


@pytest.mark.slow
@pytest.mark.parametrize('block', BLOCKS, ids=[f'line{b.line}' for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, tmp_path):
  script = tmp_path / f'readme_line{block.line}.py'
  script.write_text(block.code)
  try:
    result = subprocess.run(
      [sys.executable, script.name],
      cwd=tmp_path,
      env=environment(block.code),
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(f'README.md line {block.line} ({block.heading}): over {TIMEOUT_S} s')
  where = f'README.md line {block.line} ({block.heading}; script line n is README line {block.line - 1} + n)'
  assert result.returncode == 0, f'{where} failed:\n{result.stderr[-4000:]}'
  expected = expected_output(block.code)
  if expected:
    printed = result.stdout.splitlines()
    assert len(printed) == len(expected) and all(map(same_line, printed, expected)), (
      f'{where} printed\n{result.stdout}\nwhere its comments say\n' + '\n'.join(expected)
    )


# --- the checker itself ----------------------------------------------------------------


def test_expected_output_reads_print_comments_and_arrow_lines():
  code = (
    'x = 1  # not output\n'
    'print(x)  # 1\n'
    'for i in range(2):\n'
    "    print(f'step {i}')\n"
    '# -> step 0\n'
    '# -> step 1\n'
    '# a plain comment\n'
    'print("#")  # -> #\n'
  )
  assert expected_output(code) == ['1', 'step 0', 'step 1', '#']


@pytest.mark.parametrize(
  'got, want, same',
  [
    ('epoch 4: loss 0.006', 'epoch 4: loss 0.006', True),
    ('epoch 4: loss 0.007', 'epoch 4: loss 0.006', True),  # 1 in the last decimal
    ('epoch 4: loss 0.009', 'epoch 4: loss 0.006', False),
    ('epoch 4: loss 1.540', 'epoch 4: loss 1.500', False),  # over 1%: 0.015
    ('epoch 5: loss 0.006', 'epoch 4: loss 0.006', False),  # integers exactly
    ('before: loss 2.375', 'before: loss 2.334', False),  # 1% of 2.334 is 0.023
    ('0.0', '0.0', True),
    ('0.0123', '0.0', False),  # another format: 1e-6
    ("['encoder', 'decoder']", "['encoder', 'decoder']", True),
    ("['decoder', 'encoder']", "['encoder', 'decoder']", False),
    ("P(None, 'model')", "P('model', None)", False),
  ],
)
def test_same_line(got, want, same):
  assert same_line(got, want) is same


def test_a_block_that_fails_or_prints_otherwise_fails(tmp_path):
  """The test can fail: a wrong comment or an exception is caught."""
  wrong = Block(1, 'x', 'print(2)  # 3\n')
  with pytest.raises(AssertionError, match='printed'):
    test_readme_block_runs_as_written(wrong, tmp_path)
  broken = Block(1, 'x', 'import optax_path\noptax_path.no_such_thing\n')
  with pytest.raises(AssertionError, match='no_such_thing'):
    test_readme_block_runs_as_written(broken, tmp_path)


def test_requires_devices_sets_the_flag():
  env = environment('# requires: 8 devices (on a CPU: ...)\nimport jax\n')
  assert '--xla_force_host_platform_device_count=8' in env['XLA_FLAGS']
  with pytest.raises(AssertionError, match='unknown requirement'):
    environment('# requires: a GPU\n')
