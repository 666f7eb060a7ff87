"""bench/: every scenario in its tiny mode, end to end, and the shape and sanity of what it writes."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import PURE, ROOT

# The tiny run of every scenario (a Kubernetes control plane and a kubelet among them) is set up by the
# first test that asks for it, and takes longer than pytest-timeout's default for one test.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # The Kubernetes scenario measures no parser: the pure-Python run leaves it to the C build's.
    skip = ["--skip", "k8s", "--pure-python"] if PURE else []
    result = subprocess.run([sys.executable, "-m", "bench", "all", "--tiny", "--out", str(out), *skip], cwd=ROOT,
                            capture_output=True, text=True, timeout=1150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("all-*.json")
    return out, json.loads(path.read_text()), result.stdout


def test_machine_is_described(tiny_run):
    _, results, _ = tiny_run
    machine = results["machine"]
    assert machine["parser"] == ("python" if PURE else "c") and machine["wakegate"].startswith("wakegate ")
    assert machine["cores"] >= 2 and machine["cpu"] and machine["python"]
    assert "nginx" in machine["nginx"] and "HAProxy" in machine["haproxy"]


def test_steady_compares_four_targets(tiny_run):
    _, results, _ = tiny_run
    (case,) = results["sections"]["steady"]["cases"]
    assert set(case["targets"]) == {"direct", "wakegate", "nginx", "haproxy"}
    for name, t in case["targets"].items():
        assert t["rps"] > 100, name
        assert 0 < t["p50"] <= t["p75"] <= t["p90"] <= t["p99"] < 5, name
        assert t["errors"] == 0, name
    assert set(case["wakegate_vs"]) == {"nginx", "haproxy", "direct"}
    assert 0 < case["wakegate_vs"]["nginx"]["rps"] < 10


def test_wake_measures_every_mode_against_its_baseline(tiny_run):
    from bench.wake import WAKE_MODES

    _, results, stdout = tiny_run
    section = results["sections"]["wake"]
    modes = {m["mode"]: m for m in section["modes"]}
    assert not section["not_measured"] and set(modes) == {m.name for m in WAKE_MODES}
    for mode in WAKE_MODES:
        m = modes[mode.name]
        assert m["first_request"]["n"] == (2 if mode.slow_cycles else 3), mode.name
        assert m["first_request"]["p50"] > m["awake"]["p50"] > 0, mode.name
        assert m["backend_resume"]["p50"] > 0 and m["readiness_wait"]["p50"] > 0, mode.name
        assert 0 < m["wakegate_own"]["p50"] < m["first_request"]["p50"], mode.name
        assert m["without_wakegate"]["total"]["p50"] > 0 and m["without_wakegate"]["to_answer"]["p50"] > 0, mode.name
    assert modes["stop"]["without_wakegate"]["total"]["p50"] > 10  # a Python process takes tens of ms to start
    for name in ("criu-prepared", "criu-stateful", "criu-prepared-slow", "criu-stateful-slow"):
        assert modes[name]["without_wakegate"]["resume"]["p50"] > 1 and modes[name]["snapshot_bytes"] > 1 << 20
    # The slow app starts in a second here (tiny) but is restored from its image in milliseconds.
    assert modes["criu-prepared-slow"]["first_request"]["p50"] < 1000
    # No RAM is copied on the new path: the VM runs again far sooner than after loading the stream.
    assert modes["vm-snapshot"]["backend_resume"]["p50"] < modes["vm-stream"]["backend_resume"]["p50"]
    (md,) = tiny_run[0].glob("all-*.md")
    assert "| the seeds reported |" in md.read_text()


def test_burst_answers_everyone_with_one_wake(tiny_run):
    _, results, _ = tiny_run
    burst = results["sections"]["burst"]["burst"]
    assert burst["requests"] == 50 and burst["ok"] == 50 and burst["errors"] == 0 and burst["wakes"] == 1
    assert 0 < burst["peak_rss_mib"] < 500


def test_scale_reports_each_size(tiny_run):
    _, results, _ = tiny_run
    sizes = results["sections"]["scale"]["sizes"]
    assert [s["services"] for s in sizes] == [1, 20]
    for s in sizes:
        assert s["startup_seconds"] > 0 and s["rss_mib_after"] > 5 and s["rps"] > 100
    assert sizes[0]["rps_vs_smallest"] == 1.0


def test_parse_compares_the_parsers(tiny_run):
    _, results, _ = tiny_run
    medians = results["sections"]["parse"]["median_seconds"]
    assert {"c", "python", "h11", "httptools"} <= set(medians)
    assert medians["c"] < medians["python"]


def test_hostile_measures_a_polite_client_under_attack(tiny_run):
    _, results, _ = tiny_run
    section = results["sections"]["hostile"]
    polite = section["polite"]
    assert polite["requests"] > 10 and polite["errors"] == 0
    assert 0 < polite["p50_ms"] <= polite["p99_ms"] <= polite["max_ms"]
    assert section["wakegate_alive"]
    assert section["attacks"]["attempts"] > 0 and set(section["attacks"]["connections"]) >= {"slow_heads",
                                                                                              "trickle_small"}
    assert 10 < section["rss_mib"]["start"] <= section["rss_mib"]["peak"] < 500


def test_cores_compares_every_worker_count_with_nginx(tiny_run):
    _, results, _ = tiny_run
    section = results["sections"]["cores"]
    counts = [int(n) for n in section["by_workers"]]
    assert counts == list(range(1, len(os.sched_getaffinity(0)) + 1))
    for entry in section["by_workers"].values():
        for target in ("wakegate", "nginx"):
            assert entry[target]["rps"] > 0 and entry[target]["errors"] == 0 and entry[target]["cpu_us_per_request"] > 0
        assert entry["wakegate_vs_nginx"] > 0
    assert set(section["wake"]) == {"1", "2"}
    for wake in section["wake"].values():
        assert wake["first_request"]["n"] == wake["awake"]["n"] > 0


def test_wasm_compares_a_handler_with_process_services(tiny_run):
    _, results, _ = tiny_run
    section = results["sections"]["wasm"]
    for target in ("wasm", "awake"):
        assert section["targets"][target]["rps"] > 0 and section["targets"][target]["errors"] == 0
        assert section["latency"][target]["p50_ms"] > 0
    assert section["latency"]["wasm"]["instantiate_plus_run_p50_ms"] > 0
    assert section["paused"]["first_request"]["n"] > 0
    assert section["rss"]["services"] == 50 and section["rss"]["rss_mib_many"] > 0


def test_tls_compares_wakegate_with_nginx_over_https(tiny_run):
    _, results, _ = tiny_run
    section = results["sections"]["tls"]
    for mode in ("keep-alive", "new connection"):
        case = section["modes"][mode]
        for target in ("wakegate", "nginx"):
            assert case[target]["rps"] > 0 and case[target]["errors"] == 0, (mode, target, case)
        assert case["wakegate_vs_nginx"] > 0


@pytest.mark.skipif(PURE, reason="the C build's run measures it")
def test_k8s_compares_a_sleeping_pod_with_a_kubelet_scaling_from_zero(tiny_run):
    _, results, _ = tiny_run
    k8s = results["sections"]["k8s"]
    pause, container, kubelet = k8s["wakegate_pause"], k8s["wakegate_container"], k8s["kubelet"]
    assert pause["first_request"]["n"] == 5 and pause["wakes"] >= 6 and kubelet["total"]["n"] == 2
    for section in (pause, k8s["wakegate_stop"], container):
        assert section["ready_throughout"] and not section["status_writes_during_cycles"]
    # a kubelet's pod is Ready only after its sandbox, its container and a readiness probe
    assert kubelet["total"]["p50"] > kubelet["scale_to_endpoints"]["p50"] > container["first_request"]["p50"]
    assert k8s["ratio"] > 1 and k8s["wakegate_node_scale"]["scale_to_endpoints"]["p50"] > 0


def test_outputs_written(tiny_run):
    out, results, stdout = tiny_run
    assert sorted(results["plots"]) == sorted(p.name for p in out.glob("*.png"))
    assert len(results["plots"]) == 2
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (md,) = out.glob("all-*.md")
    text = md.read_text()
    for heading in ("### steady", "### measure", "### wake", "### cores", "### wasm", "### tls", "### burst", "### scale", "### parse", "### hostile"):
        assert heading in text
    assert "round 1/1" in stdout  # progress is shown


def test_measure_counts_instructions(tiny_run):
    """The measure scenario (part of `bench all`): wall-time costs, the /metrics scrape, and callgrind's
    count of instructions per request. The access log line costs several percent, more than the
    count's spread over a tiny run (about 2%), so it must rank above metrics alone; metrics alone
    cost about as much as that spread, so bare and metrics need only be close."""
    folder, results, _ = tiny_run
    section = results["sections"]["measure"]
    assert {"bare", "metrics-only", "measured", "direct"} <= set(section["cases"][0]["targets"])
    assert section["metrics_scrape"]["bytes"] > 0
    counted = section["instructions"]["per_request"]
    assert counted["bare"] > 5_000
    assert 0.97 * counted["bare"] < counted["metrics"] < counted["metrics + access log"] < 2 * counted["bare"]
    (md,) = folder.glob("all-*.md")
    assert "### measure" in md.read_text() and "Instructions per request" in md.read_text()


def test_the_twin_is_measured_only_when_asked(tmp_path):
    """A checkout without the built extension must not report the twin's figures as wakegate's."""
    import os

    env = {**os.environ, "WAKEGATE_PUREPYTHON": "1"}
    result = subprocess.run([sys.executable, "-m", "bench", "parse", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "pass --pure-python" in result.stderr, result.stderr
    assert not list(tmp_path.iterdir())
