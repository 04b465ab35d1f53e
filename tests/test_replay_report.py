"""Pure aggregation, Wilson intervals, the gate (seed 001's numbers) and the four renderers."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess

import orjson
import pytest

from replay.gate import evaluate_gate
from replay.report import aggregate, render_html, render_json, render_markdown, render_terminal, wilson
from replay.spec import Gating


@dataclasses.dataclass
class R:
    candidate: str
    case_id: str
    segment: str
    status: str
    cost_usd: float = 0.0


# seed 001: segment -> (n, baseline passes, candidate passes)
SEED_001 = {"refund_flow": (47, 43, 36), "invoice_parse": (210, 176, 191), "contract_review": (156, 138, 139),
            "escalation_route": (89, 74, 77), "other": (698, 613, 607), "tiny": (6, 6, 3)}


def results(spec: dict[str, tuple[int, int, int]], candidate: str = "cand") -> list[R]:
    out = []
    for seg, (n, before, after) in spec.items():
        for i in range(n):
            cid = f"{seg}-{i}"
            out.append(R("baseline", cid, seg, "passed" if i < before else "failed"))
            out.append(R(candidate, cid, seg, "passed" if i < after else "failed", 0.001))
    return out


def test_wilson_known_values():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson(0, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.0, 0.2775)
    lo, hi = wilson(10, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.7225, 1.0)
    lo, hi = wilson(43, 47)
    assert (round(lo, 4), round(hi, 4)) == (0.8007, 0.9664)


def test_seed_001_min_segment_fails_on_refund_while_the_mean_passes():
    rows = results(SEED_001)
    strict = aggregate(rows, Gating(aggregate="min_segment", threshold=0.85, min_cases_per_segment=20))
    c = strict.candidates[0]
    refund = next(r for r in c.rows if r.segment == "refund_flow")
    assert (refund.n, refund.before_pass, refund.after_pass) == (47, 43, 36)
    assert round(refund.before, 3) == 0.915 and round(refund.after, 3) == 0.766 and round(refund.delta, 3) == -0.149
    assert refund.failing and not refund.low_confidence
    assert not strict.passed and c.verdict.failing == ["refund_flow"]
    assert any("refund_flow: pass rate 0.766 < threshold 0.85" in x for x in strict.reasons)
    tiny = next(r for r in c.rows if r.segment == "tiny")
    assert tiny.low_confidence and not tiny.failing  # 3/6 = 0.5 but n < 20: printed, not gated
    assert c.verdict.low_confidence == ["tiny"]
    assert c.overall.n == 1206 and c.overall.after >= 0.85 and c.overall.delta > 0

    lenient = aggregate(rows, Gating(aggregate="mean", threshold=0.85, min_cases_per_segment=20))
    assert lenient.passed
    assert any("not gated (aggregate=mean), below threshold: refund_flow" in x for x in lenient.reasons)


def test_max_drop_fails_even_with_the_mean_aggregate():
    rows = results(SEED_001)
    r = aggregate(rows, Gating(aggregate="mean", threshold=0.5, max_drop=0.10, min_cases_per_segment=20))
    assert not r.passed and r.candidates[0].verdict.failing == ["refund_flow"]
    assert any("dropped -0.149 vs baseline, more than max_drop 0.1" in x for x in r.reasons)


def test_gate_with_nothing_to_gate_on_fails():
    r = aggregate(results({"a": (5, 5, 5)}), Gating(min_cases_per_segment=20))
    assert not r.passed and "nothing to gate on" in r.reasons[0]


def test_gate_is_pure_on_plain_rows():
    @dataclasses.dataclass
    class S:
        segment: str
        n: int
        before: float | None
        after: float

    v = evaluate_gate([S("a", 30, 0.9, 0.9), S("b", 30, None, 0.86)], S("mean", 60, None, 0.88),
                      Gating(threshold=0.85, max_drop=0.05))
    assert v.passed and v.status == "passed" and "worst segment b" in v.reasons[0]


def test_errored_cases_are_not_scores_and_make_the_run_incomplete():
    """6 of 20 cases errored (a gateway outage): they are left out of n and the pass rate (14/14, not 14/20, which
    would fail the gate on an outage), counted apart per segment and in total, and the run is incomplete."""
    rows = results({"a": (20, 20, 20), "b": (20, 20, 20)})
    for i in range(6):
        rows[2 * i + 1] = R("cand", f"a-{i}", "a", "errored")
    rows[41] = R("cand", "b-0", "b", "errored")
    rows[42] = R("baseline", "b-1", "b", "errored")
    r = aggregate(rows, Gating(threshold=0.9, min_cases_per_segment=10), run_id="run-e", status="complete")
    a, b = r.candidates[0].rows
    assert (a.n, a.after_pass, a.after, a.errored) == (14, 14, 1.0, 6)
    assert (a.before_n, a.before) == (14, 1.0) and a.delta == 0 and not a.failing
    assert (b.n, b.errored, b.before_n, b.before_errored) == (19, 1, 18, 1)
    o = r.candidates[0].overall
    assert (o.n, o.errored, o.after) == (33, 7, 1.0)
    assert r.errored == 8 and r.status == "incomplete"
    line = "8 errored case result(s) (cand 7, baseline 1: gateway errors after retries or evaluator failures) are " \
           "not counted in the pass rates; `tagway replay resume run-e` retries them"
    assert line in r.reasons

    md = render_markdown(r)
    assert "| a | 14 | 1.000 | 1.000 | +0.000 | 0.785–1.000 | 6 |  |" in md
    assert "| b | 19 | 1.000 | 1.000 | +0.000 | 0.832–1.000 | 1 (+1 baseline) |  |" in md
    assert "| **mean (weighted)** | **33** |" in md and "| **7 (+1 baseline)** |" in md and f"- {line}" in md
    assert md.startswith("### tagway replay `run-e`: ⚠️ gate passed (run incomplete: not final)")
    text = render_terminal(r)
    a_line = next(x for x in text.splitlines() if x.strip().startswith("a "))
    assert a_line.split() == ["a", "14", "1.000", "1.000", "+0.000", "6"]
    assert line in " ".join(text.split()) and "VERDICT: PASSED (run incomplete: not final)" in text
    d = orjson.loads(render_json(r))
    assert d["errored"] == 8 and d["status"] == "incomplete"
    assert [(x["segment"], x["n"], x["errored"], x["before_errored"]) for x in d["candidates"][0]["rows"]] == [
        ("a", 14, 6, 0), ("b", 19, 1, 1)]
    assert d["candidates"][0]["overall"]["errored"] == 7
    page = render_html(r)
    assert '<td class="errored">6</td>' in page and "8 errored</p>" in page


def test_a_segment_with_only_errored_results_shows_no_rate():
    rows = [R("cand", f"x-{i}", "x", "errored") for i in range(3)]
    r = aggregate(rows, Gating(threshold=0.9, min_cases_per_segment=1))
    row = r.candidates[0].rows[0]
    assert (row.n, row.errored) == (0, 3) and r.status == "incomplete"
    assert "| x | 0 | — | — | — | — | 3 |" in render_markdown(r)


def test_markdown_table_content():
    r = aggregate(results(SEED_001), Gating(threshold=0.85), run_id="run-1", segment_by=["customer"],
                  models={"cand": "gpt-new"})
    md = render_markdown(r)
    assert "| segment | n | before | after | delta | 95% CI after | errored | |" in md
    assert "| refund_flow | 47 | 0.915 | 0.766 | -0.149 | 0.628–0.864 | 0 | ❌ |" in md
    assert "| invoice_parse | 210 | 0.838 | 0.910 | +0.071 |" in md
    assert "| tiny | 6 | 1.000 | 0.500 | -0.500 |" in md and "⚠ low n" in md
    assert "| **mean (weighted)** | **1206** |" in md
    assert "#### candidate cand (gpt-new): failed" in md
    assert "**Verdict: FAILED**" in md and "- segment refund_flow: pass rate 0.766 < threshold 0.85 (n=47)" in md


def test_terminal_table_names_the_failing_segment():
    r = aggregate(results(SEED_001), Gating(threshold=0.85), run_id="run-1", segment_by=["customer"])
    text = render_terminal(r)
    line = next(x for x in text.splitlines() if "refund_flow" in x and "47" in x)
    assert "0.915" in line and "0.766" in line and "-0.149" in line and "❌" in line
    assert "VERDICT: FAILED" in text and "mean (weighted)" in text


def test_json_is_complete():
    r = aggregate(results(SEED_001), Gating(threshold=0.85), run_id="run-1", segment_by=["customer"])
    d = orjson.loads(render_json(r))
    assert d["verdict"] == "failed" and d["run_id"] == "run-1" and d["gating"]["aggregate"] == "min_segment"
    seg = {row["segment"]: row for row in d["candidates"][0]["rows"]}
    assert seg["refund_flow"]["n"] == 47 and seg["refund_flow"]["failing"] is True
    assert seg["tiny"]["low_confidence"] is True and len(seg["refund_flow"]["after_ci"]) == 2


def test_multiple_candidates_get_one_table_each():
    rows = results({"a": (30, 27, 28)}, "c1") + [x for x in results({"a": (30, 27, 20)}, "c2")
                                                 if x.candidate == "c2"]
    r = aggregate(rows, Gating(threshold=0.85))
    assert [c.candidate for c in r.candidates] == ["c1", "c2"]
    assert [c.verdict.passed for c in r.candidates] == [True, False] and not r.passed
    md = render_markdown(r)
    assert md.count("#### candidate") == 2 and "c2: segment a" in md


def test_html_is_self_contained_and_escaped():
    rows = results({"<script>x</script>": (25, 20, 20), **SEED_001})
    page = render_html(aggregate(rows, Gating(threshold=0.85), run_id="r1"))
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "<svg" in page and 'data-segment="refund_flow"' in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    r = aggregate(results(SEED_001), Gating(threshold=0.85), run_id="run-html", segment_by=["customer"])
    page = tmp_path / "report.html"
    page.write_text(render_html(r))
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    dom = out.stdout
    assert out.returncode == 0, out.stderr[-2000:]
    for seg in SEED_001:
        assert f'<tr class="' in dom and f'data-segment="{seg}"><td>{seg}</td>' in dom
    assert '<tr class="failing" data-segment="refund_flow"><td>refund_flow</td><td>47</td><td>0.915</td>' \
           '<td>0.766</td><td>-0.149</td>' in dom
    assert 'class="low-confidence" data-segment="tiny"' in dom
    assert "Gate FAILED" in dom and dom.count('<g class="seg"') == len(SEED_001)


def test_terminal_shows_rich_markup_in_values_as_written():
    """Segment values (customer names), candidate names and models come from traffic and specs: `[/]` must not
    crash the table and `[red]x[/red]` must not restyle it."""
    from rich.console import Console

    rows = results({"[/]": (25, 25, 10), "[red]x[/red]": (25, 25, 25), "acme [bold]": (25, 25, 25)}, "[b]c[/b]")
    r = aggregate(rows, Gating(threshold=0.85, min_cases_per_segment=20), run_id="r-[/]",
                  models={"[b]c[/b]": "[/]model"}, notes=["note [/i] here"], skipped={"no content [/]": 2})
    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    text = render_terminal(r, console)
    shown = console.export_text(clear=False)
    for out in (text, shown):
        assert "candidate [b]c[/b] ([/]model)" in out
        assert any(line.split()[:2] == ["[/]", "25"] for line in out.splitlines())
        assert any(line.split()[:2] == ["[red]x[/red]", "25"] for line in out.splitlines())
        assert "segment [/]: pass rate 0.400 < threshold 0.85 (n=25)" in out
        assert "note: note [/i] here" in out and "2 no content [/]" in out and "run r-[/] (" in out
    styled = console.export_html(inline_styles=True)
    assert "[red]x[/red]" in styled and ">x</span>" not in styled  # shown as written, not as a red "x"
