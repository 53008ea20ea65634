"""RLCR (RL with calibration rewards): model-independent pieces.

rewards   -- completion parser, answer matching, RLCR/RLVR rewards, GRPO advantages
prompts   -- system prompts of the official recipe and chat/prompt assembly
data      -- local JSONL loaders (HotpotQA-style, math) into `datasets.Dataset`
synthetic -- a synthetic QA task with per-class irreducible uncertainty
Metrics live in `eval.calibration`. See docs/rlcr.md.
"""
