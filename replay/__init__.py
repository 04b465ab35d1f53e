"""tagway's way back in: select a tagged slice of production calls (or a pinned dataset), replay it against
candidate models and prompts through the gateway, score each case, and report and gate per segment.

Faces: `spec` (the replay spec), `slice` and `datasets` (what to replay), `runner` and `pipeline` (running it,
escalation included), `evaluators` (the checks, one registry), `gate/` (the gate's statistics), `report` and
`render` (the paired per-segment report and its four formats), `planning` and `discover` (before and after a run),
`cli` (`tagway replay ...`). Depends on `exporters` only; the gateway is reached over HTTP or as an ASGI app
imported by name at run time.
"""
