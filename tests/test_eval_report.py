"""The eval run table's title names the dataset version once, whichever way the run stored it."""
from __future__ import annotations

import pytest
from rich.console import Console

from exporters.evals import EvalRun
from replay.evals.report import print_report


@pytest.mark.parametrize("dataset,version,shown", [
    ("refunds", "refunds@4", "on refunds@4:"),  # a stored dataset: its version ref
    ("refunds", "4", "on refunds@4:"),
    ("cases.jsonl", "", "on cases.jsonl:"),  # a file: no version
])
def test_title_names_the_dataset_version_once(dataset, version, shown):
    console = Console(record=True, width=200)
    run = EvalRun("r1", "preview", "complete", dataset, version, ["quality@1"], {"scored": 0})
    print_report(run, [], [], console)
    text = console.export_text()
    assert f"eval run r1 (preview) {shown}" in text and "refunds@refunds" not in text
