"""CLIP towers on packed tokens: a ViT over the kept patches and a causal text transformer.

Every sequence of a batch is packed back to back into x [T, D] (no padding anywhere): LayerNorm,
the MLP and the projections run on the T real tokens, and attention goes through
``varlen_attention_qkvpacked`` with the sequences' cu_seqlens [B+1] int32 and a host ``max_seqlen``.
With CLIPA's short-token pre-training (e.g. 25% of the patches, ~15-token captions padded to 77)
this does the work of the kept tokens only.

Pre-LN blocks as open_clip's ``ResidualAttentionBlock``:  x += attn(ln_1(x));  x += mlp(ln_2(x)),
mlp = c_proj(gelu(c_fc(.))), attention = out_proj(varlen_attention(in_proj(.))). Parameter names
are open_clip's (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.i.{ln_1, attn.in_proj_weight, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
``ln_post``, ``proj``; text: ``token_embedding``, ``ln_final``, ``text_projection``), so a
``state_dict`` of :mod:`.naive` (or of open_clip's towers) loads as is.

Pooling: the ViT takes each sequence's class token (its first row); the text tower takes the last
token of each sequence (CLIP's EOT token), both from cu_seqlens on the device.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import _validation
from ..ops.patch_embed import interpolate_pos_embed, patch_embed, pos_embed_2d_sincos


def _pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class PackedAttention(nn.Module):
    """Multi-head self-attention on packed tokens; parameters as nn.MultiheadAttention's."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, cu_seqlens, max_seqlen: int, causal: bool, backend: str):
        from ..ops.varlen_attention import varlen_attention_qkvpacked

        T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(T, 3, self.heads, D // self.heads)
        out = varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, causal=causal, backend=backend)
        return self.out_proj(out.reshape(T, D))


class PackedResidualBlock(nn.Module):
    """Pre-LN transformer block on packed tokens [T, D]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x, cu_seqlens, max_seqlen: int, causal: bool, backend: str):
        x = x + self.attn(self.ln_1(x), cu_seqlens, max_seqlen, causal, backend)
        return x + self.mlp(self.ln_2(x))


class PackedTransformer(nn.Module):
    """``layers`` pre-LN blocks on packed tokens [T, D]. With ``grad_checkpointing`` on (and grad
    enabled) each block's activations are recomputed in backward (``torch.utils.checkpoint``, non-
    reentrant): memory per block drops to its input [T, D], at the cost of a second forward."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(PackedResidualBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x, cu_seqlens, max_seqlen: int, causal: bool = False, backend: str = "auto"):
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.resblocks:
            if recompute:
                x = checkpoint(block, x, cu_seqlens, max_seqlen, causal, backend, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, max_seqlen, causal, backend)
        return x


class PackedViT(nn.Module):
    """Vision tower over the kept patches of each image (any number per image), packed.

    Args:
        image_size, patch_size: int or (h, w) / int; the grid is image_size / patch_size.
        width, layers, heads, output_dim: transformer width D, depth, heads, embedding size.
        attn_backend: ``varlen_attention_qkvpacked``'s backend. patch_backend: ``patch_embed``'s.
        pos_embed: "learned" (a parameter, open_clip's default) or "sincos" (a fixed 2D sin-cos
            buffer, CLIPA's pre-training choice; recomputed exactly on resize).
        patch_bias: a bias in the patch embedding (open_clip/CLIP have none).

    >>> vit = PackedViT(32, 8, width=64, layers=2, heads=2, output_dim=16)
    >>> vit(torch.randn(3, 3, 32, 32), keep_idx=torch.tensor([[0, 5], [1, 2], [3, 15]])).shape
    torch.Size([3, 16])
    """

    def __init__(
        self, image_size, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
        attn_backend: str = "auto", *, patch_backend: str = "auto", pos_embed: str = "learned",
        patch_bias: bool = False, mlp_ratio: float = 4.0,
    ):  # fmt: skip
        super().__init__()
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        self.image_size, self.patch_size = _pair("image_size", image_size), patch_size
        self.grid_size = self._grid(self.image_size)
        self.attn_backend, self.patch_backend, self.pos_embed_kind = attn_backend, patch_backend, pos_embed
        self.output_dim = output_dim
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        n = 1 + self.grid_size[0] * self.grid_size[1]
        if pos_embed == "learned":
            self.positional_embedding = nn.Parameter(scale * torch.randn(n, width))
        else:
            self.register_buffer("positional_embedding", pos_embed_2d_sincos(*self.grid_size, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = PackedTransformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def _grid(self, image_size) -> tuple[int, int]:
        h, w = image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_size {h}x{w} must be a multiple of patch_size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def encode_tokens(self, images, keep_idx=None, *, cu_seqlens=None, max_keep=None):
        """Packed output tokens: PackedTokens(tokens [T, D] after the last block, cu_seqlens, max_seqlen)."""
        if (
            not isinstance(images, torch.Tensor)
            or images.dim() != 4
            or tuple(images.shape[-2:]) != self.image_size
        ):
            raise ValueError(
                f"images must be [B, 3, {self.image_size[0]}, {self.image_size[1]}], got "
                f"{tuple(getattr(images, 'shape', ()))}; call resize_pos_embed(new_size) to change resolution"
            )
        packed = patch_embed(
            images, self.conv1.weight, self.conv1.bias, self.positional_embedding, self.class_embedding,
            keep_idx, cu_seqlens=cu_seqlens, max_keep=max_keep, backend=self.patch_backend,
        )  # fmt: skip
        x = self.ln_pre(packed.tokens)
        x = self.transformer(x, packed.cu_seqlens, packed.max_seqlen, causal=False, backend=self.attn_backend)
        return packed._replace(tokens=x)

    def forward(self, images, keep_idx=None, *, cu_seqlens=None, max_keep=None):
        """Image embeddings [B, output_dim] from the kept patches.

        images [B, 3, H, W] at ``image_size``; keep_idx: None (all patches), [B, k] patch indices
        (row-major in the grid), or packed [T_p] with ``cu_seqlens`` [B+1] (host or device) of the
        per-image counts and optional host ``max_keep``; see :func:`~fastclip_kernels.ops.patch_embed.patch_embed`.
        """
        packed = self.encode_tokens(images, keep_idx, cu_seqlens=cu_seqlens, max_keep=max_keep)
        pooled = packed.tokens[packed.cu_seqlens[:-1].long()]  # class token of each image
        return self.ln_post(pooled) @ self.proj

    @torch.no_grad()
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (open_clip's method name)."""
        self.transformer.grad_checkpointing = bool(enable)

    def resize_pos_embed(self, new_image_size, *, learnable: bool | None = None):
        """Change the input resolution (e.g. full-resolution fine-tuning after low-resolution /
        few-token pre-training). Learned tables are interpolated bicubically (class row kept);
        sin-cos tables are recomputed for the new grid. ``learnable=True`` turns a sin-cos table
        into a learned one initialized from it (CLIPA's fine-tuning). A learned table becomes a
        new Parameter: build the optimizer after resizing.
        """
        new_size = _pair("new_image_size", new_image_size)
        new_grid = self._grid(new_size)
        old = self.positional_embedding
        kind = self.pos_embed_kind if learnable is None else ("learned" if learnable else "sincos")
        if self.pos_embed_kind == "learned" and kind == "learned":
            table = interpolate_pos_embed(old.detach(), new_grid, self.grid_size)
        else:  # the exact sin-cos table of the new grid (also the start of a learned one)
            table = pos_embed_2d_sincos(*new_grid, old.shape[1], dtype=old.dtype, device=old.device)
        del self.positional_embedding
        if kind == "learned":
            self.positional_embedding = nn.Parameter(table)
        else:
            self.register_buffer("positional_embedding", table)
        self.image_size, self.grid_size, self.pos_embed_kind = new_size, new_grid, kind


class PackedTextTransformer(nn.Module):
    """Causal text tower on packed captions; pools each caption's last token (CLIP's EOT).

    >>> text = PackedTextTransformer(100, 16, width=64, layers=2, heads=2, output_dim=16)
    >>> ids, cu = torch.tensor([5, 7, 99, 4, 99]), torch.tensor([0, 3, 5], dtype=torch.int32)
    >>> text(ids, cu, max_seqlen=3).shape
    torch.Size([2, 16])
    """

    def __init__(
        self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, output_dim: int,
        attn_backend: str = "auto", *, mlp_ratio: float = 4.0,
    ):  # fmt: skip
        super().__init__()
        self.context_length, self.vocab_size, self.output_dim = context_length, vocab_size, output_dim
        self.attn_backend = attn_backend
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = PackedTransformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (open_clip's method name)."""
        self.transformer.grad_checkpointing = bool(enable)

    def _pack_padded(self, ids, lengths, max_seqlen):
        from ..tokens.text import lengths_from_pad, pack

        B, L = ids.shape
        if lengths is None:
            if ids.device.type != "cpu":
                raise ValueError(
                    "padded ids on a device need host lengths= (the EOT position of each caption); "
                    "deriving them from the padding would read the ids back to the host"
                )
            lengths = lengths_from_pad(ids)  # CLIP pads with 0 after EOT: pool the EOT, not a pad
        if isinstance(lengths, torch.Tensor) and lengths.device.type != "cpu":
            raise TypeError(
                "lengths must be host ints (a list or a CPU tensor): the packed size is needed on the host; "
                "pack device-side with fastclip_kernels.tokens.text.pack(ids, lengths, total=...) instead"
            )
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        if lengths.shape != (B,) or (B and (int(lengths.min()) < 1 or int(lengths.max()) > L)):
            raise ValueError(f"lengths must be {B} ints in [1, {L}], got {lengths.tolist()}")
        if max_seqlen is not None and max_seqlen < int(lengths.max()):
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest caption ({int(lengths.max())})")
        packed, cu = pack(ids, lengths.to(ids.device, non_blocking=True), total=int(lengths.sum()))
        return packed, cu, max_seqlen if max_seqlen is not None else int(lengths.max())

    def _check_packed(self, ids, cu_seqlens, max_seqlen):
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("packed ids [T] need cu_seqlens [B+1] and a host int max_seqlen")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not 1 <= max_seqlen:
            raise TypeError(f"max_seqlen must be a positive host int, got {max_seqlen!r}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a [B+1] int tensor, got {getattr(cu_seqlens, 'shape', cu_seqlens)}"
            )
        if _validation.index_checks_enabled(cu_seqlens):  # CPU tensors (or FASTCLIP_CHECK_INDICES=1)
            lengths = cu_seqlens.diff()
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != ids.shape[0] or int(lengths.min()) < 1:
                raise ValueError(
                    f"cu_seqlens must rise strictly from 0 to len(ids) = {ids.shape[0]} (no empty caption), "
                    f"got {cu_seqlens.tolist()}"
                )
            if int(lengths.max()) > max_seqlen:
                raise ValueError(
                    f"max_seqlen={max_seqlen} is below the longest caption ({int(lengths.max())})"
                )
        return cu_seqlens.to(device=ids.device, dtype=torch.int32, non_blocking=True)

    def forward(self, ids, cu_seqlens=None, max_seqlen=None, *, lengths=None):
        """Text embeddings [B, output_dim].

        Packed: ids [T] int64 with cu_seqlens [B+1] (int32 on ids' device, or a CPU tensor that is
        checked and copied) and ``max_seqlen`` (host int >= the longest caption). Padded: ids
        [B, L] with host ``lengths`` (list or CPU tensor; default for CPU ids: one past the last
        non-pad token, i.e. the EOT of CLIP-tokenized captions); padding is dropped.
        Positions restart at 0 in every caption; the last token of each caption is pooled.
        """
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"ids must be an int64 tensor of token ids, got {getattr(ids, 'dtype', type(ids))}"
            )
        if ids.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError("padded ids [B, L] take lengths=, not cu_seqlens")
            ids, cu_seqlens, max_seqlen = self._pack_padded(ids, lengths, max_seqlen)
        elif ids.dim() == 1:
            cu_seqlens = self._check_packed(ids, cu_seqlens, max_seqlen)
        else:
            raise ValueError(f"ids must be packed [T] or padded [B, L], got shape {tuple(ids.shape)}")
        if max_seqlen > self.context_length:
            raise ValueError(f"max_seqlen={max_seqlen} exceeds context_length={self.context_length}")
        T = ids.shape[0]
        steps = torch.arange(T, device=ids.device, dtype=torch.int32)
        seq = torch.searchsorted(cu_seqlens[1:].contiguous(), steps, right=True)
        positions = steps - cu_seqlens[seq]
        x = self.token_embedding(ids) + self.positional_embedding[positions.long()]
        x = self.transformer(x, cu_seqlens, max_seqlen, causal=True, backend=self.attn_backend)
        pooled = x[cu_seqlens[1:].long() - 1]  # last token of each caption: CLIP's EOT
        return self.ln_final(pooled) @ self.text_projection
