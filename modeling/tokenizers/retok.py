"""ReTok: a flexible-length 1D image tokenizer (Fu et al., "Improving Flexible Image Tokenizers for
Autoregressive Image Generation", arXiv 2601.01535), built on GigaTok's hybrid CNN + Q-former tokenizer.

Released tokenizer `VQ_SB256_e250.pt` (Google Drive, see `utils.weights.PUBLISHED`):
256x256 RGB -> 256 ordered tokens from a 16384 x 8 L2-normalised codebook; any prefix of 1..256 tokens decodes
to an image. The pipeline, as the original's `VQVitModelPlus` runs it at inference:

- encode: CNN encoder (f16) -> 16x16 feature map -> Q-former encoder: 256 1D queries, pooled from the map at
  coarse-to-fine levels, plus 224 *redundant* copies of queries 32..255 (ReTok's redundant token padding), attend to
  the map -> the first 256 latents -> 1x1 conv to 8 dims -> nearest L2-normalised codebook entry.
- decode the first k tokens: codebook vectors -> 1x1 conv -> Q-former decoder: 16x16 2D queries (all the first
  token's embedding plus their 2D positions) attend to the k token embeddings (positions 0..k-1) -> CNN decoder
  with adaptive GroupNorm and depth-to-space upsampling -> RGB in [-1, 1], returned as [0, 1].

State-dict names are the original's, so the released checkpoint loads with strict=True. Only the inference path of
the released configuration (configs/vq/VQ_SB256.yaml, and VQ_SS256 which differs in decoder size) is implemented;
a config that selects another path is refused by name. Two released modules serve training only and are built so
that the checkpoint loads strictly: the decoder's `distill_mlp` (the semantic regularisation head) and the
quantizer's `codebook_used` buffer (a usage statistic); the redundant queries' decoder positions
(`latent_token_positional_embedding_comp`) are read only by a decoder given more than 256 tokens, which this
interface does not offer.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.weights import load_checked, load_state_dict_file, resolve_weights, unwrap

from .base import SequenceTokenizer

# The original's ViT size table: name -> (width, layers, heads).
VIT_SIZES = {
    "tiny": (256, 4, 4),
    "small": (512, 6, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "xl": (1280, 36, 20),
    "xxl": (1536, 48, 24),
    "xxxl": (2560, 48, 40),
}

# configs/vq/VQ_SB256.yaml `model.init_args` that define the architecture (`out_inner_dim` is what the original's
# loader sets for its DINOv2-B distillation target), then three sizes the original fixes in code rather than config.
RELEASED_CONFIG = {
    "codebook_size": 16384,
    "codebook_embed_dim": 8,
    "codebook_l2_norm": True,
    "codebook_show_usage": True,
    "encoder_ch_mult": [1, 1, 2, 2, 4],
    "decoder_ch_mult": [1, 1, 2, 2, 4],
    "model_size": None,
    "encoder_size": "small",
    "decoder_size": "base",
    "num_latent_tokens": 256,
    "z_channels": 256,
    "multi_level_query_init": True,
    "last_level_2d_query_init": False,
    "multi_level_2d_query_init": False,
    "adaptive_gn": True,
    "d2s_up": True,
    "use_attn": False,
    "distill_depth": 3,
    "out_inner_dim": 768,
    "image_size": 256,  # the ViTs' default image_size
    "ch": 128,  # the CNNs' default base width
    "vit_sizes": VIT_SIZES,  # a config may name other sizes, as the tests do for tiny ones
}
# init_args of the original that only shape training (losses, dropout, the rotation trick's gradients): accepted.
TRAINING_ONLY_KEYS = ("commit_loss_beta", "entropy_loss_ratio", "dropout_p", "rot", "fea_rec_loss_type",
                      "fea_rec_loss_weight")
# Architecture switches whose released value is the only implemented one.
RELEASED_PATH = {
    "codebook_l2_norm": True,
    "multi_level_query_init": True,
    "last_level_2d_query_init": False,
    "multi_level_2d_query_init": False,
    "adaptive_gn": True,
    "d2s_up": True,
    "use_attn": False,
    "num_latent_tokens": 256,
}
# The original hard-codes its redundant token padding: queries 32..255 are repeated after the 256.
FIRST_REPEATED_QUERY = 32


def resolve_config(config: Optional[Mapping[str, Any]]) -> dict:
    """The released config updated by `config`; unknown keys and unimplemented paths are errors."""
    config = {k: v for k, v in dict(config or {}).items() if k not in TRAINING_ONLY_KEYS}
    unknown = sorted(set(config) - set(RELEASED_CONFIG))
    if unknown:
        raise ValueError(f"unknown ReTok config keys {unknown}; known keys: {sorted(RELEASED_CONFIG)}")
    c = {**RELEASED_CONFIG, **config}
    for key, value in RELEASED_PATH.items():
        if c[key] != value:
            raise ValueError(f"ReTok: only {key}={value} (the released VQ_SB256 path) is implemented, got {c[key]}")
    for part in ("encoder", "decoder"):
        size = c[f"{part}_size"] or c["model_size"]
        if size not in c["vit_sizes"]:
            raise ValueError(f"ReTok: unknown {part}_size {size!r}; known: {sorted(c['vit_sizes'])}")
    grid = c["image_size"] // 2 ** (len(c["encoder_ch_mult"]) - 1)
    # The 256 multi-level queries pool the encoder's map down to blocks of 16 columns x 8 rows at the finest level.
    if grid % 16:
        raise ValueError(f"ReTok: the encoder grid (image_size / 2^(len(encoder_ch_mult) - 1) = {grid}) "
                         "must be a multiple of 16")
    c["encoder_ch_mult"], c["decoder_ch_mult"] = list(c["encoder_ch_mult"]), list(c["decoder_ch_mult"])
    return c


def config_from_vq_model(vq: Mapping[str, Any]) -> dict:
    """The ReTok config in a reAR config's `model.vq_model` section (the original init_args' names)."""
    fixed_in_code = ("image_size", "ch", "vit_sizes")
    return {key: vq[key] for key in RELEASED_CONFIG if key not in fixed_in_code}


# ---------------------------------------------------------------------------------------------------------------
# Shared layers


def swish(x: Tensor) -> Tensor:
    # The original's formula; F.silu rounds differently.
    return x * torch.sigmoid(x)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=affine)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters, computed as its weights-returning path does
    (scaled queries, softmax, no fused kernel): what the original runs."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """(B, L, W) queries attend to (B, S, W) keys / values."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (self._split_heads(F.linear(x, w, b)) for x, w, b in
                   ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        q = q * math.sqrt(1.0 / q.shape[-1])
        out = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1), v)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class QFormerLayer(nn.Module):
    """DETR's pre-norm decoder layer: self-attention among the queries, cross-attention to the memory, MLP.
    Positions are added to queries and keys, not to values."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = Attention(width, heads)
        self.multihead_attn = Attention(width, heads)
        self.linear1 = nn.Linear(width, 4 * width)
        self.linear2 = nn.Linear(4 * width, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        h = self.norm1(queries)
        q = h + query_pos
        queries = queries + self.self_attn(q, q, h)
        h = self.norm2(queries)
        queries = queries + self.multihead_attn(h + query_pos, memory + memory_pos, memory)
        return queries + self.linear2(F.gelu(self.linear1(self.norm3(queries))))


def positions(count: int, width: int) -> nn.Parameter:
    # (L, 1, W): the original's sequence-first layout, kept for the state dict.
    return nn.Parameter(torch.randn(count, 1, width) * width**-0.5)


def batch_first(pos: nn.Parameter) -> Tensor:
    return pos.transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Q-former encoder: 2D feature map -> 1D latent tokens


def multi_level_pooling(x: Tensor, levels: int) -> Tensor:
    """(B, C, H, W) -> (B, 2^levels, C): the map averaged over 1, 1, 2, 4, ..., 2^(levels-1) blocks, coarse to
    fine; the number of block columns doubles first, then the rows."""
    groups = []
    for group in range(levels + 1):
        level = max(group - 1, 0)
        rows, cols = 2 ** (level // 2), 2 ** ((level + 1) // 2)
        pooled = F.avg_pool2d(x, kernel_size=(x.shape[2] // rows, x.shape[3] // cols))
        groups.append(pooled.flatten(2).transpose(1, 2))
    return torch.cat(groups, dim=1)


class QFormerEncoder(nn.Module):
    """`s2to1encoder`: 256 latent queries, initialised by multi-level pooling of the feature map, attend to it."""

    def __init__(self, c: dict):
        super().__init__()
        width, layers, heads = c["vit_sizes"][c["encoder_size"] or c["model_size"]]
        self.grid = c["image_size"] // 2 ** (len(c["encoder_ch_mult"]) - 1)
        self.num_latent_tokens = c["num_latent_tokens"]
        self.ln_pre = nn.LayerNorm(c["z_channels"])
        self.encoder_embed = nn.Linear(c["z_channels"], width)
        self.positional_embedding = positions(self.grid**2, width)
        self.latent_token_positional_embedding = positions(self.num_latent_tokens, width)
        self.latent_token_positional_embedding_comp = positions(self.num_latent_tokens - FIRST_REPEATED_QUERY, width)
        self.global_proj = nn.Linear(width, width)
        self.transformer = nn.ModuleList(QFormerLayer(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, c["z_channels"], kernel_size=1)

    def forward(self, feature_map: Tensor) -> Tensor:
        """(B, z, grid, grid) -> latents (B, z, 1, num_latent_tokens): a 1 x N map, the original's layout."""
        x = self.encoder_embed(self.ln_pre(feature_map.flatten(2).transpose(1, 2)))  # (B, grid^2, width)
        queries = multi_level_pooling(x.transpose(1, 2).unflatten(2, (self.grid, self.grid)),
                                      round(math.log2(self.num_latent_tokens)))
        # Redundant token padding: the tail queries again, with positions of their own (`_comp`).
        queries = self.global_proj(torch.cat([queries, queries[:, FIRST_REPEATED_QUERY:]], dim=1))
        query_pos = batch_first(torch.cat([self.latent_token_positional_embedding,
                                           self.latent_token_positional_embedding_comp]))
        memory_pos = batch_first(self.positional_embedding)
        for layer in self.transformer:
            queries = layer(queries, query_pos, x, memory_pos)
        # The redundant latents have done their part (through self-attention); no decoding path reads them.
        latents = self.ln_post(queries)[:, : self.num_latent_tokens]
        # Contiguous, as the original's reshape leaves it: the 1x1 convs round differently on a channels-last layout.
        return self.conv_out(latents.transpose(1, 2).unsqueeze(2).contiguous())


# ---------------------------------------------------------------------------------------------------------------
# Q-former decoder: 1D tokens (any prefix) -> 2D feature map


class QFormerDecoder(nn.Module):
    """`s1to2decoder`: a grid of 2D queries, all starting as the first token's embedding, attend to the tokens."""

    def __init__(self, c: dict):
        super().__init__()
        width, layers, heads = c["vit_sizes"][c["decoder_size"] or c["model_size"]]
        self.grid = c["image_size"] // 2 ** (len(c["decoder_ch_mult"]) - 1)
        num_latent_tokens = c["num_latent_tokens"]
        self.ln_pre = nn.LayerNorm(c["z_channels"])
        self.decoder_embed = nn.Linear(c["z_channels"], width)
        self.positional_embedding = positions(self.grid**2, width)
        self.latent_token_positional_embedding = positions(num_latent_tokens, width)
        self.latent_token_positional_embedding_comp = positions(num_latent_tokens - FIRST_REPEATED_QUERY, width)
        self.transformer = nn.ModuleList(QFormerLayer(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, c["z_channels"], kernel_size=3, padding=1)
        if c["distill_depth"] is not None:
            # Training only: maps the features after block `distill_depth` to DINOv2's width for ReTok's
            # hierarchical semantic regularisation. Built so that the released state dict loads strictly.
            self.distill_mlp = nn.Sequential(
                nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width), nn.SiLU(),
                nn.Linear(4 * width, c["out_inner_dim"]),
            )

    def forward(self, tokens: Tensor) -> Tensor:
        """Token features (B, k, z), the first k of a sequence -> feature map (B, z, grid, grid)."""
        x = self.decoder_embed(self.ln_pre(tokens))
        queries = x[:, :1].expand(-1, self.grid**2, -1)
        query_pos = batch_first(self.positional_embedding)
        token_pos = batch_first(self.latent_token_positional_embedding[: tokens.shape[1]])
        for layer in self.transformer:
            queries = layer(queries, query_pos, x, token_pos)
        h = self.ln_post(queries).transpose(1, 2).unflatten(2, (self.grid, self.grid))
        return self.conv_out(h.contiguous())


# ---------------------------------------------------------------------------------------------------------------
# CNN encoder and decoder (taming-transformers style, GigaTok's decoder tricks)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


def res_blocks(in_channels: int, out_channels: int, count: int) -> nn.ModuleList:
    """`count` ResnetBlocks; the first maps in -> out channels, the rest out -> out."""
    return nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(count))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class DepthToSpaceUpsample(nn.Module):
    """3x3 conv to 4x the channels, then depth-to-space in DCR order (channel = (row * 2 + col) * C + c; note
    F.pixel_shuffle's order is CRD)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        b, c, height, width = h.shape
        h = h.view(b, 2, 2, c // 4, height, width).permute(0, 3, 4, 1, 5, 2)
        return h.reshape(b, c // 4, 2 * height, 2 * width)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then a per-channel scale and shift from the decoder input's statistics
    (MAGVIT-v2): scale = gamma(std), shift = beta(mean), over each channel of the input map."""

    def __init__(self, style_channels: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gn = group_norm(channels, affine=False)
        self.gamma = nn.Linear(style_channels, channels)
        self.beta = nn.Linear(style_channels, channels)
        self.eps = eps

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        style = style.flatten(2)
        # Unbiased variance (torch's default), as the original computes it.
        scale = self.gamma((style.var(dim=-1) + self.eps).sqrt())[..., None, None]
        shift = self.beta(style.mean(dim=-1))[..., None, None]
        return scale * self.gn(x) + shift


class DownLevel(nn.Module):
    """One resolution of the encoder: two res blocks, then (but the last) a strided-conv downsampler."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.res = res_blocks(in_channels, out_channels, 2)
        if downsample:
            self.downsample = Downsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = block(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class UpLevel(nn.Module):
    """One resolution of the decoder: three res blocks, then (but the last) a depth-to-space upsampler."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool):
        super().__init__()
        self.res = res_blocks(in_channels, out_channels, 3)
        if upsample:
            self.upsample = DepthToSpaceUpsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class Encoder(nn.Module):
    """Images in [-1, 1] -> (B, z, H/f, W/f), f = 2^(levels - 1)."""

    def __init__(self, c: dict):
        super().__init__()
        ch = c["ch"]
        widths = [ch * m for m in c["encoder_ch_mult"]]
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        in_widths = [ch] + widths[:-1]
        self.conv_blocks = nn.ModuleList(
            DownLevel(in_widths[i], widths[i], downsample=i < len(widths) - 1) for i in range(len(widths))
        )
        self.mid = res_blocks(widths[-1], widths[-1], 2)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], c["z_channels"], kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in [*self.conv_blocks, *self.mid]:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1]. Levels run coarse to fine (conv_blocks.0 is the
    coarsest); each starts with an adaptive GroupNorm conditioned on the decoder input."""

    def __init__(self, c: dict):
        super().__init__()
        ch, z = c["ch"], c["z_channels"]
        widths = [ch * m for m in reversed(c["decoder_ch_mult"])]
        self.conv_in = nn.Conv2d(z, widths[0], kernel_size=3, padding=1)
        self.mid = res_blocks(widths[0], widths[0], 2)
        in_widths = [widths[0]] + widths[:-1]
        self.adaptive = nn.ModuleList(AdaptiveGroupNorm(z, w) for w in in_widths)
        self.conv_blocks = nn.ModuleList(
            UpLevel(in_widths[i], widths[i], upsample=i < len(widths) - 1) for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for adaptive, level in zip(self.adaptive, self.conv_blocks):
            h = level(adaptive(h, z))
        return self.conv_out(swish(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------------------------
# Quantizer


class VectorQuantizer(nn.Module):
    """Nearest entry of the L2-normalised codebook to the L2-normalised feature."""

    def __init__(self, codebook_size: int, dim: int, show_usage: bool):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        if show_usage:
            # Training only: the ids of the last 65536 quantized vectors (a usage statistic), kept because the
            # released state dict has it.
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def nearest_codes(self, z: Tensor) -> Tensor:
        """Rows of z (M, dim) -> codebook indices (M,), by ||z||^2 + ||e||^2 - 2 z.e in float32 with the original's
        exact einsum: another formula or precision rounds differently and flips near-ties to other tokens."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), p=2, dim=-1)
            e = self.codebook().float()
            distances = (torch.sum(z**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1)
                         - 2 * torch.einsum("bd,dn->bn", z, e.t()))
        return distances.argmin(dim=1)


# ---------------------------------------------------------------------------------------------------------------


class ReTok(SequenceTokenizer):
    """The frozen tokenizer: `encode` images to 256 tokens, `decode_tokens` from any prefix of them,
    `get_quantized_states` for reAR's alignment heads."""

    decodes_prefixes = True  # a generator may model only the first k tokens
    # The original's samplers write clamp(127.5 y + 128, 0, 255) of the [-1, 1] output y as uint8: rounded bytes.
    pixel_rounding = "nearest"

    def __init__(self, config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.config = c = resolve_config(config)
        self.encoder = Encoder(c)
        self.s2to1encoder = QFormerEncoder(c)
        self.quant_conv = nn.Conv2d(c["z_channels"], c["codebook_embed_dim"], kernel_size=1)
        self.quantize = VectorQuantizer(c["codebook_size"], c["codebook_embed_dim"], c["codebook_show_usage"])
        self.post_quant_conv = nn.Conv2d(c["codebook_embed_dim"], c["z_channels"], kernel_size=1)
        self.s1to2decoder = QFormerDecoder(c)
        self.decoder = Decoder(c)
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str, config: Optional[Mapping[str, Any]] = None) -> "ReTok":
        """Load weights strictly, weights-only: the released training checkpoint (`VQ_SB256_e250.pt`, its "ema"
        state dict if it has one, else "model", as the original's evaluation scripts choose) or a plain state dict
        (`.pt`, `.bin`, `.safetensors`). Without `config`, the released architecture."""
        state_dict = load_retok_state_dict(resolve_weights(path))  # first: a missing file fails before building
        return load_checked(cls(config), state_dict, what=f"ReTok weights {path}")

    @torch.no_grad()
    def encode_features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the features that are quantized (B, num_tokens, token_size)."""
        self.check_images(images)
        latents = self.s2to1encoder(self.encoder((images - 0.5) / 0.5))  # the original's Normalize(0.5, 0.5)
        return self.quant_conv(latents).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> tokens (B, num_tokens), coarse to fine."""
        features = self.encode_features(images)
        return self.quantize.nearest_codes(features.reshape(-1, self.token_size)).reshape(features.shape[:2])

    @torch.no_grad()
    def get_quantized_states(self, tokens: Tensor) -> Tensor:
        """Tokens (B, k) -> their L2-normalised codebook vectors (B, k, token_size)."""
        if tokens.dim() == 2 and not 1 <= tokens.shape[1] <= self.num_tokens:
            raise ValueError(f"ReTok decodes 1 to {self.num_tokens} tokens per image, got {tokens.shape[1]}")
        return super().get_quantized_states(tokens)

    def codebook_vectors(self, tokens: Tensor) -> Tensor:
        return self.quantize.codebook()[tokens]

    @torch.no_grad()
    def decode_raw(self, tokens: Tensor) -> Tensor:
        """The first k tokens (B, k), 1 <= k <= num_tokens -> the decoder's output (B, 3, H, W), about [-1, 1]."""
        codes = self.get_quantized_states(tokens).transpose(1, 2).unsqueeze(2).contiguous()  # (B, dim, 1, k)
        token_features = self.post_quant_conv(codes).flatten(2).transpose(1, 2)
        return self.decoder(self.s1to2decoder(token_features))

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """The first k tokens (B, k), 1 <= k <= num_tokens -> images (B, 3, H, W) clamped to [0, 1]."""
        return ((self.decode_raw(tokens) + 1.0) / 2.0).clamp(0.0, 1.0)

def load_retok_state_dict(path: str) -> dict:
    """The state dict in a ReTok weights file. The released `.pt` is a training checkpoint
    {"model", "ema"?, "optimizer", "discriminator", "optimizer_disc", "steps", "args"}: its "ema" weights if it has
    them, else "model", as the original's evaluation scripts choose; or a plain state dict."""
    return unwrap(load_state_dict_file(path), ("ema", "model", "state_dict"), path)
