"""Fixed position encodings for the SiT: 2D sin-cos absolute embedding and 2D rotary embedding (RoPE)."""
import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 1D positions (MAE convention: sines then cosines). Returns (len(positions), dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding for a grid_size x grid_size token grid, row-major.

    The first half of the channels encodes the column index, the second half the row index (MAE/DiT layout).
    Returns a float32 tensor of shape (grid_size**2, dim).
    """
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return emb.float()


def rope_2d_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables of 2D rotary embedding (EVA-02 style) for a row-major grid.

    The first half of each head rotates with the row index, the second half with the column index; within a half,
    channels are rotated in adjacent pairs (2i, 2i+1) at frequency theta^(-2i/half). Returns two (grid_size**2,
    head_dim) float32 tensors.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
    angles_1d = torch.arange(grid_size, dtype=torch.float32)[:, None] * freqs
    angles_1d = angles_1d.repeat_interleave(2, dim=1)
    rows = angles_1d[:, None, :].expand(grid_size, grid_size, half)
    cols = angles_1d[None, :, :].expand(grid_size, grid_size, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Map adjacent channel pairs (a, b) to (-b, a): the 90 degree rotation used by RoPE."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (..., tokens, head_dim) by tables broadcastable to it."""
    return x * cos + rotate_pairs(x) * sin


def apply_rope_paired(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` for tables whose channel pairs (2i, 2i+1) hold equal values, as `rope_2d_tables` makes them:
    the same numbers, computed from each pair once in one elementwise pass (queries and keys stacked into one x
    are rotated together)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., ::2], sin[..., ::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
