"""vcrd/core/checks.py: the row view never copies the logits, whatever their layout."""

from __future__ import annotations

import pytest
import torch

from vcrd import VCRDConfig
from vcrd.core.checks import prepare


def _shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize("layout", ["packed", "batched", "shifted", "vocab-cut"])
def test_row_view_is_a_view(layout):
    B, T, V = 3, 11, 37
    s_full, u_full = torch.randn(B, T, V + 5), torch.randn(B, T, V + 5)
    if layout == "packed":
        s, u, labels = s_full[..., :V].reshape(-1, V).contiguous(), u_full[..., :V].reshape(-1, V).contiguous(), None
        base_s = s
    elif layout == "batched":
        s, u, base_s = s_full[..., :V].contiguous(), u_full[..., :V].contiguous(), None
        base_s = s
    elif layout == "shifted":  # logits[:, :-1]: its rows cannot be flattened without a copy
        s, u, base_s = s_full[:, :-1, :V], u_full[:, :-1, :V], s_full
    else:  # a padded teacher vocabulary, compared on the first V columns
        s, u, base_s = s_full[..., :V].contiguous(), u_full, None
        base_s = s
    labels = torch.randint(0, V, s.shape[:-1])
    batch = prepare(s, u, labels, None, None, VCRDConfig(), V if layout == "vocab-cut" else None)
    assert _shares_storage(batch.s, base_s)
    rows = [r1 - r0 for r0, r1, cs, cu in batch.chunks(4)]
    assert sum(rows) == labels.numel()
    for r0, r1, cs, cu in batch.chunks(4):
        assert _shares_storage(cs, base_s) and cs.shape == (r1 - r0, V) and cu.shape == (r1 - r0, V)
        torch.testing.assert_close(cs, s.reshape(-1, s.shape[-1])[r0:r1, :V])
