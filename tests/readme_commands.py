"""The README's own commands, read from the README: what CI runs and the tests check.

  python tests/readme_commands.py setup|test|main     prints that command

The README's first screen has a bold label ("**Set up**", "**Test**", "**Main command**") followed
by an indented code block holding exactly one command; this module returns that command, so CI and
the tests run what a reader copies, not a copy of it.
"""

from __future__ import annotations

import os
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
LABELS = {"setup": "**Set up**", "test": "**Test**", "main": "**Main command**"}


def command(which: str, readme: str = README) -> str:
  lines = open(readme).read().splitlines()
  label = LABELS[which]
  start = next((i for i, l in enumerate(lines) if l.startswith(label)), None)
  if start is None:
    raise ValueError(f"{readme}: no line starting with {label}")
  block = []
  for line in lines[start + 1:]:
    if line.startswith("    ") and line.strip():
      block.append(line.strip())
    elif block:
      break
    elif line.strip():
      raise ValueError(f"{readme}: text between {label} and its command block: {line!r}")
  if len(block) != 1:
    raise ValueError(f"{readme}: {label} must be followed by a one-line command block, got {block}")
  return block[0]


if __name__ == "__main__":
  print(command(sys.argv[1]))
