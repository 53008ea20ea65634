"""Prompts of the RLCR recipe (paraphrased from the authors' code) and chat assembly.

Chat layout of the official recipe: a system turn that defines the output tags
and a user turn ``"\\n\\nPROBLEM: {problem}\\n\\n"``. For HotpotQA the problem text
is the question, a note that grading is exact match, and the paragraphs.

`build_prompt` applies an HF tokenizer's chat template when one is given (and
has a template) and otherwise renders a plain-text fallback for byte-level
models (`render_plain`).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "RLCR_SYSTEM_PROMPT", "RLCR_SYSTEM_PROMPT_LONG", "RLVR_SYSTEM_PROMPT", "HOTPOT_EM_NOTE",
    "SYSTEM_PROMPTS", "system_prompt", "user_turn", "hotpot_problem", "build_messages",
    "render_plain", "build_prompt",
]

_FORMAT_LINE = (
    "Follow exactly this format: <think> your reasoning </think><answer> your final answer "
    "</answer><analysis> your analysis of how confident you are and why </analysis>"
    "<confidence> a number between 0 and 1 </confidence>"
)

RLCR_SYSTEM_PROMPT = (
    "The User asks a question and the Assistant solves it. The Assistant first reasons about "
    "the problem privately, then gives the final answer, then examines how sure it is of that "
    "answer, and finally states its confidence. The reasoning goes inside <think> </think> "
    "tags, the final answer inside <answer> </answer> tags, the analysis of confidence and "
    "uncertainty inside <analysis> </analysis> tags, and the confidence, a number from 0 to 1 "
    "inclusive, inside <confidence> </confidence> tags. " + _FORMAT_LINE
)

RLCR_SYSTEM_PROMPT_LONG = (
    RLCR_SYSTEM_PROMPT.removesuffix(_FORMAT_LINE)
    + "Guidelines for the analysis:\n"
    "1. Point out where the reasoning could be wrong, and where the question or the solution "
    "steps are ambiguous.\n"
    "2. Do not fix or change the answer; only reason about what makes it uncertain.\n"
    "3. If the answer looks right, it is fine to list only a few uncertainties and say that you "
    "cannot find more.\n"
    "4. Uncertainty is not only error: it can come from an ambiguous question or from how a "
    "fact or rule was applied.\n"
    "5. Mention alternative approaches or readings that could lead to a different answer.\n"
    "6. Be specific; avoid generic statements.\n"
    "7. Put this analysis inside <analysis> </analysis> tags.\n" + _FORMAT_LINE
)

RLVR_SYSTEM_PROMPT = (
    "The User asks a question and the Assistant solves it. The Assistant first reasons about "
    "the problem privately and then gives the answer. The reasoning goes inside <think> "
    "</think> tags and the answer inside <answer> </answer> tags, i.e. <think> your reasoning "
    "</think><answer> your answer </answer>"
)

HOTPOT_EM_NOTE = (
    "Your answer is graded by exact match, so put only the answer itself inside the "
    "<answer> </answer> tags, with no sentences or reasoning."
)

# Official use: HotpotQA RLCR -> "rlcr_long"; math RLCR -> "rlcr"; RLVR -> "rlvr".
SYSTEM_PROMPTS = {"rlcr": RLCR_SYSTEM_PROMPT, "rlcr_long": RLCR_SYSTEM_PROMPT_LONG,
                  "rlvr": RLVR_SYSTEM_PROMPT}


def system_prompt(name: str) -> str:
  if name not in SYSTEM_PROMPTS:
    raise ValueError(f"name: unknown system prompt {name!r} (known: {', '.join(SYSTEM_PROMPTS)})")
  return SYSTEM_PROMPTS[name]


def hotpot_problem(question: str, context: str | Sequence[str] = "") -> str:
  """Question, the exact-match note, then the supporting paragraphs (official layout)."""
  paragraphs = [context] if isinstance(context, str) else list(context)
  paragraphs = [p for p in paragraphs if p.strip()]
  out = f"Question: {question} \n\n{HOTPOT_EM_NOTE} \n\n"
  if paragraphs:
    body = "".join(f"Paragraph {i} \n\n {p} \n\n--------------------------------\n\n"
                   for i, p in enumerate(paragraphs))
    out += f"Supporting Information: {body} \n\n"
  return out


def user_turn(problem: str) -> str:
  return f"\n\nPROBLEM: {problem}\n\n"


def build_messages(problem: str, *, system: str | None = "rlcr") -> list[dict[str, str]]:
  """[system, user] chat messages; `system` is a SYSTEM_PROMPTS name or None for no system turn."""
  msgs = [] if system is None else [{"role": "system", "content": system_prompt(system)}]
  msgs.append({"role": "user", "content": user_turn(problem)})
  return msgs


def render_plain(messages: Sequence[dict[str, str]]) -> str:
  """Plain-text chat rendering for tokenizers without a chat template.

  Each turn is ``"<|role|>\\n{content}\\n"``; the string ends with
  ``"<|assistant|>\\n"`` so the completion follows directly.
  """
  out = []
  for m in messages:
    if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
      raise ValueError(f"messages: each needs role in system/user/assistant and content, got {m!r}")
    out.append(f"<|{m['role']}|>\n{m['content']}\n")
  return "".join(out) + "<|assistant|>\n"


def build_prompt(problem: str, *, system: str | None = "rlcr", tokenizer: Any = None,
                 use_chat_template: bool | None = None) -> str:
  """The prompt string a model continues with its completion.

  use_chat_template: True requires `tokenizer.apply_chat_template` with a
  template; False always renders plain text; None (default) uses the template
  when the tokenizer has one, else plain text.
  """
  messages = build_messages(problem, system=system)
  has_template = tokenizer is not None and hasattr(tokenizer, "apply_chat_template") and (
      getattr(tokenizer, "chat_template", None) is not None)
  if use_chat_template is None:
    use_chat_template = has_template
  if use_chat_template:
    if not has_template:
      raise ValueError("tokenizer: use_chat_template=True needs a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return render_plain(messages)
