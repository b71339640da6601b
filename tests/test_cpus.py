"""CPU lists, physical cores and the split of a host's cores between GPU lanes (benchmarks.cpus)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from benchmarks.cpus import choose_cpus, format_cpu_list, parse_cpu_list, pinned, split_cores


def _topology(root, cores: list[str]):
    """A fake /sys/devices/system/cpu: core i's hardware threads are ``cores[i]`` (a CPU list)."""
    for siblings in cores:
        for cpu in parse_cpu_list(siblings):
            d = root / f"cpu{cpu}" / "topology"
            d.mkdir(parents=True)
            (d / "thread_siblings_list").write_text(siblings + "\n")
    return str(root)


def test_cpu_lists_and_one_hardware_thread_per_core(tmp_path):
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    # 4 cores with two hardware threads each, numbered the usual Linux way (core i: i and i+4)
    sys_cpu = _topology(tmp_path, ["0,4", "1,5", "2,6", "3,7"])
    allowed = set(range(8))
    assert choose_cpus("one-per-core:3", allowed, sys_cpu) == [0, 1, 2]
    # only the CPUs this process may use count: core 0 is reached through its second thread
    assert choose_cpus("one-per-core:2", {2, 3, 4, 6, 7}, sys_cpu) == [2, 3]
    assert choose_cpus("one-per-core:3", {2, 3, 4, 6, 7}, sys_cpu) == [2, 3, 4]
    # siblings given as a range ("0-1") and a machine without topology files (each CPU a core)
    assert choose_cpus("one-per-core:2", {0, 1, 2, 3}, _topology(tmp_path / "b", ["0-1", "2-3"])) == [0, 2]
    assert choose_cpus("one-per-core:3", {5, 6, 9}, str(tmp_path / "none")) == [5, 6, 9]
    assert choose_cpus("1,3", allowed, sys_cpu) == [1, 3]
    for spec, says in [
        ("one-per-core:5", "only 4 physical cores"),
        ("one-per-core:0", "N >= 1"),
        ("one-per-core:x", "N >= 1"),
        ("0-9", "[8, 9] are not among"),
        ("3-1", "expected a CPU list"),
        ("all", "expected a CPU list"),
        ("0-99999999", "expected a CPU list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            choose_cpus(spec, allowed, sys_cpu)


def test_cpu_lists_print_back_as_they_parse():
    assert format_cpu_list([5, 0, 2, 1]) == "0-2,5"
    assert format_cpu_list([3]) == "3"
    for text in ("0-3,8,10-11", "0,2,4", "7"):
        assert format_cpu_list(parse_cpu_list(text)) == text


def test_lanes_get_disjoint_whole_cores(tmp_path):
    sys_cpu = _topology(tmp_path, ["0,4", "1,5", "2,6", "3,7"])
    allowed = set(range(8))
    # hardware-thread siblings stay in one lane: two lanes never share a core
    assert split_cores(2, allowed, sys_cpu) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert split_cores(3, allowed, sys_cpu) == [[0, 1, 4, 5], [2, 6], [3, 7]]
    assert split_cores(1, allowed, sys_cpu) == [list(range(8))]
    # only the CPUs this process may use: core 1 reached through CPU 1 alone, core 3 not at all
    assert split_cores(2, {0, 1, 2, 4, 6}, sys_cpu) == [[0, 1, 4], [2, 6]]
    # fewer cores than lanes: no split keeps them apart
    assert split_cores(5, allowed, sys_cpu) is None
    assert split_cores(2, {0, 4}, sys_cpu) is None
    # without topology files each CPU counts as a core
    assert split_cores(2, {0, 1, 2}, str(tmp_path / "none")) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="0 groups"):
        split_cores(0, allowed, sys_cpu)


def test_pinned_engine_processes_inherit_the_cpus_and_the_mask_is_restored():
    """What ``--cpus`` relies on: a process started inside ``pinned`` (as vLLM starts its engine)
    runs on those CPUs; the caller's own mask is back afterwards."""
    before = os.sched_getaffinity(0)
    one = [min(before)]
    probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    with pinned(one):
        inside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert inside == str(one)
    assert os.sched_getaffinity(0) == before
    outside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert outside == str(sorted(before))
