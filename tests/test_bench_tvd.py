"""TVD diagnostic (transformers only, no engine): maths, response-only positions, resume, sources."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.report import check_schema
from benchmarks.tvd import SCHEMA, Scorer, compare_logits, response_slice, run_tvd
from massv_vllm.metrics import probs_from_logits, tvd
from massv_vllm.testing.tiny import synthetic_image

QUESTIONS = [
    ("captioning", "Describe the image.", "A small red circle in the top left."),
    ("vqa", "What colour is the square?", "Blue."),
    ("vqa", "How many shapes are there?", "There are two shapes."),
]


def _eval(tmp_path, n=3):
    recs = []
    for i, (task, q, a) in enumerate(QUESTIONS[:n]):
        synthetic_image(i, (96, 64)).save(tmp_path / f"img{i}.png")
        recs.append(
            {
                "id": f"r{i}",
                "image": f"img{i}.png",
                "task": task,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(recs))
    return path


def test_compare_logits_identical_and_mismatched():
    logits = torch.randn(5, 64)
    t, a = compare_logits(logits, logits.clone())
    assert torch.allclose(t, torch.zeros(5), atol=1e-6) and a.all()
    # a drafter whose mass sits on other tokens: TVD near 1, no top-1 agreement
    other = torch.full((5, 64), -30.0)
    other[:, 0] = 30.0
    target = torch.full((5, 64), -30.0)
    target[:, 1] = 30.0
    t, a = compare_logits(target, other)
    assert torch.allclose(t, torch.ones(5), atol=1e-6) and not a.any()
    with pytest.raises(ValueError, match="padded to the target's text vocab"):
        compare_logits(logits, logits[:, :63])


def test_response_slice_covers_exactly_the_response_predictions():
    # prompt of 4 tokens, response of 3: logits at positions 3, 4, 5 predict tokens 4, 5, 6.
    assert response_slice(4, 3) == slice(3, 6)
    ids = list(range(7))
    assert [ids[i + 1] for i in range(7)[response_slice(4, 3)]] == [4, 5, 6]
    with pytest.raises(ValueError):
        response_slice(0, 3)


def test_tvd_run_text_vs_massv(tiny_qwen, tmp_path):
    ev = _eval(tmp_path)
    drafters = {"text": str(tiny_qwen.text_drafter), "massv": str(tiny_qwen.drafter)}
    out = tmp_path / "out"
    doc = run_tvd(tiny_qwen.target, ev, drafters, out, progress=False, argv=["test"])
    assert check_schema(doc, SCHEMA) == []
    assert json.loads((out / "tvd.json").read_text()) == doc
    assert doc["num_records"] == 3 and doc["eval"]["tasks"] == {"captioning": 1, "vqa": 2}
    lines = [json.loads(x) for x in (out / "tokens.jsonl").read_text().splitlines()]
    assert [ln["id"] for ln in lines] == ["r0", "r1", "r2"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen.target))
    for ln, (_, _, answer) in zip(lines, QUESTIONS):
        # only response positions are scored: the answer's tokens + the end-of-turn token
        want = tok(answer, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert ln["response_token_ids"] == want
        for name in drafters:
            assert len(ln["tvd"][name]) == len(want) == len(ln["top1"][name])
            assert all(0.0 <= v <= 1.0 for v in ln["tvd"][name])
    total = sum(len(ln["response_token_ids"]) for ln in lines)
    for name in drafters:
        s = doc["summary"][name]
        assert s["all"]["num_tokens"] == total
        assert s["vqa"]["num_tokens"] + s["captioning"]["num_tokens"] == total
        assert 0.0 < s["all"]["tvd"]["mean"] < 1.0 and 0.0 <= s["all"]["top1_agreement"] <= 1.0
        assert s["all"]["tvd"]["p10"] <= s["all"]["tvd"]["median"] <= s["all"]["tvd"]["p90"]
    # the MASSV drafter sees the projected image, the text-only one does not: different values
    assert lines[0]["tvd"]["text"] != lines[0]["tvd"]["massv"]
    assert (out / "tvd_hist.png").stat().st_size > 1000

    # resume: same settings -> nothing is scored again, same summary
    def boom(*a, **k):
        raise AssertionError("a finished record was scored again")

    orig = Scorer.__init__
    Scorer.__init__ = boom
    try:
        again = run_tvd(tiny_qwen.target, ev, drafters, out, progress=False, argv=["test"])
    finally:
        Scorer.__init__ = orig
    assert again["summary"] == doc["summary"]


def test_pipeline_values_match_an_independent_computation(tiny_qwen, tmp_path):
    """Target logits from the full VLM, drafter logits with the target's image features, compared
    at the response positions only: recomputed here by hand for one record."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from massv_vllm.training.modeling import MassvDrafter
    from massv_vllm.training.target_features import TargetEncoder

    ev = _eval(tmp_path, n=1)
    doc_dir = tmp_path / "o"
    run_tvd(tiny_qwen.target, ev, {"massv": str(tiny_qwen.drafter)}, doc_dir, progress=False, argv=["t"])
    line = json.loads((doc_dir / "tokens.jsonl").read_text().splitlines()[0])
    resp = line["response_token_ids"]

    img = synthetic_image(0, (96, 64))
    proc = AutoProcessor.from_pretrained(str(tiny_qwen.target))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0][1]}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inp = proc(text=[text], images=[[img]], return_tensors="pt")
    p = inp["input_ids"].shape[1]
    ids = torch.cat([inp["input_ids"], torch.tensor([resp])], dim=1)
    target = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen.target)).eval()
    extra = {k: v for k, v in inp.items() if k in ("pixel_values", "image_grid_thw")}
    # transformers finds the image tokens for M-RoPE through mm_token_type_ids (1 = image)
    extra["mm_token_type_ids"] = torch.cat(
        [inp["mm_token_type_ids"], torch.zeros(1, len(resp), dtype=torch.long)], 1
    )
    with torch.no_grad():
        t_logits = target(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
        feats = torch.cat(TargetEncoder(tiny_qwen.target).image_features([img]))
        d_logits = MassvDrafter.from_pretrained(tiny_qwen.drafter).eval()(ids, image_embeds=feats).logits[0]
    r = len(resp)
    expected = tvd(
        probs_from_logits(d_logits[p - 1 : p - 1 + r]), probs_from_logits(t_logits[p - 1 : p - 1 + r])
    )
    assert line["tvd"]["massv"] == pytest.approx(expected.tolist(), abs=1e-5)
    shifted = tvd(probs_from_logits(d_logits[p : p + r]), probs_from_logits(t_logits[p - 1 : p - 1 + r]))
    assert shifted.tolist() != pytest.approx(expected.tolist(), abs=1e-5)  # the check can fail


def test_token_ids_from_a_generation_file_and_gemma(tiny_gemma, tmp_path):
    ev = _eval(tmp_path, n=2)
    gen = tmp_path / "gen.jsonl"
    rows = [  # generate.py rows: "<source id>#<sample>"; the lowest sample index is used; r1 missing
        {"id": "r0#1", "source_id": "r0", "sample_index": 1, "response_token_ids": [40, 41]},
        {"id": "r0#0", "source_id": "r0", "sample_index": 0, "response_token_ids": [30, 31, 32, 33]},
    ]
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = run_tvd(
        tiny_gemma.target,
        ev,
        {"massv": str(tiny_gemma.drafter)},
        tmp_path / "g",
        responses="token_ids",
        responses_file=gen,
        progress=False,
        argv=["t"],
    )
    assert doc["num_records"] == 1
    assert doc["summary"]["massv"]["all"]["num_tokens"] == 4
    line = json.loads((tmp_path / "g" / "tokens.jsonl").read_text().splitlines()[0])
    assert line["id"] == "r0" and line["response_token_ids"] == [30, 31, 32, 33]
    assert doc["eval"]["read_stats"]["skipped"] == {"no generated token ids": 1}
    with pytest.raises(ValueError, match="only goes with"):
        run_tvd(tiny_gemma.target, ev, {"m": str(tiny_gemma.drafter)}, tmp_path / "x", responses_file=gen)


def test_mismatched_drafter_is_refused(tiny_qwen, tiny_gemma, tmp_path):
    ev = _eval(tmp_path, n=1)
    with pytest.raises(ValueError, match="drafter 'g'"):
        run_tvd(tiny_qwen.target, ev, {"g": str(tiny_gemma.drafter)}, tmp_path / "x", progress=False)
