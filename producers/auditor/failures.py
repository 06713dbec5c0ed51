"""Failure types (AuditDM): each divergence named by what was asked, how the image was changed, and how the target
answered against the references' consensus; tallied per policy version with a few exemplars.

A name is ``capability/kind/edit/pattern``:

- ``kind``: the world's kind of question (`dpe.world.question_kind`, e.g. a colour-filtered count), ``any`` for
  questions of another kind or capabilities with one kind;
- ``edit``: ``original`` for the item's own image, else the counterfactual's edit (``mirror``, ``remove``,
  ``grayscale``...);
- ``pattern``: ``no_answer`` (nothing usable), ``ignores_edit`` (on a counterfactual the target repeats its answer
  to the original although the references' answer changed), ``too_high`` / ``too_low`` (numbers), ``false_yes`` /
  ``false_no``, ``wrong_option``, ``wrong_text``.

Example:
    >>> from producers.auditor.probes import Probe
    >>> probe = Probe("p", "counting", "How many red shapes are in the image?", "number")
    >>> failure_type(probe, "3", "2", edit="remove")
    'counting/color/remove/too_high'
    >>> failure_type(Probe("q", "existence", "Is there a red square in the image?", "yes_no"), "yes", "no", "original")
    'existence/absent/original/false_yes'
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from dpe.events import Divergence, FailedItem, FailureType, FailureTypes
from dpe.grading import parse_number
from dpe.world import question_kind
from producers.auditor.probes import Probe

MAX_EXEMPLARS = 3
"""Exemplars kept per failure type."""
ORIGINAL = "original"


def edit_name(view_id: str) -> str:
    """The edit of a view by its id: ``original``, or the counterfactual's key without its object.

    >>> edit_name("abc"), edit_name("abc/cf/mirror"), edit_name("abc/cf/remove-blue-square")
    ('original', 'mirror', 'remove')
    """
    if "/cf/" not in view_id:
        return ORIGINAL
    return view_id.rsplit("/cf/", 1)[1].split("-", 1)[0]


def answer_pattern(probe: Probe, target: str | None, consensus: str) -> str:
    """How a canonical target answer (None: none usable) differs from the consensus, by answer type.

    >>> probe = Probe("p", "chart", "What is the value of bar B?", "number")
    >>> answer_pattern(probe, None, "4"), answer_pattern(probe, "2", "4"), answer_pattern(probe, "5", "4")
    ('no_answer', 'too_low', 'too_high')
    """
    if target is None:
        return "no_answer"
    if probe.answer_type == "number":
        given, expected = parse_number(target), parse_number(consensus)
        if given is not None and expected is not None:
            return "too_high" if given > expected else "too_low"
    if probe.answer_type == "yes_no":
        return f"false_{target}"
    if probe.answer_type == "choice":
        return "wrong_option"
    return "wrong_text"


def failure_type(probe: Probe, target: str | None, consensus: str, edit: str, ignores_edit: bool = False) -> str:
    """The name of one divergence's failure type (see the module docstring)."""
    kind = question_kind(probe.capability, probe.question, consensus) or "any"
    pattern = "ignores_edit" if ignores_edit else answer_pattern(probe, target, consensus)
    return f"{probe.capability}/{kind}/{edit}/{pattern}"


class FailureTally:
    """Divergences by failure type for the current target version, with up to `MAX_EXEMPLARS` exemplars each.

    >>> tally = FailureTally()
    >>> tally.changed, tally.event(producer="auditor") is None
    (False, True)
    """

    def __init__(self) -> None:
        self._start(None)

    def _start(self, policy_version: int | None) -> None:
        """An empty tally of `policy_version`."""
        self.policy_version = policy_version
        self.audited = 0
        self.counts: dict[str, int] = defaultdict(int)
        self.capability: dict[str, str] = {}
        self.exemplars: dict[str, list[FailedItem]] = defaultdict(list)
        self.changed = False

    def add(self, verdicts: Sequence[Divergence]) -> None:
        """Count an audited item's verdicts (a newer policy version starts a new tally)."""
        for verdict in verdicts:
            if verdict.policy_version != self.policy_version:
                self._start(verdict.policy_version)
            self.audited += 1
            self.changed = True
            if not verdict.diverged or verdict.failure_type is None:
                continue
            name = verdict.failure_type
            self.counts[name] += 1
            self.capability[name] = verdict.capability
            if len(self.exemplars[name]) < MAX_EXEMPLARS:
                self.exemplars[name].append(FailedItem(
                    item_id=verdict.item_id, suite="audit", image=verdict.image, question=verdict.question,
                    expected=verdict.consensus_answer, given=verdict.target_answer, reason=name))

    def event(self, producer: str) -> FailureTypes | None:
        """The tally as an event (None before any verdict); marks it published."""
        if self.policy_version is None:
            return None
        self.changed = False
        types = {name: FailureType(capability=self.capability[name], count=count, exemplars=self.exemplars[name])
                 for name, count in sorted(self.counts.items())}
        return FailureTypes(producer=producer, policy_version=self.policy_version, audited_probes=self.audited,
                            types=types)
