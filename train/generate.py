"""Self-distilled SDViT data: the target answers instruction prompts through vLLM.

    python train/generate.py --recipe train/recipes/qwen2.5-vl-7b_qwen2.5-1.5b.json \\
        --target Qwen2.5-VL-7B-Instruct --data llava_instruct/llava_v1_5_mix665k.json \\
        --image-root llava_instruct/images --out runs/generated

Resumable: rerun the same command after a crash. ``--text-only`` drops the images (data for
text-only drafters). All logic lives in ``massv_vllm.training.generation``; ``--help`` lists options.
"""

from massv_vllm.training.generation import main

if __name__ == "__main__":  # vLLM starts worker processes: keep the entry point guarded
    main()
