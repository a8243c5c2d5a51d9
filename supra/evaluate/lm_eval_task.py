"""lm-evaluation-harness 0.4.x through its Python API, with any supra model wrapped as an `LM`.

`SupraLM` scores (context, continuation) pairs the way lm-eval's own HF wrapper does: the pair is
tokenised whole and split where the context's tokens end (so a continuation that merges with the
context's last characters is scored as the model would see it), the model reads context +
continuation minus the last token, and only the continuation's positions are summed. Batches are
right-padded without an attention mask: every model here is causal, so pads after a row's last
token cannot change that row's logits, and position ids stay 0..n-1 as in an unpadded forward.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from ..models import hub_unreachable

Request = tuple[tuple[str, str], list[int], list[int]]


class SupraLM(TemplateLM):
    """A causal LM (supra-converted or not) and its tokenizer, as lm-eval's `LM`."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 4,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        config_length = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_length = max_length or config_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Like lm-eval's HF wrapper: no BOS/EOS added unless asked (the prefix token stands in for BOS).
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            # The input is context + continuation without its last token, cut to max_length from the left.
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in chunk]
            width = max(map(len, inputs))
            batch = torch.full((len(chunk), width), pad, dtype=torch.long)
            for row, ids in enumerate(inputs):
                batch[row, :len(ids)] = torch.tensor(ids)
            logprobs = F.log_softmax(self.model(input_ids=batch.to(self.device), use_cache=False).logits.float(), -1)
            for row, i in enumerate(chunk):
                continuation = torch.tensor(pairs[i][1], device=self.device)
                end = len(inputs[row])
                scores = logprobs[row, end - len(continuation):end]
                total = scores.gather(-1, continuation[:, None]).sum().item()
                greedy = bool((scores.argmax(-1) == continuation).all())
                results[i] = (total, greedy)
        return results

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        return self.score_tokens([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint max_length windows (lm-eval's perplexity tasks)."""
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            totals.append(sum(score for score, _ in self.score_tokens(windows)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) generation through model.generate, cut at the stop strings."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            do_sample = bool(kwargs.pop("do_sample", False))
            sampling = {k: kwargs[k] for k in ("temperature", "top_p", "top_k") if k in kwargs} if do_sample else {}
            # Keep the end of a context too long for max_length together with the tokens to generate.
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.prefix_token_id]
            prompt = torch.tensor([ids], device=self.device)
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                                      do_sample=do_sample, num_beams=1, pad_token_id=self.eot_token_id,
                                      stop_strings=until, tokenizer=self.tokenizer, **sampling)
            text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager for `tasks`, refused in one line when a task is unknown or, with the hub
    out of reach, its dataset is not in the local cache. eval checks this before it loads a model and
    runs the tasks after: the second call is the first one's answer (indexing every task YAML and
    loading the datasets offline take seconds each)."""
    return _checked_task_manager(tuple(tasks), include_path)


@functools.cache
def _checked_task_manager(tasks: tuple[str, ...], include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = list(tasks)

    if include_path is not None and not Path(include_path).expanduser().exists():
        raise UserError(f"eval.lm_eval_include_path {include_path} does not exist")
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {include_path}" if include_path else " (pass eval.lm_eval_include_path for local tasks)"
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: not shipped with lm-eval{where}")
    if hub_unreachable():
        with offline_datasets(tasks):
            get_task_dict(tasks, manager)  # what is cached loads in seconds, and again from the cache below
    return manager


def run_lm_eval(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: list[str], *,
                include_path: str | None = None, limit: int | float | None = None, num_fewshot: int | None = None,
                batch_size: int = 4, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on `tasks`; offline when every task is a local YAML under include_path."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    with offline_datasets(tasks) if hub_unreachable() else contextlib.nullcontext():
        return simple_evaluate(model=SupraLM(model, tokenizer, batch_size), tasks=tasks, num_fewshot=num_fewshot,
                               limit=limit, task_manager=manager, log_samples=log_samples, bootstrap_iters=0)


@contextlib.contextmanager
def offline_datasets(tasks: list[str]) -> Iterator[None]:
    """Datasets from HF_HOME only, while the hub cannot be reached; a missing one is one line."""
    try:
        with cache_only():
            yield
    except Exception as err:
        if not _offline(err):
            raise
        raise UserError(f"lm-eval task(s) {', '.join(tasks)} need datasets that are not in the local cache, and "
                        f"{hub_unreachable()}: pre-fetch them into HF_HOME where there is network, or give local "
                        "task YAMLs with eval.lm_eval_include_path") from None


def _offline(err: BaseException | None) -> bool:
    """Whether an error, or one it came from, is the network's (no connection, DNS, offline mode)."""
    while err is not None:
        if isinstance(err, (ConnectionError, socket.gaierror, TimeoutError)) or "offline" in str(err).lower() \
                or type(err).__name__ in ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """huggingface_hub and datasets in offline mode while the hub cannot be reached: datasets already
    in HF_HOME load, a missing one fails at once instead of after every retry (minutes, each printed).
    Both libraries read these flags when a download starts, not only at import."""
    import datasets.config
    from huggingface_hub import constants

    flags = [(constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


def summarize(results: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Metrics per task (lm-eval's `metric,filter` keys flattened to `metric`) and table rows."""
    summary: dict[str, dict[str, float]] = {}
    rows = []
    for task, metrics in results["results"].items():
        values = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            numeric = isinstance(value, (int, float))
            if numeric and not metric.endswith("_stderr") and metric not in ("alias", "sample_len"):
                name = metric if filter_name in ("", "none") else f"{metric}[{filter_name}]"
                values[name] = float(value)
                rows.append((f"{task} {name}", f"{value:.4f}"))
        summary[task] = values
    return {"tasks": summary, "n_samples": results.get("n-samples", {}),
            "num_fewshot": results.get("n-shot", {})}, rows
