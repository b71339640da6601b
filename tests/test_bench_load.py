"""benchmarks/load.py's GPU memory reading, against a stand-in ``nvidia-smi`` (no GPU here)."""

from __future__ import annotations

import os
import stat

from benchmarks import load


def _fake_nvidia_smi(bin_dir, apps: str, gpus: str) -> None:
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  --query-compute-apps=*) printf '{apps}' ;;\n"
        f"  --query-gpu=*) printf '{gpus}' ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_gpu_memory_of_the_servers_processes_else_of_the_visible_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    me = os.getpid()
    # this process (the "server") holds 1200 + 300 MiB; another process's 999 MiB does not count
    _fake_nvidia_smi(tmp_path, f"{me}, 1200\\n{me}, 300\\n1, 999\\n", "0, 1600\\n1, 700\\n")
    mem = load.server_memory(me)
    assert (mem["gpu_mib"], mem["gpu_scope"]) == (1500.0, "processes") and mem["rss_mib"] > 10
    # inside a container nvidia-smi lists host PIDs: none is ours, so all used memory of the GPUs
    # this process may use (it lists every GPU of the machine)
    _fake_nvidia_smi(tmp_path, "4242, 1200\\n", "0, 1600\\n1, 700\\n")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mem = load.server_memory(me)
    assert (mem["gpu_mib"], mem["gpu_scope"]) == (2300.0, "device")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # a lane of scripts/gpu_jobs.py
    assert load.server_memory(me)["gpu_mib"] == 700.0
    # an nvidia-smi that fails (no driver): host memory only
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # still executable
    assert load.server_memory(me)["gpu_mib"] is None
