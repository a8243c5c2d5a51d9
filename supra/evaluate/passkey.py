"""Synthetic passkey retrieval (Mohtashami & Jaggi 2023): find a number hidden in filler text.

A prompt of about L tokens repeats an irrelevant filler paragraph, with "The pass key is NNNNN.
Remember it. NNNNN is the pass key." inserted at relative depth d (0 = right after the
instructions, 1 = just before the question), and ends with the question. Greedy decoding
answers; a trial is right when the generated text contains the number. Accuracy per (length,
depth) cell over `trials` random keys.
"""

from __future__ import annotations

import random

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


def build_prompt(tokenizer: PreTrainedTokenizerBase, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a prompt of at most `length` tokens (as close as whole filler paragraphs allow)."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    head, needle = encode(INSTRUCTION), encode(NEEDLE.format(key=key))
    question, filler = encode(QUESTION), encode(FILLER)
    room = length - len(head) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt without filler "
                         f"({length - room} tokens)")
    repeats = room // len(filler)
    before = round(depth * repeats)
    return head + filler * before + needle + filler * (repeats - before) + question


@torch.no_grad()
def passkey(model: nn.Module, tokenizer: PreTrainedTokenizerBase, lengths: list[int], depths: list[float],
            trials: int, seed: int = 0) -> dict:
    """Accuracy grid [length][depth]; all trials of one cell run as one left-padded batch."""
    if trials < 1 or not lengths or not depths:
        raise ValueError("passkey needs eval.passkey_trials >= 1 and non-empty passkey_lengths / passkey_depths")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"eval.passkey_depths must lie in [0, 1], got {list(depths)}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    accuracy, prompt_tokens, examples = [], [], []
    for length in lengths:
        row = []
        for depth in depths:
            keys = [str(rng.randint(10000, 99999)) for _ in range(trials)]
            prompts = [build_prompt(tokenizer, length, depth, key) for key in keys]
            width = max(map(len, prompts))
            ids = torch.full((trials, width), pad, dtype=torch.long)
            mask = torch.zeros((trials, width), dtype=torch.long)
            for i, prompt in enumerate(prompts):  # left padding: every row's answer starts at the same column
                ids[i, width - len(prompt):] = torch.tensor(prompt)
                mask[i, width - len(prompt):] = 1
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=8, do_sample=False,
                                 num_beams=1, pad_token_id=pad)
            answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            row.append(sum(key in answer for key, answer in zip(keys, answers)) / trials)
            examples.append({"length": length, "depth": depth, "key": keys[0], "answer": answers[0]})
        accuracy.append(row)
        prompt_tokens.append(len(prompts[0]))
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy,
            "prompt_tokens": prompt_tokens,
            "mean_accuracy": sum(map(sum, accuracy)) / (len(lengths) * len(depths)), "examples": examples}
