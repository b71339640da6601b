"""Assertions shared by the engine tests of both families (not a test module itself)."""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.multimodal.utils import encode_image_url

from massv_vllm.metrics import SpecCounters
from massv_vllm.testing.lossless import Output, Request, divergences, greedy, prompt_suite
from massv_vllm.testing.tiny import synthetic_image

# One prompt suite for every engine test: text-only, 1 and 2 images of varied sizes, long prompts
# that take several prefill chunks (max_num_batched_tokens is small), all in one batch.
ENGINE_KW = dict(max_model_len=2048, max_num_batched_tokens=160, max_num_seqs=8, dtype="float32")
SUITE_SIZE = 12
MAX_TOKENS = 16
GAMMA = 3


def engine_suite() -> list[Request]:
    """The suite every engine test runs (the session's no-speculation references are of it)."""
    return prompt_suite(SUITE_SIZE, max_images=2, long_words=150)


def probed_engine(tiny, drafter, env: dict[str, str] | None = None, **spec: Any):
    """A module-scoped MASSV engine with the drafter probe (generator body for a fixture);
    ``env``: patch switches for its processes, ``spec``: further speculative-config keys."""
    from massv_vllm.engine import engine_env, make_llm, massv_spec, shutdown

    with engine_env(env):
        engine = make_llm(str(tiny.target), massv_spec(str(drafter), GAMMA, **spec), probe=True, **ENGINE_KW)
    yield engine
    shutdown(engine)


def mirror_engine(tiny, out_dir, text_only: bool = False, env: dict[str, str] | None = None):
    """``probed_engine`` with a drafter that mirrors the target (written to ``out_dir``)."""
    from massv_vllm.testing.tiny import make_mirror_drafter

    drafter = make_mirror_drafter(tiny.target, tiny.tokenizer, out_dir, text_only=text_only)
    yield from probed_engine(tiny, drafter, env=env)


def counted_greedy(
    llm, requests: list[Request], max_tokens: int = MAX_TOKENS
) -> tuple[list[Output], SpecCounters]:
    """T=0 outputs of ``requests`` and the spec-decode counters they added."""
    before = SpecCounters.from_llm(llm)
    outs = greedy(llm, requests, max_tokens)
    return outs, SpecCounters.from_llm(llm) - before


def target_image_features(target, seeds: list[int], size: tuple[int, int]) -> torch.Tensor:
    """The target's image features (``TargetEncoder``, the training side) of ``chat(seeds,
    size=size)``'s images, concatenated: what the projector must be fed."""
    from massv_vllm.training.target_features import TargetEncoder

    return torch.cat(TargetEncoder(target).image_features([synthetic_image(s, size) for s in seeds]))


def fast_loop_calls(llm, kind: str = "all") -> int | None:
    """Proposals made by MASSV's own draft loop (patches/_draft_loop.py), ``all`` or those whose
    ``first_pass`` ran there too, or whose steps took the ``one_graph`` update; needs the probe."""
    calls = llm.collective_rpc("massv_fast_loop_calls")[0]
    return None if calls is None else calls[kind]


def assert_draft_layers_keep_their_windows(llm, window: int) -> None:
    """The drafter's sliding layers (``window``) and full layers each have a metadata builder of
    their own window: vLLM 0.26 gave all drafter layers of one attention backend one builder, with
    one layer's window, which FlashAttention applies to every layer it serves
    (``MASSV_PATCH_DRAFT_WINDOWS``)."""
    groups = llm.collective_rpc("massv_draft_attention_windows")[0]
    print(f"drafter attention groups (builder window, layer windows): {groups}")
    assert {w for _, ws in groups for w in ws} == {None, window}, groups  # the drafter's own layers
    for builder_window, windows in groups:
        assert windows == [builder_window] * len(windows), groups


def assert_mirror_accepts(llm, reference, image_floor: float | None = 2.0) -> dict[str, float]:
    """T=0 output equals the no-speculation reference on the whole suite, *and* drafts are
    accepted: MAL >= γ + 0.5 on the text-only prompts (the mirror drafter is the target there)
    and MAL > ``image_floor`` on the image prompts. Returns the two MALs."""
    suite = engine_suite()
    assert_lossless(reference, greedy(llm, suite, MAX_TOKENS))
    mals = {}
    for kind, requests in (
        ("text", [r for r in suite if r.num_images == 0]),
        ("image", [r for r in suite if r.num_images > 0]),
    ):
        delta = counted_greedy(llm, requests)[1]
        assert delta.num_drafts > 0
        mals[kind] = delta.mean_accepted_length
    print(f"mirror drafter MAL: {mals}")
    assert mals["text"] >= GAMMA + 0.5, mals
    if image_floor is not None:
        assert mals["image"] > image_floor, mals
    return mals


def assert_drafter_reads_images(llm, tokens, colours, seed) -> None:
    """The first draft after each single-image prompt is the token the drafter was trained to
    give for that image's colour (see ``train_image_aware_drafter``)."""
    for i, colour in enumerate(colours):
        out, rec = run_probed(llm, chat_with(colour_image(colour, seed=seed + i)), max_tokens=2)
        draft = first_draft_after_prefill(out, rec)[1]
        assert draft[0] == tokens[colour], (colour, draft)


def assert_lossless(reference, candidate) -> None:
    found = divergences(reference, candidate)
    for d in found:
        print("DIVERGENCE", d)
    assert not found, f"{len(found)} of {len(reference)} requests differ from the no-speculation reference"


def chat_with(*images, text="Describe the image."):
    content = [{"type": "image_url", "image_url": {"url": encode_image_url(img)}} for img in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def chat(image_seeds, text="Describe the image.", size=(168, 112)):
    return chat_with(*(synthetic_image(s, size) for s in image_seeds), text=text)


def run_probed(llm, messages, max_tokens=4):
    """One request through a probe-enabled engine; returns (output, probe records)."""
    llm.collective_rpc("massv_probe_start")
    out = llm.chat(
        [messages], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False
    )[0]
    return out, llm.collective_rpc("massv_probe_records")[0]


def projector_inputs(rec) -> torch.Tensor:
    return torch.cat([torch.tensor(p["values"]).view(p["shape"]) for p in rec["projector_inputs"]])


def first_draft_after_prefill(out, rec) -> tuple[int, list[int]]:
    """(target's first generated token, the drafter's proposal made right after the full prompt)."""
    plen = len(out.prompt_token_ids)
    for step, drafts in zip(rec["steps"], rec["drafts"]):
        (rid,) = step["req_ids"]
        qsl = step["query_start_loc"]
        if step["num_computed"][0] + (qsl[1] - qsl[0]) == plen:
            return out.outputs[0].token_ids[0], drafts[rid]
    raise AssertionError("no proposal at the end of prefill")


def assert_positions_are_absolute(rec, gamma) -> int:
    """Every request's first draft slot of every proposal sits at its absolute position.

    With the stock M-RoPE bug a prefill chunk after an image starts at
    ``num_computed + mrope_position_delta`` instead of ``num_computed``. Returns steps checked.
    """
    firsts = rec["positions"][::gamma]  # gamma drafter forwards per proposal, first pass first
    assert len(firsts) == len(rec["steps"])
    for pos, step in zip(firsts, rec["steps"]):
        qsl = step["query_start_loc"]
        for r, computed in enumerate(step["num_computed"]):
            assert pos[qsl[r] + r] == computed, (step, pos[qsl[r] + r])
    return len(firsts)


def colour_image(colour: str, seed: int, size=(140, 112)):
    """A noisy image whose dominant colour is ``colour`` (what the trained drafter must read)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    base = {"red": (220, 30, 30), "blue": (30, 30, 220)}[colour]
    img = Image.new("RGB", size, tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in base))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        d.rectangle((x, y, x + 8, y + 8), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def train_image_aware_drafter(tiny, out_dir, max_steps: int = 300, text: str = "Describe the image."):
    """Fit the tiny drafter (transformers side, on TargetEncoder features) to emit one token for
    red images and another for blue ones at every position after the image.

    Served by vLLM, its first draft then tells whether vLLM fed it the same image features as
    training did. Returns (drafter folder, {colour: token id}).
    """
    from massv_vllm.training.modeling import MassvDrafter
    from massv_vllm.training.target_features import TargetEncoder

    torch.manual_seed(0)
    enc = TargetEncoder(tiny.target)
    drafter = MassvDrafter.from_pretrained(tiny.drafter)
    tokens = {c: enc.tokenizer.convert_tokens_to_ids(t) for c, t in (("red", "red"), ("blue", "blue"))}
    if any(
        t is None or t == enc.tokenizer.unk_token_id for t in tokens.values()
    ):  # byte-level BPE spells " red"
        tokens = {c: enc.tokenizer(" " + c).input_ids[0] for c in ("red", "blue")}
    prompt = enc.chat_prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    )
    rows, labels, feats = [], [], []
    for i in range(16):  # same prompt and image size for all: one stacked batch
        colour = "red" if i % 2 == 0 else "blue"
        img = colour_image(colour, seed=10_000 + i)
        ids = enc.prompt_ids(prompt, [img]).input_ids + [int(torch.randint(30, 300, ()))]
        last_img = max(j for j, t in enumerate(ids) if t == enc.image_token_id)
        # every position after the image predicts the colour token (the loss shifts labels by one)
        rows.append(ids)
        labels.append([-100] * (last_img + 1) + [tokens[colour]] * (len(ids) - last_img - 1))
        feats.append(enc.image_features([img])[0])
    ids_t, labels_t, feats_t = torch.tensor(rows), torch.tensor(labels), torch.cat(feats)
    opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    for _ in range(max_steps):
        out = drafter(ids_t, image_embeds=feats_t, labels=labels_t)
        right = bool((out.logits[:, -1].argmax(-1) == labels_t[:, -1]).all())
        if right and out.loss.item() < 0.05:  # right everywhere, with a margin that survives bf16
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    else:
        raise AssertionError("the drafter did not learn to read the image colour")
    drafter.eval()
    drafter.save_pretrained(out_dir, tokenizer_from=tiny.drafter)
    return out_dir, tokens


def greedy_by_kind(llm, requests, max_tokens: int = MAX_TOKENS) -> tuple[dict, dict[str, SpecCounters]]:
    """T=0 outputs and spec-decode counter deltas of the text-only and of the image requests of
    ``requests``, one batch per kind: ({kind: outputs}, {kind: counters}); kinds "text", "image"
    (a kind without requests is left out)."""
    outs, counters = {}, {}
    for kind in ("text", "image"):
        subset = [r for r in requests if (r.num_images > 0) == (kind == "image")]
        if not subset:
            continue
        outs[kind], counters[kind] = counted_greedy(llm, subset, max_tokens)
    return outs, counters


def sharpen_target(target, out_dir, factor: float):
    """A copy of a tiny target whose ``lm_head`` is scaled by ``factor``: the same argmax (so the
    same greedy outputs) but logits ``factor`` times larger, i.e. its T=1 distribution is the
    original's at T = 1/factor. The random tiny targets are near-uniform over their vocabulary at
    T=1; sharpened, a T=1 sample spreads over a handful of tokens."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    target, out = Path(target), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in target.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(target / "model.safetensors"))
    if "lm_head.weight" not in sd:
        raise ValueError(f"{target}: no untied lm_head.weight to sharpen")
    sd["lm_head.weight"] = sd["lm_head.weight"] * factor
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
