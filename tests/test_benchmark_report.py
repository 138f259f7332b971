"""The benchmark harness's Markdown writer keeps what it does not generate."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from benchmarks.report import merge_kept  # noqa: E402

OLD = """# Benchmarks

Header of an old run.

## Times (ms, median)

old times

## Targets (issue 12): 30 of 90 figures met

old targets

## A hand-written round

text

```python
# not a heading
```

### Its subsection

more text

## GPU

gpu figures
"""

NEW = """# Benchmarks

Header of the new run.

## Times (ms, median)

new times

## Targets (issue 12): 41 of 90 figures met

new targets
"""


def test_rendered_sections_replace_and_hand_written_ones_stay():
    text = merge_kept(OLD, NEW)
    assert "new times" in text and "new targets" in text
    assert "old times" not in text and "old targets" not in text
    assert text.index("new targets") < text.index("## A hand-written round")
    for kept in ("## A hand-written round", "# not a heading", "### Its subsection", "## GPU"):
        assert kept in text
    assert text.index("### Its subsection") < text.index("## GPU")
    assert merge_kept("", NEW) == NEW
