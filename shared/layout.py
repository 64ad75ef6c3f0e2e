"""The token layout: the one place where token positions are declared.

Every sequence the library touches is ordered

    [CLS x num_cls][trained registers x num_trained_registers][patches][test-time registers]

or, for models that position the tokens after the prefix by counting from the end (rotary
embeddings applied to the last num_patches tokens, as in DINOv3), with ``registers_after_prefix``:

    [CLS x num_cls][trained registers x num_trained_registers][test-time registers][patches]

Every slice in the library comes from a :class:`TokenLayout`. The number of patches is
never stored: it follows from the sequence length, so one layout serves every image size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class TokenLayout:
    num_cls: int = 1
    num_trained_registers: int = 0
    num_test_time_registers: int = 0
    registers_after_prefix: bool = False

    def __post_init__(self):
        for name in ("num_cls", "num_trained_registers", "num_test_time_registers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")

    @property
    def num_prefix(self) -> int:
        """CLS plus trained registers: the tokens before the patches."""
        return self.num_cls + self.num_trained_registers

    def with_test_time_registers(self, count: int) -> "TokenLayout":
        return replace(self, num_test_time_registers=count)

    def num_patches(self, seq_len: int) -> int:
        count = seq_len - self.num_prefix - self.num_test_time_registers
        if count < 0:
            raise InvalidArgumentError(f"a sequence of {seq_len} tokens is too short for {self}")
        return count

    def cls(self) -> slice:
        return slice(0, self.num_cls)

    def prefix(self) -> slice:
        """CLS and trained registers."""
        return slice(0, self.num_prefix)

    def trained_registers(self) -> slice:
        return slice(self.num_cls, self.num_prefix)

    def patches(self, seq_len: int) -> slice:
        start = self.num_prefix + (self.num_test_time_registers if self.registers_after_prefix else 0)
        return slice(start, start + self.num_patches(seq_len))

    def test_time_registers(self, seq_len: int) -> slice:
        # Written with explicit bounds: a count of zero gives an empty slice, never x[-0:].
        start = self.num_prefix if self.registers_after_prefix else self.num_prefix + self.num_patches(seq_len)
        return slice(start, start + self.num_test_time_registers)

    def image_tokens(self, seq_len: int) -> slice | torch.Tensor:
        """CLS, trained registers and patches: everything but the test-time registers.

        A slice, or a long index tensor when test-time registers sit between the prefix and the patches.
        """
        if not self.registers_after_prefix or not self.num_test_time_registers:
            return slice(0, self.num_prefix + self.num_patches(seq_len))
        patches = self.patches(seq_len)
        return torch.cat([torch.arange(self.num_prefix), torch.arange(patches.start, patches.stop)])

    def parts(self, seq_len: int, *, cls: bool = False, trained_registers: bool = False,
              patches: bool = False, test_time_registers: bool = False) -> tuple[slice, ...]:
        """The named token groups as slices in token order, empty ones left out.

        Reading ``tokens[:, part]`` for each part, and not ``tokens[:, mask]``, keeps every
        position static: no data-dependent ``nonzero``, so no graph break under ``torch.compile``.
        """
        named = ((cls, self.cls()), (trained_registers, self.trained_registers()),
                 (patches, self.patches(seq_len)), (test_time_registers, self.test_time_registers(seq_len)))
        chosen = [part for wanted, part in named if wanted and part.stop > part.start]
        return tuple(sorted(chosen, key=lambda part: part.start))

    def mask(self, seq_len: int, *, cls: bool = False, trained_registers: bool = False,
             patches: bool = False, test_time_registers: bool = False,
             device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean [seq_len] mask selecting the named token groups (for ``torch.where``; read with :meth:`parts`)."""
        selected = torch.zeros(seq_len, dtype=torch.bool, device=device)
        for part in self.parts(seq_len, cls=cls, trained_registers=trained_registers, patches=patches,
                               test_time_registers=test_time_registers):
            selected[part] = True
        return selected


def gather_parts(tokens: torch.Tensor, parts: tuple[slice, ...]) -> torch.Tensor:
    """``tokens`` [B, L, ...] at the positions of ``parts`` (dimension 1), in order: [B, T, ...]."""
    if len(parts) == 1:
        return tokens[:, parts[0]]
    return torch.cat([tokens[:, part] for part in parts], dim=1)


def extend_pairwise(pairwise: torch.Tensor, extra: int) -> torch.Tensor:
    """A pairwise tensor [..., L, L] (an attention bias or mask) for ``extra`` tokens appended after
    position L - 1, each paired like token 0: it gets token 0's row, its column and its diagonal entry.

    Returns [..., L + extra, L + extra]. With token 0 the CLS token, a register gets the bias of
    attending to and from CLS; with a padding mask, it attends and is attended like a valid token.
    """
    leading = pairwise.shape[:-2]
    rows = torch.cat([pairwise, pairwise[..., :1, :].expand(*leading, extra, pairwise.shape[-1])], dim=-2)
    columns = rows[..., :, :1].clone()
    columns[..., -extra:, :] = pairwise[..., :1, :1]
    return torch.cat([rows, columns.expand(*rows.shape[:-1], extra)], dim=-1)
