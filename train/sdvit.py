"""Phase 2 (SDViT): fine-tune projector + small LM on the target's own responses (generate.py).

    deepspeed --num_gpus 1 train/sdvit.py --deepspeed_config train/configs/zero2.json \\
        --recipe train/recipes/qwen2.5-vl-7b_qwen2.5-1.5b.json \\
        --drafter runs/phase1/drafter --target Qwen2.5-VL-7B-Instruct \\
        --data runs/generated/generated.jsonl --out runs/phase2

All logic lives in ``massv_vllm.training.trainer``; ``--help`` lists the options.
"""

from massv_vllm.training.recipes import SDVIT
from massv_vllm.training.trainer import main

if __name__ == "__main__":
    main(SDVIT)
