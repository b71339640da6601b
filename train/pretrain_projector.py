"""Phase 1: train the MASSV projector on image-caption pairs (small LM and target frozen).

    deepspeed --num_gpus 1 train/pretrain_projector.py --deepspeed_config train/configs/zero2.json \\
        --recipe train/recipes/qwen2.5-vl-7b_qwen2.5-1.5b.json \\
        --drafter drafters/untrained --target Qwen2.5-VL-7B-Instruct \\
        --data llava_pretrain/blip_laion_cc_sbu_558k.json --image-root llava_pretrain/images --out runs/phase1

All logic lives in ``massv_vllm.training.trainer``; ``--help`` lists the options.
"""

from massv_vllm.training.recipes import PRETRAIN
from massv_vllm.training.trainer import main

if __name__ == "__main__":
    main(PRETRAIN)
