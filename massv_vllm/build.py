"""Build an untrained MASSV drafter folder from a small LM and a target VLM.

    massv-build-drafter --small-lm Qwen2.5-1.5B-Instruct --target Qwen2.5-VL-7B-Instruct --out drafter/

Reads the target's config (family, image token, image-embedding width, vocab), pads the small
LM's embedding/lm_head to the target vocab (padded logits are masked at run time), initialises the
projector and writes an HF-format folder that ``MassvDrafter.from_pretrained`` and vLLM
(``"method": "massv"``) load. ``--text-only`` writes the same folder without a projector: the
text-only baseline drafter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from massv_vllm.families import family_of_base, family_of_target
from massv_vllm.provenance import write_provenance
from massv_vllm.serving.checks import compare_tokenizers, load_base_config, target_config_from_dir
from massv_vllm.serving.config import (
    DEFAULT_GAMMA,
    MassvConfig,
    MassvConfigError,
    ProjectorConfig,
    TargetInfo,
)
from massv_vllm.training.modeling import MassvDrafter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_drafter(
    small_lm_dir: str | Path,
    target_dir: str | Path,
    out_dir: str | Path,
    *,
    projector_hidden_dim: int | None = None,
    projector_depth: int = 2,
    activation: str = "gelu",
    text_only: bool = False,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    gamma: int = DEFAULT_GAMMA,
) -> Path:
    """Write an untrained drafter folder for ``target_dir`` built on ``small_lm_dir`` (``gamma``:
    the draft tokens vLLM uses when none are given, recorded in its speculators section)."""
    from transformers import AutoModelForCausalLM

    small, target = Path(small_lm_dir), Path(target_dir)
    subject = f"cannot build a MASSV drafter from {small} for {target}"
    tcfg = target_config_from_dir(target)
    fam = family_of_target(tcfg)
    if fam is None:
        raise MassvConfigError(subject, f"target architectures {tcfg.architectures} are not a supported VLM")
    scfg = load_base_config(small, subject)
    sfam = family_of_base(scfg.model_type)
    problems = []
    if sfam is None or sfam.name != fam.name:
        problems.append(
            f"small LM model_type {scfg.model_type!r} is not of the target's family "
            f"(expected one of {list(fam.base_model_types)})"
        )
    problems += compare_tokenizers(small, target)
    target_vocab = fam.text_vocab_size(tcfg)
    if scfg.vocab_size > target_vocab:
        problems.append(f"small LM vocab {scfg.vocab_size} is larger than the target's {target_vocab}")
    if problems:
        raise MassvConfigError(subject, problems)

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(small), dtype=dtype or "auto", trust_remote_code=False)
    base_vocab = base.get_input_embeddings().weight.shape[0]
    pad_vocab(base, target_vocab)
    embed_dim = fam.image_embed_dim(tcfg)
    massv = MassvConfig(
        target=TargetInfo(
            family=fam.name,
            architecture=fam.target_architectures[0],
            image_token_id=fam.image_token_id(tcfg),
            image_embed_dim=embed_dim,
            vocab_size=target_vocab,
        ),
        base_architecture=fam.base_architecture,
        base_vocab_size=base_vocab,
        projector=None
        if text_only
        else ProjectorConfig(
            input_dim=embed_dim,
            hidden_dim=projector_hidden_dim or base.config.hidden_size,
            depth=projector_depth,
            activation=activation,
        ),
    )
    drafter = MassvDrafter(base, massv)
    out = drafter.save_pretrained(out_dir, tokenizer_from=small, verifier=target, gamma=gamma)
    write_provenance(
        out,
        kind="build_drafter",
        inputs={"small_lm": str(small), "target": str(target)},
        extra={"text_only": text_only, "seed": seed},
    )
    return out


@torch.no_grad()
def pad_vocab(model: torch.nn.Module, vocab_size: int) -> None:
    """Grow embedding (and untied lm_head) to ``vocab_size`` rows; new rows are zero."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if old == vocab_size:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.get_input_embeddings().weight[old:].zero_()
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        head.weight[old:].zero_()
    model.config.vocab_size = vocab_size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small-lm", required=True, help="folder of the small same-family LM")
    p.add_argument("--target", required=True, help="folder of the target VLM")
    p.add_argument("--out", required=True, help="output drafter folder")
    p.add_argument("--projector-hidden-dim", type=int, default=None, help="default: small LM hidden size")
    p.add_argument("--projector-depth", type=int, default=2)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--text-only", action="store_true", help="no projector (text-only baseline drafter)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the small LM's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gamma",
        type=int,
        default=DEFAULT_GAMMA,
        help="draft tokens per step recorded in the folder (used when vLLM is given none)",
    )
    a = p.parse_args(argv)
    # One error line instead of a traceback: hub ids (the usage line's own example) are not read.
    folders = {"--small-lm": a.small_lm, "--target": a.target}
    not_dirs = [f"{flag} {path}" for flag, path in folders.items() if not Path(path).is_dir()]
    if not_dirs:
        p.exit(
            2,
            f"massv-build-drafter: error: --small-lm and --target must be local model folders, but "
            f"{' and '.join(not_dirs)} {'is not a folder' if len(not_dirs) == 1 else 'are not folders'} "
            "(for a Hugging Face hub id, download it first: huggingface-cli download <id> "
            "--local-dir <folder>)\n",
        )
    try:
        out = build_drafter(
            a.small_lm,
            a.target,
            a.out,
            projector_hidden_dim=a.projector_hidden_dim,
            projector_depth=a.projector_depth,
            activation=a.activation,
            text_only=a.text_only,
            dtype=DTYPES.get(a.dtype) if a.dtype else None,
            seed=a.seed,
            gamma=a.gamma,
        )
    except MassvConfigError as e:
        p.exit(1, f"massv-build-drafter: error: {e}\n")
    print(f"wrote MASSV drafter to {out}")


if __name__ == "__main__":
    main()
