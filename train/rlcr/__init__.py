"""RLCR (RL with calibration rewards): rewards, data, and the training pipeline.

rewards   -- completion parser, answer matching, RLCR/RLVR rewards, GRPO advantages
prompts   -- system prompts of the official recipe and chat/prompt assembly
data      -- local JSONL loaders (HotpotQA-style, math) into `datasets.Dataset`
synthetic -- a synthetic QA task with per-class irreducible uncertainty
tokenizer -- byte tokenizer with one reserved id per RLCR tag (tiny CPU models)
rollout   -- batched, jitted, sharded sampling of G completions per prompt
grpo      -- reusable GRPO learner: advantages, PPO-clip loss, KL, one jitted update step
sft       -- SFT warm-up on (prompt, completion) pairs through train.trainer / train.loop
job, cli  -- `jaxlab train rlcr`: SFT -> RLVR and RLCR -> calibration evaluation
Metrics live in `eval.calibration`. See docs/rlcr.md.
"""
