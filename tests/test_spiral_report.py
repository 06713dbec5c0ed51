"""The spiral's state folded from events, its live view and its report."""

from __future__ import annotations

import json
import os
import re
import time

from prometheus_server import wait_until
from rich.console import Console

from dpe.config import child_env, secret_env, write_config
from dpe.events import (
    AcceptedSample,
    BlobRef,
    CapabilityWeakness,
    Checkpoint,
    EvalOutcome,
    Event,
    FailureType,
    FailureTypes,
    QCVerdict,
    QuotaPlan,
    RejectedSample,
    SampleBody,
    WeaknessSnapshot,
)
from dpe.settings import Settings
from dpe.spiral.report import write_report
from dpe.spiral.run import SpiralOptions, run_settings
from dpe.spiral.state import SpiralState
from dpe.spiral.view import RoundLog, StallLog, render_view, rounds_table
from dpe.supervisor import ServiceSpec, Supervisor

BLOB = BlobRef(sha256="c" * 64, media_type="image/png", size_bytes=9, width=8, height=8)


def heldout(version: int, item: str, capability: str, correct: bool) -> EvalOutcome:
    return EvalOutcome(policy_version=version, suite="heldout", item_id=item, capability=capability,
                       answer_type="yes_no", expected="yes", predicted="no", correct=correct, score=float(correct))


def accepted(sample_id: str, capability: str) -> AcceptedSample:
    body = SampleBody(image=BLOB, question="q?", answer="yes", answer_type="yes_no")
    return AcceptedSample(sample_id=sample_id, capability=capability, body=body, source_item_id="i", plan_id="p",
                          agents=[], qc=[QCVerdict(check="schema", passed=True, reason_code="ok")], policy_version=0)


def snapshot(version: int, rates: dict[str, float]) -> WeaknessSnapshot:
    caps = {c: CapabilityWeakness(error_rate=r, effective_n=10, ci_low=max(0, r - .1), ci_high=min(1, r + .1), events=10)
            for c, r in rates.items()}
    return WeaknessSnapshot(seq=version, policy_version=version, capabilities=caps, events_total=20)


def plan(version: int, quotas: dict[str, int]) -> QuotaPlan:
    return QuotaPlan(round=version, strategy="dpe_step", budget=sum(quotas.values()), quotas=quotas,
                     weights={c: 1.0 for c in quotas}, snapshot_id="s", policy_version=version)


def timeline() -> list[Event]:
    """Two rounds as the topics tell them, duplicates and another suite included."""
    return [
        heldout(0, "a", "counting", False), heldout(0, "b", "counting", True), heldout(0, "c", "color", True),
        heldout(0, "d", "color", True), heldout(0, "e", "counting", False),
        heldout(0, "diag-only", "counting", True).model_copy(update={"suite": "diagnostic"}),
        snapshot(0, {"counting": 0.7, "color": 0.1}), plan(0, {"counting": 6, "color": 2}),
        accepted("s1", "counting"), accepted("s1", "counting"), accepted("s2", "color"),
        Checkpoint(policy_version=1, parent_version=0, uri="/c/1", sample_ids=["s1", "s2"], metrics={"reward_mean": 0.4}),
        heldout(1, "a", "counting", True), heldout(1, "b", "counting", True), heldout(1, "e", "counting", False),
        heldout(1, "c", "color", True), heldout(1, "c", "color", True),
        snapshot(1, {"counting": 0.4, "color": 0.1}), plan(1, {"counting": 5, "color": 3}),
        tally(1, {"counting/all/original/too_high": 2}),
        tally(1, {"counting/all/original/too_high": 3, "color/any/mirror/ignores_edit": 1}),
    ]


def tally(policy_version: int, counts: dict[str, int]) -> FailureTypes:
    """The auditor's failure-type tally of a version (no exemplars)."""
    return FailureTypes(policy_version=policy_version, audited_probes=20, types={
        name: FailureType(capability=name.split("/")[0], count=count, exemplars=[]) for name, count in counts.items()})


def folded() -> SpiralState:
    state = SpiralState(heldout_suite="heldout")
    for event in timeline():
        state.apply(event)
    return state


def test_state_counts_duplicates_once_and_ignores_other_suites():
    state = folded()
    assert state.accepted == 2 and dict(state.accepted_by_capability) == {"counting": 1, "color": 1}
    assert state.heldout_accuracy(0) == {"color": 1.0, "counting": 1 / 3}
    assert state.heldout_accuracy(1) == {"color": 1.0, "counting": 2 / 3}
    assert state.policy_version == 1


def test_rounds_link_versions_to_their_plan_weakness_and_training():
    rounds = folded().rounds()
    assert [r.policy_version for r in rounds] == [0, 1]
    assert rounds[0].quota_plan == {"color": 2, "counting": 6} and rounds[0].weakness["counting"] == 0.7
    assert rounds[1].samples_trained == 2 and rounds[1].trainer_metrics == {"reward_mean": 0.4}
    assert rounds[1].weakness["counting"] == 0.4 and rounds[1].heldout_items == 4
    assert rounds[1].heldout_items_by_capability == {"color": 1, "counting": 3}
    assert rounds[1].samples_trained_by_capability == {"color": 1, "counting": 1}
    assert rounds[0].failure_types == {}, "the base: nothing audited"
    assert rounds[1].failure_types == {"color/any/mirror/ignores_edit": 1, "counting/all/original/too_high": 3}, \
        "the newest tally of a version is its tally"
    resumed = SpiralState.from_json(json.loads(json.dumps(folded().to_json())))
    assert resumed.rounds()[1].failure_types == rounds[1].failure_types


def test_trained_samples_are_counted_by_capability_whichever_event_comes_first_and_survive_a_resume():
    state = SpiralState()
    events = [accepted("s1", "counting"),
              Checkpoint(policy_version=1, parent_version=0, uri="/c/1", sample_ids=["s1", "s2", "s3"]),
              accepted("s2", "color"), accepted("s3", "color"), accepted("s3", "color"),
              Checkpoint(policy_version=1, parent_version=0, uri="/c/1", sample_ids=["s1", "s2", "s3"]),
              accepted("s4", "chart")]
    for event in events:
        state.apply(event)
    assert state.rounds()[1].samples_trained_by_capability == {"color": 2, "counting": 1}
    resumed = SpiralState.from_json(json.loads(json.dumps(state.to_json())))
    assert resumed.rounds()[1].samples_trained_by_capability == {"color": 2, "counting": 1}
    resumed.apply(Checkpoint(policy_version=2, parent_version=1, uri="/c/2", sample_ids=["s4", "s5"]))
    resumed = SpiralState.from_json(json.loads(json.dumps(resumed.to_json())))
    resumed.apply(accepted("s5", "color"))
    assert resumed.rounds()[2].samples_trained_by_capability == {"chart": 1, "color": 1}, \
        "accepted before a stop, trained after it, and the other way round"


def test_rejections_are_counted_by_reason_once_and_samples_by_origin():
    state = SpiralState()
    rejection = RejectedSample(candidate_id="x", capability="color", source_item_id="i", plan_id="p",
                               qc=[QCVerdict(check="dedup", passed=False, reason_code="near_duplicate")],
                               reason_code="near_duplicate")
    state.apply(rejection)
    state.apply(rejection)
    state.apply(rejection.model_copy(update={"candidate_id": "y", "origin": "audit", "divergence_id": "1/i/p"}))
    state.apply(accepted("s9", "color").model_copy(update={"origin": "audit", "divergence_id": "1/j/p"}))
    assert dict(state.rejected_by_reason) == {"near_duplicate": 2}
    assert state.by_origin == {"accepted": {"audit": 1}, "rejected": {"agents": 1, "audit": 1}}
    assert SpiralState.from_json(json.loads(json.dumps(state.to_json()))).by_origin == state.by_origin


def test_live_view_shows_every_capability_and_the_change_from_base():
    console = Console(record=True, width=140)
    console.print(render_view(folded(), target_rounds=3, services={"trainer": "running"}, elapsed_s=12))
    text = console.export_text()
    assert "round 1/3" in text and "trainer: running" in text
    assert re.search(r"counting .*0\.40.*\+0\.33", text), text


def test_report_writes_summary_and_plots(tmp_path):
    summary_path, report_path = write_report(tmp_path / "run", folded().rounds(), meta={"run_id": "r1", "strategy": "dpe_step"})
    summary = json.loads(summary_path.read_text())
    assert summary["run_id"] == "r1" and [r["policy_version"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["heldout_accuracy"]["counting"] == 2 / 3
    page = report_path.read_text()
    assert page.count("data:image/png;base64,") == 4, "weakness, quotas, held-out accuracy, failure types"
    assert "<td>0.67</td>" in page


def test_a_stall_is_said_in_words_in_the_view_once_in_the_log_and_in_the_report(tmp_path):
    """No new policy version for `after_s` while accepted samples wait: the trainer is the one stuck."""
    state = folded()
    stalls = StallLog(after_s=600)
    state.apply(accepted("waiting", "counting"))
    assert stalls.update(state) is None and stalls.current is None, "the spiral is moving"
    later = time.monotonic() + 1200
    began = stalls.update(state, now=later)
    assert began == ("stalled: no new policy version for 20 min while 1 accepted samples wait for the trainer "
                     "(see its log)")
    assert stalls.update(state, now=later + 60) is None and len(stalls.seen) == 1, "one line per stall, not per tick"
    console = Console(record=True, width=200)
    console.print(render_view(state, target_rounds=3, services={}, elapsed_s=1300, stall=stalls.current))
    assert "stalled: no new policy version for 21 min" in console.export_text()
    state.apply(Checkpoint(policy_version=2, parent_version=1, uri="/c/2", sample_ids=["waiting"]))
    assert stalls.update(state) is None and stalls.current is None, "a new version ends the stall"
    _, report = write_report(tmp_path / "run", state.rounds(), meta={"run_id": "r1", "stalls": stalls.seen})
    assert '<ul class="stalls"><li>stalled: no new policy version for 20 min' in report.read_text()


def test_final_table_has_accuracy_per_version_and_the_change():
    console = Console(record=True, width=140)
    console.print(rounds_table(folded().rounds(), title="run r1"))
    text = console.export_text()
    assert re.search(r"counting\s+│\s+0\.33\s+│\s+0\.67\s+│\s+\+0\.33", text), text
    assert re.search(r"samples trained\s+│\s+0\s+│\s+2", text), text


def test_a_run_aligns_the_quota_budget_the_trainer_round_and_the_diagnosis(tmp_path):
    settings = Settings.load(overrides={"agents": {"llm": {"api_key": "sk-secret"}}})
    options = SpiralOptions(round_samples=48, strategy="uniform", runs_dir=tmp_path, run_id="r")
    configured = run_settings(settings, options, "127.0.0.1:9092", tmp_path / "model")
    assert configured.stream.quotas.budget == configured.trainer.rounds.max_samples == 48
    assert configured.stream.quotas.strategy == "uniform"
    assert configured.stream.quotas.round_evidence == configured.evaluator.synthetic.round_items
    assert configured.evaluator.synthetic.heldout_suite in configured.stream.scoring.measure_only_suites
    assert configured.agents.llm.api_key.get_secret_value() == "sk-secret"
    agents = json.loads(secret_env(configured)["DPE_AGENTS"])
    assert agents["llm"]["api_key"] == "sk-secret", "child services get secrets by env"


def test_unattended_run_logs_each_round_once_when_its_heldout_suite_is_graded():
    state, log, lines = SpiralState(heldout_suite="heldout"), RoundLog(heldout_items=4), []
    for event in timeline():
        state.apply(event)
        lines += log.new_lines(state)
    assert lines == [
        "policy v0: 0 samples trained, held-out mean accuracy 0.750 on 4 items, plan –",
        ("policy v1: 2 samples trained, held-out mean accuracy 0.833 (+0.167 since v0) on 4 items, "
         "plan dpe_step (color 2, counting 6)"),
    ]
    assert log.new_lines(state) == []


def test_the_supervisor_reports_each_restart_with_the_exit_code(tmp_path):
    restarts = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPE_")}
    supervisor = Supervisor(env=env, log_dir=tmp_path, max_restarts=1, on_restart=restarts.append)
    supervisor.start(ServiceSpec("broken", ["no-such-command"]))
    deadline = time.monotonic() + 60
    try:
        while not supervisor.check() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        supervisor.stop()
    assert [str(restart) for restart in restarts] == ["service broken exited with code 2; restart 1 of 1 within 10 min"]


def test_the_supervisor_gives_up_on_a_crash_loop_but_not_on_crashes_far_apart(tmp_path):
    clock = [0.0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPE_")}
    supervisor = Supervisor(env=env, log_dir=tmp_path, max_restarts=2, window_s=600, clock=lambda: clock[0])
    supervisor.start(ServiceSpec("broken", ["no-such-command"]))

    def crash_and_check(at: float) -> list[str]:
        wait_until(lambda: supervisor.status()["broken"].startswith("exited"), 30, "the service to crash")
        clock[0] = at
        return supervisor.check()

    try:
        verdicts = [crash_and_check(at) for at in (10, 700, 1400, 1410, 1420)]
    finally:
        supervisor.stop()
    assert verdicts == [[], [], [], [], ["broken"]], "crashes 11 min apart never add up; 3 within 10 min do"


SECRETS = {
    "agents": {"llm": {"api_key": "sk-agents-llm"}},
    "auditor": {"references": [
        {"kind": "toolchain", "name": "regions", "toolchain": "regions"},
        {"kind": "endpoint", "name": "big", "endpoint": {"base_url": "http://vllm:8000/v1", "model": "m",
                                                         "api_key": "sk-reference"}},
    ]},
    "evaluator": {"judge": {"base_url": "http://judge:8000/v1", "model": "j", "api_key": "sk-judge"}},
    "kafka": {"sasl_password": "sk-kafka"},
}


def test_the_run_config_holds_no_secret_and_services_get_every_secret_by_environment(tmp_path, monkeypatch):
    settings = Settings.load(overrides=SECRETS)
    path = tmp_path / "config.yaml"
    write_config(settings, path)
    written = path.read_text()
    assert "sk-" not in written and "api_key" not in written and "sasl_password:" not in written
    assert "http://vllm:8000/v1" in written, "everything else is written"

    for name in [name for name in os.environ if name.startswith("DPE_")]:
        monkeypatch.delenv(name)
    for name, value in child_env(path, settings).items():
        monkeypatch.setenv(name, value)
    child = Settings.load()
    assert child.auditor.references[1].endpoint.api_key.get_secret_value() == "sk-reference"
    assert child.agents.llm.api_key.get_secret_value() == "sk-agents-llm"
    assert child.evaluator.judge.api_key.get_secret_value() == "sk-judge"
    assert child.kafka.sasl_password.get_secret_value() == "sk-kafka"
    assert child.model_dump(mode="json") == settings.model_dump(mode="json"), "a service sees the run's settings"

