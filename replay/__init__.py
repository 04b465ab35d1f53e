"""tagway's way back in: select a tagged slice of production calls (or a pinned dataset), replay it against
candidate models and prompts through the gateway, score each case, and report and gate per segment.

Rooms: `gate/` (the gate's statistics), evaluators, slices and datasets, the runner and pipeline, reports.
Depends on `exporters` only; the gateway is reached over HTTP or as an ASGI app imported by name at run time.
"""
