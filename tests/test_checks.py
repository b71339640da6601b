"""Bad drafters and bad pairings: one clear error naming the problem, before any engine starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from massv_vllm.serving.checks import check_drafter, check_pair, target_config_from_dir
from massv_vllm.serving.config import MassvConfigError


@pytest.fixture
def drafter_copy(tiny_qwen, tmp_path):
    dst = tmp_path / "drafter"
    shutil.copytree(tiny_qwen.drafter, dst)
    return dst


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


def _pair_error(drafter, tiny_qwen) -> str:
    with pytest.raises(MassvConfigError) as e:
        check_pair(drafter, target_config_from_dir(tiny_qwen.target), tiny_qwen.target)
    return str(e.value)


def test_good_pair_passes(tiny_set):
    info = check_pair(tiny_set.drafter, target_config_from_dir(tiny_set.target), tiny_set.target)
    assert info.massv.target.family == tiny_set.family


def test_projector_width_differs_from_target_embedding(drafter_copy, tiny_qwen):
    def widen(cfg):
        cfg["massv"]["projector"]["input_dim"] += 16
        cfg["massv"]["target"]["image_embed_dim"] += 16

    _edit_config(drafter_copy, widen)
    _edit_weights(drafter_copy, lambda sd: sd.update({"projector.linears.0.weight": torch.zeros(64, 144)}))
    assert "projector input width 144 != target image-embedding width 128" in _pair_error(
        drafter_copy, tiny_qwen
    )


def test_projector_output_differs_from_small_lm_hidden(drafter_copy):
    _edit_weights(drafter_copy, lambda sd: sd.update({"projector.linears.1.weight": torch.zeros(48, 64)}))
    with pytest.raises(
        MassvConfigError, match=r"projector.linears.1.weight has shape \[48, 64\], config implies \[64, 64\]"
    ):
        check_drafter(drafter_copy)


def test_vocab_of_another_size(drafter_copy, tiny_qwen):
    def shrink(cfg):
        cfg["vocab_size"] = cfg["massv"]["target"]["vocab_size"] = 480

    _edit_config(drafter_copy, shrink)
    _edit_weights(
        drafter_copy,
        lambda sd: sd.update({"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:480]}),
    )
    assert "vocab size 480 != target text vocab size 512" in _pair_error(drafter_copy, tiny_qwen)


def test_tokenizer_of_another_family(drafter_copy, tiny_qwen, tiny_gemma):
    shutil.copyfile(tiny_gemma.drafter / "tokenizer.json", drafter_copy / "tokenizer.json")
    msg = _pair_error(drafter_copy, tiny_qwen)
    assert "tokenizer differs from the target's" in msg and "not the same model family/vocab" in msg


def test_drafter_for_another_family(tiny_gemma, tiny_qwen):
    assert "family mismatch: drafter is for gemma3, target is qwen2_5_vl" in _pair_error(
        tiny_gemma.drafter, tiny_qwen
    )


def test_image_token_mismatch(drafter_copy, tiny_qwen):
    _edit_config(drafter_copy, lambda c: c["massv"]["target"].update(image_token_id=7))
    assert "image token id 7 != target's image_token_id 5" in _pair_error(drafter_copy, tiny_qwen)


def test_missing_weights(drafter_copy):
    (drafter_copy / "model.safetensors").unlink()
    with pytest.raises(MassvConfigError, match=r"no weight files \(\*\.safetensors\)"):
        check_drafter(drafter_copy)


def test_missing_tensor(drafter_copy):
    _edit_weights(drafter_copy, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MassvConfigError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        check_drafter(drafter_copy)


def test_corrupt_and_truncated_safetensors(drafter_copy):
    f = drafter_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MassvConfigError, match="corrupt or truncated safetensors file model.safetensors"):
        check_drafter(drafter_copy)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(MassvConfigError, match="corrupt or truncated"):
        check_drafter(drafter_copy)


def test_pickle_weights_refused_unless_allowed(drafter_copy, monkeypatch):
    sd = load_file(str(drafter_copy / "model.safetensors"))
    (drafter_copy / "model.safetensors").unlink()
    torch.save(sd, drafter_copy / "pytorch_model.bin")
    with pytest.raises(MassvConfigError, match="pickle files .*pytorch_model.bin.* can run code"):
        check_drafter(drafter_copy)
    assert check_drafter(drafter_copy, allow_pickle=True).weight_files[0].name == "pytorch_model.bin"
    monkeypatch.setenv("MASSV_ALLOW_PICKLE", "1")
    assert check_drafter(drafter_copy).weight_files


def test_non_vlm_target(tiny_qwen):
    with pytest.raises(MassvConfigError) as e:
        check_pair(tiny_qwen.drafter, target_config_from_dir(tiny_qwen.small_lm), None)
    assert "is not a vision-language model MASSV supports" in str(e.value)
    assert "Qwen2_5_VLForConditionalGeneration" in str(e.value)


def test_unknown_base_architecture(drafter_copy):
    _edit_config(drafter_copy, lambda c: c["massv"].update(base_architecture="LlamaForCausalLM"))
    with pytest.raises(MassvConfigError, match="unknown base_architecture 'LlamaForCausalLM'"):
        check_drafter(drafter_copy)


def test_drafter_of_another_schema_version(drafter_copy):
    _edit_config(drafter_copy, lambda c: c["massv"].update(schema_version=99, massv_vllm_version="9.0"))
    with pytest.raises(MassvConfigError, match=r"schema_version 99 \(written by massv-vllm 9.0\)"):
        check_drafter(drafter_copy)


def test_not_a_drafter_folder(tiny_qwen, tmp_path):
    with pytest.raises(MassvConfigError, match="is not a directory"):
        check_drafter(tmp_path / "nope")
    with pytest.raises(MassvConfigError, match="not a MASSV drafter"):
        check_drafter(tiny_qwen.small_lm)


@pytest.mark.engine
def test_llm_rejects_bad_drafter_before_the_engine_starts(drafter_copy, tiny_qwen):
    """`LLM(speculative_config={"method": "massv", ...})` fails in the calling process, fast."""
    from massv_vllm.engine import make_llm, massv_spec

    _edit_config(drafter_copy, lambda c: c["massv"]["target"].update(image_token_id=7))
    t0 = time.monotonic()
    with pytest.raises(MassvConfigError, match="image token id 7 != target's image_token_id 5"):
        make_llm(str(tiny_qwen.target), massv_spec(str(drafter_copy), 3), max_model_len=512)
    assert time.monotonic() - t0 < 30  # no engine process was started (a start costs ~30-45 s)
    with pytest.raises(MassvConfigError, match="is not a vision-language model MASSV supports"):
        make_llm(str(tiny_qwen.small_lm), massv_spec(str(tiny_qwen.drafter), 3), max_model_len=512)


# --- Defects an outside probe found: every one is a single MassvConfigError, never a prompt, a raw
# --- traceback, a hang or code of the folder being run.


@contextlib.contextmanager
def deadline(seconds: float):
    """A hang (FIFO open, endless loop) becomes a test failure instead of a stuck run."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _plant_remote_code(folder, marker):
    """A config.json whose unknown model_type and auto_map make transformers offer to run evil.py."""
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'massv_evil'\n"
    )
    _edit_config(
        folder,
        lambda c: c.update(
            model_type="massv_evil",
            auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
        ),
    )


def test_code_in_a_model_folder_is_never_run(drafter_copy, tiny_qwen, tmp_path, monkeypatch):
    marker = tmp_path / "remote-code-ran"
    asked = []
    # Even a user answering "y" to transformers' "run the custom code? [y/N]" must not run it.
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    _plant_remote_code(drafter_copy, marker)
    with deadline(60), pytest.raises(MassvConfigError) as e:
        check_drafter(drafter_copy)
    assert "model_type 'massv_evil' is not a model type transformers" in str(e.value)
    assert "never runs code shipped in a model folder" in str(e.value)
    target = tmp_path / "target"
    shutil.copytree(tiny_qwen.target, target)
    _plant_remote_code(target, marker)
    with deadline(60), pytest.raises(MassvConfigError, match="never runs code"):
        target_config_from_dir(target)
    assert not asked, "transformers asked whether to run the folder's code"
    assert not marker.exists()


def test_garbage_tokenizer_json_is_reported_with_its_file(drafter_copy, tiny_qwen):
    (drafter_copy / "tokenizer.json").write_text('{1: "not a tokenizer"}')  # "key must be a string"
    msg = _pair_error(drafter_copy, tiny_qwen)
    assert f"drafter tokenizer: {drafter_copy / 'tokenizer.json'} is not a valid tokenizer.json" in msg


ABSURD_CONFIGS = {
    # name: (edit of config.json, substring of the error)
    "hidden_size_1e12": (lambda c: c.update(hidden_size=1e12), "'hidden_size' must be an integer, got 1000000000000.0"),
    "hidden_size_huge_int": (lambda c: c.update(hidden_size=10**12), "'hidden_size' is 1000000000000, outside"),
    "hidden_size_negative": (lambda c: c.update(hidden_size=-64), "'hidden_size' is -64, outside the allowed range"),
    "no_attention_heads": (lambda c: c.update(num_attention_heads=0), "'num_attention_heads' is 0, outside"),
    "heads_as_string": (lambda c: c.update(num_attention_heads="2"), "'num_attention_heads' must be an integer"),
    "projector_depth_1e8": (lambda c: c["massv"]["projector"].update(depth=10**8), "projector.depth 100000000 exceeds"),
    "positions_1e18": (lambda c: c.update(max_position_embeddings=10**18), "rotary table"),
    "image_token_negative": (lambda c: c["massv"]["target"].update(image_token_id=-1), "'target.image_token_id' is -1"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ABSURD_CONFIGS))
def test_absurd_config_values_are_one_clear_error(drafter_copy, name):
    edit, needle = ABSURD_CONFIGS[name]
    _edit_config(drafter_copy, edit)
    with deadline(30), pytest.raises(MassvConfigError) as e:
        check_drafter(drafter_copy)
    assert needle in str(e.value)


def test_every_bad_value_is_listed_in_one_error(drafter_copy):
    def wreck(c):
        c.update(hidden_size=-64, num_attention_heads=0, max_position_embeddings=10**18)
        c["massv"]["projector"]["depth"] = 10**8

    _edit_config(drafter_copy, wreck)
    with deadline(30), pytest.raises(MassvConfigError) as e:
        check_drafter(drafter_copy)
    assert len(e.value.problems) == 4, e.value.problems


def test_deeply_nested_config_json(drafter_copy):
    depth = 100_000
    (drafter_copy / "config.json").write_text('{"massv": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(MassvConfigError, match="config.json is nested too deeply"):
        check_drafter(drafter_copy)
    (drafter_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(MassvConfigError, match="config.json must hold a JSON object, got list"):
        check_drafter(drafter_copy)


@contextlib.contextmanager
def fifo_writer_after(fifo, seconds: float):
    """Opening a FIFO blocks in native code that holds the GIL and retries the interrupted open
    (neither SIGALRM nor a thread can end it): a writer process that shows up after ``seconds``
    turns that hang into a failure."""
    code = "import os, sys, time; time.sleep(float(sys.argv[2])); os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))"
    writer = subprocess.Popen(
        [sys.executable, "-c", code, str(fifo), str(seconds)], stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        writer.kill()
        writer.wait()


def test_fifo_and_device_files_are_refused_before_opening(drafter_copy, tmp_path):
    weights = drafter_copy / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)  # opening it blocks until a writer appears: forever
    with fifo_writer_after(weights, 20), pytest.raises(MassvConfigError, match="model.safetensors is a FIFO"):
        check_drafter(drafter_copy)
    weights.unlink()
    os.mkfifo(tmp_path / "elsewhere")
    weights.symlink_to(tmp_path / "elsewhere")  # a link is followed: its target is what counts
    (drafter_copy / "tokenizer.json").unlink()
    (drafter_copy / "tokenizer.json").symlink_to("/dev/zero")
    with fifo_writer_after(weights, 20), pytest.raises(MassvConfigError) as e:
        check_drafter(drafter_copy)
    assert "model.safetensors is a FIFO" in str(e.value) and "tokenizer.json is a device" in str(e.value)


def test_symlinks_out_of_the_folder_are_followed_like_a_hub_snapshot(drafter_copy, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        shutil.move(drafter_copy / f, blobs / f)
        (drafter_copy / f).symlink_to(blobs / f)
    assert check_drafter(drafter_copy).weight_files


def _hub_cache(root, repo_id, tokenizer_json=None):
    """A Hugging Face cache holding only ``repo_id``'s tokenizer.json (as a download leaves it)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, snapshot / "tokenizer.json")
    return snapshot


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_target_tokenizer_is_read_from_the_hub_cache(tiny_qwen, tiny_gemma, offline_hub_cache):
    """vLLM's ModelConfig.tokenizer is the hub id when the target is one (the README's example)."""
    hub_id = "Qwen/Qwen2.5-VL-7B-Instruct"
    target_cfg = target_config_from_dir(tiny_qwen.target)
    _hub_cache(offline_hub_cache, hub_id, tiny_gemma.drafter / "tokenizer.json")  # another family's
    with pytest.raises(MassvConfigError, match="tokenizer differs from the target's"):
        check_pair(tiny_qwen.drafter, target_cfg, hub_id)
    _hub_cache(offline_hub_cache, hub_id, tiny_qwen.target / "tokenizer.json")
    assert check_pair(tiny_qwen.drafter, target_cfg, hub_id).massv.target.family == "qwen2_5_vl"


def test_target_tokenizer_that_cannot_be_found_is_an_error(tiny_qwen, offline_hub_cache):
    target_cfg = target_config_from_dir(tiny_qwen.target)
    with pytest.raises(MassvConfigError) as e:
        check_pair(tiny_qwen.drafter, target_cfg, "Qwen/Qwen2.5-VL-7B-Instruct")
    assert "is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids fetching it" in str(e.value)
    _hub_cache(offline_hub_cache, "Qwen/Qwen2.5-VL-7B-Instruct")  # a snapshot without tokenizer files
    with pytest.raises(MassvConfigError, match="has no tokenizer files"):
        check_pair(tiny_qwen.drafter, target_cfg, "Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(MassvConfigError, match="neither a local folder nor a Hugging Face hub id"):
        check_pair(tiny_qwen.drafter, target_cfg, "/no/such/folder")


def test_build_cli_with_hub_ids_prints_one_error_line(tmp_path, capsys):
    from massv_vllm.build import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "--small-lm",
                "Qwen2.5-1.5B-Instruct",
                "--target",
                "Qwen2.5-VL-7B-Instruct",
                "--out",
                str(tmp_path),
            ]
        )
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--small-lm and --target must be local model folders" in err


def test_build_cli_reports_a_bad_folder_without_traceback(tiny_qwen, drafter_copy, tmp_path, capsys):
    from massv_vllm.build import main

    _edit_config(drafter_copy, lambda c: c.update(model_type="massv_evil"))
    with pytest.raises(SystemExit) as e:
        main(
            ["--small-lm", str(drafter_copy), "--target", str(tiny_qwen.target), "--out", str(tmp_path / "o")]
        )
    assert e.value.code == 1
    assert "model_type 'massv_evil' is not a model type" in capsys.readouterr().err
