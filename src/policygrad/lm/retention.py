"""What a trained policy keeps of the model it started from: its KL divergence to that model on prompts, and its
answers to a small fixed set of factual questions (docs/studies.md, study 2: does a KL penalty to the pre-trained
policy keep more of it than plain GRPO?).

    KL(pi || pi_0 | x) = E_{y ~ pi(.|x)} [ log pi(y | x) - log pi_0(y | x) ]
                       = E_{y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log pi_0(y_t | x, y_<t) ]

estimated per prompt by the mean over K completions sampled from ``pi`` at temperature 1 of the summed per-token
log-ratio (k1 of :func:`policygrad.regularizers.kl`, summed over the sequence: unbiased for the sequence-level KL,
in nats, of the two models' own distributions; Schulman 2020). Completions end at EOS or ``max_new_tokens``, so it is
the KL of the distributions truncated there.

The factual questions (:data:`FACTS`) are short, one-answer questions a small instruct model mostly knows; an answer
counts when any accepted spelling occurs in the greedy reply, case-insensitively. They are a coarse probe of
forgetting, not a benchmark: 30 questions, so one answer is 3.3 points.

Shapes: B prompts, K samples each, N = B * K rows, T completion tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FACTS", "answers_fact", "factual_answers", "sequence_kl"]

FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the largest planet in the solar system?", ("jupiter",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("Which planet is closest to the Sun?", ("mercury",)),
    ("What is the chemical symbol for gold?", ("au",)),
    ("What is the chemical symbol for water?", ("h2o", "h₂o")),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2", "co₂")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the boiling point of water in degrees Celsius at sea level?", ("100",)),
    ("What is 12 multiplied by 12?", ("144",)),
    ("What is the square root of 81?", ("nine", "9")),
    ("Who wrote the play Romeo and Juliet?", ("shakespeare",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("Who developed the theory of relativity?", ("einstein",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is the longest river in Africa?", ("nile",)),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("What is the freezing point of water in degrees Fahrenheit?", ("32",)),
    ("What language is mainly spoken in Brazil?", ("portuguese",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("What organ pumps blood through the human body?", ("heart",)),
)
"""(question, accepted answers in lower case): the fixed factual probe of study 2."""


def answers_fact(reply: str, accepted: Sequence[str]) -> bool:
    """Whether ``reply`` contains one of the ``accepted`` answers, case-insensitively.

    >>> answers_fact("The capital of France is Paris.", ("paris",))
    True
    >>> answers_fact("I am not sure.", ("paris",))
    False
    """
    text = reply.lower()
    return any(answer in text for answer in accepted)


@torch.no_grad()
def factual_answers(
    model: Any,
    tokenizer: Any,
    facts: Sequence[tuple[str, Sequence[str]]] = FACTS,
    max_new_tokens: int = 32,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """The greedy reply of ``model`` to each question of ``facts`` (chat-formatted when the tokenizer has a
    template, as every prompt is when sampled), and whether it answers: ``[{"question", "reply", "correct"}, ...]``."""
    from policygrad.lm.rollout import sample

    was_training = model.training
    model.eval()
    prompts = [question for question, _ in facts]
    rollout = sample(
        model,
        tokenizer,
        prompts,
        group_size=1,
        max_new_tokens=max_new_tokens,
        greedy=True,
        autocast_dtype=autocast_dtype,
        score_tokens=False,
    )
    model.train(was_training)
    return [
        {"question": question, "reply": reply.strip(), "correct": answers_fact(reply, accepted)}
        for (question, accepted), reply in zip(facts, rollout.completions)
    ]


@torch.no_grad()
def sequence_kl(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    samples: int = 4,
    max_new_tokens: int = 48,
    seed: int = 0,
    micro_batch_size: int | None = 16,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Per prompt, the k1 estimate of KL(policy || reference) over ``samples`` completions drawn from ``policy`` at
    temperature 1 (module docstring), in nats per completion.

    Args:
        prompts: B prompts, as the task gives them (sampling chat-formats them when the tokenizer has a template).
        seed: seeds the sampling, so the same weights give the same estimate.
    Returns:
        (B,) float64 estimates; each is 0 when ``policy`` and ``reference`` are the same model.
    """
    from policygrad.lm.rollout import rollout_logprobs, sample

    was_training = policy.training
    policy.eval()
    torch.manual_seed(seed)
    rollout = sample(
        policy,
        tokenizer,
        prompts,
        group_size=samples,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        micro_batch_size=micro_batch_size,
        autocast_dtype=autocast_dtype,
        score_tokens=True,
    )  # rollout.logprobs: (N, T) under the policy, zero where masked
    policy.train(was_training)
    ref_logprobs = rollout_logprobs(reference, rollout, 1.0, micro_batch_size, autocast_dtype)  # (N, T), 0 masked
    log_ratio = (rollout.logprobs - ref_logprobs).sum(-1)  # (N,): both are 0 past each completion's end
    return log_ratio.double().view(len(prompts), samples).mean(-1)  # (B,)
