"""`tagway replay report --format github`: a PR comment. The seed 001 report against a golden file (set
TAGWAY_UPDATE_GOLDEN=1 to rewrite it after a deliberate change), rendered by a CommonMark + GFM-tables parser
(markdown-it-py, as GitHub renders tables and <details>), and a huge report kept under GitHub's comment limit."""
from __future__ import annotations

import os
import re
from pathlib import Path

from markdown_it import MarkdownIt

from replay.render import GITHUB_MAX_CHARS, render_github
from replay.report import aggregate
from replay.spec import Gating
from tests.test_replay_report import SEED_001, results

GOLDEN = Path(__file__).parent / "golden" / "report_github.md"


def seed_report():
    return aggregate(results(SEED_001), Gating(), run_id="run-1", segment_by=["customer"], models={"cand": "gpt-5-mini"},
                     n_cases=1206, dataset="refunds@3", inputs={"refund_flow-036": "Where is my | refund?"})


def test_github_markdown_matches_the_golden_file():
    text = render_github(seed_report(), "https://tagway.example.com/")
    if os.environ.get("TAGWAY_UPDATE_GOLDEN"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_github_markdown_renders_verdict_first_then_the_flagged_segments_and_a_collapsed_table():
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render(GOLDEN.read_text(encoding="utf-8"))
    first = html.split("\n", 1)[0]
    assert first == "<h2>❌ tagway gate: REGRESSION</h2>"
    assert '<a href="https://tagway.example.com/ui/replays/run-1"><code>run-1</code></a>' in html
    tables = html.split("<table>")[1:]
    # the flagged segments' table (refund_flow regresses, tiny is inconclusive), the flipped cases, then all 6
    flagged = re.findall(r"<tr>\n<td>([a-z_]+)</td>", tables[0])
    assert flagged == ["refund_flow", "tiny"]
    assert "<details><summary>All 6 segments</summary>" in html
    assert re.findall(r"<tr>\n<td>([a-z_]+)</td>", tables[-1]) == sorted(SEED_001)
    assert "Where is my | refund?" in html  # the escaped pipe stays in its cell
    assert html.index("REGRESSION") < html.index("<table>")


def test_github_markdown_stays_under_the_comment_limit():
    many = {f"segment_{i:04d}": (40, 40, 10) for i in range(1500)}  # every one a regression with 30 flips
    text = render_github(aggregate(results(many), Gating(), run_id="big"))
    assert len(text) <= GITHUB_MAX_CHARS
    assert text.startswith("## ❌ tagway gate: REGRESSION")
