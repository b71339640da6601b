"""Target training of the synthetic world: inputs exactly as the model/vLLM build them, the fast
training paths equal the stock ones, the sampler and schedule resume exactly."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from benchmarks.world import generate_world as gw
from benchmarks.world import train_target as tt
from benchmarks.world.sizes import SMALL, WorldCounts
from massv_vllm.training.data.records import hf_messages, load_image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and far faster on a busy 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from massv_vllm.testing.tiny import train_tokenizer

    root = tmp_path_factory.mktemp("world")
    counts = WorldCounts(target_train=6, captions=1, instructions=1, eval_per_task=1, val=4, lm_texts=4)
    gw.generate_world(root / "world", counts, seed=0, workers=1)
    train_tokenizer(root / "tok", "qwen2_5_vl", gw.tokenizer_corpus(60), 512)
    tt.build_target(root / "target", root / "tok", SMALL.target.arch, window_px=448, seed=0)
    return root


@pytest.fixture(scope="module")
def parts(world):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(world / "target"), dtype=torch.float32)
    enc = tt.PromptEncoder(AutoProcessor.from_pretrained(str(world / "target")))
    train = tt.read_split(world / "world", "target_train")
    return model, enc, train


def _batch(enc, records):
    items = [tt.TrainSet(records, enc)[i] for i in range(len(records))]
    return tt.collate(items, enc.tokenizer.pad_token_id)


def test_encoded_sample_is_the_chat_template_with_loss_on_the_answer_only(parts):
    _, enc, train = parts
    for r in train[:6]:
        item = tt.TrainSet([r], enc)[0]
        full = enc.processor.apply_chat_template(hf_messages(r, with_response=True), tokenize=False)
        ref = enc.processor(text=[full], images=[load_image(r.images[0])], return_tensors="pt")["input_ids"]
        ids = item["input_ids"]
        assert ref[0].tolist()[: len(ids)] == ids  # the template adds only "\n" after <|im_end|>
        answer = [t for t, lab in zip(ids, item["labels"]) if lab != -100]
        assert enc.tokenizer.decode(answer) == r.response + "<|im_end|>"
        first_answer = next(i for i, lab in enumerate(item["labels"]) if lab != -100)
        assert first_answer > ids.index(enc.image_token_id) and set(item["labels"][:first_answer]) == {-100}


def test_rope_positions_match_the_model_and_pixels_match_the_processor(parts):
    model, enc, train = parts
    b = _batch(enc, train[:5])  # mixed image sizes, right padding
    token_type = (b["input_ids"] == enc.image_token_id).int()
    ref, _ = model.model.get_rope_index(
        b["input_ids"], token_type, image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"]
    )
    assert torch.equal(ref, b["position_ids"])
    assert b["pixel_values"].dtype == torch.uint8
    normalized = tt.PixelNormalizer(enc.processor.image_processor, torch.device("cpu"))(b["pixel_values"])
    images = [load_image(r.images[0]) for r in train[:5]]
    stock = enc.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(normalized, stock, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        tt.PixelNormalizer(enc.processor.image_processor, torch.device("cpu"))(stock)


def test_fast_vision_paths_compute_the_stock_function(parts):
    model, enc, train = parts
    b = _batch(enc, train[:5])
    normalize = tt.PixelNormalizer(enc.processor.image_processor, torch.device("cpu"))
    b["pixel_values"] = normalize(b["pixel_values"])
    fast = copy.deepcopy(model)
    tt.linear_patch_embed(fast)
    tt.padded_vision_attention(fast)
    for m in (model, fast):
        m.zero_grad()
    loss_ref = model(**b).loss
    loss_ref.backward()
    loss_fast = fast(**b).loss
    loss_fast.backward()
    assert torch.allclose(loss_ref, loss_fast, atol=1e-5)
    g_ref = model.model.visual.blocks[0].attn.qkv.weight.grad
    g_fast = fast.model.visual.blocks[0].attn.qkv.weight.grad
    assert torch.allclose(g_ref, g_fast, atol=1e-5, rtol=1e-4)
    # The prompt ids + M-RoPE positions are what the model computes itself from mm_token_type_ids.
    del b["position_ids"]
    b["mm_token_type_ids"] = (b["input_ids"] == enc.image_token_id).int()
    with torch.no_grad():
        assert torch.allclose(model(**b).loss, loss_ref, atol=1e-5)


def test_sampler_resumes_exactly_and_covers_every_sample_once_per_epoch():
    full = list(tt.StepBatches(n=10, batch_size=4, start_step=0, total_steps=7, seed=3))
    resumed = list(tt.StepBatches(n=10, batch_size=4, start_step=3, total_steps=7, seed=3))
    assert resumed == full[3:]
    flat = [i for b in full for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per epoch


def test_schedule_warms_up_decays_and_honours_the_time_budget():
    lrs = [tt.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert tt.lr_at(20, 1.0, 10, 100, time_fraction=1.0) == pytest.approx(0.1)  # out of time: floor


@torch.no_grad()
def _greedy_by_hand(model, enc, records) -> list[str]:
    """Greedy answers the plain way: one record at a time, no padding, no KV cache; each new token
    is the argmax of a full forward pass over the prompt and the tokens so far, until an end token
    of the model's generation config or the task's token limit."""
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
    was_training = model.training
    model.eval()
    answers = []
    for r in records:
        inputs = enc.processor(
            text=[enc.prompt_text(r)], images=[[load_image(r.images[0])]], return_tensors="pt"
        )
        ids = inputs["input_ids"][0].tolist()
        new: list[int] = []
        for _ in range(tt.MAX_NEW_TOKENS[r.task]):
            x = torch.tensor([ids + new])
            logits = model(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                mm_token_type_ids=(x == enc.image_token_id).int(),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
            ).logits
            new.append(int(logits[0, -1].argmax()))
            if new[-1] in ends:
                break
        answers.append(enc.tokenizer.decode(new, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def test_training_checkpoints_and_resumes_where_it_stopped(world, parts, tmp_path):
    model, enc, train = parts
    val = tt.read_split(world / "world", "val")
    sizes = dataclasses.replace(SMALL.target, batch_size=2, max_steps=2, eval_every=2, warmup_steps=1)
    state = tmp_path / "state.pt"
    m = copy.deepcopy(model)
    dev = torch.device("cpu")
    st, reason = tt._train_loop(m, enc, train, val, sizes, 0, dev, None, state)
    assert st.step == 2 and reason == "max_steps" and state.is_file() and len(st.history) == 1
    answers = tt.greedy_answers(m, enc, val[:2], dev, None)
    # generate(), batched with left padding (prompts of 156..242 tokens), = the plain way; also on
    # the untrained model, whose answers are not one repeated token
    assert answers == _greedy_by_hand(m, enc, val[:2])
    assert tt.greedy_answers(model, enc, val[:3], dev, None) == _greedy_by_hand(model, enc, val[:3])
    m2 = copy.deepcopy(model)  # a fresh process: the weights come from the checkpoint
    st2, _ = tt._train_loop(m2, enc, train, val, dataclasses.replace(sizes, max_steps=4), 0, dev, None, state)
    assert st2.step == 4 and [h["step"] for h in st2.history] == [2, 4]
    assert st2.losses[0] == st.losses[0]  # the log continues the first run's
    acc = tt.score_outputs(val[:2], answers)
    assert set(acc) == {"attribute"} and acc["attribute"]["n"] == 2
