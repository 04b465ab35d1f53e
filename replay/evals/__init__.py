"""Evaluators with output schemas, evaluation runs over datasets, and tag rules (seed 002). Faces:

- `schema`: an LLM evaluator's output fields (choices, integer, float, string) -> the judge's JSON schema and the
  pydantic model its answer must fit;
- `rules`: tag rules checked against the schema, which rules an answer meets, and reconciliation as pure functions;
- `definition`: evaluator definitions (YAML), versioned in the store;
- `targets`: a dataset's rows -> messages or sessions to evaluate;
- `judge`: the judge prompt and answer parsing;
- `run`: one evaluation run (full, delta, preview): score, store, reconcile under the tag lock;
- `populate`: a dataset's auto-population followed by a delta run of each evaluator it declares;
- `report`, `cli`: the results with their Applied Tags column; `tagway eval ...`.
Tag state itself (events, current state, locks, audit) lives in exporters.tagstate, shared with the gateway.
"""
