"""controller/kube/status.py: what Kubernetes sees of a pod, from the agent's report."""

import pytest

from controller.kube.status import PodReport, Terminated, matches, pod_status


def report(**kw):
    return PodReport(container="app", image="img:1", node_address="10.0.0.5", started_at="2026-12-01T10:00:00Z", **kw)


STATES = [
    # report fields, phase, Ready, container state key, ready flag
    (dict(ready=True, running_since="2026-12-01T10:00:01Z"), "Running", "True", "running", True),
    (dict(ready=False, waiting=("ErrImageNeverPull", "not on the node")), "Pending", "False", "waiting", False),
    (dict(ready=False, waiting=("CrashLoopBackOff", "keeps exiting"), restarts=2, running_since="x"), "Running",
     "False", "waiting", False),
    (dict(ready=False, running_since="2026-12-01T10:00:01Z"), "Running", "False", "running", False),  # node stopping
]


@pytest.mark.parametrize("fields,phase,ready,state,flag", STATES)
def test_pod_status(fields, phase, ready, state, flag):
    r = report(**fields)
    status = pod_status(r)
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    container = status["containerStatuses"][0]
    assert status["phase"] == phase and conditions["Ready"] == ready == conditions["ContainersReady"]
    assert conditions["PodScheduled"] == conditions["Initialized"] == "True"
    assert list(container["state"]) == [state] and container["ready"] is flag
    assert status["podIP"] == status["hostIP"] == "10.0.0.5" and status["podIPs"] == [{"ip": "10.0.0.5"}]
    assert matches(status, r)


def test_a_condition_keeps_its_transition_time_until_it_changes():
    r = report(ready=True)
    first = {c["type"]: c["lastTransitionTime"] for c in pod_status(r)["conditions"]}
    r.transitions["Ready"] = ("True", "2026-01-01T00:00:00Z")
    again = {c["type"]: c["lastTransitionTime"] for c in pod_status(r)["conditions"]}
    assert again["Ready"] == "2026-01-01T00:00:00Z" and again["PodScheduled"] == first["PodScheduled"]
    r.ready = False
    assert {c["type"]: c["lastTransitionTime"] for c in pod_status(r)["conditions"]}["Ready"] != "2026-01-01T00:00:00Z"


def test_the_last_run_and_restarts_are_reported():
    r = report(ready=True, restarts=1, last=Terminated(exit_code=137, reason="Error", started_at="a", finished_at="b"))
    container = pod_status(r)["containerStatuses"][0]
    assert container["restartCount"] == 1
    assert container["lastState"]["terminated"] == {"exitCode": 137, "reason": "Error", "startedAt": "a", "finishedAt": "b"}


def test_a_status_written_by_someone_else_does_not_match():
    r = report(ready=True)
    status = pod_status(r)
    status["conditions"] = [{"type": "Ready", "status": "False"}]  # the node lifecycle controller's doing
    assert not matches(status, r)
