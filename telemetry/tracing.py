"""The SDK's tracing interceptor, with every span of a build saying which build and stage.

The SDK's spans name the workflow and activity (RunWorkflow:..., StartActivity:<type>,
RunActivity:<type>) and carry Temporal's ids; an operator looking at a trace backend asks
for a build by name and for a stage. These subclasses add both as span attributes
(vocabulary.SPAN_BUILD_NAME, SPAN_BUILD_STAGE): the build name from the workflow's or
activity's input, the stage from the activity type (every stage is run by the activity of
its name). Nothing else is added: inputs carry task tokens and instructions, which never
go into a span.

Imported only when tracing is on (observability._tracing), so a worker without
OTEL_EXPORTER_OTLP_ENDPOINT never loads OpenTelemetry.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import opentelemetry.trace
import temporalio.worker
from opentelemetry.propagators.textmap import CarrierValT
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from temporalio import activity, workflow
from temporalio.contrib.opentelemetry import TracingInterceptor, TracingWorkflowInboundInterceptor

from telemetry.context import bound_build_name
from vocabulary import SPAN_BUILD_NAME, SPAN_BUILD_STAGE, STAGES

_STAGES = frozenset(STAGES)
_WORKFLOW_SPAN_PREFIX = "RunWorkflow:"

# (trace id, span id) the next span gets instead of random ones; see WorkflowRootIds.
_forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "forced_span_ids", default=None)


def _root_span_id(trace_id: int) -> int:
    return int.from_bytes(hashlib.sha256(trace_id.to_bytes(16, "big")).digest()[:8], "big") or 1


# A trace context in header form, as the SDK's tracing interceptor keeps it.
Carrier = dict[str, CarrierValT]


def root_carrier(run_id: str) -> Carrier:
    """The trace context of a workflow run that no traced client started: a trace id from
    the run id, and the span id its RunWorkflow span will have. Derived, not drawn, so a
    replay on any worker finds the same parent for the run's later spans."""
    trace_id = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:16], "big") or 1
    return {"traceparent": f"00-{trace_id:032x}-{_root_span_id(trace_id):016x}-01"}


def _derived_root(carrier: Mapping[str, CarrierValT]) -> tuple[int, int] | None:
    """(trace id, span id) if `carrier` is one root_carrier made, else None."""
    parts = str(carrier.get("traceparent", "")).split("-")
    if len(parts) != 4:
        return None
    try:
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    return (trace_id, span_id) if span_id == _root_span_id(trace_id) else None


class WorkflowRootIds(IdGenerator):
    """Random ids, except for the one RunWorkflow span that must have its derived ids."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_trace_id(self) -> int:
        forced = _forced_ids.get()
        return forced[0] if forced else self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        forced = _forced_ids.get()
        return forced[1] if forced else self._random.generate_span_id()


def build_name_of(args: Sequence[Any]) -> str | None:
    """The build name a workflow's or activity's first argument carries, if any: a model
    with `build_name`, or the JSON object a workflow started by a dispatcher receives."""
    if not args:
        return None
    first = args[0]
    name = first.get("build_name") if isinstance(first, Mapping) else getattr(
        first, "build_name", None)
    return name if isinstance(name, str) and name else None


def build_attributes(build_name: str | None, activity_type: str) -> dict[str, str]:
    attributes = {SPAN_BUILD_NAME: build_name} if build_name else {}
    if activity_type in _STAGES:
        attributes[SPAN_BUILD_STAGE] = activity_type
    return attributes


class BuildWorkflowTracing(TracingWorkflowInboundInterceptor):
    """The workflow's spans (RunWorkflow, StartActivity, signals, queries) with the build's
    name, and the stage on each StartActivity:<stage>."""

    _build_name: str | None = None

    def _load_workflow_context_carrier(self) -> Carrier | None:
        # Without a traced client's context the SDK gives every workflow span a trace of
        # its own; a derived root keeps a run's spans in one trace under RunWorkflow.
        carrier = super()._load_workflow_context_carrier()
        if carrier is None:
            carrier = self._workflow_context_carrier = root_carrier(workflow.info().run_id)
        return carrier

    async def execute_workflow(self, input: temporalio.worker.ExecuteWorkflowInput) -> Any:
        self._build_name = build_name_of(input.args)
        return await super().execute_workflow(input)

    def _completed_span(self, span_name: str, *, additional_attributes: Any = None,
                        **kwargs: Any) -> None:
        # The SDK's one place that makes a workflow span: the name says which activity a
        # StartActivity span starts.
        attributes = dict(additional_attributes or {})
        attributes.update(build_attributes(self._build_name, span_name.partition(":")[2]))
        super()._completed_span(span_name, additional_attributes=attributes, **kwargs)


class _BuildActivityAttributes(temporalio.worker.ActivityInboundInterceptor):
    """Runs inside the SDK's RunActivity span, so the current span is that one."""

    async def execute_activity(self, input: temporalio.worker.ExecuteActivityInput) -> Any:
        span = opentelemetry.trace.get_current_span()
        named = build_name_of(input.args)
        span.set_attributes(build_attributes(named, activity.info().activity_type))
        try:
            return await super().execute_activity(input)
        finally:
            # Legacy argument shapes carry no model; the activity binds its build itself.
            bound = bound_build_name()
            if named is None and bound:
                span.set_attribute(SPAN_BUILD_NAME, bound)


class BuildTracingInterceptor(TracingInterceptor):
    """TracingInterceptor whose workflow and activity spans carry build name and stage."""

    def intercept_activity(self, next: temporalio.worker.ActivityInboundInterceptor
                           ) -> temporalio.worker.ActivityInboundInterceptor:
        return super().intercept_activity(_BuildActivityAttributes(next))

    def _completed_workflow_span(self, params: Any) -> Carrier | None:
        # Runs outside the workflow. The RunWorkflow span of a derived root is that root:
        # made as a trace root with the derived ids, so the run's other spans hang under it.
        root = _derived_root(params.context)
        if root is None or not params.name.startswith(_WORKFLOW_SPAN_PREFIX):
            return super()._completed_workflow_span(params)
        token = _forced_ids.set(root)
        try:
            return super()._completed_workflow_span(dataclasses.replace(params, context={}))
        finally:
            _forced_ids.reset(token)

    def workflow_interceptor_class(self, input: temporalio.worker.WorkflowInterceptorClassInput
                                   ) -> type[TracingWorkflowInboundInterceptor]:
        super().workflow_interceptor_class(input)  # registers the span-making extern
        return BuildWorkflowTracing

