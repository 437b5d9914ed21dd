"""Audit rounds and block verdicts: pure decisions, safe inside workflows.

A re-audit is told the previous round's findings; which of them it reports again is read
by matching findings: by their `id` key when the auditor gives one, else by their text
(whitespace-collapsed, case-folded). A block named in a decision is named by its number
in that decision (1-based, as the notice and get_status list them) or by its `id`.
"""

from __future__ import annotations

from collections.abc import Iterable

from models import AuditRound, BlockDecision, BlockVerdict, Decision, Finding, Tally, Verdict

# The verdict an Update gives the blocks it does not name.
DEFAULT_VERDICTS: dict[Decision, Verdict] = {"approved": "accept", "rejected": "reject",
                                             "changes_requested": "change"}
# Key a flag that became a block carries (the last allowed audit still found it).
ESCALATED_KEY = "unverified_flag"


def finding_id(finding: Finding) -> str | None:
    value = (finding.model_extra or {}).get("id")
    return str(value) if isinstance(value, str | int) and str(value).strip() else None


def finding_key(finding: Finding) -> str:
    ident = finding_id(finding)
    return f"id:{ident}" if ident else "text:" + " ".join(finding.description.split()).casefold()


def match_round(previous: AuditRound, found: Iterable[Finding]) -> None:
    """Fill in which of what `previous` sent to fix the next audit no longer found."""
    again = {finding_key(item) for item in found}
    previous.still_present = [f for f in previous.sent_to_fix if finding_key(f) in again]
    previous.verified_fixed = [f for f in previous.sent_to_fix if finding_key(f) not in again]


def escalate(flags: list[Finding]) -> list[Finding]:
    """Flags of the last allowed audit, as blocks for a person to decide."""
    return [Finding.model_validate({**f.model_dump(), ESCALATED_KEY: True}) for f in flags]


def unknown_keys(blocks: list[Finding], verdicts: dict[str, Verdict]) -> list[str]:
    known = {str(n) for n in range(1, len(blocks) + 1)}
    known |= {ident for ident in (finding_id(b) for b in blocks) if ident}
    return sorted(key for key in verdicts if key not in known)


def block_verdicts(blocks: list[Finding], decision: Decision, choice: BlockDecision,
                   *, round_no: int, decided_by: str) -> list[BlockVerdict]:
    """Every block's verdict: named by number or id, else the Update's own."""
    records = []
    for index, block in enumerate(blocks, start=1):
        ident = finding_id(block)
        verdict = (choice.verdicts.get(str(index))
                   or (choice.verdicts.get(ident) if ident else None)
                   or DEFAULT_VERDICTS[decision])
        records.append(BlockVerdict(
            round=round_no, index=index, block_id=ident, description=block.description,
            verdict=verdict, decided_by=decided_by, source=choice.source,
            claimed_by=choice.claimed_by, note=choice.note))
    return records


def overall(verdicts: Iterable[Verdict], asked: Decision) -> Decision:
    """reject_blocks, or one rejected block, rejects the build; else one block to
    change sends it back; else the blocks are accepted."""
    given = set(verdicts)
    if "reject" in given or asked == "rejected":
        return "rejected"
    return "changes_requested" if "change" in given else "approved"


def file_decision(status_decision: Decision, verdicts: dict[str, Verdict],
                  changes_note: str | None) -> Decision:
    """The Update an originating task's decision goes through: a rejecting status
    rejects; `approved` with a changes note and no verdicts requests changes to every
    block; `approved` otherwise approves, the blocks its verdicts name excepted."""
    if status_decision == "rejected":
        return "rejected"
    if changes_note and not verdicts:
        return "changes_requested"
    return "approved"


def tally(rounds: list[AuditRound], verdicts: list[BlockVerdict]) -> Tally:
    counts = {"accept": 0, "reject": 0, "change": 0}
    for record in verdicts:
        counts[record.verdict] += 1
    flag_fixes = [r for r in rounds if r.sent_to_fix and r.changes_note is None]
    fixed = sum(len(r.verified_fixed) for r in flag_fixes)
    # A flag found again is counted where it is found again (fixed, or made a block);
    # one no later audit looked at stays unverified.
    unchecked = sum(len(r.sent_to_fix) - len(r.verified_fixed) - len(r.still_present)
                    for r in flag_fixes)
    unverified = unchecked + sum(len(r.escalated_to_blocks) for r in rounds)
    return Tally(blocks_accepted=counts["accept"], blocks_rejected=counts["reject"],
                 blocks_changed=counts["change"], reaudits_run=max(len(rounds) - 1, 0),
                 flags_verified_fixed=fixed, flags_unverified=unverified,
                 all_flags_verified_fixed=unverified == 0)
