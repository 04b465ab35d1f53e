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


def test_errored_cases_count_as_not_passed_and_are_marked():
    rows = results({"a": (20, 20, 20)})
    rows[1] = R("cand", "a-0", "a", "errored")
    r = aggregate(rows, Gating(threshold=0.9, min_cases_per_segment=20))
    row = r.candidates[0].rows[0]
    assert row.after_pass == 19 and row.errored == 1
    assert "1 errored" in render_markdown(r)


def test_markdown_table_content():
    r = aggregate(results(SEED_001), Gating(threshold=0.85), run_id="run-1", segment_by=["customer"],
                  models={"cand": "gpt-new"})
    md = render_markdown(r)
    assert "| segment | n | before | after | delta | 95% CI after | |" in md
    assert "| refund_flow | 47 | 0.915 | 0.766 | -0.149 | 0.628–0.864 | ❌ |" in md
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
