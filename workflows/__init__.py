"""Workflows: deterministic decisions only; all I/O lives in activities/.

`build_pipeline_workflow` (the nine stages; its state in `pipeline_state`, stage 7 as
older runs wait in `legacy_stage7`) and `build_plan` (a plan's phases in order), with
what they share: `contracts` (every activity's name, input and result, called by
reference; activities/ implements them), `instructions` (an agent's instruction text),
`rounds` (audit rounds and block verdicts), `timings` (where a build's time went),
`failures` (a failed stage in words) and `patches` (every `workflow.patched` id).

May import: the shared contract (vocabulary, policies, models, exceptions), the pure
text cleaning of `taskfiles.visible_text`, and itself: whatever else it imported would
run inside the sandbox or break replay.
"""
