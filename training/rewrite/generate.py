"""Batched sampling from a local causal language model through ``transformers`` (never a download).

    >>> lm = LocalLM("/models/llama-3.2-1b-instruct", device="cuda", dtype="bfloat16")
    >>> lm.complete(["Rewrite ...\\na cat on a mat =>"], temperature=0.9, top_p=0.95, max_new_tokens=77)

The model is loaded with ``local_files_only=True`` (a folder, or a name already in the HF cache); a
missing model is a ``FileNotFoundError`` naming the path. Prompts are left-padded into batches; the
completion is the decoded new tokens only. Sampling is seeded per call, so a rerun of the same
batch (e.g. after an interruption) draws the same texts.
"""

from __future__ import annotations

import torch

__all__ = ["LocalLM"]


class LocalLM:
    """A causal LM and its tokenizer from a local folder or the HF cache."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32"):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ImportError("caption rewriting needs transformers: pip install transformers") from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                model, local_files_only=True, dtype=getattr(torch, dtype)
            )
        except OSError as e:
            raise FileNotFoundError(
                f"model {model!r} is neither a local folder nor in the Hugging Face cache "
                "(run-time downloads are off: fetch it first, e.g. `huggingface-cli download`)"
            ) from e
        self.model.to(device).eval()
        self.device, self.model_path = device, model
        self.tokenizer.padding_side = "left"  # generation continues at the right end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @torch.no_grad()
    def complete(
        self,
        prompts: list[str],
        *,
        temperature: float = 0.9,
        top_p: float = 0.95,
        max_new_tokens: int = 77,
        seed: int = 0,
    ) -> list[str]:
        """One sampled completion per prompt (the new text only)."""
        if not prompts:
            return []
        if temperature <= 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise ValueError(
                f"need temperature > 0, top_p in (0, 1], max_new_tokens >= 1; got {temperature}, {top_p}, {max_new_tokens}"
            )
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        torch.manual_seed(seed)
        out = self.model.generate(
            **batch, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip
        new = out[:, batch["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
