"""Pure aggregation into the paired per-segment report (seed 001's numbers), errors as outcomes, each exit code, the
flipped cases, families, and the four renderers."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess

import orjson
import pytest

from replay.gate import SegmentPlan
from replay.render import render_html, render_json, render_markdown, render_terminal
from replay.report import aggregate
from replay.spec import Gating


@dataclasses.dataclass
class R:
    candidate: str
    case_id: str
    segment: str
    status: str
    cost_usd: float = 0.0
    error: str = ""
    output: str = ""
    evaluations: list = dataclasses.field(default_factory=list)


# seed 001: segment -> (n, baseline passes, candidate passes); outcomes nested (a case the candidate passes, the
# baseline passed too), so refund_flow has 7 pass->fail flips and none back
SEED_001 = {"refund_flow": (47, 43, 36), "invoice_parse": (210, 176, 191), "contract_review": (156, 138, 139),
            "escalation_route": (89, 74, 77), "other": (698, 613, 607), "tiny": (6, 6, 3)}


def results(spec: dict[str, tuple[int, int, int]], candidate: str = "cand") -> list[R]:
    out = []
    for seg, (n, before, after) in spec.items():
        for i in range(n):
            cid = f"{seg}-{i:03d}"
            out.append(R("baseline", cid, seg, "passed" if i < before else "failed", output=f"old answer {i}"))
            out.append(R(candidate, cid, seg, "passed" if i < after else "failed", 0.001, output=f"new answer {i}",
                         evaluations=[] if i < after else [{"name": "icontains", "passed": False,
                                                            "reason": "missing ['refund']"}]))
    return out


def test_seed_001_refund_flow_is_a_regression_the_pooled_rate_hides():
    r = aggregate(results(SEED_001), Gating(), inputs={"refund_flow-036": "Where is my refund?"})
    c = r.candidates[0]
    seg = {row.segment: row for row in c.rows}
    refund = seg["refund_flow"]
    assert (refund.n, refund.before_pass, refund.after_pass, refund.pass_fail, refund.fail_pass) == (47, 43, 36, 7, 0)
    assert round(refund.before, 3) == 0.915 and round(refund.after, 3) == 0.766 and round(refund.delta, 3) == -0.149
    # exact one-sided sign test: 7 flips down of 7 -> p = 1/128; Holm across 6 segments -> 6/128 = 0.047 <= 0.05
    assert refund.p_value == pytest.approx(1 / 128) and refund.p_adjusted == pytest.approx(6 / 128)
    assert refund.verdict == "regression" and refund.delta_ci[1] < 0 < refund.delta_ci[1] + 1
    lo, hi = refund.before_ci
    assert (round(lo, 4), round(hi, 4)) == (0.8007, 0.9664)  # Wilson, 43/47
    assert seg["tiny"].verdict == "inconclusive" and seg["tiny"].more_cases > 0  # 6 -> 3 on 6 cases: p = 1/8
    assert seg["invoice_parse"].verdict == "ok" and seg["other"].verdict == "ok"  # -0.009 is within the margin
    assert c.overall.n == 1206 and c.overall.after > c.overall.before  # the pooled rate went up
    assert r.verdict == "regression" and r.exit_code == 1 and c.status == "regression"
    # the wound: the 7 flipped cases, with their input, both answers and the failing check
    assert refund.flips_total == 7 and [f.case_id for f in refund.flips] == [f"refund_flow-{i:03d}" for i in range(36, 43)]
    first = refund.flips[0]
    assert (first.direction, first.input, first.baseline, first.candidate) == (
        "pass->fail", "Where is my refund?", "old answer 36", "new answer 36")
    assert first.reasons == "icontains: missing ['refund']"
    assert not seg["other"].flips  # ok segments list none
    assert any(x.startswith("segment refund_flow: regression: dropped 0.149 > margin 0.05, significant") for x in
               r.reasons)
    assert any(x.startswith("segment tiny: inconclusive:") and "more case(s) would decide it" in x for x in r.reasons)


@pytest.mark.parametrize("gating,status,code", [
    (dict(), "complete", 1),  # regression
    (dict(alpha=0.01), "complete", 0),  # 6/128 > 0.01: refund and tiny inconclusive, which pass by default ...
    (dict(alpha=0.01, inconclusive="block"), "complete", 4),  # ... or block
    (dict(margin=0.2), "complete", 4 - 4),  # no drop beyond 0.2 except tiny's (inconclusive, passes)
    (dict(margin=0.2, inconclusive="block"), "complete", 4),
    (dict(), "incomplete", 3),
])
def test_exit_codes(gating, status, code):
    r = aggregate(results(SEED_001), Gating(**gating), status=status)
    assert r.exit_code == code and r.passed is (code == 0)


def test_errors_fail_by_default_or_are_left_out():
    rows = results({"a": (30, 30, 30)})
    for x in rows[1:20:2]:  # 10 candidate results errored
        x.status, x.error = "errored", "HTTP 503: try again later"
    failed = aggregate(rows, Gating(), run_id="r")
    row = failed.candidates[0].rows[0]
    assert (row.n, row.after_pass, row.errored, row.pass_fail) == (30, 20, 10, 10) and row.verdict == "regression"
    assert failed.status == "complete" and failed.exit_code == 1
    assert row.flips[0].candidate == "[error] HTTP 503: try again later" and row.flips[0].reasons.startswith("error:")
    assert any("10 errored result(s) (cand 10) count as failures (errors: fail)" in x for x in failed.reasons)
    left_out = aggregate(rows, Gating(errors="exclude"), run_id="r")
    row = left_out.candidates[0].rows[0]
    assert (row.n, row.errored, row.excluded, row.verdict) == (20, 10, 10, "ok")
    assert left_out.status == "incomplete" and left_out.exit_code == 3
    assert any("left out (errors: exclude); `tagway replay resume r` retries them" in x for x in left_out.reasons)


def test_an_always_erroring_candidate_fails_the_gate_with_a_clear_message():
    rows = results({"a": (3, 3, 3), "b": (2, 2, 2)})  # too few cases for any significance
    for x in rows:
        if x.candidate == "cand":
            x.status, x.error = "errored", "HTTP 500: upstream exploded"
    for errors in ("fail", "exclude"):
        r = aggregate(rows, Gating(errors=errors), run_id="r")
        assert r.verdict == "regression" and r.candidates[0].status == "regression"
        assert any("candidate cand errored on every one of its 5 case(s)" in x and "HTTP 500: upstream exploded" in x
                   for x in r.reasons)
    assert aggregate(rows, Gating()).exit_code == 1


def test_evaluators_that_score_nothing_block_as_no_evidence_not_as_a_regression():
    """A judge that answers in prose errors on every result, the candidate's and the baseline's alike: the candidate
    answered every case, so the run says the evaluators failed (inconclusive, blocking under either policy, exit 4),
    not that the candidate regressed (exit 1)."""
    rows = results({"a": (20, 20, 20), "b": (20, 20, 20)})
    for x in rows:
        x.status, x.error, x.evaluations = "errored", "llm_judge: no PASS/FAIL verdict in the judge's answer", [
            {"name": "llm_judge", "error": "no PASS/FAIL verdict"}]
    for policy in ("block", "pass"):
        r = aggregate(rows, Gating(inconclusive=policy), run_id="r")
        assert r.candidates[0].status == "inconclusive" and r.verdict == "inconclusive" and r.exit_code == 4, policy
        assert any("evaluators could not score: every one of candidate cand's 40 case(s) was answered but no "
                   "evaluator could score it; fix the evaluators" in x for x in r.reasons), r.reasons


def test_a_segment_no_evaluator_could_score_blocks_as_no_evidence_beside_segments_that_pass():
    """An evaluator that fails on one tenant's inputs (a replay trial's python evaluator raising for globex): that
    segment's every case errored in the evaluators, baseline and candidate alike. Counted as failures it read as "the
    baseline passed none", too thin to judge, and the default gate exited 0 over a segment nobody had scored (its
    candidate was in fact worse there). It blocks now, as a run no evaluator could score does (exit 4), under
    either policy; a regression elsewhere still exits 1."""
    rows = results({"acme": (40, 36, 36), "globex": (45, 40, 20), "initech": (40, 35, 35)})
    for x in rows:
        if x.segment == "globex":
            x.status, x.error, x.evaluations = "errored", "python: KeyError: 'globex'", [
                {"name": "python", "error": "KeyError: 'globex'"}]
    for policy in ("block", "pass"):
        r = aggregate(rows, Gating(inconclusive=policy), run_id="r")
        seg = {row.segment: row for row in r.candidates[0].rows}
        assert (seg["acme"].verdict, seg["initech"].verdict, seg["globex"].verdict) == ("ok", "ok", "inconclusive")
        assert seg["globex"].why.startswith("evaluators could not score: no evaluator could score its cases")
        assert r.verdict == "inconclusive" and r.exit_code == 4, (policy, r.exit_code, r.reasons)
        assert any(x.startswith("evaluators could not score: segment(s) globex of candidate cand were answered but "
                                "no evaluator could score them") and "KeyError: 'globex'" in x for x in r.reasons)
    # the baseline scored there (the evaluator fails on the candidate's answers only): the candidate's doing, not this
    for x in rows:
        if x.segment == "globex" and x.candidate == "baseline":
            x.status, x.error, x.evaluations = "passed", "", []
    assert aggregate(rows, Gating()).exit_code == 1  # 45 pass->fail flips: a regression, as before
    # and with a regression in another segment the run still fails on it
    worse = results({"acme": (40, 36, 20), "globex": (45, 40, 40)})
    for x in worse:
        if x.segment == "globex":
            x.status, x.error, x.evaluations = "errored", "python: boom", [{"name": "python", "error": "boom"}]
    assert aggregate(worse, Gating()).exit_code == 1


def test_a_segment_with_no_scored_pair_is_inconclusive_and_gets_no_bar():
    rows = results({"a": (25, 25, 25), "gone": (3, 3, 3)})
    for x in rows:
        if x.segment == "gone" and x.candidate == "baseline":
            x.status, x.error = "errored", "the production call errored (error)"
    r = aggregate(rows, Gating(errors="exclude"), status="complete")
    gone = next(row for row in r.candidates[0].rows if row.segment == "gone")
    assert (gone.n, gone.verdict, gone.why, gone.before, gone.after) == (0, "inconclusive", "no scored case", None,
                                                                         None)
    page = render_html(r)
    block = page[page.index('<g class="seg" data-segment="gone">'):]
    block = block[:block.index("</g>")]
    assert "no scored case" in block and "<rect" not in block
    assert page.count('<rect class="after"') == 1  # only segment a has a bar


def test_families_pool_their_segments_and_gate_first():
    rows = results({"ent/acme": (20, 20, 10), "ent/globex": (20, 18, 18), "smb/x": (20, 20, 20)})
    r = aggregate(rows, Gating(families={"by": "tier"}), family_of=lambda s: s.split("/")[0])
    c = r.candidates[0]
    fams = {f.segment: f for f in c.families}
    assert fams["ent"].n == 40 and fams["ent"].verdict == "regression" and fams["smb"].verdict == "ok"
    seg = {row.segment: row for row in c.rows}
    assert seg["ent/acme"].verdict == "regression" and seg["ent/acme"].family == "ent"
    assert any(x.startswith("family ent: regression:") for x in r.reasons) and r.exit_code == 1
    md = render_markdown(r)
    assert "| family | n |" in md and "| ent | 40 |" in md


def test_escalation_looks_enter_the_test_with_their_share_of_alpha():
    """Two planned looks (20 then 60 cases): the first may spend (20/60)^3 of alpha, the second the rest; the
    report's p-value is the smallest p_k / w_k and the look count is shown."""
    rows = results({"a": (60, 60, 50)})
    plans = {"a": SegmentPlan([20, 60], taken=2)}
    r = aggregate(rows, Gating(), plans=plans)
    row = r.candidates[0].rows[0]
    assert row.looks == 2 and row.pass_fail == 10
    w2 = 1 - (20 / 60) ** 3
    assert row.p_value == pytest.approx(0.5 ** 10 / w2)  # the first 20 cases had no flip: p_1 = 1
    one = aggregate(rows, Gating())  # no plan: one look at all 60 cases
    assert one.candidates[0].rows[0].p_value == pytest.approx(0.5 ** 10)


def test_multiple_candidates_get_one_table_each():
    rows = results({"a": (30, 27, 28)}, "c1") + [x for x in results({"a": (30, 27, 17)}, "c2")
                                                 if x.candidate == "c2"]
    r = aggregate(rows, Gating())
    assert [c.candidate for c in r.candidates] == ["c1", "c2"]
    assert [c.status for c in r.candidates] == ["ok", "regression"] and r.exit_code == 1
    md = render_markdown(r)
    assert md.count("#### candidate") == 2 and "c2: segment a: regression" in md


def test_markdown_and_json_carry_the_flipped_cases():
    r = aggregate(results(SEED_001), Gating(), run_id="run-1", segment_by=["customer"],
                  production_errors={"count": 12, "included": False})
    md = render_markdown(r)
    assert md.startswith("### tagway replay `run-1`: ❌ gate REGRESSION, exit 1")
    assert "12 errored production call(s) in the slice left out (include_errors: false)" in md
    assert "| refund_flow | 47 | 0.915 | 0.766 | -0.149 |" in md and "| ↓7 ↑0 | 0.047 | ❌ regression |" in md
    assert "Flipped cases in <b>refund_flow</b> (regression: 7 pass→fail, 0 fail→pass; showing 7 of 7)" in md
    assert "| pass->fail | `refund_flow-036` |  | old answer 36 | new answer 36 | icontains: missing ['refund'] |" in md
    d = orjson.loads(render_json(r))
    refund = next(x for x in d["candidates"][0]["rows"] if x["segment"] == "refund_flow")
    assert refund["verdict"] == "regression" and len(refund["flips"]) == 7 and refund["flips"][0]["case_id"]
    assert d["verdict"] == "regression" and d["exit_code"] == 1 and d["gating"]["alpha"] == 0.05
    assert d["production_errors"] == {"count": 12, "included": False} and "findings" not in d["candidates"][0]


def test_terminal_lists_flipped_cases_and_shows_rich_markup_as_written():
    """Segment values (customer names), candidate names, models and answers come from traffic and specs: `[/]`
    must not crash the table and `[red]x[/red]` must not restyle it."""
    from rich.console import Console

    rows = results({"[/]": (25, 25, 10), "[red]x[/red]": (25, 25, 25), "acme [bold]": (25, 25, 25)}, "[b]c[/b]")
    for x in rows:
        if x.candidate != "baseline" and x.status == "failed":
            x.output = "[red]no[/red]"
    r = aggregate(rows, Gating(), run_id="r-[/]", models={"[b]c[/b]": "[/]model"}, notes=["note [/i] here"],
                  skipped={"no content [/]": 2})
    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    text = render_terminal(r, console)
    shown = console.export_text(clear=False)
    for out in (text, shown):
        assert "candidate [b]c[/b] ([/]model)" in out
        assert any(line.split()[:2] == ["[/]", "25"] for line in out.splitlines())
        assert any(line.split()[:2] == ["[red]x[/red]", "25"] for line in out.splitlines())
        assert "flipped cases in [/] (regression: 15 pass->fail, 0 fail->pass; showing 10 of 15):" in out
        assert "    candidate: [red]no[/red]" in out
        assert "segment [/]: regression" in out and "VERDICT: REGRESSION (exit 1)" in out
        assert "note: note [/i] here" in out and "2 no content [/]" in out and "run r-[/] (" in out
    styled = console.export_html(inline_styles=True)
    assert "[red]x[/red]" in styled and ">x</span>" not in styled  # shown as written, not as a red "x"


def test_terminal_report_at_80_columns_keeps_numbers_whole():
    """A narrow terminal leaves whole columns out (and says which) instead of cutting numbers; a long segment
    folds onto more lines with every character kept; the fail mark is ✗, which terminal fonts have."""
    from rich.console import Console

    def at_80(r) -> list[str]:
        console = Console(record=True, width=80, force_terminal=True, color_system=None)
        render_terminal(r, console)
        lines = console.export_text().splitlines()
        assert max(len(x) for x in lines) <= 80
        return lines

    lines = at_80(aggregate(results(SEED_001), Gating(), run_id="run-1"))
    line = next(x for x in lines if x.split()[:1] == ["refund_flow"])
    assert line.split()[:6] == ["refund_flow", "47", "0.915", "0.766", "-0.149", "↓7"] and "✗ regression" in line
    assert not [x for x in lines if "❌" in x]
    notice = " ".join(x.strip() for x in lines[next(i for i, x in enumerate(lines) if x.startswith("not shown")):][:2])
    assert notice.startswith("not shown at 80 columns: 95% CI delta, p adj, errored (--format md")

    long = "customer=acme-corporation-international-holdings / intent=refund_escalation"
    lines = at_80(aggregate(results({long: (30, 10, 30), "short": (30, 30, 30)}), Gating(), run_id="run-2"))
    first = next(x for x in lines if x.lstrip().startswith("customer=acme"))
    assert first.split()[1:5] == ["30", "0.333", "1.000", "+0.667"]
    seg_width = first.index(" 30 ")
    at = lines.index(first)
    parts = [first[:seg_width]]
    for x in lines[at + 1:]:
        if x[seg_width:].strip():  # the next row
            break
        parts.append(x)
    assert "".join("".join(parts).split()) == "".join(long.split())  # every character of it is there


def test_terminal_report_is_plain_ascii_on_a_non_utf8_terminal():
    import io

    from rich.console import Console

    r = aggregate(results(SEED_001), Gating(), run_id="run-1")
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")  # any non-ASCII character would raise here
    render_terminal(r, Console(file=out, width=160, force_terminal=True, color_system=None))
    out.flush()
    text = raw.getvalue().decode("ascii")
    line = next(x for x in text.splitlines() if "refund_flow" in x and "47" in x)
    assert "0.766" in line and "v7 ^0" in line and "X regression" in line and "-0.272 .. -0.038" in line
    assert "VERDICT: REGRESSION" in text and "pass->fail" in text


def test_html_is_self_contained_and_escaped():
    rows = results({"<script>x</script>": (25, 20, 20), **SEED_001})
    for x in rows:
        if x.segment == "refund_flow" and x.candidate == "cand":
            x.output = "<img src=x onerror=alert(1)>"
    page = render_html(aggregate(rows, Gating(), run_id="r1", inputs={"refund_flow-036": "<b>refund</b>"}))
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;b&gt;refund&lt;/b&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "<svg" in page and 'data-segment="refund_flow"' in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    r = aggregate(results(SEED_001), Gating(), run_id="run-html", segment_by=["customer"])
    page = tmp_path / "report.html"
    page.write_text(render_html(r))
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    dom = out.stdout
    assert out.returncode == 0, out.stderr[-2000:]
    for seg in SEED_001:
        assert f'data-segment="{seg}"><td>{seg}</td>' in dom
    assert '<tr class="regression" data-segment="refund_flow"><td>refund_flow</td><td>47</td><td>0.915</td>' \
           '<td>0.766</td><td>-0.149</td>' in dom
    assert '<tr class="inconclusive" data-segment="tiny">' in dom
    assert "gate REGRESSION, exit 1" in dom and dom.count('<g class="seg"') == len(SEED_001)
    assert dom.count('<tr class="flip"') == 7 + 3  # refund_flow's 7 and tiny's 3


def test_no_candidate_result_is_inconclusive_and_never_passes():
    """A run that replayed nothing (the gateway refused the key at the first call, say) has no evidence either way:
    inconclusive, not "regression", and it blocks even where inconclusive segments are let through."""
    from replay.gate import EXIT_INCOMPLETE, EXIT_INCONCLUSIVE  # noqa: PLC0415
    for inconclusive in ("block", "pass"):
        r = aggregate([], Gating(inconclusive=inconclusive), run_id="r")
        assert (r.verdict, r.exit_code) == ("inconclusive", EXIT_INCONCLUSIVE)
        assert "no candidate result: nothing to gate on" in r.reasons
    stopped = aggregate([], Gating(), run_id="r", status="incomplete")
    assert (stopped.verdict, stopped.exit_code) == ("inconclusive", EXIT_INCOMPLETE)


def test_the_header_names_how_cases_are_segmented():
    """A slice's keys, or a dataset's own segments (a dataset run's segment_by is ["segment"]: it read 'segments by
    segment')."""
    from replay.render import render_github  # noqa: PLC0415

    sliced = aggregate(results(SEED_001), Gating(), run_id="r1", segment_by=["intent"])
    fixed = aggregate(results(SEED_001), Gating(), run_id="r2", segment_by=["segment"], dataset="refunds@3")
    assert "segments by intent" in render_markdown(sliced) and "segments by intent" in render_github(sliced)
    for text in (render_markdown(fixed), render_github(fixed)):
        assert "the dataset's segments" in text and "segments by segment" not in text


def test_every_renderer_prints_a_small_cost_as_it_is():
    """30 cases at $0.00000137 a call: $0.000041, never the $0.0000 a model without a price also showed; a
    dollar up in cents. JSON keeps the exact sum."""
    from rich.console import Console

    def report(per_call: float):
        rows = results({"a": (30, 27, 28)})
        for x in rows:
            if x.candidate != "baseline":
                x.cost_usd = per_call
        return aggregate(rows, Gating(), run_id="run-cost")

    small, large = report(0.00000137), report(0.4115)
    assert render_terminal(small, Console(record=True, width=160)).count("cost $0.000041   OK") == 1
    assert "\ncost $0.000041\n" in render_markdown(small)
    assert '<p class="muted">cost $0.000041</p>' in render_html(small)
    assert orjson.loads(render_json(small))["candidates"][0]["cost_usd"] == pytest.approx(30 * 0.00000137)
    assert "cost $12.35   OK" in render_terminal(large, Console(record=True, width=160))
    assert "\ncost $12.35\n" in render_markdown(large) and "cost $12.35</p>" in render_html(large)


def test_an_incomplete_run_never_reads_as_a_pass():
    """A run stopped midway (its budget, an interruption, the gateway gone) whose finished cases show no drop said
    `gate PASSED (run incomplete: not final)` and `"verdict": "passed"`, which reads as a pass. Its verdict is
    `incomplete` in every format; what the finished cases did show (a regression) is still said."""
    from replay.render import render_github  # noqa: PLC0415

    stopped = aggregate(results({"a": (40, 36, 36)}), Gating(), run_id="r", status="incomplete")
    assert (stopped.verdict, stopped.exit_code, stopped.passed) == ("incomplete", 3, False)
    assert orjson.loads(render_json(stopped))["verdict"] == "incomplete"
    for text in (render_terminal(stopped), render_markdown(stopped), render_github(stopped), render_html(stopped)):
        assert "INCOMPLETE" in text and "PASSED" not in text
    assert "gate INCOMPLETE, exit 3" in render_markdown(stopped)
    found = aggregate(results(SEED_001), Gating(), run_id="r", status="incomplete")
    assert (found.verdict, found.exit_code) == ("regression", 3)
    assert "gate REGRESSION (run incomplete: not final), exit 3" in render_markdown(found)
