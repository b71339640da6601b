"""The ways the README starts MASSV, each run for real on the CPU engine with the tiny models.

* the README's CPU serve command, as written (vLLM's ``--spec-model`` flag with a MASSV drafter
  folder, γ from the folder), through the ``vllm`` launcher: an image request is answered with
  drafts;
* a speculators-style drafter folder as the model (``LLM(model=DRAFTER)``): the target it names is
  started with MASSV and answers an image request with drafts.
The JSON form is what every other engine test uses.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from massv_vllm.engine import make_llm, shutdown
from massv_vllm.metrics import SpecCounters
from massv_vllm.testing.serve_utils import start_command
from tests.engine_checks import chat
from tests.test_serve import GOOD_PNG, data_url, user

pytestmark = pytest.mark.engine

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_cpu_command() -> list[str]:
    """The fenced bash block after the README's ``cpu-serve`` marker, as argv."""
    text = README.read_text()
    m = re.search(r"<!-- cpu-serve:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md lost its CPU serve command (the cpu-serve marker)"
    return shlex.split(m.group(1).replace("\\\n", " "))


def test_readme_cpu_serve_command(tiny_qwen, tmp_path):
    argv = readme_cpu_command()
    assert argv[:2] == ["vllm", "serve"] and "TARGET" in argv and "MASSV_DRAFTER" in argv
    argv = [
        {"TARGET": str(tiny_qwen.target), "MASSV_DRAFTER": str(tiny_qwen.drafter)}.get(a, a) for a in argv
    ]
    with start_command(argv, model=str(tiny_qwen.target), log_path=tmp_path / "serve.log") as server:
        before = SpecCounters.from_prometheus(server.metrics_text())
        status, body = server.chat(user(data_url(GOOD_PNG)), max_tokens=12, temperature=0)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]
        delta = SpecCounters.from_prometheus(server.metrics_text()) - before
        assert delta.num_drafts > 0
        # γ came from the drafter folder (5 by default): one acceptance counter per position
        assert len(delta.accepted_per_pos) == 5


def test_drafter_folder_as_the_model_starts_its_target(tiny_qwen):
    from vllm import SamplingParams

    llm = make_llm(str(tiny_qwen.drafter), None, max_model_len=2048, max_images=1)
    try:
        assert llm.llm_engine.model_config.model == str(tiny_qwen.target.resolve())
        before = SpecCounters.from_llm(llm)
        out = llm.chat([chat([941])], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 12
        delta = SpecCounters.from_llm(llm) - before
        assert delta.num_drafts > 0 and len(delta.accepted_per_pos) == 5
    finally:
        shutdown(llm)
